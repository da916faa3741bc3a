"""The dispatcher's side of backfill (Desk): every live event of an explicit topic that backfill fills passes its
Track; a gap record that lost data opens a Job with one Window a topic and hands it to the backfill thread; what comes
back is deduplicated against the live events of the window and emitted (records with "backfill": true), then one
summary record for the gap.

Its interfaces, all in the dispatcher thread but wake(): the dispatcher's Emit turns a note into records for every
sink (and the capture) and says how many it wrote; the normalizer is told the tracks (FrameNormalizer.watch) whenever
they change; the thread's deliveries are taken only when live data is not waiting (due()), or once every
LIVE_ITEMS_PER_CHUNK hand-overs, so live data is never delayed or reordered."""

from __future__ import annotations

import queue
import time
from typing import TYPE_CHECKING, Callable

import ujson

from ..capture_format import Backfilled, BackfillSummary
from ..handover import wake
from .jobs import SEEN_LIMIT, BackfillStats, Done, Job, Track, Window
from .mapping import BY_Q, event_symbol, filled_kind, hashable_identity, wanted_kind

if TYPE_CHECKING:
    from ..normalize import FrameNormalizer
    from ..subscriptions import Subscriptions

# The dispatcher's: a note (backfilled events, or a gap's backfill summary) and its ingest_ms -> records for every
# sink; returns (records written, events left out by NDJSON_INCLUDE or sampling).
Emit = Callable[[Backfilled | BackfillSummary, int], tuple[int, int]]

# The gap reasons that lost data (a sink_drop or a shutdown did not: nothing to fetch).
LOST_DATA = ("disconnect", "read_timeout", "server_close", "status", "stale", "max_connections", "inbound_drop",
             "restart")
JOB_QUEUE = 64
DELIVERY_QUEUE = 16
LIVE_ITEMS_PER_CHUNK = 32
SNAPSHOT_SECS = 0.5  # how often the dispatcher refreshes the track positions the stream position keeps
SAVED_AT_LAST = 100  # identities kept per track for a restart's dedup


class Desk:
    """The dispatcher's side of backfill (see the package's text). Every method but wake() runs in the dispatcher
    thread, which hands each its Emit."""

    def __init__(self, cluster: str, kinds: tuple[str, ...], normalizer: FrameNormalizer, subscriptions: Subscriptions,
                 stats: BackfillStats, inbound: queue.Queue):
        self.cluster = cluster
        self.kinds = kinds
        self.normalizer = normalizer
        self.subscriptions = subscriptions
        self.stats = stats
        self.inbound = inbound
        # The explicit topics of a filled kind, each with its Track; the normalizer shows each its live events.
        self.tracks: dict[tuple[str, str], Track] = {}
        self.jobs: queue.Queue = queue.Queue(JOB_QUEUE)
        self.deliveries: queue.Queue = queue.Queue(DELIVERY_QUEUE)
        self.open_jobs: list[Job] = []
        self.positions: dict[str, list] = {}  # snapshot(): "CODE SYMBOL" -> [last_ts, identities at it]
        self._next_snapshot = 0.0
        self._version = -1
        self._items = 0
        self.sync()

    def sync(self) -> None:
        """Follow the running subscription: a Track for every explicit topic of a filled kind."""
        if self.subscriptions.version == self._version:
            return
        self._version = self.subscriptions.version
        watched = set()
        for topic in self.subscriptions.desired:
            code, _, ticker = topic.partition(".")
            if "*" not in ticker and filled_kind(self.cluster, code) in self.kinds:
                watched.add((code, event_symbol(self.cluster, ticker)))
        tracks = self.tracks
        for key in [key for key in tracks if key not in watched]:
            del tracks[key]
        for key in watched:
            tracks.setdefault(key, Track())
        self.normalizer.watch(tracks)

    def gap(self, reason: str, gap_seq: int, hole_from: int, hole_to: int | None, emit: Emit) -> None:
        """A gap record was written: open its job (nothing to do for sink_drop and shutdown, or with no topic)."""
        if reason not in LOST_DATA:
            return
        self.sync()
        now_ms = time.time_ns() // 1_000_000
        job = Job(gap_seq, reason, hole_from, hole_to if hole_to is not None else now_ms)
        for topic in self.subscriptions.desired:
            code, _, ticker = topic.partition(".")
            kind = filled_kind(self.cluster, code) or wanted_kind(self.cluster, code)
            if kind not in self.kinds:
                continue
            if "*" in ticker:
                job.skipped.append({"topic": topic, "kind": kind, "ticker": None, "recovered": 0,
                                    "complete": False, "reason": "wildcard"})
            elif filled_kind(self.cluster, code) is None:
                job.skipped.append({"topic": topic, "kind": kind, "ticker": ticker, "recovered": 0,
                                    "complete": False, "reason": "unsupported"})
            else:
                symbol = event_symbol(self.cluster, ticker)
                track = self.tracks.get((code, symbol))
                if track is None:
                    continue
                lower = track.last_ts if track.last_ts is not None else hole_from
                window = Window(topic, code, symbol, kind, (self.cluster, kind) in BY_Q, lower, track.at_last,
                                job.hole_to, track.restored)
                track.windows.append(window)
                job.windows.append(window)
        if not job.windows and not job.skipped:
            return
        if not job.windows:
            self._finish(job, emit)
            return
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            for window in job.windows:
                window.reason, window.detail = "error", f"backfill busy: {JOB_QUEUE} gaps already waiting"
            self._finish(job, emit)
            return
        self.open_jobs.append(job)

    def snapshot(self, force: bool = False) -> None:
        """From the dispatcher thread, at most every SNAPSHOT_SECS: each track's last event time and the identities
        of its events at that time, as `positions` (a new dict: the main thread saves it with the stream position,
        so that a restart's windows start exactly where each topic stopped)."""
        now = time.monotonic()
        if now < self._next_snapshot and not force:
            return
        self._next_snapshot = now + SNAPSHOT_SECS
        positions = {}
        for (code, symbol), track in self.tracks.items():
            kind = filled_kind(self.cluster, code)
            if track.last_ts is None or kind is None:  # (a track is kept for filled codes only)
                continue
            by_q = (self.cluster, kind) in BY_Q
            keys = [list(key) for event in track.at_last[:SAVED_AT_LAST]
                    if (key := hashable_identity(kind, by_q, event)) is not None]
            keys += [list(key) for key in track.restored[:SAVED_AT_LAST - len(keys)]]
            positions[f"{code} {symbol}"] = [track.last_ts, keys]
        self.positions = positions

    def restore(self, positions: dict) -> None:
        """Before the dispatcher starts: the previous run's track positions (state.py), for a restart's windows."""
        tracks = self.tracks
        for name, value in positions.items():
            code, _, symbol = name.partition(" ")
            track = tracks.get((code, symbol))
            if track is None or track.last_ts is not None:
                continue
            try:
                last_ts, keys = value
                restored = tuple(tuple(key) for key in keys)
                {hash(key) for key in restored}
            except (TypeError, ValueError):
                continue  # (a damaged entry: that topic's window starts at the restart's hole)
            if type(last_ts) is int:
                track.last_ts, track.restored = last_ts, restored
        self.positions = dict(positions)

    def wake(self) -> None:
        """From the backfill thread, after it delivered: the dispatcher takes the chunk even if no data comes."""
        wake(self.inbound)

    def due(self, idle: bool) -> bool:
        """Whether the dispatcher takes a chunk now: there is one, and live data is not waiting (or its turn came)."""
        if not self.deliveries.queue:
            return False
        self._items += 1
        return idle or self._items % LIVE_ITEMS_PER_CHUNK == 0 or not self.inbound.queue

    def deliver(self, emit: Emit) -> None:
        """One chunk (deduplicated, then emitted) or one job's end (its summary)."""
        try:
            item = self.deliveries.get_nowait()
        except queue.Empty:
            return
        if item.__class__ is Done:
            self._finish(item.job, emit)
            return
        window = item.window
        if window.overflow:
            # More live events in the window than it can remember: what it forgot could be delivered twice.
            window.reason = "error"
            window.detail = f"more than {SEEN_LIMIT:,} live events in {window.topic}'s window: not delivered"
            return
        kept = []
        seen = window.seen
        window.handled += len(item.keys)
        for key, text in zip(item.keys, item.texts):
            if key in seen:
                window.duplicates += 1
                continue
            seen.add(key)  # a later page (or a later gap's window) repeating it is a duplicate too
            kept.append(text)
        self.stats.duplicates += len(item.keys) - len(kept)
        if kept:
            # Counted as recovered only once written: what the normalizer leaves out is counted by reason.
            written, filtered = emit(Backfilled("[" + ",".join(kept) + "]"), time.time_ns() // 1_000_000)
            window.recovered += written
            window.skipped["filtered"] += filtered
            window.skipped["unencodable"] += len(kept) - written - filtered
            self.stats.events[window.kind] += written

    def _finish(self, job: Job, emit: Emit, why: str | None = None, at_ms: int | None = None) -> None:
        for window in job.windows:
            if why and window.reason is None and (not window.done or window.handled < window.fetched):
                window.reason = why
            track = self.tracks.get((window.code, window.symbol))
            if track is not None and window in track.windows:
                track.windows.remove(window)
        if job in self.open_jobs:
            self.open_jobs.remove(job)
        summary = job.summary()
        self.stats.summaries[summary["reason"] or "complete"] = self.stats.summaries.get(
            summary["reason"] or "complete", 0) + 1
        if job.started is not None and self.stats.seconds is not None:
            self.stats.seconds.observe(time.monotonic() - job.started)
        emit(BackfillSummary(ujson.dumps(summary, ensure_ascii=False, escape_forward_slashes=False)),
             time.time_ns() // 1_000_000 if at_ms is None else at_ms)

    def shutdown(self, emit: Emit, now_ms: int) -> None:
        """The service stops (at now_ms): what was fetched and not delivered is let go; every open job's summary says
        shutdown."""
        while True:
            try:
                item = self.deliveries.get_nowait()
            except queue.Empty:
                break
            if item.__class__ is Done and item.job in self.open_jobs:
                self._finish(item.job, emit, at_ms=now_ms)
        for job in list(self.open_jobs):
            self._finish(job, emit, "shutdown", now_ms)
