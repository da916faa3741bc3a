"""What the backfill's two sides pass each other (the desk in the dispatcher thread, the thread that asks the REST
API): a Job per gap record, a Window per topic of it, the Track of each explicit topic's live events, the Chunks of
events going back and the Done that ends a job; and the counters both keep (BackfillStats, exported by metrics.py).
The bounds live here, with the window that keeps them."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .mapping import KINDS, PAGE_LIMIT, hashable_identity

if TYPE_CHECKING:
    from ..metrics import LatencyHistogram

# Why a topic's backfill is incomplete, most telling first (a job's reason is the first of its topics').
REASONS = ("wildcard", "not_entitled", "too_old", "rate_limited", "error", "limit", "shutdown", "unsupported")
# Why a REST result was not delivered (besides being a duplicate): outside the window asked for, not what the API
# documents, not strict JSON (NaN, 1e999, a lone surrogate), or left out by NDJSON_INCLUDE / sampling like live events.
SKIPPED = ("outside_window", "invalid", "unencodable", "filtered")

AT_LAST_LIMIT = 1000
SEEN_LIMIT = 100_000
# What one window can hold, so that no REST answer can grow the output or the dedup memory without bound: one full
# page, plus EVENTS_PER_MS for every millisecond of the window (100,000 events a second for one symbol, beyond any
# real ticker's rate); pages at least MIN_PAGE_EVENTS on average.
EVENTS_PER_MS = 100
MIN_PAGE_EVENTS = 100


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
        self.seen = {key for event in before if (key := hashable_identity(kind, by_q, event)) is not None}
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
                key = hashable_identity(self.kind, self.by_q, event)
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
