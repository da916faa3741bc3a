"""Inbound queue -> normalize, filter, sample, seq -> every sink's queue, one batch per hand-over (the frames one
socket read completed, received at the same time); a Gap notice (leading a hand-over's frames, or an item of its own at
shutdown) becomes one gap record for every sink, in order with the data (handover.py has the items' shapes). With
SINK=capture, a hand-over's capture entries (every message as received) go on to
the capture's queue, with the text of each frame the parse proved strict JSON as received."""

from __future__ import annotations

import operator
import queue
import time

from . import logs
from .backfill import Desk
from .capture_format import Backfilled, BackfillSummary, CaptureBatch
from .metrics import LatencyHistogram
from .handover import FINISH, STOP, WAKE, gap_item_ms
from .normalize import EXTRA, FrameError, FrameNormalizer, Gap
from .sinks import TICK_SECS, FramedBatch, SinkQueue
from .subscriptions import Subscriptions
from .threads import ServiceThread

CODE = operator.itemgetter(1)
# polygon_last_event_timestamp_seconds is kept per code; codes come from the network, so the table is bounded.
_LAST_SEEN_LIMIT = 1000

_log = logs.get("polygon_streamer")
_gap_log = logs.get("polygon_gaps")


class Dispatcher(ServiceThread):
    """Ends after STOP has come through the inbound queue, so every frame accepted before it reaches the sinks;
    then queues STOP behind them for each sink. The stop flag is for a hard stop only."""

    def __init__(self, inbound: queue.Queue, normalizer: FrameNormalizer, sink_queues: list[SinkQueue],
                 latency: LatencyHistogram, warn_interval_secs: float, capture_queue: SinkQueue | None = None,
                 desk: Desk | None = None):
        super().__init__("dispatcher")
        self.inbound = inbound
        self.normalizer = normalizer
        self.sink_queues = sink_queues
        # The gateway's queue takes each hand-over as a FramedBatch; the other sinks, the records.
        self._framed = [sink_queue for sink_queue in sink_queues if sink_queue.takes_frames]
        self._plain = [sink_queue for sink_queue in sink_queues if not sink_queue.takes_frames]
        self.capture_queue = capture_queue
        self.latency = latency
        self._parse_warning = logs.RateLimitedWarning(_log, warn_interval_secs)
        self._sequence_warning = logs.RateLimitedWarning(_log, warn_interval_secs)
        # code -> ingest ms of its last event delivered (polygon_last_event_timestamp_seconds)
        self.last_seen_ms: dict[str, int] = {}
        self.desk = desk  # BACKFILL: the dispatcher's side of gap healing
        # A sink takes its clients' added topics (extra_topics): the subscriptions whose two sets the normalizer
        # follows (set_union), checked once per hand-over.
        self.union: Subscriptions | None = None
        self._union_version = 0
        self._capture_session = 0  # the session of the last captured batch (backfill lines take it)

    def loop(self) -> None:
        get = self.inbound.get
        normalizer = self.normalizer
        normalize = normalizer.normalize
        observe = self.latency.observe
        sink_queues = self.sink_queues
        plain_queues = self._plain
        framed_queues = self._framed
        last_seen = self.last_seen_ms
        while True:
            try:
                item = get(timeout=TICK_SECS)
            except queue.Empty:
                if self.stopping.is_set():
                    return
                if self.desk is not None:
                    self._backfill()
                continue
            if item is STOP:
                if self.desk is not None:
                    self.desk.shutdown(self.emit, time.time_ns() // 1_000_000)
                    self.desk.snapshot(force=True)  # where every topic stopped, for the next run (state.py)
                for sink_queue in sink_queues + ([self.capture_queue] if self.capture_queue else []):
                    while not sink_queue.close(time.monotonic() + TICK_SECS) and not self.stopping.is_set():
                        if sink_queue.consumer is not None and not sink_queue.consumer.is_alive():
                            break
                return
            if item is WAKE:
                self._backfill()
                continue
            ingest_ms = item[0]
            frames = item[1]
            if frames is FINISH:  # the service stops at ingest_ms: the open backfills end
                if self.desk is not None:
                    self.desk.shutdown(self.emit, ingest_ms)
                continue
            if frames.__class__ is Gap:
                self.gap(frames, ingest_ms)
                continue
            if frames.__class__ is Backfilled or frames.__class__ is BackfillSummary:  # reprocess of a capture
                self.emit(frames, ingest_ms)
                continue
            if frames and frames[0].__class__ is Gap:  # the holes before these frames
                told = 0
                while frames[told].__class__ is Gap:
                    self.gap(frames[told], gap_item_ms(frames[told]))
                    told += 1
                frames = frames[told:]
            union = self.union
            if union is not None and union.union_version != self._union_version:
                self._union_version = union.union_version
                normalizer.set_union(union.desired, union.extra, ingest_ms)
            elif normalizer.retire_due is not None and ingest_ms >= normalizer.retire_due:
                normalizer.expire_retired(ingest_ms)
            anomalies = normalizer.sequence_anomalies_total
            batch = None
            extra = normalizer.extra
            if extra:
                extra.clear()
            framed = FramedBatch() if framed_queues else None
            # capturing: each frame's text, if strict JSON as received
            proven: list[str | None] | None = [] if len(item) > 2 else None
            for data in frames:  # the frames one socket read completed: one batch for each sink
                diverted = len(extra)
                try:
                    records, newest = normalize(data, ingest_ms)
                except FrameError as exc:
                    self._parse_warning.warn(f"skipped a frame: {exc}", frame_bytes=len(data),
                                             parse_errors_total=normalizer.parse_errors)
                    if proven is not None:
                        proven.append(None)
                    continue
                if proven is not None:
                    proven.append(normalizer.frame_text)
                if framed is not None:
                    self._frame(framed, data, records, extra, diverted)
                if newest is not None:
                    observe((ingest_ms - newest) / 1000.0)
                if records:
                    if batch is None:
                        batch = records
                    else:
                        batch += records
            if batch:
                if len(batch) == 1:
                    last_seen[batch[0][1]] = ingest_ms
                else:
                    last_seen.update(dict.fromkeys(map(CODE, batch), ingest_ms))
                if len(last_seen) > _LAST_SEEN_LIMIT:
                    last_seen.clear()
                for sink_queue in plain_queues:
                    sink_queue.offer(ingest_ms, batch)
            if framed:
                for sink_queue in framed_queues:
                    sink_queue.offer(ingest_ms, framed)
            if proven is not None:
                self._capture(item[2], frames, proven)
            if normalizer.sequence_anomalies_total != anomalies:
                self._warn_sequence()
            if self.desk is not None:
                self.desk.snapshot()
                if self.desk.due(False):
                    self.desk.deliver(self.emit)

    def _frame(self, framed: FramedBatch, data: bytes | str, records: list, extra: list, diverted: int) -> None:
        """A frame's records into the gateway's batch, with the events of topics only its clients asked for
        (extra[diverted:], diverted by normalize, each with its place among the frame's records) where they were;
        the frame's bytes go with them when every element of the frame is among them and it is strict JSON."""
        count = len(records) + len(extra) - diverted
        if not count:
            return
        start = len(framed)
        if count > len(records):
            at = 0
            for position, code, symbol, text in extra[diverted:]:
                framed += records[at:position]
                at = position
                framed.append((0, code, symbol, EXTRA, None, text))
            framed += records[at:]
        else:
            framed += records
        normalizer = self.normalizer
        raw = None
        if count == normalizer.frame_events and normalizer.frame_text is not None:
            raw = data if data.__class__ is bytes else normalizer.frame_text.encode("utf-8")
        framed.frames.append((start, len(framed), raw, count - len(records)))

    def _capture(self, batches: list, frames: list[bytes], proven: list[str | None]) -> None:
        """A hand-over's capture batch (sinks.capture.CaptureBatch: every message in order, data frames and statuses),
        or, after the inbound queue was full, the batches held meanwhile. The hand-over's data frames are among its
        messages, in the same order: those the parse proved strict JSON go on as their text, which the capture embeds
        as it is; the rest stay bytes, for the capture to check."""
        capture_queue = self.capture_queue
        if capture_queue is None:
            return
        if frames:
            batch = batches[-1]
            at = 0
            for index, message in enumerate(batch):
                if at < len(frames) and message is frames[at]:
                    if proven[at] is not None:
                        batch[index] = proven[at]
                    at += 1
        for batch in batches:
            capture_queue.offer(batch.recv_ns // 1_000_000, batch)
        if batches:
            self._capture_session = batches[-1].session
        if not frames:
            batches.clear()  # passed on: the reader counts the batches it released and the dispatcher has not

    def gap(self, gap: Gap, ingest_ms: int) -> None:
        """One gap record, to every sink; a new session also restarts the `q` checks."""
        if gap.reason not in ("inbound_drop", "sink_drop"):
            self.normalizer.new_session()
        record = self.normalizer.gap_record(gap, ingest_ms)
        _gap_log.warning("gap in the data: %s", gap.detail,
                         extra={"fields": {"reason": gap.reason, "gap_ms": self.normalizer.last_gap_ms,
                                           "dropped_events": gap.dropped_events, "seq": record[0]}})
        for sink_queue in self.sink_queues:
            sink_queue.offer(ingest_ms, [record])
        if self.desk is not None:
            last = self.normalizer.last_ingest_ms
            self.desk.gap(gap.reason, record[0], last if last is not None else gap.interrupted_ms, gap.resumed_ms,
                          self.emit)

    def _backfill(self) -> None:
        """Chunks of backfill while no live data waits (a bounded number a turn)."""
        desk = self.desk
        if desk is None:
            return
        desk.snapshot()
        for _ in range(64):
            if not desk.due(True) or self.inbound.queue:
                return
            desk.deliver(self.emit)

    def emit(self, note: Backfilled | BackfillSummary, ingest_ms: int) -> tuple[int, int]:
        """Backfilled events (records marked "backfill": true) or a backfill summary, to every sink and the capture.
        Returns (records offered, events left out by NDJSON_INCLUDE or sampling)."""
        normalizer = self.normalizer
        left_out = normalizer.filtered + normalizer.sampled_out
        if note.__class__ is Backfilled:
            try:
                records, _ = normalizer.normalize(note.text, ingest_ms, backfill=True)
            except FrameError as exc:
                self._parse_warning.warn(f"skipped backfilled events: {exc}", frame_bytes=len(note.text))
                return 0, 0
        else:
            records = [normalizer.summary_record(note.text, ingest_ms)]
        if records:
            for sink_queue in self.sink_queues:
                sink_queue.offer(ingest_ms, records)
        if self.capture_queue is not None:
            self.capture_queue.offer(ingest_ms, CaptureBatch(ingest_ms * 1_000_000, self._capture_session, [note]))
        return len(records), normalizer.filtered + normalizer.sampled_out - left_out

    def _warn_sequence(self) -> None:
        anomaly = self.normalizer.last_sequence_anomaly
        if anomaly is None:
            return
        code, symbol, q, previous, reason = anomaly
        self._sequence_warning.warn(f"sequence anomaly: {code} {symbol} q={q} after q={previous} ({reason}); "
                                    "the event is delivered as received", type=code, symbol=symbol, q=q,
                                    previous_q=previous, reason=reason,
                                    sequence_anomalies_total=self.normalizer.sequence_anomalies_total)


def stop_inbound(inbound: queue.Queue, deadline: float) -> bool:
    """Queue STOP behind every accepted frame (the reader has stopped, so the dispatcher is making room)."""
    while time.monotonic() < deadline:
        try:
            inbound.put(STOP, timeout=TICK_SECS)
            return True
        except queue.Full:
            continue
    return False
