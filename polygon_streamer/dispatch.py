"""Inbound queue -> normalize, filter, sample, seq -> every sink's queue, one batch per frame."""

from __future__ import annotations

import queue
import time

from . import logs
from .metrics import LatencyHistogram
from .normalize import FrameError, FrameNormalizer
from .sinks import TICK_SECS, SinkQueue
from .threads import ServiceThread

STOP = None
# A batch handed to the sinks joins the frames that were waiting together while it holds fewer events than this, so
# that a sink queue's capacity (in batches) bounds memory about as it did with one frame per batch at batch 100.
MAX_BATCH_EVENTS = 100

_log = logs.get("polygon_streamer")


class Dispatcher(ServiceThread):
    """Ends after STOP has come through the inbound queue, so every frame accepted before it reaches the sinks;
    then queues STOP behind them for each sink. The stop flag is for a hard stop only."""

    def __init__(self, inbound: queue.Queue, normalizer: FrameNormalizer, sink_queues: list[SinkQueue],
                 latency: LatencyHistogram, warn_interval_secs: float):
        super().__init__("polygon-dispatcher")
        self.inbound = inbound
        self.normalizer = normalizer
        self.sink_queues = sink_queues
        self.latency = latency
        self.frames = 0
        self._parse_warning = logs.RateLimitedWarning(_log, warn_interval_secs)

    def loop(self) -> None:
        get = self.inbound.get
        get_ready = self.inbound.get_nowait
        sink_queues = self.sink_queues
        while True:
            try:
                item = get(timeout=TICK_SECS)
            except queue.Empty:
                if self.stopping.is_set():
                    return
                continue
            # Every frame already waiting joins this batch: one hand-over to each sink for all of them, instead of
            # a queue operation and a sink wake-up per frame (small frames arrive many at a time).
            ingest_ms = item[0] if item is not STOP else 0
            batch: list[tuple] = []
            while item is not STOP:
                self._normalize(item, batch)
                if len(batch) >= MAX_BATCH_EVENTS:
                    break
                try:
                    item = get_ready()
                except queue.Empty:
                    break
            if batch:
                for sink_queue in sink_queues:
                    sink_queue.offer(ingest_ms, batch)
            if item is STOP:
                for sink_queue in sink_queues:
                    while not sink_queue.close(time.monotonic() + TICK_SECS) and not self.stopping.is_set():
                        if sink_queue.consumer is not None and not sink_queue.consumer.is_alive():
                            break
                return

    def _normalize(self, item: tuple[int, bytes], batch: list[tuple]) -> None:
        ingest_ms, data = item
        self.frames += 1
        try:
            records, newest = self.normalizer.normalize(data, ingest_ms)
        except FrameError as exc:
            self._parse_warning.warn(f"skipped a frame: {exc}", frame_bytes=len(data),
                                     parse_errors_total=self.normalizer.parse_errors)
            return
        if newest is not None:
            self.latency.observe((ingest_ms - newest) / 1000.0)
        batch += records


def stop_inbound(inbound: queue.Queue, deadline: float) -> bool:
    """Queue STOP behind every accepted frame (the reader has stopped, so the dispatcher is making room)."""
    while time.monotonic() < deadline:
        try:
            inbound.put(STOP, timeout=TICK_SECS)
            return True
        except queue.Full:
            continue
    return False
