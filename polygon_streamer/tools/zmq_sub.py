"""`polygon-streamer zmq-sub`: a ZeroMQ subscriber that prints (or counts) what the zmq sink publishes, one
`topic payload` line each (as redis_sub.py is the Redis Streams reader)."""

from __future__ import annotations

import signal
import sys
import time

import click
import zmq

from ..config import ConfigError


def run(endpoint: str, connect: bool, topics: tuple[str, ...], count_only: bool, max_messages: int) -> int:
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    for prefix in topics or ("",):
        sock.setsockopt(zmq.SUBSCRIBE, prefix.encode("utf-8"))
    try:
        sock.connect(endpoint) if connect else sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        context.term()
        raise ConfigError(f"invalid ZMQ_ENDPOINT (--endpoint) {endpoint!r}: cannot "
                          f"{'connect' if connect else 'bind'}: {exc.strerror}") from None
    stop = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.append(True))
    click.echo(f"zmq-sub: {'connected to' if connect else 'bound at'} {endpoint}"
               f"{' (topics ' + ', '.join(topics) + ')' if topics else ''}; waiting for messages (Ctrl-C to stop)",
               err=True)
    received = 0
    window = 0
    next_report = time.monotonic() + 1.0
    out = sys.stdout.buffer
    while not stop and (not max_messages or received < max_messages):
        if not sock.poll(200):
            continue
        # Drain what is queued without a poll per message, so a counting subscriber keeps up with the firehose.
        while not max_messages or received < max_messages:
            try:
                topic, payload = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            received += 1
            window += 1
            if not count_only:
                out.write(topic + b" " + payload + b"\n")
        out.flush()
        now = time.monotonic()
        if count_only and now >= next_report:
            # (from now, not from the last deadline: after an idle start that would be a line per message)
            click.echo(f"{received} received ({window / (now - next_report + 1.0):.0f}/s)")
            window = 0
            next_report = now + 1.0
    if count_only:
        click.echo(f"{received} received")
    sock.close(0)
    context.term()
    return 0
