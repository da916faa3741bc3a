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
        normalize = self.normalizer.normalize
        observe = self.latency.observe
        sink_queues = self.sink_queues
        while True:
            try:
                item = get(timeout=TICK_SECS)
            except queue.Empty:
                if self.stopping.is_set():
                    return
                continue
            if item is STOP:
                for sink_queue in sink_queues:
                    while not sink_queue.close(time.monotonic() + TICK_SECS) and not self.stopping.is_set():
                        if sink_queue.consumer is not None and not sink_queue.consumer.is_alive():
                            break
                return
            ingest_ms, data = item
            self.frames += 1
            try:
                records, newest = normalize(data, ingest_ms)
            except FrameError as exc:
                self._parse_warning.warn(f"skipped a frame: {exc}", frame_bytes=len(data),
                                         parse_errors_total=self.normalizer.parse_errors)
                continue
            if newest is not None:
                observe((ingest_ms - newest) / 1000.0)
            if records:
                for sink_queue in sink_queues:
                    sink_queue.offer(ingest_ms, records)


def stop_inbound(inbound: queue.Queue, deadline: float) -> bool:
    """Queue STOP behind every accepted frame (the reader has stopped, so the dispatcher is making room)."""
    while time.monotonic() < deadline:
        try:
            inbound.put(STOP, timeout=TICK_SECS)
            return True
        except queue.Full:
            continue
    return False
