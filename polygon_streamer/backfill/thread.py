"""The backfill thread (`backfill`): takes the desk's jobs in order; per window, the REST pages (rest.py) mapped to
the WebSocket event's letters (mapping.py), each result kept only inside the window and as strict JSON, in Chunks back
to the desk, then the job's Done. Its budgets: SETTLE_SECS before the first request (the first live event after the
hole comes meanwhile), WINDOW_BUDGET_SECS per topic and JOB_BUDGET_SECS per gap, so one bad gap cannot hold the gaps
behind it."""

from __future__ import annotations

import math
import queue
import time
from typing import TYPE_CHECKING

from .. import logs
from ..rest import RestClient, RestError, Stopped
from ..threads import ServiceThread
from .desk import Desk
from .jobs import BackfillStats, Chunk, Done, Job, Window
from .mapping import BAR_MS, hashable_identity, request, strict_json, to_event

if TYPE_CHECKING:
    from ..config import Config

CHUNK_EVENTS = 2000
SETTLE_SECS = 1.0
WINDOW_BUDGET_SECS = 60.0
JOB_BUDGET_SECS = 300.0

_log = logs.get("polygon_backfill")


class BackfillThread(ServiceThread):
    """Takes the desk's jobs in order; per window, the REST pages mapped to events, in chunks back to the desk."""

    def __init__(self, config: Config, desk: Desk, stats: BackfillStats):
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
                    key = None if event is None else hashable_identity(window.kind, window.by_q, event)
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
            self.desk.wake()
            return
