"""The one thread that owns the WebSocket: connect, auth, subscribe, recv, backoff, reconnect; and its heartbeat."""

from __future__ import annotations

import collections
import functools
import math
import queue
import random
import re
import select
import socket
import threading
import time
import typing
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import websocket
from websocket._abnf import frame_buffer  # the same class and recv_length() in 1.2.3 and 1.9.x

from . import logs, protocol
from .config import Config
from .capture_format import SessionEnd as CapturedEnd
from .handover import EV_MARKER, Handover
from .health import ReaderState
from .normalize import FrameError, parse_frame
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
_ACK_PREFIXES = ("subscribed to: ", "unsubscribed to: ", "unsubscribed from: ")
CLOSE_MESSAGE_TOO_BIG = 1009
# One socket read takes up to this much: every frame that has arrived, at batch 1 hundreds of them. Below glibc's
# mmap threshold (128 KiB): Python allocates the whole size for each recv before trimming it to what came, and a
# 256 KiB request was an mmap + page faults + munmap on every read, which at a steady 5,000 frames/s was a third of
# the reader's CPU.
READ_CHUNK_BYTES = 64 * 1024
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
        if self.length is not None and self.length > self.max_bytes:
            raise FrameTooLarge(self.length, self.max_bytes)


class BoundedWebSocket(websocket.WebSocket):
    """A WebSocket with a size cap on every frame, a total deadline on connect + upgrade (create_connection's
    timeout applies to each read, so a server answering a byte at a time could hold the upgrade forever), and reads
    from the socket in large chunks: websocket-client's frame reader asks for the 2-byte header, the length and the
    payload separately, three syscalls per frame, each a release and re-take of the GIL; one recv now serves every
    frame that has arrived. `before_read` runs before each read that may block (the reader hands over what the last
    read completed); `read_ns` is when the last read returned: the receive time of every frame it completed."""

    frame_buffer: _BoundedFrameBuffer

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
            set_os_thread_name("connect-watch")
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

        watchdog = threading.Thread(target=watch, name="connect-watch", daemon=True)
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
        super().__init__("reader")
        self._config = config
        self.subscriptions = subscriptions or Subscriptions(config.subscription.split(","), "SUBSCRIPTION")
        # The hand-over to the inbound queue (and, with capture, to the capture), gaps and drops included.
        self.handover = Handover(config, inbound, capture, self.subscriptions.describe)
        self._capturing = capture is not None
        self.last_recv_ns = 0  # when the socket read that completed the last message returned (time.time_ns())
        self.stats = ReaderStats()
        self._backoff = Backoff(config.backoff_initial_secs, config.backoff_max_secs)
        self._url_for_logs = public_url(config.url)
        self.ws: BoundedWebSocket | None = None
        # Readiness, read by the HTTP thread. Data events are counted until READY_MIN_MESSAGES is reached, no further.
        self.subscribed_at: float | None = None
        self.events_since_subscribe = 0
        # Why the last session ended and when the next attempt is due (for /ready and /health).
        self.last_end: SessionEnd | None = None
        self.retry_at: float | None = None
        # Subscribe / unsubscribe messages not sent yet (sent between reads: _send_outbox), and why the last
        # subscription could not be sent, while that lasts (for /health).
        self._outbox: collections.deque[str] = collections.deque()
        self._acks: list = [0, []]  # subscribe acks of the message being read: how many, the first topics
        self.subscribe_error: str | None = None

    def state(self) -> ReaderState:
        """What health.py reads of the reader (from another thread: one snapshot of plain fields)."""
        return ReaderState(self.stats.connected, self.subscribed_at, self.events_since_subscribe, self.last_end,
                           self.retry_at, self.subscribe_error)

    # -- the reconnect loop -------------------------------------------------------------------------------------

    def loop(self) -> None:
        attempt = 0
        while not self.stopping.is_set():
            attempt += 1
            if attempt > 1:
                self.stats.reconnects += 1
            started = time.monotonic()
            sessions = self.stats.sessions
            end = self._session(attempt)
            if self._outbox:
                if self.subscribe_error is None:
                    self.subscribe_error = (f"{len(self._outbox):,} subscribe message(s) not taken by the server "
                                            f"before the session ended ({end.reason})")
                self._outbox.clear()
            # The stream was interrupted: the first data of a later session is preceded by a gap record; with capture,
            # how the session ended follows its frames (a stop included: replay keeps the connection open there).
            stopped = self.stopping.is_set()
            self.handover.session_ended(
                CapturedEnd("shutdown" if stopped else end.gap, end.reason, end.close_code, end.close_reason),
                time.time_ns(), self.stats.sessions if self.stats.sessions != sessions else 0,
                self.subscribed_at is not None and not stopped)
            if stopped:
                break
            self.last_end = end
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
            # (class_ is called as a factory: the partial gives our class its bounds)
            bounded = typing.cast(type[websocket.WebSocket], functools.partial(
                BoundedWebSocket, max_frame_bytes=self._config.max_frame_bytes, connect_deadline_secs=connect_secs))
            ws = typing.cast(BoundedWebSocket, websocket.create_connection(
                self._config.url,
                timeout=connect_secs,
                skip_utf8_validation=True,
                enable_multithread=True,
                class_=bounded,
            ))
        except Exception as exc:
            self.stats.errors += 1
            reason = f"connect failed: {type(exc).__name__}: {exc}"
            _log.error(reason, extra={"fields": {"url": self._url_for_logs}})
            return SessionEnd(reason)
        ws.settimeout(min(TICK_SECS, self._config.read_timeout_secs))
        ws.before_read = self.handover.hand_over
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
            self.handover.hand_over()  # ahead of the gap record of this session's end
            self.ws = None
            self.stats.connected = False
            self.subscriptions.disconnected()
            self._close(ws)

    def _close(self, ws: BoundedWebSocket) -> None:
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
            if self._outbox:
                self._send_outbox(ws)
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
                    said = f"code {status}" if status is not None else "no close code"
                    raise SessionEnd(f"closed by the server ({said}{', ' + reason if reason else ''})",
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
        if self._capturing:
            self.handover.captured(data, read_ns, self.stats.sessions)
        return data

    def _await_status(self, ws: BoundedWebSocket, wanted: tuple[str, ...], step: str) -> None:
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
                    self._log_acks()
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
            self._log_acks()

    def _handshake(self, ws: BoundedWebSocket) -> None:
        # The spec's own example shows "success" for the connect event; the server sends "connected".
        self._await_status(ws, (protocol.CONNECTED, protocol.SUCCESS), "connected")
        ws.send(protocol.auth_message(self._config.api_key))
        self._await_status(ws, (protocol.AUTH_SUCCESS,), "auth_success")
        self.stats.connected = True
        messages = self.subscriptions.session_started()  # the whole desired set, in chunks
        self._outbox.clear()
        self._outbox.extend(protocol.subscribe_message(params) for params in messages)
        self._send_outbox(ws)
        self.events_since_subscribe = 0
        self.subscribed_at = time.monotonic()
        topics = self.subscriptions.desired
        shown = ",".join(topics) if len(topics) <= 20 else f"{len(topics)} topics ({self.subscriptions.source})"
        _log.info("subscribing to %s", shown, extra={"fields": {"topics": len(topics), "messages": len(messages),
                                                               "source": self.subscriptions.source,
                                                               "cluster": self._config.cluster}})

    def _apply_changes(self, ws: BoundedWebSocket) -> None:
        """The desired set changed (SIGHUP): send the difference on the live connection."""
        change = self.subscriptions.take_change()
        if change is None:
            return
        subscribe, unsubscribe = change
        self._outbox.extend(protocol.unsubscribe_message(params) for params in unsubscribe)
        self._outbox.extend(protocol.subscribe_message(params) for params in subscribe)
        self._send_outbox(ws)
        _log.info("subscriptions changed: %d message(s) to subscribe, %d to unsubscribe", len(subscribe),
                  len(unsubscribe), extra={"fields": {"subscribe": subscribe[:3], "unsubscribe": unsubscribe[:3]}})

    def _send_outbox(self, ws: BoundedWebSocket) -> None:
        """Send the queued subscribe / unsubscribe messages while the socket takes them without waiting, one at a time
        between reads: the server answers every topic with an ack, and a client that sent a large subscription
        without reading would fill both directions and stall (the server waiting for us to read its acks, we for it
        to read our messages). A message the server does not take within READ_TIMEOUT_SECS (a server that reads
        nothing is as dead as one that sends nothing) ends the session, said in /health (subscribe_error) until a
        subscription goes out whole."""
        outbox = self._outbox
        sock = ws.sock
        send_timeout = self._config.read_timeout_secs
        while outbox and sock is not None:
            if not select.select([], [sock], [], 0)[1]:
                return
            message = outbox[0]
            sock.settimeout(send_timeout)
            try:
                ws.send(message)
            except websocket.WebSocketTimeoutException:
                self.subscribe_error = (f"a subscribe message of {len(message):,} bytes was not taken by the server "
                                        f"within {send_timeout:g}s (READ_TIMEOUT_SECS); {len(outbox):,} message(s) "
                                        "unsent")
                raise SessionEnd(f"subscription not sent: {self.subscribe_error}") from None
            finally:
                if ws.sock is not None:
                    ws.sock.settimeout(min(TICK_SECS, self._config.read_timeout_secs))
            outbox.popleft()
        if not outbox:
            self.subscribe_error = None

    def _handle_status(self, event: dict) -> str:
        """Log and count one status object; returns its status."""
        status = str(event.get("status", ""))[:SERVER_MESSAGE_CHARS]
        full_message = str(event.get("message", ""))  # (the frame is within MAX_FRAME_BYTES)
        self.subscriptions.on_statuses([(status, full_message)])  # an ack names its topic: the whole of it
        message = full_message[:SERVER_MESSAGE_CHARS]
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
        elif status == protocol.SUCCESS and message.startswith(_ACK_PREFIXES):
            acks = self._acks  # one line per message of acks, not one per topic (_log_acks)
            acks[0] += 1
            if len(acks[1]) < 5:
                acks[1].append(message.partition(": ")[2])
        elif status == protocol.SUCCESS:
            _log.info("status %s: %s", status, message, extra={"fields": fields})
        elif status in (protocol.CONNECTED, protocol.AUTH_SUCCESS):
            _log.info("status %s: %s", status, message, extra={"fields": fields})
        else:
            _log.warning("status %s: %s", status, message, extra={"fields": fields})
        return status

    def _log_acks(self) -> None:
        """The acks of one message, in one line: how many, and the first topics."""
        count, topics = self._acks
        if not count:
            return
        shown = ", ".join(topics) + (f" and {count - len(topics):,} more" if count > len(topics) else "")
        _log.info("status success: %d topic(s) acknowledged: %s", count, shown,
                  extra={"fields": {"status": protocol.SUCCESS, "acknowledged": count, "topics": topics,
                                    "cluster": self._config.cluster}})
        self._acks = [0, []]

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
        self._log_acks()
        return seen, terminal, len(events) > seen

    def _stream(self, ws: BoundedWebSocket) -> None:
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
        offer = self.handover.offer
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
                            offer(ingest_ms, data, statuses)
                        raise SessionEnd(f"server sent {terminal}", terminal,
                                         gap="max_connections" if terminal == protocol.MAX_CONNECTIONS else "status")
                    if not has_data:
                        continue
            if self.events_since_subscribe < ready_min:
                self.events_since_subscribe += max(0, data.count(EV_MARKER) - statuses)
            if stale_after:
                stale_deadline = clock() + stale_after
            offer(ingest_ms, data, statuses)

    def shutdown_items(self, now_ms: int) -> list[tuple]:
        """After the reader has stopped, what it still holds, as inbound items (Handover.shutdown_items)."""
        return self.handover.shutdown_items(now_ms)


class Heartbeat(ServiceThread):
    """Sends a WebSocket ping every interval on the reader's socket (websocket-client's send lock makes it safe)."""

    def __init__(self, reader: Reader, interval_secs: float):
        super().__init__("heartbeat")
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
