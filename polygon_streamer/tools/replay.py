"""`polygon-streamer replay CAPTURE...`: serves capture files over the real Polygon protocol on a local port.

The handshake (connected, auth, subscribe acks) is the local server's (local/mockserver.py, on the protocol's
server side, wsserver.py), with its bounds on strangers
(a client cap, a handshake deadline, bounded reads); then each connection gets the captured data frames of its
cluster, in receive-time order, filtered by what it subscribed to (codes, symbols, `*`, `PREFIX*`): a frame whose
events all match is sent byte for byte as captured (a `frame_b64` one as a binary message), with its original
batching; otherwise the matching events alone, re-encoded; a frame that is not JSON is sent as captured (the live
client received it); captured statuses are not sent (the handshake has its own).

Sessions: where the captured session ended and another followed, the connection ends the same way (a close frame with
the captured code where the server sent one, else the TCP connection is cut), so a client sees the reconnects and
gaps it saw live; its next connection with the same API key goes on with the next session. After the last session the
connection stays open and quiet (as a closed market), or starts over with `loop` (never when a pass had nothing to
send), and the next connection with that key starts from the beginning.

Timing: `speed` 1 keeps the captured gaps between frames, N runs N times faster, None as fast as the client reads.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Iterable, NamedTuple

import ujson

from .. import protocol
from .captures import CaptureFiles, CapturedFrame
from ..normalize import FrameError, IncludeFilter, parse_frame
from ..wsserver import topic_filter

PROGRESS_SECS = 1.0
# A client that does not answer our close within this long is cut.
CLOSE_WAIT_SECS = 1.0

# What backfill delivered (REST, not the WebSocket): the client's own backfill fetches it, replay does not serve it.
BACKFILL_FORMS = ("backfill", "backfill_summary")


def symbol_of(cluster: str, event: dict) -> str:
    code = event.get("ev")
    shape = protocol.SHAPES.get(cluster, {}).get(code, protocol.OTHER) if isinstance(code, str) else protocol.OTHER
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


def format_ms(ms: int | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else "-"


class Survey(NamedTuple):
    """What the captures hold, read once at start: data frames (and sessions) per cluster within the window, the
    receive times they span, and the lines that cannot be used."""
    frames: dict[str, int]
    sessions: dict[str, int]
    first_ms: int | None
    last_ms: int | None
    window_frames: int
    skipped: list


ACK_TEXT = b"subscribed to: "


def _acked_topics(frame: CapturedFrame) -> list[str]:
    """The topics a captured subscribe ack names (`subscribed to: T.*`)."""
    try:
        events = parse_frame(frame.data)
    except FrameError:
        return []
    return [message[len("subscribed to: "):].strip() for event in events
            if isinstance(event, dict) and event.get("ev") == "status" and event.get("status") == "success"
            and isinstance(message := event.get("message"), str) and message.startswith("subscribed to: ")
            and "." in message]


def _is_status_only(frame: CapturedFrame) -> bool:
    if b"status" not in frame.data:
        return False
    try:
        events = parse_frame(frame.data)
    except FrameError:
        return False
    return bool(events) and all(isinstance(event, dict) and event.get("ev") == "status" for event in events)


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
        self._cursors: dict[str, int] = {}  # API key -> the captured session (its run number) to serve next
        self.finished = threading.Event()  # a connection reached the end of the captures (the first pass)

    def survey(self) -> Survey:
        frames: dict[str, int] = {}
        sessions: dict[str, set] = {}
        first = last = None
        files = CaptureFiles(self.paths)
        for frame in files:
            if frame.form == "end" or frame.form in BACKFILL_FORMS or _is_status_only(frame):
                continue
            at_ms = frame.recv_ns // 1_000_000
            first = at_ms if first is None else first
            last = at_ms
            if self._before(at_ms) or self._after(at_ms):
                continue
            frames[frame.cluster] = frames.get(frame.cluster, 0) + 1
            sessions.setdefault(frame.cluster, set()).add(frame.session)
        self.skipped = files.skipped
        return Survey(frames, {cluster: len(numbers) for cluster, numbers in sessions.items()}, first, last,
                      sum(frames.values()), files.skipped)

    def _before(self, at_ms: int) -> bool:
        return self.start_ms is not None and at_ms < self.start_ms

    def _after(self, at_ms: int) -> bool:
        return self.end_ms is not None and at_ms > self.end_ms

    def __call__(self, connection, params: str) -> None:
        matcher = topic_filter(params)
        stopping = connection.server.stopping
        key = connection.key or ""
        self._next_report = time.monotonic() + PROGRESS_SECS
        while not stopping.is_set():
            outcome = self._serve_pass(connection, matcher, key)
            if outcome == "session_end" or stopping.is_set():
                return
            self.finished.set()
            with self._lock:
                self._cursors.pop(key, None)  # the next connection with this key starts from the beginning
            if not self.loop or outcome == "nothing":
                note = "nothing in the captures matches this subscription" if outcome == "nothing" else \
                    "end of the captures"
                self._report(0, note + "; the connection stays open")
                break
            self._report(0, "end of the captures; starting over")
        while not stopping.is_set():  # a market after the close: quiet, but answering pings
            connection._pump(0.2)

    def _serve_pass(self, connection, matcher: IncludeFilter, key: str) -> str:
        """One pass from this key's session on: "session_end" (the connection was ended where the captured session
        ended), "end" (the captures are over) or "nothing" (nothing was sent in the whole pass)."""
        stopping = connection.server.stopping
        with self._lock:
            target = self._cursors.get(key, 0)
        run = -1
        session = None
        after_end = False
        ended_by = None   # how the session being served ended (its `end` line), once seen
        acked: list[str] = []  # the topics the captured session had acknowledged so far
        whole = False  # the client's subscription covers them: frames go as captured
        served_in_run = served = 0
        first_ns = None
        started = time.monotonic()
        files = CaptureFiles(self.paths)
        for frame in files:
            if stopping.is_set():
                return "session_end"
            if frame.cluster != connection.cluster or frame.form in BACKFILL_FORMS:
                continue
            if run < 0 or frame.session != session or after_end:
                if run >= target and served_in_run:  # the served session is over and another follows
                    with self._lock:
                        self._cursors[key] = run + 1
                    self._end_connection(connection, ended_by)
                    return "session_end"
                run += 1
                session = frame.session
                after_end = False
                ended_by = None
                acked = []
                whole = False
                served_in_run = 0
            if frame.form == "end":
                after_end = True
                ended_by = frame.end
                continue
            if run < target:
                continue
            if ACK_TEXT in frame.data:
                acked += _acked_topics(frame)
                # A client subscribed to at least what the live one was gets what the live one got, byte for byte.
                whole = bool(acked) and all(matcher.covers(*topic.split(".", 1)) for topic in acked)
            at_ms = frame.recv_ns // 1_000_000
            if self._before(at_ms):
                continue
            if self._after(at_ms):
                break
            payload, events = self._select(frame, matcher, connection.cluster, whole)
            if payload is None:
                continue
            if first_ns is None:
                first_ns = frame.recv_ns
                started = time.monotonic()
            if self.speed is not None:
                due = started + (frame.recv_ns - first_ns) / 1e9 / self.speed
                while (wait := due - time.monotonic()) > 0:
                    connection._pump(min(wait, 0.2))  # answer pings and closes while waiting
                    if stopping.is_set():
                        return "session_end"
            connection.send_raw(payload, binary=frame.form == "frame_b64")
            connection._pump(0)
            served_in_run += 1
            served += 1
            with self._lock:
                self.frames_sent += 1
                self.events_sent += events
            if self.progress and time.monotonic() >= self._next_report:
                self._report(at_ms)
                self._next_report = time.monotonic() + PROGRESS_SECS
        with self._lock:
            self.skipped = files.skipped
        return "end" if served else "nothing"

    @staticmethod
    def _end_connection(connection, end) -> None:
        """As the captured session ended: the server's close frame where it sent one, else a cut connection."""
        if end is not None and end.reason == "server_close" and end.close_code is not None:
            connection.close(end.close_code, end.close_reason or "", CLOSE_WAIT_SECS)
        connection.abort()

    @staticmethod
    def _select(frame: CapturedFrame, matcher: IncludeFilter, cluster: str, whole: bool) -> tuple[bytes | None, int]:
        """The message to send (as captured when every event matches, or `whole`: the client's subscription covers
        the captured session's) and its number of events; status-only frames are not sent."""
        try:
            events = parse_frame(frame.data)
        except FrameError:
            return frame.data, 0  # not JSON: the live client received it as it is
        if whole:
            data = [event for event in events if not (isinstance(event, dict) and event.get("ev") == "status")]
            return (frame.data, len(data)) if data or not events else (None, 0)
        kept = [event for event in events if isinstance(event, dict) and event.get("ev") != "status"
                and matcher.matches(str(event.get("ev")), symbol_of(cluster, event))]
        if not kept:
            return None, 0
        if len(kept) == len(events):
            return frame.data, len(kept)
        return ujson.dumps(kept, ensure_ascii=False, escape_forward_slashes=False).encode("utf-8"), len(kept)

    def _report(self, position_ms: int, note: str = "") -> None:
        if not self.progress:
            return
        when = f", capture time {format_ms(position_ms)}" if position_ms else ""
        print(f"replay: {self.frames_sent:,} frames, {self.events_sent:,} events sent{when}"
              + (f": {note}" if note else ""), file=sys.stderr, flush=True)
