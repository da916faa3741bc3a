"""`polygon-streamer redis-sub`: a consumer-group reader of the Redis sink's streams (XREADGROUP, then XACK once the
records are printed), to show and test many consumers sharing one stream: each record goes to one consumer of the
group. Prints each record line (the schema's), or counts them."""

from __future__ import annotations

import signal
import sys
import threading
import time

from .. import protocol
from ..config import Config
from ..sinks.redis import connect, stream_keys

READ_COUNT = 1000
BLOCK_MS = 200
IDLE_SECS = 0.05
# Redis went away after the start: retry, waiting this long, doubling up to the ceiling (a reader outlives restarts).
RETRY_SECS = (0.1, 5.0)


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
    """Redis not there at the start is a configuration error (the caller's exit 2); Redis lost later is retried with
    backoff, one line on stderr per outage, until it is back or SIGTERM/SIGINT."""
    client = connect(config)  # first: without redis-py, one line (SinkConfigError) instead of an import traceback
    import redis.exceptions

    keys = stream_keys(config, protocol.KINDS + ("gap", "backfill"))
    _join_groups(client, keys, group, consumer, from_start)
    print(f"redis-sub: reading {len(keys)} stream(s) of {config.redacted()['redis_url']} as {consumer} in group "
          f"{group}; waiting for records (Ctrl-C to stop)", file=sys.stderr, flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    reader = _Reader(client, keys, group, consumer, count_only, max_records, not config.redis_cluster)
    delay = RETRY_SECS[0]
    while not stop.is_set() and not reader.done():
        try:
            reader.read_until(stop)
            break
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                redis.exceptions.BusyLoadingError) as exc:
            print(f"redis-sub: lost Redis at {config.redacted()['redis_url']} ({config.redact(str(exc))}); retrying "
                  f"every {delay:g}s up to {RETRY_SECS[1]:g}s", file=sys.stderr, flush=True)
        while not stop.wait(delay):
            delay = min(RETRY_SECS[1], delay * 2)
            try:
                _join_groups(client, keys, group, consumer, False)  # (a restarted Redis may have lost the group)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                    redis.exceptions.BusyLoadingError):
                continue
            print("redis-sub: Redis is back", file=sys.stderr, flush=True)
            delay = RETRY_SECS[0]
            break
    if count_only:
        print(f"{reader.received} received", flush=True)
    client.close()
    return 0


class _Reader:
    def __init__(self, client, keys: list[str], group: str, consumer: str, count_only: bool, max_records: int,
                 together: bool):
        self.client = client
        self.keys = keys
        self.group = group
        self.consumer = consumer
        self.count_only = count_only
        self.max_records = max_records
        # One XREADGROUP over every key can block; on a cluster the keys live on different nodes: one read per key.
        self.together = together
        self.received = 0
        self.window = 0
        self.next_report = time.monotonic() + 1.0

    def done(self) -> bool:
        return bool(self.max_records) and self.received >= self.max_records

    def read_until(self, stop: threading.Event) -> None:
        client, group, consumer = self.client, self.group, self.consumer
        out = sys.stdout.buffer
        while not stop.is_set() and not self.done():
            wanted = READ_COUNT if not self.max_records else min(READ_COUNT, self.max_records - self.received)
            if self.together:
                replies = client.xreadgroup(group, consumer, {key: ">" for key in self.keys}, count=wanted,
                                            block=BLOCK_MS)
            else:
                replies = []
                for key in self.keys:
                    reply = client.xreadgroup(group, consumer, {key: ">"}, count=wanted) or []
                    replies += reply
                    wanted -= sum(len(entries) for _key, entries in reply)
                    if wanted <= 0:
                        break  # the rest next round: --max-records is never exceeded
            got = 0
            for key, entries in replies or []:
                if not entries:
                    continue
                if not self.count_only:
                    out.write(b"".join(fields[b"record"] + b"\n" for _id, fields in entries))
                    out.flush()
                client.xack(key, group, *[entry_id for entry_id, _ in entries])
                got += len(entries)
            self.received += got
            self.window += got
            now = time.monotonic()
            if self.count_only and now >= self.next_report:
                print(f"{self.received} received ({self.window / (now - self.next_report + 1.0):.0f}/s)", flush=True)
                self.window = 0
                self.next_report = now + 1.0
            if not got and not self.together:
                stop.wait(IDLE_SECS)
