"""`polygon-streamer subscriptions`: what a running service is subscribed to, read from its GET /subscriptions: each
topic's state (pending, active, refused) as a table, or the JSON as it is."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import click


def show(host_port: str, as_json: bool) -> int:
    url = f"http://{host_port}/subscriptions"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the service is local: no proxy
    try:
        with opener.open(url, timeout=5) as response:
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, OSError) as exc:
        click.echo(f"polygon-streamer: cannot read {url}: {getattr(exc, 'reason', exc)} (is the service running "
                   "with this METRICS_ADDR?)", err=True)
        return 1
    if as_json:
        click.echo(text, nl=False)
        return 0
    state = json.loads(text)
    topics = state["topics"]
    width = max([len("TOPIC")] + [len(topic) for topic in topics])
    click.echo(f"{'TOPIC':<{width}}  {'STATE':<8}  MESSAGE")
    for topic, entry in topics.items():
        click.echo(f"{topic:<{width}}  {entry['state']:<8}  {entry.get('message', '')}".rstrip())
    counts = state["counts"]
    click.echo(f"{len(topics)} topic(s) from {state['source']}: " + ", ".join(f"{counts[k]} {k}" for k in counts))
    return 0
