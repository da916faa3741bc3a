"""`polygon-streamer redis-sub`: a consumer-group reader of the Redis sink's streams (XREADGROUP, then XACK once the
records are printed), to show and test many consumers sharing one stream: each record goes to one consumer of the
group. Prints each record line (the schema's), or counts them."""

from __future__ import annotations

import signal
import sys
import threading
import time

from . import protocol
from .config import Config
from .sinks.redis import connect, stream_keys

READ_COUNT = 1000
BLOCK_MS = 200
IDLE_SECS = 0.05


def _join_groups(client, keys: list[str], group: str, consumer: str, from_start: bool) -> None:
    """Create the group on every key (or join it), and this consumer in it, so XINFO shows it before data comes."""
    import redis.exceptions

    for key in keys:
        try:
            client.xgroup_create(key, group, id="0" if from_start else "$", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):  # the group exists: join it
                raise
        client.xgroup_createconsumer(key, group, consumer)


def run(config: Config, group: str, consumer: str, count_only: bool, max_records: int, from_start: bool) -> int:
    client = connect(config)
    keys = stream_keys(config, protocol.KINDS + ("gap",))
    _join_groups(client, keys, group, consumer, from_start)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    out = sys.stdout.buffer
    received = 0
    window = 0
    next_report = time.monotonic() + 1.0
    # One XREADGROUP over every key can block; on a cluster the keys live on different nodes: one read per key.
    together = not config.redis_cluster
    while not stop.is_set() and (not max_records or received < max_records):
        wanted = READ_COUNT if not max_records else min(READ_COUNT, max_records - received)
        if together:
            replies = client.xreadgroup(group, consumer, {key: ">" for key in keys}, count=wanted, block=BLOCK_MS)
        else:
            replies = []
            for key in keys:
                reply = client.xreadgroup(group, consumer, {key: ">"}, count=wanted) or []
                replies += reply
                wanted -= sum(len(entries) for _key, entries in reply)
                if wanted <= 0:
                    break  # the rest next round: --max-records is never exceeded
        got = 0
        for key, entries in replies or []:
            if not entries:
                continue
            if not count_only:
                out.write(b"".join(fields[b"record"] + b"\n" for _id, fields in entries))
                out.flush()
            client.xack(key, group, *[entry_id for entry_id, _ in entries])
            got += len(entries)
        received += got
        window += got
        if count_only and time.monotonic() >= next_report:
            print(f"{received} received ({window}/s)", flush=True)
            window = 0
            next_report = time.monotonic() + 1.0
        if not got and not together:
            stop.wait(IDLE_SECS)
    if count_only:
        print(f"{received} received", flush=True)
    client.close()
    return 0
