"""The reader's hand-over to the inbound queue: what one socket read completed goes downstream as one item, never
blocking the reader; the holes in the stream travel with the data; a full queue drops, counted, while the capture
still keeps every message (held for the next item, within CAPTURE_CHANNEL_CAP).

This module names every item that crosses the inbound queue (the dispatcher decodes them, the service counts what
is left of them at a stop: queued_counts()):
- (ingest_ms, frames) or, with capture, (ingest_ms, frames, [CaptureBatch, ...]): a hand-over. `frames` may begin
  with Gap notices: the holes before its first frame, told with it, so that one hole is one gap record however often
  the queue refuses (a hole told on its own took the one free slot and the data behind it found the queue full again:
  two records for one hole);
- (ingest_ms, Gap): a hole told at shutdown (data never came back);
- (ingest_ms, Backfilled | BackfillSummary): a capture's backfill line, fed by reprocess;
- (ingest_ms, FINISH): the service stops at ingest_ms: the open backfills end (their summaries say shutdown);
- WAKE: backfill has chunks waiting (put only into an empty queue: never a live slot);
- STOP: the end; the dispatcher queues it behind everything for each sink.
"""

from __future__ import annotations

import queue

from . import logs
from .capture_format import CaptureBatch, SessionEnd
from .config import Config
from .normalize import Gap

_log = logs.get("polygon_conn")

# The frames one socket read completes go downstream together, as one queue item (a hand-over), up to this much
# frame text: queue operations and thread wake-ups are paid per hand-over instead of per frame (at batch 1, a few
# dozen frames each). A frame this large or larger is a hand-over of its own. Small, because a queue slot's size is
# what the capacities bound: with a stalled sink and default capacities, peak RSS at batch 1 was 31 MB with a frame
# a slot, 79 MB with 4 KiB and 216 MB with 16 KiB, which saved only another 4% of CPU.
HANDOVER_BYTES = 4 * 1024
EV_MARKER = b'"ev"'  # also `"ev" : "T"`: the count is an estimate where it is used (readiness, drops)


STOP = None
WAKE = ("backfill",)
FINISH = ("backfill-finish",)


def queued_counts(inbound: queue.Queue) -> tuple[int, int]:
    """What the inbound queue still holds, for a stop's report: (events, estimated by marker in the raw frames (the
    holes told with them are not events), captured messages)."""
    with inbound.mutex:
        items = [item for item in inbound.queue if item.__class__ is tuple and len(item) > 1]
    events = sum(frame.count(b'"ev":') for item in items if item[1].__class__ is list
                 for frame in item[1] if frame.__class__ is bytes)
    frames = sum(batch.frames() for item in items if len(item) > 2 for batch in item[2])
    return events, frames


def wake(inbound: queue.Queue) -> None:
    """From another thread (backfill, with chunks waiting): the dispatcher may be waiting on an empty inbound queue,
    so WAKE goes in, only then (never taking a slot live data could use)."""
    if not inbound.queue:
        try:
            inbound.put_nowait(WAKE)
        except queue.Full:
            pass


def gap_item_ms(gap: Gap) -> int:
    """The ingest_ts of a hole's record: when a drop happened, or when data resumed (when the hole began if it never
    did)."""
    if gap.reason == "inbound_drop" or gap.resumed_ms is None:
        return gap.interrupted_ms
    return gap.resumed_ms


class HandoverStats:
    def __init__(self) -> None:
        self.channel_drops = 0
        self.channel_dropped_frames = 0


class Handover:
    """Owned by the reader thread (single writer); `stats` are read at scrape time."""

    def __init__(self, config: Config, inbound: queue.Queue, capture=None, describe_subscription=lambda: None):
        self._config = config
        self._inbound = inbound
        # SINK=capture (its sinks.SinkQueue): every message as received, handshakes and statuses included. A
        # hand-over's messages travel in its inbound item with the frames and the dispatcher passes them on, with the
        # text its parse proved strict JSON: the frames are parsed once, by the thread that parses without capture.
        self.capture = capture
        self._describe_subscription = describe_subscription
        self.stats = HandoverStats()
        self._bp_warning = logs.RateLimitedWarning(_log, config.bp_warn_interval_secs)
        # What the current socket read completed, not yet handed over (flushed before the next read that may block,
        # at HANDOVER_BYTES, and when the session ends): the holes told with it, then frames for the inbound queue,
        # all received at _ms, with the status objects among them (not counted as dropped events), and for capture
        # every message, those that stay here included (a CaptureBatch: one read, one session).
        self._frames: list = []
        self._ms = 0
        self._bytes = 0
        self._statuses = 0
        self._captured: CaptureBatch | None = None
        # Capture batches of hand-overs the full inbound queue refused (their frames were dropped, counted): they go
        # with the next item that finds room, so the capture keeps them in order; with the capture's queue, at most
        # CAPTURE_CHANNEL_CAP batches, the oldest beyond are counted as capture drops.
        self._capture_held: list[CaptureBatch] = []
        # The held lists released into the inbound queue: the dispatcher empties each once it has offered its batches.
        self._capture_released: list[list[CaptureBatch]] = []
        # Holes not yet told downstream, in order: the session gap (told with the first data of a later session) and
        # inbound drops (told with the next frames that find room).
        self.pending_gaps: list[Gap] = []

    def session_gap_pending(self) -> bool:
        return any(gap.resumed_ms is None and gap.reason != "inbound_drop" for gap in self.pending_gaps)

    def captured(self, data: bytes, read_ns: int, session: int) -> None:
        """A message as received, for the capture (all of one read go in one batch)."""
        captured = self._captured
        if captured is None:  # (before_read hands over before every read: one batch, one read)
            captured = self._captured = CaptureBatch(read_ns, session)
        captured.append(data)

    def offer(self, ingest_ms: int, data: bytes, statuses: int) -> None:
        """Add a frame to the current hand-over; the holes not yet told lead it."""
        if self._frames and (self._bytes + len(data) > HANDOVER_BYTES or self.pending_gaps):
            # (every frame of a hand-over came with one read: before_read hands over before the next)
            self.hand_over(self.capture is not None)
        if self.pending_gaps:
            for gap in self.pending_gaps:
                gap.resumed_ms = ingest_ms
            self._frames, self.pending_gaps = self.pending_gaps, []
        self._frames.append(data)
        self._ms = ingest_ms
        self._bytes += len(data)
        self._statuses += statuses
        if self._bytes >= HANDOVER_BYTES:
            self.hand_over()

    def hand_over(self, keep_last_entry: bool = False) -> None:
        """What the last socket read completed goes downstream as one inbound item: (ingest_ms, frames), and with
        capture (ingest_ms, frames, [its CaptureBatch]), then also for messages that stay here (statuses).
        keep_last_entry: the batch's last message is the frame being offered, which goes in the next hand-over."""
        frames = self._frames
        captured = self._captured
        if not frames and captured is None:
            return
        self._frames = []
        self._bytes = 0
        statuses, self._statuses = self._statuses, 0
        if self.capture is None:
            try:
                self._inbound.put_nowait((self._ms, frames))
            except queue.Full:
                self._drop(self._ms, frames, statuses)
            return
        assert captured is not None, "with a capture every message is in its batch"
        if keep_last_entry:
            self._captured = CaptureBatch(captured.recv_ns, captured.session, captured[-1:])
            del captured[-1]
        else:
            self._captured = None
        ingest_ms = self._ms if frames else captured.recv_ns // 1_000_000
        try:
            if self._capture_held:
                self._release_held()
            self._inbound.put_nowait((ingest_ms, frames, [captured]))
        except queue.Full:
            if frames:
                self._drop(ingest_ms, frames, statuses)
            self._hold_for_capture(captured)

    def session_ended(self, end: SessionEnd, ended_ns: int, session: int, subscribed: bool) -> None:
        """A session is over (its frames handed over): a hole begins if it had subscribed and no earlier one is
        still open; with capture, its `end` line (how it ended, and whether a hole began) follows its frames."""
        if subscribed and not self.session_gap_pending():
            end.gap = True
            end.subscription = self._describe_subscription()
            self.pending_gaps.append(Gap(end.reason, end.detail, ended_ns // 1_000_000, close_code=end.close_code,
                                         close_reason=end.close_reason, subscription=end.subscription))
        if self.capture is not None and session:
            self._captured = CaptureBatch(ended_ns, session, [end])
            self.hand_over()

    def restarted(self, gap: Gap, seq: int, now_ns: int) -> None:
        """The previous run's position was found (state.py): its hole is told before this run's first data; with
        capture, an `end` line of session 0 says so first (with the position, for reprocess to number the same)."""
        self.pending_gaps.append(gap)
        if self.capture is not None:
            last_ingest_ms, last_ts = gap.before or (None, None)
            end = SessionEnd(gap.reason, gap.detail, gap=True, subscription=gap.subscription,
                             position={"last_ingest_ts": last_ingest_ms, "last_ts": last_ts, "seq": seq})
            self._captured = CaptureBatch(now_ns, 0, [end])
            self.hand_over()

    def _hold_for_capture(self, captured: CaptureBatch) -> None:
        """Keep a batch the full inbound queue refused for the next item. CAPTURE_CHANNEL_CAP bounds the capture's
        backlog: the batches held here, those released into the inbound queue and not yet passed on, and those in its
        own queue; beyond it, the oldest held are dropped, counted (so a capture that cannot write gets nothing held:
        its full queue is the backlog)."""
        held = self._capture_held
        held.append(captured)
        self._capture_released = [released for released in self._capture_released if released]
        backlog = len(held) + sum(map(len, self._capture_released)) + self.capture.queue.qsize()
        excess = backlog - self._config.capture_channel_cap
        if excess > 0:
            dropped = held[:excess]
            del held[:excess]
            for batch in dropped:
                self.capture.drop(batch, "inbound queue full and the capture's backlog at CAPTURE_CHANNEL_CAP "
                                  f"({self._config.capture_channel_cap} batches)", batch.recv_ns // 1_000_000)

    def _release_held(self) -> None:
        """The capture batches held while the inbound queue was full, as one item ahead of the next (queue.Full if
        there is still no room)."""
        if self._inbound.full():  # only this thread puts while it runs: room now is room for the put
            raise queue.Full
        self._inbound.put_nowait(self._held_item())
        self._capture_released.append(self._capture_held)
        self._capture_held = []

    def _held_item(self) -> tuple:
        """The held capture batches as one inbound item, with no frames."""
        return self._capture_held[-1].recv_ns // 1_000_000, [], self._capture_held

    def _drop(self, ingest_ms: int, frames: list, statuses: int) -> None:
        """The queue refused a hand-over: its holes are told with the next, its frames are counted as one hole with
        those dropped just before."""
        told = 0
        while told < len(frames) and frames[told].__class__ is Gap:
            frames[told].resumed_ms = None
            told += 1
        if told:
            self.pending_gaps[:0] = frames[:told]
            del frames[:told]
        events = max(0, sum(frame.count(EV_MARKER) for frame in frames) - statuses)
        self.stats.channel_drops += events
        self.stats.channel_dropped_frames += len(frames)
        last = self.pending_gaps[-1] if self.pending_gaps else None
        if last is None or last.reason != "inbound_drop":
            last = Gap("inbound_drop", "", ingest_ms, dropped_events=0, subscription=self._describe_subscription())
            self.pending_gaps.append(last)
        last.dropped_events += events
        last.detail = (f"inbound queue full (CHANNEL_CAP {self._config.channel_cap} hand-overs): "
                       f"{last.dropped_events} event(s) dropped")
        self._bp_warning.warn("inbound queue full: dropping frames (CHANNEL_CAP)",
                              capacity_handovers=self._config.channel_cap,
                              dropped_events_total=self.stats.channel_drops)

    def shutdown_items(self, now_ms: int) -> list[tuple]:
        """After the reader has stopped, what it still holds, as inbound items: capture batches the full queue
        refused, and the holes never told because data did not resume. A session gap becomes `shutdown` (the service
        stopped inside it, at now_ms); drops keep their reason."""
        items = []
        for gap in self.pending_gaps:
            if gap.reason != "inbound_drop":
                gap = shutdown_gap(gap)
            items.append((gap.interrupted_ms if gap.reason == "inbound_drop" else now_ms, gap))
        self.pending_gaps = []
        if self._capture_held:  # ahead of the gaps: capture batches do not wait for them
            items.insert(0, self._held_item())
            self._capture_held = []
        return items


def shutdown_gap(gap: Gap) -> Gap:
    """A session's hole that data never came back from before the stop."""
    stopped = Gap("shutdown", f"the service stopped before data resumed after: {gap.detail}", gap.interrupted_ms,
                  close_code=gap.close_code, close_reason=gap.close_reason, subscription=gap.subscription)
    stopped.before = gap.before
    return stopped
