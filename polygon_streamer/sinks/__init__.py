"""Sinks behind one small interface, each fed by its own bounded queue and thread.

A batch is (ingest_ms, records): the records of one hand-over (the frames one socket read completed, see reader.py;
normalize.py for the records) and when they were received; STOP ends the stream.
"""

from __future__ import annotations

import importlib
import os
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Iterable, Sequence

from .. import logs
from ..metrics import WRITE_LATENCY_BUCKETS, LatencyHistogram
from ..threads import ServiceThread

if TYPE_CHECKING:
    from ..normalize import FrameNormalizer

STOP = None
TICK_SECS = 0.1

# The sink table: each SINK name and the module.class that builds it (imported only when chosen: pyzmq, redis-py and
# confluent-kafka are needed only by their sinks). A new sink is its module, its settings in config.py and one row here.
SINKS = {
    "stdout": "stdout.StdoutSink",
    "ndjson": "ndjson.NdjsonSink",
    "zmq": "zmq.ZmqSink",
    "capture": "capture.CaptureSink",
    "redis": "redis.RedisSink",
    "gateway": "gateway.GatewaySink",
    "kafka": "kafka.KafkaSink",
}
SINK_NAMES = tuple(SINKS)

_log = logs.get("polygon_streamer")


class Sink:
    """What a sink does; all methods run on the sink's own thread."""

    name = "sink"
    # What the sink is fed: the records of every event ("records"); the same as FramedBatch, which says which frame
    # each live record came from ("frames": the gateway, which sends what Polygon sent frame by frame); or every
    # message as received ("wire": the capture's batches, sinks.capture; the dispatcher passes them on, the reader
    # holds them while the inbound queue is full).
    takes = "records"
    # > 0: the thread hands every batch already queued, up to this many events, to one write_batches call (a sink
    # with a round trip per write, such as Redis, pays it once for all of them).
    coalesce_events = 0
    # Whether its batches also hold the events of topics its own clients added upstream (the gateway's
    # GATEWAY_UPSTREAM=union): records of kind normalize.EXTRA, with no seq; no other sink ever sees them.
    extra_topics = False
    # An offline tool's (reprocess): a sink whose writes have failed this long gives up (SinkClosed) instead of
    # waiting for a disk that may never come back; the service rides such failures out (None).
    stall_limit_secs: float | None = None

    @classmethod
    def from_config(cls, config) -> "Sink":
        """The sink as the configuration says (every sink builds itself)."""
        return cls(config)  # type: ignore[call-arg]

    @staticmethod
    def queue_settings(config) -> tuple[int, bool, float]:
        """Its queue: (capacity in batches, whether a full queue drops (counted) instead of making the dispatcher
        wait, the interval between its drop warnings)."""
        raise NotImplementedError

    def __init__(self) -> None:
        # Frame received -> its events handed to the OS; observed by the sink when that happens.
        self.write_latency = LatencyHistogram(WRITE_LATENCY_BUCKETS)
        self.thread: SinkThread | None = None  # set by SinkThread

    def observe_written(self, ingest_ms: int, events: int) -> None:
        self.write_latency.observe(time.time() - ingest_ms / 1000.0, events)

    def destination(self) -> str | None:
        """Where it writes, for the start-up line (a secret redacted), or None."""
        return None

    def files(self) -> list[str]:
        """The files it writes (config --check removes those the check itself created)."""
        return []

    def start_warnings(self, config) -> list[str]:
        """What the start must warn of about this sink's configuration (after open)."""
        return []

    def open(self) -> None:
        """Acquire files/sockets. Raise SinkConfigError for a problem the operator must fix (exit 2)."""

    def check(self) -> str | None:
        """config --check, after open: what it learned of a remote destination (one line), or None; SinkConfigError
        when that destination cannot be reached (run would start and wait for it)."""
        return None

    def write(self, records: list, ingest_ms: int) -> None:
        """records: one batch of what the sink takes (`takes`): normalized records (tuples), or for "wire" one
        CaptureBatch of messages as received."""
        raise NotImplementedError

    def write_batches(self, batches: list[tuple[int, list[tuple]]]) -> None:
        """With coalesce_events: several queued batches, (ingest_ms, records) each, in order."""
        for ingest_ms, records in batches:
            self.write(records, ingest_ms)

    def degraded(self) -> str | None:
        """Why the sink cannot deliver right now while the process is fine (for /health), or None."""
        return None

    def health_note(self) -> str | None:
        """What /health and STATUS= tell of a healthy sink that serves clients (the gateway's count), or None."""
        return None

    def failed_writes(self) -> int:
        """Writes (or reopens, reconnects) that failed and were retried: polygon_sink_write_errors_total."""
        return 0

    def still_working(self) -> None:
        """Called each round of a long retry inside a write (a full disk, Redis away): the sink is waiting on
        purpose, not stuck, so the watchdog keeps being fed."""
        if self.thread is not None and self.thread.busy_since is not None:
            self.thread.busy_since = time.monotonic()

    def use_subscriptions(self, subscriptions) -> None:
        """The service's Subscriptions, for a sink whose clients may add topics upstream (set_extra)."""

    def subscriptions_view(self) -> dict | None:
        """For GET /subscriptions: what the sink's own clients are subscribed to (the gateway's), or None."""
        return None

    def close_report(self) -> str | None:
        """After close: what the shutdown line must add about this sink (e.g. nobody received it), or None."""
        return None

    def tick(self, now: float) -> None:
        """Called at least every TICK_SECS: time-based flushing and rotation."""

    def idle(self) -> None:
        """The queue is empty after a write: make what is buffered visible now (natural batching: under load the
        queue is rarely empty and writes stay large; when quiet every batch is visible at once)."""

    # When (time.monotonic) the sink wants release() called for what it holds back, or None: its thread wakes then.
    due: float | None = None

    def release(self, now: float) -> None:
        """`due` has come: send what was held back for it."""

    def reopen(self) -> None:
        """SIGHUP: reopen files by path."""

    def close(self, deadline: float | None = None) -> None:
        """Flush everything and release resources; a sink that can retry a failing write does so until the deadline
        (time.monotonic())."""

    def unwritten(self) -> int:
        """After close: accepted events this sink could not write (the shutdown report and exit status)."""
        return 0


def sink_class(name: str) -> type[Sink]:
    module, _, cls = SINKS[name].partition(".")
    try:
        return getattr(importlib.import_module(f".{module}", __name__), cls)
    except ImportError as exc:  # a library only this sink needs (wsproto for the gateway)
        raise SinkConfigError(f"SINK={name}: {exc}") from None


def build_sinks(config) -> list[tuple[Sink, "SinkQueue"]]:
    """Every sink SINK names, each with its queue, built by the table."""
    built = []
    for name in config.sinks:
        cls = sink_class(name)
        capacity, drop_when_full, warn_interval_secs = cls.queue_settings(config)
        sink_queue = SinkQueue(name, capacity, drop_when_full, warn_interval_secs)
        sink_queue.takes_frames = cls.takes == "frames"
        built.append((cls.from_config(config), sink_queue))
    return built


class SinkConfigError(Exception):
    """A sink cannot start with this configuration (missing directory, bad endpoint); exit 2."""


class SinkClosed(Exception):
    """The sink's destination is gone for good (the reader of stdout exited: EPIPE); the sink stops, the rest of
    the service drains and exits 1 reporting what this sink could not write. unwritten: events the sink had
    already taken from its queue and could not write."""

    def __init__(self, message: str, unwritten: int = 0):
        super().__init__(message)
        self.unwritten = unwritten


def stdout_gone(unwritten: int = 0) -> SinkClosed:
    """stdout's reader has exited: point fd 1 at /dev/null so that nothing (not even the interpreter's exit-time
    flush) writes to the broken pipe again, and say so in one line."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return SinkClosed("stdout was closed by its reader (broken pipe)", unwritten)


class SinkStats:
    def __init__(self) -> None:
        self.written = 0
        self.dropped = 0


class FramedBatch(list):
    """A hand-over's records for a sink that takes "frames" (the gateway), in order, with where each live frame's
    records are. The list also holds the events of topics only the gateway's clients asked for (kind
    normalize.EXTRA), in place. `frames` holds (start, end, raw, added) for records[start:end]: raw is the frame's
    bytes as received when every element of the frame is among them and the frame is strict compact JSON
    (normalize.compact_split), else None; added, how many of them are EXTRA."""

    __slots__ = ("frames",)

    def __init__(self, records: Iterable[tuple] = ()):
        super().__init__(records)
        self.frames: list[tuple[int, int, bytes | None, int]] = []

    def after(self, record: tuple) -> "FramedBatch":
        """The same batch behind one more record (a sink_drop gap record), its frames where they were."""
        batch = FramedBatch([record, *self])
        batch.frames = [(start + 1, end + 1, raw, added) for start, end, raw, added in self.frames]
        return batch


class SinkQueue:
    """The dispatcher's side of one sink's queue. drop_when_full: the user chose a bounded queue, so a full queue
    drops the batch and counts every event in it; otherwise the dispatcher waits (backpressure upstream).
    After a drop, the first batch that finds room is preceded by a sink_drop gap record saying how many events
    are missing (schema.md); it takes the seq of the last dropped event, so the sink's seq stays increasing and
    the other sinks (which got those events) see no hole."""

    def __init__(self, name: str, capacity: int, drop_when_full: bool, warn_interval_secs: float):
        self.name = name
        self.capacity = capacity
        self.queue: queue.Queue = queue.Queue(capacity)
        self.drop_when_full = drop_when_full
        self.stats = SinkStats()
        own_log = name in ("ndjson", "zmq", "redis", "kafka")
        self._warning = logs.RateLimitedWarning(logs.get(f"polygon_{name}" if own_log else "polygon_streamer"),
                                                warn_interval_secs)
        self.consumer: threading.Thread | None = None
        self.normalizer: FrameNormalizer | None = None  # set by the service: builds the sink_drop gap records
        self.takes_frames = False  # its sink takes FramedBatch (Sink.takes)
        self._last_ingest_ms: int | None = None  # the last batch queued: what the gap record says came before
        self._last_ts: int | None = None
        self._pending_drops = 0  # events dropped since the last batch queued
        self._first_drop_ms = 0
        self._last_dropped_seq = 0
        self._before_drop: tuple[int | None, int | None] = (None, None)

    def offer(self, ingest_ms: int, records: list[tuple]) -> None:
        if self.drop_when_full:
            try:
                if self._pending_drops:
                    # The gap record travels in the batch that resumes the data: queued alone, it could take
                    # the last free slot, the batch be dropped, and one hole be told as two adjacent records.
                    self._offer_gap(ingest_ms, self.queue.put_nowait, records)
                else:
                    self.queue.put_nowait((ingest_ms, records))
            except queue.Full:
                self.drop(records, "queue full", ingest_ms)
                return
            if self.normalizer is not None:
                self._last_ingest_ms = ingest_ms
                self._last_ts = records[-1][4]
            return
        while True:
            try:
                self.queue.put((ingest_ms, records), timeout=TICK_SECS)
                return
            except queue.Full:
                if self.consumer is not None and not self.consumer.is_alive():
                    self.drop(records, "sink thread stopped", ingest_ms)
                    return

    def drop(self, records: list[tuple], why: str, ingest_ms: int) -> None:
        if not self._pending_drops:
            self._first_drop_ms = ingest_ms
            self._before_drop = (self._last_ingest_ms, self._last_ts)
        self._pending_drops += len(records)
        if self.normalizer is not None:
            self._last_dropped_seq = records[-1][0]
        self.stats.dropped += len(records)
        self._warning.warn(f"{self.name} sink: {why}, dropping events", sink=self.name,
                           capacity_batches=self.capacity, dropped_events_total=self.stats.dropped)

    def _offer_gap(self, resumed_ms: int | None, put, records: Sequence[tuple] = ()) -> None:
        """Queue the sink_drop gap record for the drops since the last queued batch, ahead of `records` in one
        batch; put's queue.Full (no room) leaves the drops pending."""
        if self.normalizer is None:  # no gap records in this sink (capture): its drops are told by its metric only
            if records:
                put((resumed_ms, records))
            self._pending_drops = 0
            return
        from ..normalize import Gap

        dropped = self._pending_drops
        gap = Gap("sink_drop", f"{self.name} sink queue full ({self.capacity} batches): {dropped} event(s) dropped",
                  self._first_drop_ms, resumed_ms, dropped_events=dropped)
        last_ingest_ms, last_ts = self._before_drop
        record = self.normalizer.gap_record(gap, self._first_drop_ms, seq=self._last_dropped_seq,
                                            last_ingest_ms=last_ingest_ms, last_ts=last_ts, count=False)
        gap_ms = self.normalizer.last_gap_ms
        if records.__class__ is FramedBatch:
            put((resumed_ms, records.after(record)))
        else:
            put((resumed_ms, [record, *records]) if records else (self._first_drop_ms, [record]))
        self.normalizer.count_gap(gap.reason, gap_ms)
        self._pending_drops = 0

    def close(self, deadline: float) -> bool:
        """Queue STOP behind everything already accepted (and the gap record of drops not yet told); False if the
        sink did not make room by the deadline."""
        while time.monotonic() < deadline:
            try:
                if self._pending_drops:
                    self._offer_gap(None, lambda item: self.queue.put(item, timeout=TICK_SECS))
                self.queue.put(STOP, timeout=TICK_SECS)
                return True
            except queue.Full:
                if self.consumer is not None and not self.consumer.is_alive():
                    return False
        return False


class SinkThread(ServiceThread):
    """Drains one queue into one sink; reopens on request; flushes and closes on STOP."""

    def __init__(self, sink: Sink, sink_queue: SinkQueue):
        super().__init__(f"sink-{sink.name}")
        self.sink = sink
        self.sink_queue = sink_queue
        self.reopen_requested = threading.Event()
        self.reopened = threading.Event()  # set once a requested reopen is done (READY=1 after SIGHUP waits for it)
        self.unwritten_at_close = 0  # taken from the queue but never written (SinkClosed, or a failing close)
        self.close_deadline: float | None = None  # set by the service's shutdown before it queues STOP
        # When the sink's current write (or tick) began; None between them. A write that has not returned for
        # SINK_STUCK_SECS (a FIFO nobody reads, a hung mount) is stuck: /health says so and the watchdog is not fed.
        self.busy_since: float | None = None
        self.closed = False  # the sink's close() has run: its unwritten events are in unwritten_at_close
        self._in_hand = 0  # events of the write in progress (counted as handed over if the sink gives up in it)
        sink_queue.consumer = self
        sink.thread = self  # a sink that retries reads stopping and close_deadline

    def loop(self) -> None:
        try:
            self._drain()
        except SinkClosed as exc:
            # Not a crash: one line, no traceback; `crashed` marks the thread dead for /health and the exit status.
            self.crashed = exc
            self.sink_queue.stats.written += self._in_hand  # handed over (unwritten: exc.unwritten, or buffered)
            self.unwritten_at_close = exc.unwritten
            _log.error("%s sink stopped: %s; the events queued for it will not be written", self.sink.name, exc,
                       extra={"fields": {"sink": self.sink.name, "unwritten_events": exc.unwritten,
                                         "queued_events": self.pending_events()}})
        finally:
            self.sink.close(self.close_deadline)
            unwritten = self.sink.unwritten()
            self.closed = True
            self.unwritten_at_close += unwritten

    def stuck_for(self, now: float) -> float | None:
        """How long the sink's current write (or tick) has run, or None between writes (health.py)."""
        since = self.busy_since
        return None if since is None else now - since

    def buffered_events(self) -> int:
        """Events the sink has taken and not written yet (a failing disk's buffer), until it is closed: counted in
        the shutdown report (read from the main thread: a snapshot)."""
        return 0 if self.closed else self.sink.unwritten()

    def _drain(self) -> None:
        get = self.sink_queue.queue.get
        get_nowait = self.sink_queue.queue.get_nowait
        empty = self.sink_queue.queue.empty
        stats = self.sink_queue.stats
        sink = self.sink
        coalesce = sink.coalesce_events
        next_tick = time.monotonic() + TICK_SECS
        while True:
            due = sink.due
            try:
                batch = get(timeout=TICK_SECS if due is None else min(TICK_SECS, max(0.0, due - time.monotonic())))
            except queue.Empty:
                batch = ()
            if batch is STOP:
                return
            if self.reopen_requested.is_set():
                self.reopen_requested.clear()
                sink.reopen()
                self.reopened.set()
            self.busy_since = time.monotonic()
            if batch and coalesce:
                batches, stop = self._coalesce(batch, get_nowait, coalesce)
                self._in_hand = sum(len(records) for _, records in batches)
                sink.write_batches(batches)
                stats.written += self._in_hand
                if stop:
                    return
            elif batch:
                ingest_ms, records = batch
                self._in_hand = len(records)
                sink.write(records, ingest_ms)
                stats.written += len(records)
            self._in_hand = 0
            if batch and empty():
                sink.idle()
            now = time.monotonic()
            due = sink.due
            if due is not None and now >= due:
                sink.release(now)
            if now >= next_tick:
                sink.tick(now)
                next_tick = now + TICK_SECS
            self.busy_since = None

    @staticmethod
    def _coalesce(batch: tuple, get_nowait, limit: int) -> tuple[list[tuple], bool]:
        """The batch and those queued behind it, up to `limit` events; True if STOP came after them."""
        batches = [batch]
        events = len(batch[1])
        while events < limit:
            try:
                batch = get_nowait()
            except queue.Empty:
                break
            if batch is STOP:
                return batches, True
            batches.append(batch)
            events += len(batch[1])
        return batches, False

    def pending_events(self) -> int:
        """Events still queued (for the shutdown report)."""
        with self.sink_queue.queue.mutex:
            return sum(len(batch[1]) for batch in self.sink_queue.queue.queue if batch)
