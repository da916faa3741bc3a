"""The server side of the Polygon WebSocket protocol (shared/spec/protocol.md 2.1-2.4), one home for everything that
serves it: the local server (local/mockserver.py), replay (tools/replay.py, through the local server) and the gateway.

- Listener: accepts on host:port, each connection on a thread of its own, at most max_clients at once (more are
  closed at accept, counted); accept() failing for want of descriptors backs off instead of spinning.
- ServerConnection: one client, with wsproto for the upgrade and for what the client sends. The bounds on strangers:
  what a client sent and we have not read is at most INBOX_MESSAGES messages (older ones are discarded, counted) and a
  message at most CLIENT_MESSAGE_CHARS (longer: close 1009); a client that has not upgraded by its handshake deadline
  is cut. Pings are answered, a close is answered, frames go out as the caller built them.
- The topics of a subscribe message as the include filter they mean (topic_filter), and the status messages.

Threads and blocking sockets, as in the rest of the service: no asyncio.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import ujson

from . import logs
from .normalize import IncludeFilter

try:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection, Request,
                                TextMessage)
    from wsproto.utilities import RemoteProtocolError
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("serving the Polygon protocol (SINK=gateway, demo, replay) needs wsproto: apt install "
                      "python3-wsproto (or pip install 'polygon-streamer[gateway]')") from exc

# What a client may have sent and we have not read yet: beyond it the oldest messages are discarded (counted), and a
# single message longer than CLIENT_MESSAGE_CHARS ends the connection (1009): nothing a client sends grows memory.
INBOX_MESSAGES = 64
CLIENT_MESSAGE_CHARS = 64 * 1024
# accept() failing (EMFILE, ENFILE, ENOBUFS): wait this long, doubling up to the ceiling, instead of spinning.
ACCEPT_BACKOFF_SECS = (0.05, 1.0)
ACCEPT_TICK_SECS = 0.2
CLOSE_DRAIN_SECS = 1.0


class Closed(Exception):
    """The connection is over (the client left, was cut, or the server stops)."""


@dataclass
class ServerStats:
    """What a server counts across its connections: plain integers read at any time, added to by every connection's
    thread through add() (a bare `+=` from two threads can lose one)."""

    connections: int = 0
    refused_clients: int = 0        # closed at accept: max_clients were being served
    accept_errors: int = 0          # accept() failed (out of descriptors): the loop backs off
    handshake_timeouts: int = 0     # cut: not through the handshake by its deadline
    protocol_errors: int = 0        # cut: what it sent was not a WebSocket upgrade (TLS to a ws:// port, plain HTTP)
    discarded_messages: int = 0     # client messages beyond the unread bound, dropped
    pings: int = 0

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, count in counts.items():
                setattr(self, name, getattr(self, name) + count)


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """An unmasked server frame (RFC 6455 5.2); fin=False for all but the last fragment of a message."""
    return ws_header(opcode, len(payload), fin) + payload


def ws_header(opcode: int, length: int, fin: bool = True) -> bytes:
    """A frame header announcing `length` payload bytes (what a hostile server may send without the payload)."""
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return struct.pack("!BB", first, length)
    if length < 65536:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def status(name: str, message: str) -> dict:
    """A status message as Polygon sends it (protocol.md 2.2)."""
    return {"ev": "status", "status": name, "message": message}


def topic_filter(params: str) -> IncludeFilter:
    """Subscribe params (`T.AAPL,Q.*,XT.BTC-*`) as the include filter they mean (`T:AAPL,Q:*,XT:BTC-*`)."""
    return IncludeFilter(topic.strip().replace(".", ":", 1) for topic in params.split(",") if topic.strip())


class ServerConnection:
    """One client's WebSocket, on its own thread. paths: the URL paths served (the cluster names); the first part of
    the client's path picks `cluster`, another is refused with 404."""

    def __init__(self, sock: socket.socket, stopping: threading.Event, stats: ServerStats, paths):
        self.sock = sock
        self.stopping = stopping
        self.stats = stats
        self.paths = paths
        self.ws = WSConnection(ConnectionType.SERVER)
        self.cluster = ""
        self.inbox: list[str] = []
        self._partial: list[str] = []  # a message arriving in pieces
        self._partial_chars = 0
        self._closing = False  # our close frame is sent: what the client still sends is read and discarded

    def serve(self) -> None:
        """The connection's whole life, on its own thread: the subclass's side of the protocol."""
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        """Every byte this class sends goes through here (a subclass that also sends from another thread locks)."""
        self.sock.sendall(data)

    @property
    def open(self) -> bool:
        return self.ws.state.name == "OPEN"

    def upgrade(self, deadline: float | None) -> None:
        """Read until the upgrade is done (Closed if the deadline passes first, counted, or the server stops)."""
        while not self.open:
            self.pump(ACCEPT_TICK_SECS)
            if self.stopping.is_set():
                raise Closed()
            self.check_deadline(deadline)

    def check_deadline(self, deadline: float | None) -> None:
        """A client that is not through the handshake by the deadline holds a thread and a descriptor for nothing."""
        if deadline is not None and time.monotonic() >= deadline:
            self.stats.add(handshake_timeouts=1)
            self.abort()

    def pump(self, timeout: float | None) -> None:
        """Read what the client sent (waiting up to timeout) and handle the upgrade and control frames."""
        if timeout is not None:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return
        data = self.sock.recv(65536)
        if not data:
            raise Closed()
        try:
            self.ws.receive_data(data)
            events = list(self.ws.events())
        except RemoteProtocolError as exc:  # not an upgrade: wsproto's answer (400 Bad Request), then the end
            self.stats.add(protocol_errors=1)
            if exc.event_hint is not None:
                try:
                    self.write(self.ws.send(exc.event_hint))
                except Exception:
                    pass
            raise Closed() from None
        for event in events:
            if isinstance(event, Request):
                path = event.target.split("?", 1)[0].strip("/").split("/")[0]
                if path not in self.paths:
                    self.write(self.ws.send(RejectConnection(status_code=404)))
                    raise Closed()
                self.cluster = path
                self.send_upgrade(self.ws.send(AcceptConnection()))
            elif isinstance(event, (TextMessage, BytesMessage)):
                self._message_piece(event.data if isinstance(event, TextMessage) else
                                    bytes(event.data).decode("utf-8", "replace"), event.message_finished)
            elif isinstance(event, Ping):
                self.stats.add(pings=1)
                self.write(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                try:
                    self.write(self.ws.send(event.response()))
                except Exception:
                    pass
                raise Closed()

    def send_upgrade(self, response: bytes) -> None:
        """The upgrade's answer (a subclass may send it otherwise: the local server's trickle)."""
        self.write(response)

    def _message_piece(self, text: str, finished: bool) -> None:
        if self._closing:
            return
        self._partial.append(text)
        self._partial_chars += len(text)
        if self._partial_chars > CLIENT_MESSAGE_CHARS:
            self._partial, self._partial_chars = [], 0
            # read (and drop) what it still sends for a moment, so that the close frame reaches it instead of a reset
            self.close(1009, "message too big", CLOSE_DRAIN_SECS)
            raise Closed()
        if not finished:
            return
        self.inbox.append("".join(self._partial))
        self._partial, self._partial_chars = [], 0
        if len(self.inbox) > INBOX_MESSAGES:
            del self.inbox[0]
            self.stats.add(discarded_messages=1)

    def next_message(self, timeout: float) -> dict | None:
        """The next message the client sent, within timeout (None: none came, or the server stops); {} for one that
        is not a JSON object (an invalid one is answered with Polygon's `error` status)."""
        deadline = time.monotonic() + timeout
        while not self.inbox:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.stopping.is_set():
                return None
            self.pump(min(remaining, ACCEPT_TICK_SECS))
        return self.parse(self.inbox.pop(0))

    def parse(self, text: str) -> dict:
        try:
            message = ujson.loads(text)
        except ValueError:
            self.send([status("error", "Invalid JSON")])
            return {}
        return message if isinstance(message, dict) else {}

    def send(self, events: list, binary: bool = False) -> None:
        self.write(ws_frame(2 if binary else 1, ujson.dumps(events).encode("utf-8")))

    def send_raw(self, payload: bytes, binary: bool = False) -> None:
        self.write(ws_frame(2 if binary else 1, payload))

    def close(self, code: int, reason: str, wait_secs: float) -> None:
        """A close frame (a code wsproto cannot send, e.g. 1006, is not sent), then wait_secs for the client's."""
        self._closing = True
        try:
            self.write(self.ws.send(CloseConnection(code=code, reason=reason[:100])))
        except Exception:
            return
        deadline = time.monotonic() + wait_secs
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                self.pump(remaining)
        except (Closed, OSError):
            pass

    def abort(self) -> None:
        """Close without a close handshake, as the real server does after auth_failed."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise Closed()


class Listener:
    """Accepts on host:port (0: a free port) until stop(). connection(sock) is built on the accepting thread, before
    the connection is counted (so whoever sees the count also sees the connection take the settings of that moment);
    its serve() then runs on a thread of its own, the socket closed after it. max_clients() is asked at each accept
    (0: no cap)."""

    def __init__(self, host: str, port: int, connection: Callable[[socket.socket], "ServerConnection"],
                 stats: ServerStats, max_clients: Callable[[], int], name: str):
        self._connection = connection
        self.stats = stats
        self._max_clients = max_clients
        self._name = name
        self.stopping = threading.Event()
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.settimeout(ACCEPT_TICK_SECS)
        self.host, self.port = self._listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)
        self._connections: list[threading.Thread] = []
        self._unexpected = logs.RateLimitedWarning(logs.get(f"polygon_{name}"), 60.0)

    def start(self) -> None:
        self._thread.start()

    def stop(self, join_secs: float = 2.0) -> None:
        self.stopping.set()
        self._thread.join(join_secs)
        for thread in list(self._connections):
            thread.join(join_secs)
        self._listener.close()

    def _accept_loop(self) -> None:
        backoff = ACCEPT_BACKOFF_SECS[0]
        while not self.stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                # Out of descriptors (or buffers): the pending connection stays in the backlog, so accept() would fail
                # again at once; wait instead of spinning.
                self.stats.add(accept_errors=1)
                self.stopping.wait(backoff)
                backoff = min(ACCEPT_BACKOFF_SECS[1], backoff * 2)
                continue
            backoff = ACCEPT_BACKOFF_SECS[0]
            self._connections = [thread for thread in self._connections if thread.is_alive()]
            cap = self._max_clients()
            if cap and len(self._connections) >= cap:
                self.stats.add(refused_clients=1)
                sock.close()
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                connection = self._connection(sock)
            except OSError:  # reset before it was served
                sock.close()
                continue
            self.stats.add(connections=1)
            thread = threading.Thread(target=self._run, args=(connection, sock), name=f"{self._name}-conn",
                                      daemon=True)
            self._connections.append(thread)
            thread.start()

    def _run(self, connection: "ServerConnection", sock: socket.socket) -> None:
        try:
            connection.serve()
        except (Closed, OSError):
            pass
        except Exception as exc:  # a bug, not the client's doing: the connection ends, the server goes on
            # (the exception's text is not logged: it may quote what the client sent, a key among it)
            self._unexpected.warn(f"{self._name}: a connection ended by an unexpected {type(exc).__name__}",
                                  error=type(exc).__name__)
        finally:
            try:
                sock.close()
            except OSError:
                pass
