"""The one thread that owns the WebSocket: connect, auth, subscribe, recv, backoff, reconnect; and its heartbeat."""

from __future__ import annotations

import functools
import math
import queue
import random
import re
import socket
import threading
import time
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import websocket
from websocket._abnf import frame_buffer  # the same class and recv_length() in 1.2.3 and 1.9.x

from . import logs, protocol
from .config import Config
from .normalize import FrameError, Gap, parse_frame
from .sinks.capture import CaptureBatch
from .subscriptions import Subscriptions
from .threads import ServiceThread, set_os_thread_name

_log = logs.get("polygon_conn")

# A session that stayed subscribed this long resets the backoff. Not on auth_success: a max_connections
# eviction arrives right after it, and resetting there makes two processes on one key evict each other in a loop.
HEALTHY_SESSION_SECS = 10.0
# How often a blocked recv wakes up to look at the stop flag and the read deadline.
TICK_SECS = 0.25
# Cap on the TCP connect + WebSocket upgrade, in total: a server that accepts and never answers, or answers one byte
# at a time, cannot hang us.
CONNECT_TIMEOUT_SECS = 10.0
# A status message is logged with at most this much of the server's text.
SERVER_MESSAGE_CHARS = 300
CLOSE_MESSAGE_TOO_BIG = 1009
# One socket read takes up to this much: every frame that has arrived, at batch 1 hundreds of them. Below glibc's
# mmap threshold (128 KiB): Python allocates the whole size for each recv before trimming it to what came, and a
# 256 KiB request was an mmap + page faults + munmap on every read, which at a steady 5,000 frames/s was a third of
# the reader's CPU.
READ_CHUNK_BYTES = 64 * 1024
# The frames one socket read completes go downstream together, as one queue item (a hand-over), up to this much
# frame text: queue operations and thread wake-ups are paid per hand-over instead of per frame (at batch 1, a few
# dozen frames each). A frame this large or larger is a hand-over of its own. Small, because a queue slot's size is
# what the capacities bound: with a stalled sink and default capacities, peak RSS at batch 1 was 31 MB with a frame
# a slot, 79 MB with 4 KiB and 216 MB with 16 KiB, which saved only another 4% of CPU.
HANDOVER_BYTES = 4 * 1024
EV_MARKER = b'"ev"'  # also `"ev" : "T"`: the count is an estimate where it is used (readiness, drops)
# A frame that may hold a status object is parsed here, and statuses are told from data by the parsed elements. A
# status spells `status` with letters or with \u escapes (JSON allows nothing else), so a frame with neither is data.
# Searched with re's literal search and a one-byte `in` (memchr) before the escape: `b"\\u" in data` alone took 11 us
# of an 11 KB frame, half of the reader's CPU at batch 100 (4.6 us now for both searches).
_STATUS_WORD = re.compile(rb"status").search


def may_hold_status(data: bytes) -> bool:
    return _STATUS_WORD(data) is not None or (b"\\" in data and b"\\u" in data)


def public_url(url: str) -> str:
    """The URL without query or credentials, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class Backoff:
    """Exponential backoff with jitter, never below the initial delay nor above the ceiling."""

    def __init__(self, initial: float, ceiling: float, uniform: Callable[[float, float], float] = random.uniform):
        self.initial = initial
        self.ceiling = ceiling
        self._uniform = uniform
        self.attempt = 0

    def next_delay(self) -> float:
        base = min(self.ceiling, self.initial * (2 ** min(self.attempt, 62)))
        self.attempt += 1
        return min(self.ceiling, max(self.initial, self._uniform(base / 2, base)))

    def reset(self) -> None:
        self.attempt = 0


class FrameTooLarge(Exception):
    def __init__(self, size: int, limit: int):
        super().__init__(f"a message of {size} bytes exceeds MAX_FRAME_BYTES ({limit})")
        self.size = size


class _BoundedFrameBuffer(frame_buffer):
    """websocket-client's frame reader, refusing a frame whose header announces more than the cap before reading
    (and buffering) any of its payload."""

    max_bytes = 0

    def recv_length(self) -> None:
        super().recv_length()
        if self.length > self.max_bytes:
            raise FrameTooLarge(self.length, self.max_bytes)


class BoundedWebSocket(websocket.WebSocket):
    """A WebSocket with a size cap on every frame, a total deadline on connect + upgrade (create_connection's
    timeout applies to each read, so a server answering a byte at a time could hold the upgrade forever), and reads
    from the socket in large chunks: websocket-client's frame reader asks for the 2-byte header, the length and the
    payload separately, three syscalls per frame, each a release and re-take of the GIL; one recv now serves every
    frame that has arrived. `before_read` runs before each read that may block (the reader hands over what the last
    read completed); `read_ns` is when the last read returned: the receive time of every frame it completed."""

    def __init__(self, *args, max_frame_bytes: int, connect_deadline_secs: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.connect_deadline_secs = connect_deadline_secs
        self.frame_buffer = _BoundedFrameBuffer(self._recv, True)
        self.frame_buffer.max_bytes = max_frame_bytes
        self._inbox = b""   # bytes read from the socket and not yet handed to the frame reader, from _inbox_at
        self._inbox_at = 0
        self.before_read: Callable[[], None] | None = None
        self.read_ns = 0

    def _recv(self, bufsize: int) -> bytes:
        if self._inbox_at >= len(self._inbox):
            if self.before_read is not None:
                self.before_read()
            self._inbox = super()._recv(READ_CHUNK_BYTES)
            self.read_ns = time.time_ns()
            self._inbox_at = 0
        start = self._inbox_at
        self._inbox_at = min(start + bufsize, len(self._inbox))
        if start == 0 and self._inbox_at == len(self._inbox):
            return self._inbox
        return self._inbox[start:self._inbox_at]

    def next_data_message(self) -> bytes | None:
        """The payload of the frame at the head of the inbox when it is the common case, a complete unfragmented
        unmasked text or binary frame shorter than 64 KiB within MAX_FRAME_BYTES, taken without websocket-client's
        per-frame objects (at batch 1 they were most of the reader's own work); None for anything else, which
        recv_frame then reads the library's way, its checks included."""
        inbox = self._inbox
        at = self._inbox_at
        if len(inbox) - at < 2:
            return None
        first = inbox[at]
        if first != 0x81 and first != 0x82:  # FIN, no RSV bits, text or binary
            return None
        frame_buffer = self.frame_buffer
        if frame_buffer.header is not None or frame_buffer.recv_buffer:  # the library is inside a frame
            return None
        length = inbox[at + 1]
        start = at + 2
        if length == 126:
            length = int.from_bytes(inbox[start:start + 2], "big")
            start += 2
        elif length > 126:  # a 64-bit length or a mask bit (servers do not mask)
            return None
        end = start + length
        if end > len(inbox) or length > frame_buffer.max_bytes:
            return None
        self._inbox_at = end
        return inbox[start:end]

    def connect(self, url, **options):
        finished = threading.Event()
        expired = threading.Event()

        def watch() -> None:
            set_os_thread_name("polygon-connect-watch")
            if finished.wait(self.connect_deadline_secs):
                return
            expired.set()
            while not finished.is_set():  # the socket exists once TCP (and TLS) are up
                sock = self.sock
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                finished.wait(0.05)

        watchdog = threading.Thread(target=watch, name="polygon-connect-watch", daemon=True)
        watchdog.start()
        try:
            super().connect(url, **options)
        except Exception:
            if expired.is_set():
                raise websocket.WebSocketTimeoutException(
                    f"timed out: connect and upgrade took longer than {self.connect_deadline_secs:g}s") from None
            raise
        finally:
            finished.set()
        if expired.is_set():
            raise websocket.WebSocketTimeoutException(
                f"timed out: connect and upgrade took longer than {self.connect_deadline_secs:g}s")


class SessionEnd(Exception):
    """Why a connection ended: reason is the log's sentence, gap the one word of the gap record's reason
    (schema.md), status the Polygon status that ended it, close_code / close_reason the server's close frame."""

    def __init__(self, reason: str, status: str | None = None, gap: str = "disconnect",
                 close_code: int | None = None, close_reason: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.gap = gap
        self.close_code = close_code
        self.close_reason = close_reason


class ReaderStats:
    """Counters written by the reader (and heartbeat) threads only; metrics.py reads them at scrape time."""

    def __init__(self) -> None:
        self.messages_received = 0
        self.channel_drops = 0
        self.channel_dropped_frames = 0
        self.reconnects = 0
        self.reconnect_success = 0
        self.reconnect_failure = 0
        self.read_timeouts = 0
        self.stale_timeouts = 0
        self.oversize_frames = 0
        self.errors = 0
        self.heartbeats_sent = 0
        self.statuses: dict[str, int] = {}
        self.connected = False
        self.sessions = 0


class Reader(ServiceThread):
    def __init__(self, config: Config, inbound: queue.Queue, capture=None, subscriptions: Subscriptions | None = None):
        super().__init__("polygon-reader")
        self._config = config
        self.subscriptions = subscriptions or Subscriptions(config.subscription.split(","), "SUBSCRIPTION")
        self._inbound = inbound
        # SINK=capture (its sinks.SinkQueue): every message as received, handshakes and statuses included. A
        # hand-over's messages travel in its inbound item with the frames and the dispatcher passes them on, with the
        # text its parse proved strict JSON: the frames are parsed once, by the thread that parses without capture.
        self._capture = capture
        self.last_recv_ns = 0  # when the socket read that completed the last message returned (time.time_ns())
        # What the current socket read completed, not yet handed over (flushed before the next read that may block,
        # at HANDOVER_BYTES, and when the session ends): frames for the inbound queue, all received at _handover_ms,
        # with the status objects among them (not counted as dropped events), and for capture every message, those
        # that stay here included (a CaptureBatch: one read, one session).
        self._handover: list = []
        self._handover_ms = 0
        self._handover_bytes = 0
        self._handover_statuses = 0
        self._captured: CaptureBatch | None = None
        # Capture batches of hand-overs the full inbound queue refused (their frames were dropped, counted): they go
        # with the next item that finds room, so the capture keeps them in order; with the capture's queue, at most
        # CAPTURE_CHANNEL_CAP batches, the oldest beyond are counted as capture drops.
        self._capture_held: list[CaptureBatch] = []
        # The held lists released into the inbound queue: the dispatcher empties each once it has offered its batches.
        self._capture_released: list[list[CaptureBatch]] = []
        self.stats = ReaderStats()
        self._backoff = Backoff(config.backoff_initial_secs, config.backoff_max_secs)
        self._bp_warning = logs.RateLimitedWarning(_log, config.bp_warn_interval_secs)
        self._url_for_logs = public_url(config.url)
        self.ws: websocket.WebSocket | None = None
        # Readiness, read by the HTTP thread. Data events are counted until READY_MIN_MESSAGES is reached, no further.
        self.subscribed_at: float | None = None
        self.events_since_subscribe = 0
        # Why the last session ended and when the next attempt is due (for /ready and /health).
        self.last_end: SessionEnd | None = None
        self.retry_at: float | None = None
        # Holes not yet told downstream, in order: the session gap (told before the first data of a later session)
        # and inbound drops (told before the next frame that finds room).
        self._pending_gaps: list[Gap] = []

    # -- the reconnect loop -------------------------------------------------------------------------------------

    def loop(self) -> None:
        attempt = 0
        while not self.stopping.is_set():
            attempt += 1
            if attempt > 1:
                self.stats.reconnects += 1
            started = time.monotonic()
            end = self._session(attempt)
            if self.stopping.is_set():
                break
            self.last_end = end
            if self.subscribed_at is not None and not any(gap.resumed_ms is None and gap.reason != "inbound_drop"
                                                          for gap in self._pending_gaps):
                # The stream was interrupted: the first data of a later session is preceded by a gap record.
                self._pending_gaps.append(Gap(end.gap, end.reason, time.time_ns() // 1_000_000,
                                              close_code=end.close_code, close_reason=end.close_reason,
                                              subscription=self.subscriptions.describe()))
            healthy = self.subscribed_at is not None and time.monotonic() - self.subscribed_at >= HEALTHY_SESSION_SECS
            if attempt > 1 and self.subscribed_at is None:
                self.stats.reconnect_failure += 1  # a success is counted as it subscribes (_session)
            self.subscribed_at = None
            if healthy:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            if end.status in (protocol.MAX_CONNECTIONS, protocol.AUTH_FAILED):
                # Another connection on this key and cluster took our slot, or the key was refused: retrying
                # soon cannot help (and hammers the server), so cool down for the ceiling.
                delay = self._backoff.ceiling
            self.retry_at = time.monotonic() + delay
            _log.warning("disconnected: %s; reconnecting in %.2fs", end.reason, delay,
                         extra={"fields": {"reason": end.reason, "status": end.status, "delay_secs": round(delay, 3),
                                           "session_secs": round(time.monotonic() - started, 3),
                                           "attempt": attempt, "url": self._url_for_logs}})
            self.stopping.wait(delay)

    def _session(self, attempt: int) -> SessionEnd:
        _log.info("connecting to %s", self._url_for_logs, extra={"fields": {"url": self._url_for_logs,
                                                                            "attempt": attempt}})
        connect_secs = min(CONNECT_TIMEOUT_SECS, self._config.read_timeout_secs)
        try:
            ws = websocket.create_connection(
                self._config.url,
                timeout=connect_secs,
                skip_utf8_validation=True,
                enable_multithread=True,
                class_=functools.partial(BoundedWebSocket, max_frame_bytes=self._config.max_frame_bytes,
                                         connect_deadline_secs=connect_secs),
            )
        except Exception as exc:
            self.stats.errors += 1
            reason = f"connect failed: {type(exc).__name__}: {exc}"
            _log.error(reason, extra={"fields": {"url": self._url_for_logs}})
            return SessionEnd(reason)
        ws.settimeout(min(TICK_SECS, self._config.read_timeout_secs))
        ws.before_read = self._hand_over
        self.stats.sessions += 1
        self.ws = ws
        try:
            self._handshake(ws)
            if attempt > 1:
                self.stats.reconnect_success += 1
            self._stream(ws)
            return SessionEnd("stopped")
        except SessionEnd as end:
            return end
        except websocket.WebSocketConnectionClosedException as exc:
            return SessionEnd(f"connection closed by the server without a close frame ({exc})")
        except FrameTooLarge as exc:
            self.stats.oversize_frames += 1
            self.stats.errors += 1
            # Not ws.close(): it would read the rest of the refused frame while waiting for the server's close.
            try:
                ws.send_close(CLOSE_MESSAGE_TOO_BIG, b"message too big")
            except Exception:
                pass
            ws.shutdown()
            return SessionEnd(str(exc))
        except Exception as exc:
            self.stats.errors += 1
            return SessionEnd(f"connection error: {type(exc).__name__}: {exc}")
        finally:
            self._hand_over()  # ahead of the gap record of this session's end
            self.ws = None
            self.stats.connected = False
            self.subscriptions.disconnected()
            self._close(ws)

    def _close(self, ws: websocket.WebSocket) -> None:
        """Say goodbye with a close frame where the socket still allows it (protocol.md 4)."""
        try:
            if ws.connected:
                ws.close(timeout=1)
        except Exception:
            pass
        try:
            ws.shutdown()
        except Exception:
            pass

    # -- protocol -----------------------------------------------------------------------------------------------

    def _recv(self, ws: BoundedWebSocket, deadline: float, stale_deadline: float = math.inf,
              live: bool = False) -> bytes:
        """One data message; SessionEnd on stop, close, no message before the deadline, or (STALE_AFTER_SECS) no
        data event before the stale deadline.

        Frames are read one by one (not with recv_data, which answers pings and joins fragments inside its own loop):
        the deadline is checked after every frame, so a server that sends only pings, or fragments that never end,
        cannot hold a dead session open, and a fragmented message is bounded by MAX_FRAME_BYTES as a whole."""
        fragments: list[bytes] = []
        size = 0
        subscriptions = self.subscriptions
        next_data_message = ws.next_data_message
        while True:
            if live and subscriptions.changed:
                self._apply_changes(ws)
            if time.monotonic() >= stale_deadline:  # checked before each frame: statuses keep arriving
                self.stats.stale_timeouts += 1
                raise SessionEnd(f"stale: no data event for {self._config.stale_after_secs:g}s while subscribed "
                                 "(STALE_AFTER_SECS)", gap="stale")
            if not fragments:
                data = next_data_message()
                if data is not None:
                    return self._received(data, ws.read_ns)
            try:
                frame = ws.recv_frame()
            except websocket.WebSocketTimeoutException:
                frame = None
                if self.stopping.is_set():
                    raise SessionEnd("stopped") from None
            if frame is not None:
                code = frame.opcode
                if code in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                    if fragments:
                        raise SessionEnd("protocol error: a new message began inside a fragmented one")
                    if frame.fin:
                        return self._received(frame.data, ws.read_ns)
                    fragments, size = [frame.data], len(frame.data)
                elif code == websocket.ABNF.OPCODE_CONT:
                    if not fragments:
                        raise SessionEnd("protocol error: a continuation frame without a message")
                    size += len(frame.data)
                    if size > self._config.max_frame_bytes:
                        raise FrameTooLarge(size, self._config.max_frame_bytes)
                    fragments.append(frame.data)
                    if frame.fin:
                        return self._received(b"".join(fragments), ws.read_ns)
                elif code == websocket.ABNF.OPCODE_CLOSE:
                    status = int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else None
                    reason = frame.data[2:SERVER_MESSAGE_CHARS].decode("utf-8", "replace")
                    try:
                        ws.send_close()
                    except Exception:
                        pass
                    raise SessionEnd(f"closed by the server (code {status}{', ' + reason if reason else ''})",
                                     gap="server_close", close_code=status, close_reason=reason or None)
                elif code == websocket.ABNF.OPCODE_PING:
                    ws.pong(frame.data)
            if time.monotonic() >= deadline:
                self.stats.read_timeouts += 1
                raise SessionEnd(f"read timeout: no data message for {self._config.read_timeout_secs:g}s",
                                 gap="read_timeout")


    def _received(self, data: bytes, read_ns: int) -> bytes:
        self.stats.messages_received += 1
        self.last_recv_ns = read_ns
        if self._capture is not None:
            captured = self._captured
            if captured is None:  # (before_read hands over before every read: one batch, one read)
                captured = self._captured = CaptureBatch(read_ns, self.stats.sessions)
            captured.append(data)
        return data

    def _await_status(self, ws: websocket.WebSocket, wanted: tuple[str, ...], step: str) -> None:
        deadline = time.monotonic() + self._config.read_timeout_secs
        while True:
            data = self._recv(ws, deadline)
            try:
                events = parse_frame(data)
            except FrameError as exc:
                self.stats.errors += 1
                raise SessionEnd(f"unexpected frame while waiting for {step}: {exc}") from None
            for event in events:
                status = self._handle_status(event) if isinstance(event, dict) and event.get("ev") == "status" \
                    else None
                if status in wanted:
                    return
                if status in protocol.TERMINAL_STATUSES:
                    message = str(event.get("message", ""))[:SERVER_MESSAGE_CHARS]
                    raise SessionEnd(f"{status} while waiting for {step}: {message}".strip(), status,
                                     gap="max_connections" if status == protocol.MAX_CONNECTIONS else "status")
                if status == protocol.ERROR and step == "auth_success":
                    # The older form of auth_failed: the server answers auth with an error status (and may leave
                    # the connection open). Nothing else can answer auth, so the handshake ends here.
                    message = str(event.get("message", ""))[:SERVER_MESSAGE_CHARS]
                    raise SessionEnd(f"auth_failed (an error status) while waiting for {step}: {message}".strip(),
                                     protocol.AUTH_FAILED, gap="status")

    def _handshake(self, ws: websocket.WebSocket) -> None:
        # The spec's own example shows "success" for the connect event; the server sends "connected".
        self._await_status(ws, (protocol.CONNECTED, protocol.SUCCESS), "connected")
        ws.send(protocol.auth_message(self._config.api_key))
        self._await_status(ws, (protocol.AUTH_SUCCESS,), "auth_success")
        self.stats.connected = True
        messages = self.subscriptions.session_started()  # the whole desired set, in chunks
        for params in messages:
            ws.send(protocol.subscribe_message(params))
        self.events_since_subscribe = 0
        self.subscribed_at = time.monotonic()
        topics = self.subscriptions.desired
        shown = ",".join(topics) if len(topics) <= 20 else f"{len(topics)} topics ({self.subscriptions.source})"
        _log.info("subscribing to %s", shown, extra={"fields": {"topics": len(topics), "messages": len(messages),
                                                               "source": self.subscriptions.source,
                                                               "cluster": self._config.cluster}})

    def _apply_changes(self, ws: websocket.WebSocket) -> None:
        """The desired set changed (SIGHUP): send the difference on the live connection."""
        change = self.subscriptions.take_change()
        if change is None:
            return
        subscribe, unsubscribe = change
        for params in unsubscribe:
            ws.send(protocol.unsubscribe_message(params))
        for params in subscribe:
            ws.send(protocol.subscribe_message(params))
        _log.info("subscriptions changed: %d message(s) to subscribe, %d to unsubscribe", len(subscribe),
                  len(unsubscribe), extra={"fields": {"subscribe": subscribe[:3], "unsubscribe": unsubscribe[:3]}})

    def _handle_status(self, event: dict) -> str:
        """Log and count one status object; returns its status."""
        status = str(event.get("status", ""))[:SERVER_MESSAGE_CHARS]
        message = str(event.get("message", ""))[:SERVER_MESSAGE_CHARS]
        self.subscriptions.on_statuses([(status, message)])
        label = status if status in protocol.KNOWN_STATUSES else protocol.UNKNOWN_LABEL
        self.stats.statuses[label] = self.stats.statuses.get(label, 0) + 1
        fields = {"status": status, "server_message": message, "cluster": self._config.cluster,
                  "url": self._url_for_logs}
        if status in (protocol.AUTH_FAILED, protocol.MAX_CONNECTIONS, protocol.ERROR, protocol.AUTH_TIMEOUT) \
                or status in protocol.TERMINAL_STATUSES:
            self.stats.errors += 1
            hint = {
                protocol.AUTH_FAILED: "check POLYGON_API_KEY and that the plan includes this cluster and feed",
                protocol.MAX_CONNECTIONS: "another connection uses this key and cluster; cooling down",
                protocol.ERROR: "the server refused a request (often a topic outside the plan)",
            }.get(status, "")
            if hint:
                fields["hint"] = hint
            _log.error("status %s: %s", status, message, extra={"fields": fields})
        elif status == protocol.SUCCESS:
            _log.info("status %s: %s", status, message, extra={"fields": fields})
        elif status in (protocol.CONNECTED, protocol.AUTH_SUCCESS):
            _log.info("status %s: %s", status, message, extra={"fields": fields})
        else:
            _log.warning("status %s: %s", status, message, extra={"fields": fields})
        return status

    def _statuses_in(self, data: bytes) -> tuple[int, str | None, bool]:
        """Handle the status objects of a mid-stream frame; (status objects seen, terminal status or None, whether
        the frame holds anything else: data events, or elements the dispatcher must count as bad)."""
        try:
            events = parse_frame(data)
        except FrameError:
            return 0, None, True  # the dispatcher counts it as a parse error
        seen = 0
        terminal = None
        for event in events:
            if isinstance(event, dict) and event.get("ev") == "status":
                seen += 1
                status = self._handle_status(event)
                if status in protocol.TERMINAL_STATUSES:
                    terminal = status
        return seen, terminal, len(events) > seen

    def _stream(self, ws: websocket.WebSocket) -> None:
        """The hot loop: frames go to the inbound queue untouched, handed over together per socket read; the reader
        never blocks on the queue.

        Counting a frame's events scans all of it (about 5 us for 100 events, a third of this thread's time), so
        it is done only where a number is needed: for /ready until READY_MIN_MESSAGES is reached, and for a frame
        that is dropped. The dispatcher counts every event it parses."""
        read_timeout = self._config.read_timeout_secs
        ready_min = self._config.ready_min_messages
        clock = time.monotonic
        stopping = self.stopping.is_set
        deadline = clock() + read_timeout
        stale_after = self._config.stale_after_secs
        stale_deadline = clock() + stale_after if stale_after else math.inf
        while not stopping():
            data = self._recv(ws, deadline, stale_deadline, True)
            ingest_ms = self.last_recv_ns // 1_000_000
            deadline = clock() + read_timeout
            statuses = 0
            if may_hold_status(data):
                statuses, terminal, has_data = self._statuses_in(data)
                if statuses:
                    if terminal is not None:
                        if has_data:
                            self._offer(ingest_ms, data, statuses)
                        raise SessionEnd(f"server sent {terminal}", terminal,
                                         gap="max_connections" if terminal == protocol.MAX_CONNECTIONS else "status")
                    if not has_data:
                        continue
            if self.events_since_subscribe < ready_min:
                self.events_since_subscribe += max(0, data.count(EV_MARKER) - statuses)
            if stale_after:
                stale_deadline = clock() + stale_after
            self._offer(ingest_ms, data, statuses)

    def _offer(self, ingest_ms: int, data: bytes, statuses: int) -> None:
        """Add a frame to the current hand-over (holes not yet told go first, on their own)."""
        if self._handover and (self._handover_bytes + len(data) > HANDOVER_BYTES or self._pending_gaps):
            # (every frame of a hand-over came with one read: before_read hands over before the next)
            self._hand_over(self._capture is not None)
        if self._pending_gaps and not self._offer_gaps(self._inbound.put_nowait, ingest_ms):
            self._drop(ingest_ms, [data], statuses)
            return
        self._handover.append(data)
        self._handover_ms = ingest_ms
        self._handover_bytes += len(data)
        self._handover_statuses += statuses
        if self._handover_bytes >= HANDOVER_BYTES:
            self._hand_over()

    def _hand_over(self, keep_last_entry: bool = False) -> None:
        """What the last socket read completed goes downstream as one inbound item: (ingest_ms, frames), and with
        capture (ingest_ms, frames, [its CaptureBatch]), then also for messages that stay here (statuses).
        keep_last_entry: the batch's last message is the frame being offered, which goes in the next hand-over."""
        frames = self._handover
        captured = self._captured
        if not frames and captured is None:
            return
        self._handover = []
        self._handover_bytes = 0
        statuses, self._handover_statuses = self._handover_statuses, 0
        if self._capture is None:
            try:
                self._inbound.put_nowait((self._handover_ms, frames))
            except queue.Full:
                self._drop(self._handover_ms, frames, statuses)
            return
        if keep_last_entry:
            self._captured = CaptureBatch(captured.recv_ns, captured.session, captured[-1:])
            del captured[-1]
        else:
            self._captured = None
        ingest_ms = self._handover_ms if frames else captured.recv_ns // 1_000_000
        try:
            if self._capture_held:
                self._release_held()
            self._inbound.put_nowait((ingest_ms, frames, [captured]))
        except queue.Full:
            if frames:
                self._drop(ingest_ms, frames, statuses)
            self._hold_for_capture(captured)

    def _hold_for_capture(self, captured: CaptureBatch) -> None:
        """Keep a batch the full inbound queue refused for the next item. CAPTURE_CHANNEL_CAP bounds the capture's
        backlog: the batches held here, those released into the inbound queue and not yet passed on, and those in its
        own queue; beyond it, the oldest held are dropped, counted (so a capture that cannot write gets nothing held:
        its full queue is the backlog)."""
        held = self._capture_held
        held.append(captured)
        self._capture_released = [released for released in self._capture_released if released]
        backlog = len(held) + sum(map(len, self._capture_released)) + self._capture.queue.qsize()
        excess = backlog - self._config.capture_channel_cap
        if excess > 0:
            dropped = held[:excess]
            del held[:excess]
            for batch in dropped:
                self._capture.drop(batch, "inbound queue full and the capture's backlog at CAPTURE_CHANNEL_CAP "
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
        events = max(0, sum(frame.count(EV_MARKER) for frame in frames) - statuses)
        self.stats.channel_drops += events
        self.stats.channel_dropped_frames += len(frames)
        last = self._pending_gaps[-1] if self._pending_gaps else None
        if last is None or last.reason != "inbound_drop":
            last = Gap("inbound_drop", "", ingest_ms, dropped_events=0, subscription=self.subscriptions.describe())
            self._pending_gaps.append(last)
        last.dropped_events += events
        last.detail = (f"inbound queue full (CHANNEL_CAP {self._config.channel_cap} hand-overs): "
                       f"{last.dropped_events} event(s) dropped")
        self._bp_warning.warn("inbound queue full: dropping frames (CHANNEL_CAP)",
                              capacity_handovers=self._config.channel_cap,
                              dropped_events_total=self.stats.channel_drops)

    def _offer_gaps(self, put, resumed_ms: int) -> bool:
        """Tell the pending holes, in order, ahead of the frame that ends them; False if the queue has no room."""
        while self._pending_gaps:
            gap = self._pending_gaps[0]
            gap.resumed_ms = resumed_ms
            try:
                put((gap.interrupted_ms if gap.reason == "inbound_drop" else resumed_ms, gap))
            except queue.Full:
                gap.resumed_ms = None
                return False
            self._pending_gaps.pop(0)
        return True

    def shutdown_items(self) -> list[tuple]:
        """After the reader has stopped, what it still holds, as inbound items: capture batches the full queue
        refused, and the holes never told because data did not resume. A session gap becomes `shutdown` (the service
        stopped inside it); drops keep their reason."""
        now_ms = time.time_ns() // 1_000_000
        items = []
        for gap in self._pending_gaps:
            if gap.reason != "inbound_drop":
                gap = Gap("shutdown", f"the service stopped before data resumed after: {gap.detail}",
                          gap.interrupted_ms, close_code=gap.close_code, close_reason=gap.close_reason,
                          subscription=gap.subscription)
            items.append((gap.interrupted_ms if gap.reason == "inbound_drop" else now_ms, gap))
        self._pending_gaps = []
        if self._capture_held:  # ahead of the gaps: capture batches do not wait for them
            items.insert(0, self._held_item())
            self._capture_held = []
        return items


class Heartbeat(ServiceThread):
    """Sends a WebSocket ping every interval on the reader's socket (websocket-client's send lock makes it safe)."""

    def __init__(self, reader: Reader, interval_secs: float):
        super().__init__("polygon-heartbeat")
        self._reader = reader
        self._interval = interval_secs

    def loop(self) -> None:
        while not self.stopping.wait(self._interval):
            ws = self._reader.ws
            if ws is None or not self._reader.stats.connected:
                continue
            try:
                ws.ping()
                self._reader.stats.heartbeats_sent += 1
            except Exception as exc:
                _log.debug("ping failed: %s", exc)
