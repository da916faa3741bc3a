"""Gap healing (BACKFILL): what a hole in the stream lost, fetched from the REST API and delivered once, marked.

Two sides, one queue each way:
- the dispatcher's side (Desk, in the dispatcher thread): every live event of an explicit topic that backfill fills
  passes its Track (the last event's time and the events at that millisecond); a gap record that lost data opens a
  Job with one Window a topic (from the last event before the hole; the first after it is noted as it comes) and
  hands it to the backfill thread; what comes back is deduplicated against the live events of the window and goes to
  every sink as records with "backfill": true, then one summary record (kind "backfill") for the gap;
- the backfill thread (BackfillThread, `backfill`): per job and topic, the REST pages of the window (rest.py),
  mapped to the WebSocket event's letters (to_event), in chunks back to the desk.

Live data is never delayed or reordered: the desk takes a chunk only when the inbound queue is empty or once every
LIVE_ITEMS_PER_CHUNK hand-overs, and backfilled records follow the gap and the resumed data. Memory is bounded by the
queues (JOB_QUEUE jobs, DELIVERY_QUEUE chunks of CHUNK_EVENTS) and the windows (SEEN_LIMIT identities each).
"""

from __future__ import annotations

import math
import queue
import time
from typing import TYPE_CHECKING, Callable
from urllib.parse import quote

import ujson

from . import logs, protocol
from .capture_format import Backfilled, BackfillSummary
from .handover import WAKE
from .rest import RestClient, RestError, Stopped
from .threads import ServiceThread

if TYPE_CHECKING:
    from .metrics import LatencyHistogram

KINDS = ("trades", "quotes", "aggs")
# (cluster, code) -> the REST kind that fills it (rest.md: trades and quotes of stocks and options, crypto trades,
# bars of stocks, options, indices and crypto). Futures and forex: their REST fields are not settled (rest.md).
FILLED: dict[str, dict[str, str]] = {
    "stocks": {"T": "trades", "Q": "quotes", "A": "aggs", "AM": "aggs"},
    "options": {"T": "trades", "Q": "quotes", "A": "aggs", "AM": "aggs"},
    "indices": {"A": "aggs", "AM": "aggs"},
    "crypto": {"XT": "trades", "XA": "aggs"},
}
_KIND_OF_SHAPE = {"trade": "trades", "quote": "quotes", "agg_second": "aggs", "agg_minute": "aggs"}
BAR_MS = {"A": 1000, "AM": 60_000, "XA": 60_000}
LOST_DATA = ("disconnect", "read_timeout", "server_close", "status", "stale", "max_connections", "inbound_drop",
             "restart")
REASONS = ("wildcard", "not_entitled", "too_old", "rate_limited", "error", "limit", "shutdown", "unsupported")
# Why a REST result was not delivered (besides being a duplicate): outside the window asked for, not what the API
# documents, not strict JSON (NaN, 1e999, a lone surrogate), or left out by NDJSON_INCLUDE / sampling like live events.
SKIPPED = ("outside_window", "invalid", "unencodable", "filtered")

PAGE_LIMIT = 50_000
CHUNK_EVENTS = 2000
JOB_QUEUE = 64
DELIVERY_QUEUE = 16
LIVE_ITEMS_PER_CHUNK = 32
SETTLE_SECS = 1.0  # after the gap, before the first request: the first live event after the hole comes meanwhile
AT_LAST_LIMIT = 1000
SEEN_LIMIT = 100_000
SNAPSHOT_SECS = 0.5  # how often the dispatcher refreshes the track positions the stream position keeps
SAVED_AT_LAST = 100  # identities kept per track for a restart's dedup
# What one window can hold, so that no REST answer can grow the output or the dedup memory without bound: one full
# page, plus EVENTS_PER_MS for every millisecond of the window (100,000 events a second for one symbol, beyond any
# real ticker's rate); pages at least MIN_PAGE_EVENTS on average. A gap's backfill gets WINDOW_BUDGET_SECS per topic
# and JOB_BUDGET_SECS in all, so one bad gap cannot hold the gaps behind it.
EVENTS_PER_MS = 100
MIN_PAGE_EVENTS = 100
WINDOW_BUDGET_SECS = 60.0
JOB_BUDGET_SECS = 300.0

_log = logs.get("polygon_backfill")


def filled_kind(cluster: str, code: str) -> str | None:
    return FILLED.get(cluster, {}).get(code)


def wanted_kind(cluster: str, code: str) -> str | None:
    """The REST kind a code's events are, whether or not this version fills them (forex quotes: unsupported)."""
    shape = protocol.SHAPES[cluster].get(code)
    return _KIND_OF_SHAPE.get(shape.kind) if shape is not None else None


def event_symbol(cluster: str, ticker: str) -> str:
    """A topic's ticker -> the symbol its events carry (crypto topics may say X:BTC-USD, events say BTC-USD)."""
    return ticker[2:] if cluster == "crypto" and ticker.startswith("X:") else ticker


def rest_ticker(cluster: str, symbol: str, kind: str) -> str:
    """The REST API's name of a WebSocket symbol: crypto trades say X:BTC-USD (rest.md), crypto bars X:BTCUSD (the
    aggregates endpoint's form, as its documented examples and every public client spell it)."""
    if cluster != "crypto":
        return symbol
    return "X:" + (symbol.replace("-", "") if kind == "aggs" else symbol)


# Where both the WebSocket event and the REST result carry the sequence number q (rest.md: options trades and
# crypto trades have none over REST), it is the identity; elsewhere the fields below are.
BY_Q = {("stocks", "trades"), ("stocks", "quotes"), ("options", "quotes")}


def identity(kind: str, by_q: bool, event: dict) -> tuple:
    """What makes an event the same event live and over REST (rest.md): (symbol, q) where both have a q, else the
    trade's (t, p, s, x, i), the quote's prices, sizes and exchanges at t, the bar's start (the symbol is the
    window's)."""
    if by_q:
        return ("q", event.get("q"))
    if kind == "trades":
        i = event.get("i")
        return (event.get("t"), event.get("p"), event.get("s"), event.get("x"), None if i is None else str(i))
    if kind == "quotes":
        return (event.get("t"), event.get("bp"), event.get("bs"), event.get("ap"), event.get("as"),
                event.get("bx"), event.get("ax"))
    return ("bar", event.get("s"))


def _hashable_identity(kind: str, by_q: bool, event: dict) -> tuple | None:
    """The event's identity, or None when a field of it cannot be one (a list or an object where the API documents a
    number): such an event is invalid over REST, and must not fail the dispatcher's dedup when it comes live."""
    key = identity(kind, by_q, event)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def strict_json(event: dict) -> str | None:
    """The event as the JSON text a sink may write (no NaN or Infinity, UTF-8 encodable), or None."""
    try:
        text = ujson.dumps(event, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False)
        if not text.isascii():
            text.encode("utf-8")
    except (OverflowError, ValueError, TypeError, UnicodeError, RecursionError):
        return None
    return text


def _copy(result: dict, event: dict, names: tuple[tuple[str, str], ...]) -> None:
    for rest_name, letter in names:
        value = result.get(rest_name)
        if value is not None:
            event[letter] = value


_TRADE = (("exchange", "x"), ("id", "i"), ("tape", "z"), ("price", "p"), ("size", "s"), ("conditions", "c"),
          ("sequence_number", "q"), ("trf_id", "trfi"))
_QUOTE = (("bid_exchange", "bx"), ("bid_price", "bp"), ("bid_size", "bs"), ("ask_exchange", "ax"),
          ("ask_price", "ap"), ("ask_size", "as"), ("conditions", "c"), ("indicators", "i"),
          ("sequence_number", "q"), ("tape", "z"))
_BAR = (("o", "o"), ("h", "h"), ("l", "l"), ("c", "c"), ("v", "v"), ("vw", "vw"), ("n", "n"))


def _ms(value) -> int | None:
    return value // 1_000_000 if type(value) is int and value >= 0 else None


def to_event(cluster: str, code: str, kind: str, symbol: str, result) -> dict | None:
    """One REST result as the WebSocket event of `code` (ns -> ms), or None when it is not what rest.md says."""
    if not isinstance(result, dict):
        return None
    event: dict = {"ev": code, ("pair" if cluster == "crypto" else "sym"): symbol}
    if kind == "aggs":
        start = result.get("t")
        if type(start) is not int or start < 0 or not isinstance(result.get("c"), (int, float)):
            return None
        _copy(result, event, _BAR)
        event["s"] = start
        event["e"] = start + BAR_MS.get(code, 60_000)
        return event
    t = _ms(result.get("sip_timestamp"))
    if t is None:
        return None
    if kind == "trades":
        if not isinstance(result.get("price"), (int, float)):
            return None
        _copy(result, event, _TRADE)
        trf = _ms(result.get("trf_timestamp"))
        if trf is not None:
            event["trft"] = trf
    else:
        if not isinstance(result.get("bid_price"), (int, float)) and not isinstance(result.get("ask_price"),
                                                                                   (int, float)):
            return None
        _copy(result, event, _QUOTE)
        conditions = event.get("c")
        if isinstance(conditions, list) and len(conditions) == 1:
            event["c"] = conditions[0]  # the WebSocket quote carries one condition code, REST a list
    event["t"] = t
    return event


def request(cluster: str, code: str, kind: str, symbol: str, from_ms: int, to_ms: int) -> tuple[str, dict]:
    """The REST path and query of one window (rest.md): ascending, the largest page."""
    ticker = quote(rest_ticker(cluster, symbol, kind), safe=":")
    if kind == "aggs":
        span = "second" if BAR_MS.get(code) == 1000 else "minute"
        return (f"/v2/aggs/ticker/{ticker}/range/1/{span}/{from_ms}/{to_ms}",
                {"sort": "asc", "adjusted": "false", "limit": PAGE_LIMIT})
    return (f"/v3/{kind}/{ticker}", {"timestamp.gte": from_ms * 1_000_000, "timestamp.lte": to_ms * 1_000_000 + 999_999,
                                     "order": "asc", "sort": "timestamp", "limit": PAGE_LIMIT})


# ---------------------------------------------------------------------------------------------------------------
# The dispatcher's side.


class Window:
    """One topic's part of a gap: from the last live event before the hole (`lower`, and the events at that
    millisecond) to the first after it (`first_after`, noted as it comes); the live events of the window seen since,
    which backfill must not deliver again."""

    __slots__ = ("topic", "code", "symbol", "kind", "by_q", "lower", "hole_end", "first_after", "seen", "overflow",
                 "recovered", "duplicates", "fetched", "handled", "skipped", "from_ms", "to_ms", "reason", "detail",
                 "done")

    def __init__(self, topic: str, code: str, symbol: str, kind: str, by_q: bool, lower: int, before: list,
                 hole_end: int, before_keys: tuple = ()):
        self.topic, self.code, self.symbol, self.kind, self.by_q = topic, code, symbol, kind, by_q
        self.lower = lower
        self.hole_end = hole_end
        self.first_after: int | None = None
        self.seen = {key for event in before if (key := _hashable_identity(kind, by_q, event)) is not None}
        self.seen.update(before_keys)  # a restart's: the previous run's events at `lower` (state.py)
        self.overflow = False
        self.recovered = self.duplicates = self.fetched = 0
        self.handled = 0  # of the fetched, those the desk has taken (delivered, duplicate or left out)
        self.skipped = dict.fromkeys(SKIPPED, 0)
        self.from_ms: int | None = None
        self.to_ms: int | None = None
        self.reason: str | None = None
        self.detail = ""
        self.done = False  # the thread is through with it (every page fetched, or a reason)

    def see(self, ts: int | None, event: dict) -> None:
        if ts is None:
            return
        if self.first_after is None:
            self.first_after = ts
        if ts <= max(self.first_after, self.hole_end):
            if len(self.seen) < SEEN_LIMIT:
                key = _hashable_identity(self.kind, self.by_q, event)
                if key is not None:  # (a field no REST result can match: nothing to deduplicate)
                    self.seen.add(key)
            else:
                self.overflow = True

    def upper(self) -> int:
        first = self.first_after
        return first if first is not None and first >= self.lower else self.hole_end

    def limits(self) -> tuple[int, int]:
        """(events, pages) the window's REST answer may hold at most (see EVENTS_PER_MS)."""
        span = max(0, (self.to_ms or 0) - (self.from_ms or 0)) + 1
        events = PAGE_LIMIT + span * EVENTS_PER_MS
        return events, 2 + events // MIN_PAGE_EVENTS

    def summary(self) -> dict:
        return {"topic": self.topic, "kind": self.kind, "ticker": self.symbol, "from_ts": self.from_ms,
                "to_ts": self.to_ms, "fetched": self.fetched, "recovered": self.recovered,
                "duplicates": self.duplicates, "skipped": dict(self.skipped), "complete": self.reason is None,
                "reason": self.reason}


class Track:
    """One explicit topic's live events, as far as a window needs them: the last one's time and the events at it."""

    __slots__ = ("last_ts", "at_last", "windows", "restored")

    def __init__(self) -> None:
        self.last_ts: int | None = None
        self.at_last: list = []
        self.windows: list[Window] = []
        self.restored: tuple = ()  # the identities at last_ts of the previous run's last events (a restart's)

    def see(self, ts: int | None, event: dict) -> None:
        if ts is not None:
            if ts == self.last_ts:
                if len(self.at_last) < AT_LAST_LIMIT:
                    self.at_last.append(event)
            elif self.last_ts is None or ts > self.last_ts:
                self.last_ts = ts
                self.at_last = [event]
                self.restored = ()
        for window in self.windows:
            window.see(ts, event)


class Job:
    """The backfill of one gap record."""

    __slots__ = ("gap_seq", "gap_reason", "hole_from", "hole_to", "windows", "skipped", "created", "started")

    def __init__(self, gap_seq: int, gap_reason: str, hole_from: int, hole_to: int):
        self.gap_seq, self.gap_reason, self.hole_from, self.hole_to = gap_seq, gap_reason, hole_from, hole_to
        self.windows: list[Window] = []
        self.skipped: list[dict] = []  # topics that cannot be filled: wildcards, unsupported codes
        self.created = time.monotonic()
        self.started: float | None = None

    def summary(self, why: str | None = None) -> dict:
        topics = [window.summary() for window in self.windows] + self.skipped
        reasons = [topic["reason"] for topic in topics if topic["reason"]]
        reason = why or (min(reasons, key=REASONS.index) if reasons else None)
        bounds = [window.from_ms for window in self.windows if window.from_ms is not None]
        ends = [window.to_ms for window in self.windows if window.to_ms is not None]
        detail = " ".join(sorted({window.detail for window in self.windows if window.detail}))[:500]
        if any(topic["reason"] == "wildcard" for topic in topics):
            detail = (detail + " " if detail else "") + (
                "wildcard topics cannot be filled ticker by ticker: reconcile them from the flat files "
                "(the next day, about 11:00 ET)")
        skipped = {why: sum(window.skipped[why] for window in self.windows) for why in SKIPPED}
        return {"gap_seq": self.gap_seq, "gap_reason": self.gap_reason, "from_ts": min(bounds, default=None),
                "to_ts": max(ends, default=None), "complete": reason is None, "reason": reason,
                "detail": detail or None, "recovered": sum(window.recovered for window in self.windows),
                "duplicates": sum(window.duplicates for window in self.windows), "skipped": skipped,
                "topics": topics}


class Chunk:
    """Events of one window for the desk: each with its identity and its strict JSON text (made by the thread)."""

    __slots__ = ("job", "window", "keys", "texts")

    def __init__(self, job: Job, window: Window, keys: list[tuple], texts: list[str]):
        self.job, self.window, self.keys, self.texts = job, window, keys, texts


class Done:
    __slots__ = ("job",)

    def __init__(self, job: Job):
        self.job = job


class BackfillStats:
    """Counters exported by metrics.py: requests by the thread, events and duplicates by the desk."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.events: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.duplicates = 0
        self.bad_results = 0
        # "complete" or the reason; every result exported from the start (0), so rate() and alerts see the first one
        self.summaries: dict[str, int] = dict.fromkeys(("complete", *REASONS), 0)
        self.seconds: LatencyHistogram | None = None  # set by the service


class Desk:
    """The dispatcher's side of backfill (see the module's text). `emit(note, ingest_ms)` is the dispatcher's: it
    turns a Backfilled or BackfillSummary note into records for every sink (and the capture)."""

    def __init__(self, cluster: str, kinds: tuple[str, ...], normalizer, subscriptions, stats: BackfillStats,
                 inbound: queue.Queue):
        self.cluster = cluster
        self.kinds = kinds
        self.normalizer = normalizer
        self.subscriptions = subscriptions
        self.stats = stats
        self.inbound = inbound
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
        tracks = self.normalizer.tracks
        for key in [key for key in tracks if key not in watched]:
            del tracks[key]
        for key in watched:
            tracks.setdefault(key, Track())
        self.normalizer.refresh_tracks()

    def gap(self, reason: str, gap_seq: int, hole_from: int, hole_to: int | None, emit: Callable) -> None:
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
                track = self.normalizer.tracks.get((code, symbol))
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
        for (code, symbol), track in self.normalizer.tracks.items():
            kind = filled_kind(self.cluster, code)
            if track.last_ts is None or kind is None:  # (a track is kept for filled codes only)
                continue
            by_q = (self.cluster, kind) in BY_Q
            keys = [list(key) for event in track.at_last[:SAVED_AT_LAST]
                    if (key := _hashable_identity(kind, by_q, event)) is not None]
            keys += [list(key) for key in track.restored[:SAVED_AT_LAST - len(keys)]]
            positions[f"{code} {symbol}"] = [track.last_ts, keys]
        self.positions = positions

    def restore(self, positions: dict) -> None:
        """Before the dispatcher starts: the previous run's track positions (state.py), for a restart's windows."""
        tracks = self.normalizer.tracks
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

    def due(self, idle: bool) -> bool:
        """Whether the dispatcher takes a chunk now: there is one, and live data is not waiting (or its turn came)."""
        if not self.deliveries.queue:
            return False
        self._items += 1
        return idle or self._items % LIVE_ITEMS_PER_CHUNK == 0 or not self.inbound.queue

    def deliver(self, emit: Callable) -> None:
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

    def _finish(self, job: Job, emit: Callable, why: str | None = None, at_ms: int | None = None) -> None:
        for window in job.windows:
            if why and window.reason is None and (not window.done or window.handled < window.fetched):
                window.reason = why
            track = self.normalizer.tracks.get((window.code, window.symbol))
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

    def shutdown(self, emit: Callable, now_ms: int) -> None:
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


# ---------------------------------------------------------------------------------------------------------------
# The backfill thread.


class BackfillThread(ServiceThread):
    """Takes the desk's jobs in order; per window, the REST pages mapped to events, in chunks back to the desk."""

    def __init__(self, config, desk: Desk, stats: BackfillStats):
        super().__init__("backfill")
        self.config = config
        self.desk = desk
        self.stats = stats
        self.disabled: dict[str, str] = {}  # kind -> why (403: off until restart)
        self.client = RestClient(config.rest_url, config.api_key, config.backfill_max_rps, self.stopping,
                                 self._count_request)
        self._kind = ""

    def stop(self) -> None:
        super().stop()
        self.client.abort()

    def _count_request(self, status: str) -> None:
        key = (self._kind, status)
        self.stats.requests[key] = self.stats.requests.get(key, 0) + 1

    def loop(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    job = self.desk.jobs.get(timeout=0.2)
                except queue.Empty:
                    continue
                try:
                    self._run(job)
                except Stopped:
                    return
                except Exception as exc:  # containment: one gap's backfill fails, not the thread
                    _log.error("backfill of gap seq %d failed: %s", job.gap_seq, exc, exc_info=True,
                               extra={"fields": {"gap_seq": job.gap_seq}})
                    for window in job.windows:
                        if not window.done:
                            window.reason, window.detail, window.done = "error", f"{type(exc).__name__}: {exc}", True
                self._put(Done(job))
        finally:
            self.client.close()

    def _run(self, job: Job) -> None:
        if self.stopping.wait(max(0.0, job.created + SETTLE_SECS - time.monotonic())):
            raise Stopped()
        job.started = time.monotonic()
        job_deadline = job.started + JOB_BUDGET_SECS
        oldest = time.time_ns() // 1_000_000 - int(self.config.backfill_max_secs * 1000)
        for window in job.windows:
            if window.kind in self.disabled:
                window.reason, window.detail, window.done = "not_entitled", self.disabled[window.kind], True
                continue
            if time.monotonic() >= job_deadline:
                window.reason, window.done = "limit", True
                window.detail = f"the gap's backfill budget ({JOB_BUDGET_SECS:g} s) ran out before this topic"
                continue
            lower, upper = window.lower, window.upper()
            if window.kind == "aggs":
                lower -= BAR_MS.get(window.code, 60_000)
            if upper < oldest:
                window.reason, window.done = "too_old", True
                continue
            if lower < oldest:
                window.reason, lower = "too_old", oldest
            window.from_ms, window.to_ms = lower, upper
            self._fetch(job, window, lower, upper, min(job_deadline, time.monotonic() + WINDOW_BUDGET_SECS))
            window.done = True

    def _fetch(self, job: Job, window: Window, lower: int, upper: int, deadline: float) -> None:
        """The window's pages, each result kept only inside [lower, upper] (by its time; a bar by its start), as
        strict JSON, at most the window's limits; the rest counted by reason (Window.skipped)."""
        cluster = self.config.cluster
        path, params = request(cluster, window.code, window.kind, window.symbol, lower, upper)
        self._kind = window.kind
        max_events, max_pages = window.limits()
        time_key = "s" if window.kind == "aggs" else "t"
        budget = (f"the topic's backfill budget ({WINDOW_BUDGET_SECS:g} s)" if deadline < math.inf else "")
        try:
            for page in self.client.pages(path, params, max_pages, deadline, budget):
                keys, texts = [], []
                past = False
                for result in page.get("results") or ():
                    event = to_event(cluster, window.code, window.kind, window.symbol, result)
                    key = None if event is None else _hashable_identity(window.kind, window.by_q, event)
                    if event is None or key is None:
                        window.skipped["invalid"] += 1
                        self.stats.bad_results += 1
                        continue
                    at = event[time_key]
                    if not lower <= at <= upper:
                        window.skipped["outside_window"] += 1
                        past = past or at > upper
                        continue
                    text = strict_json(event)
                    if text is None:
                        window.skipped["unencodable"] += 1
                        continue
                    keys.append(key)
                    texts.append(text)
                if window.fetched + len(keys) > max_events:
                    keys, texts = keys[:max_events - window.fetched], texts[:max_events - window.fetched]
                    self._deliver(job, window, keys, texts)
                    raise RestError("limit", f"GET {path}: more than {max_events:,} events for a window of "
                                             f"{upper - lower + 1:,} ms: the rest is not delivered")
                self._deliver(job, window, keys, texts)
                if past:
                    break  # ascending: the answer went past the window, and no later page comes back into it
        except RestError as exc:
            window.reason, window.detail = exc.reason, exc.detail
            if exc.reason == "not_entitled":
                self.disabled[window.kind] = exc.detail
                _log.error("backfill of %s is off until restart: %s", window.kind, exc.detail,
                           extra={"fields": {"kind": window.kind}})
            else:
                _log.warning("backfill of %s (gap seq %d) incomplete: %s", window.topic, job.gap_seq, exc.detail,
                             extra={"fields": {"topic": window.topic, "reason": exc.reason}})

    def _deliver(self, job: Job, window: Window, keys: list[tuple], texts: list[str]) -> None:
        window.fetched += len(keys)
        for start in range(0, len(keys), CHUNK_EVENTS):
            self._put(Chunk(job, window, keys[start:start + CHUNK_EVENTS], texts[start:start + CHUNK_EVENTS]))

    def _put(self, item) -> None:
        while True:
            try:
                self.desk.deliveries.put(item, timeout=0.2)
            except queue.Full:
                if self.stopping.is_set():
                    raise Stopped() from None
                continue
            self._wake()
            return

    def _wake(self) -> None:
        """The dispatcher may be waiting on an empty inbound queue: a wake-up item, only then (never a live slot)."""
        inbound = self.desk.inbound
        if not inbound.queue:
            try:
                inbound.put_nowait(WAKE)
            except queue.Full:
                pass

