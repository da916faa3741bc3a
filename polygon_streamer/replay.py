"""`polygon-streamer replay CAPTURE...`: serves capture files over the real Polygon protocol on a local port.

The handshake (connected, auth, subscribe acks) is the local server's (mockserver.py); then each connection gets the
captured data frames of its cluster, in receive-time order, filtered by what it subscribed to (codes, symbols, `*`,
`PREFIX*`): a frame whose events all match is sent byte for byte as captured, with its original batching; otherwise
the matching events alone, re-encoded; captured statuses are not sent (the handshake has its own). Timing: `speed`
1 keeps the captured gaps between frames, N runs N times faster, None as fast as the client reads. After the last
frame the connection stays open and quiet (as a closed market), or starts over with `loop`."""

from __future__ import annotations

import sys
import threading
import time
from typing import Iterable

import ujson

from . import protocol
from .captures import CaptureFiles
from .mockserver import ws_frame
from .normalize import FrameError, IncludeFilter, parse_frame

PROGRESS_SECS = 1.0


def topic_filter(params: str) -> IncludeFilter:
    """Subscribe params (`T.AAPL,Q.*,XT.BTC-*`) as the include filter they mean (`T:AAPL,Q:*,XT:BTC-*`)."""
    return IncludeFilter(topic.strip().replace(".", ":", 1) for topic in params.split(",") if topic.strip())


def symbol_of(cluster: str, event: dict) -> str:
    shape = protocol.SHAPES.get(cluster, {}).get(event.get("ev"), protocol.OTHER)
    for key in shape.symbol_keys:
        value = event.get(key)
        if isinstance(value, str):
            return value
    return ""


def parse_time(text: str | None) -> int | None:
    """--from/--to: ISO 8601 UTC (2026-11-25T14:30:00Z, fractions allowed) or Unix time in s or ms -> ms."""
    if text is None:
        return None
    stripped = text.strip()
    if stripped.replace(".", "", 1).isdigit():
        value = float(stripped)
        return int(value if value > 1e11 else value * 1000)
    from datetime import datetime, timezone

    try:
        moment = datetime.fromisoformat(stripped.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected an ISO 8601 time such as 2026-11-25T14:30:00Z or Unix seconds, not {text!r}") \
            from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


class Replay:
    """The frame source of a replaying MockServer (its `source`): one call per subscribed connection."""

    def __init__(self, paths: Iterable[str], speed: float | None = 1.0, start_ms: int | None = None,
                 end_ms: int | None = None, loop: bool = False, progress: bool = True):
        self.paths = list(paths)
        self.speed = speed
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.loop = loop
        self.progress = progress
        self.frames_sent = 0
        self.events_sent = 0
        self.skipped: list = []
        self._lock = threading.Lock()
        self.finished = threading.Event()  # a connection reached the end of the captures (the first pass)

    def __call__(self, connection, params: str) -> None:
        matcher = topic_filter(params)
        stopping = connection.server.stopping
        next_report = time.monotonic() + PROGRESS_SECS
        while not stopping.is_set():
            files = CaptureFiles(self.paths)
            first_ns = None
            started = time.monotonic()
            position_ms = 0
            for frame in files:
                if stopping.is_set():
                    return
                position_ms = frame.recv_ns // 1_000_000
                if frame.cluster != connection.cluster or not frame.is_json:
                    continue
                if self.start_ms is not None and position_ms < self.start_ms:
                    continue
                if self.end_ms is not None and position_ms > self.end_ms:
                    break
                payload, events = self._select(frame, matcher, connection.cluster)
                if payload is None:
                    continue
                if first_ns is None:
                    first_ns = frame.recv_ns
                if self.speed is not None:
                    due = started + (frame.recv_ns - first_ns) / 1e9 / self.speed
                    while (wait := due - time.monotonic()) > 0:
                        connection._pump(min(wait, 0.2))  # answer pings and closes while waiting
                        if stopping.is_set():
                            return
                connection.sock.sendall(ws_frame(1, payload))
                connection._pump(0)
                with self._lock:
                    self.frames_sent += 1
                    self.events_sent += events
                if self.progress and time.monotonic() >= next_report:
                    self._report(position_ms)
                    next_report = time.monotonic() + PROGRESS_SECS
            with self._lock:
                self.skipped = files.skipped
            self.finished.set()
            if self.progress:
                self._report(position_ms, "end of the captures" + ("; starting over" if self.loop else
                                                                    "; the connection stays open"))
            if not self.loop:
                break
        while not stopping.is_set():  # a market after the close: quiet, but answering pings
            connection._pump(0.2)

    @staticmethod
    def _select(frame, matcher: IncludeFilter, cluster: str) -> tuple[bytes | None, int]:
        """The frame to send (as captured when every event matches) and its number of events."""
        try:
            events = parse_frame(frame.data)
        except FrameError:
            return None, 0
        kept = [event for event in events if isinstance(event, dict) and event.get("ev") != "status"
                and matcher.matches(str(event.get("ev")), symbol_of(cluster, event))]
        if not kept:
            return None, 0
        if len(kept) == len(events):
            return frame.data, len(kept)
        return ujson.dumps(kept, ensure_ascii=False, escape_forward_slashes=False).encode("utf-8"), len(kept)

    def _report(self, position_ms: int, note: str = "") -> None:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(position_ms / 1000)) if position_ms else "-"
        print(f"replay: {self.frames_sent:,} frames, {self.events_sent:,} events sent, capture time {when}Z"
              + (f": {note}" if note else ""), file=sys.stderr, flush=True)
