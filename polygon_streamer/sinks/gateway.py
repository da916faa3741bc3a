"""SINK=gateway: the service as a local Polygon endpoint. A program written against Polygon's WebSocket API (the
official `massive` client, a notebook, another team's recorder) connects to ws://GATEWAY_ADDR/CLUSTER instead of
wss://socket.massive.com/CLUSTER and shares the service's one upstream connection.

The protocol is Polygon's (protocol.md 2.1-2.4, served by wsserver.py): `connected`, `auth` -> `auth_success` or
`auth_failed` and a close, subscribe / unsubscribe with an ack per topic. A topic the service's own subscription does
not cover is added upstream (GATEWAY_UPSTREAM=union) or refused with an `error` status naming why (fixed). Each client
gets the events of its topics, each event's JSON as Polygon sent it, in the order the service received them, frame by
frame (the dispatcher's FramedBatch says where each frame's records are): a frame the client takes all of is sent as
the same bytes, otherwise its matching events in one message; built once per batch and distinct set of topics, not
once per client, and what leaves for a client at once is one write. Backfilled events are not sent
(they come late and out of order); every hole is a `{"ev":"status","status":"gap",...}` message in order with the
data, carrying the gap record's reason, times and counts.

No client can slow anything else: the sink's own queue drops (counted) when full. The sink thread writes a message
into a client's socket itself while nothing is waiting for that client (a send that never blocks: no thread wake-up
per message and client); what the socket does not take at once goes to the client's bounded queue
(GATEWAY_CLIENT_QUEUE), which the client's own thread sends, in order. A full queue means `disconnect` (the
`slow_consumer` status, close 1008, as Polygon does) or `drop` (counted; one `gap` status once the client reads
again). Strangers are bounded by wsserver.py (a client cap, a handshake and auth deadline, bounded messages) and by
TOPICS_PER_CLIENT.
"""

from __future__ import annotations

import hmac
import ipaddress
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass

import ujson

from .. import logs, protocol
from ..subscriptions import REFUSED, Subscriptions
from ..config import Config, format_addr
from ..normalize import BACKFILL, EXTRA, GAP, IncludeFilter, canonical_symbol
from ..wsserver import Closed, Listener, ServerConnection, ServerStats, status, ws_frame
from . import Sink, SinkConfigError
from .stdout import BACKFILLED, PAYLOAD_END, PAYLOAD_START

HANDSHAKE_SECS = 10.0     # upgrade and auth within this long, or the connection is cut
TOPICS_PER_CLIENT = 10_000
SEND_BATCH = 64           # queued messages sent with one sendall
KICK_GRACE_SECS = 1.0     # a disconnected slow client still blocked in a send this long is cut
# The kernel's buffer for one client's unsent bytes: bounded (loopback autotuning would give each client megabytes,
# 200 clients a gigabyte), so that a client that stops reading shows in its queue within a second at full rate.
SEND_BUFFER_BYTES = 256 * 1024
CLOSE_WAIT_SECS = 1.0

_log = logs.get("polygon_gateway")

_GOING_AWAY = (b"", 0, 0)
_PAYLOAD_START_CHARS = len(PAYLOAD_START)
_BACKFILLED_CHARS = len(BACKFILLED)    # the queue's last item at a stop: close 1001 once what came before is sent


def load_keys(path: str | None, service_key: str) -> dict[str, str]:
    """name -> key from GATEWAY_KEYS_FILE (`NAME KEY` or a bare `KEY` a line, `#` comments), or the service's own key
    as `default`. Errors name the line, never a key."""
    if path is None:
        return {"default": service_key}
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeError) as exc:
        raise SinkConfigError(f"GATEWAY_KEYS_FILE {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})")
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise SinkConfigError(f"GATEWAY_KEYS_FILE {path} line {number}: expected NAME KEY or KEY")
        name, key = (words[0], words[1]) if len(words) == 2 else (f"key{number}", words[0])
        if name in keys:
            raise SinkConfigError(f"GATEWAY_KEYS_FILE {path} line {number}: the name {name!r} is used twice")
        keys[name] = key
    if not keys:
        raise SinkConfigError(f"GATEWAY_KEYS_FILE {path}: no key in it")
    return keys


def client_filter(cluster: str, topics) -> IncludeFilter:
    """Topics (CODE.TICKER) as a filter of (code, canonical symbol): what a topic names however Polygon writes it."""
    return IncludeFilter(f"{code}:{canonical_symbol(cluster, ticker)}"
                         for code, _, ticker in (topic.strip().partition(".") for topic in topics) if code)


def covered(cluster: str, upstream: IncludeFilter, topic: str) -> bool:
    """Whether a filter of topics (client_filter) receives every event the topic names."""
    code, _, ticker = topic.partition(".")
    ticker = canonical_symbol(cluster, ticker)
    return upstream.covers(code, ticker) or upstream.covers("*", ticker)


@dataclass
class GatewayStats(ServerStats):
    frames_sent: int = 0
    writes: int = 0                 # messages handed to a client's socket together (GATEWAY_SEND_INTERVAL_MS)
    events_sent: int = 0
    dropped_events: int = 0         # GATEWAY_SLOW_CLIENT=drop: not sent to a client whose queue was full
    slow_disconnects: int = 0
    auth_failures: int = 0
    removed_key_disconnects: int = 0


class _Client(ServerConnection):
    def __init__(self, gateway: "GatewaySink", sock: socket.socket):
        super().__init__(sock, gateway.stopping, gateway.stats, protocol.CLUSTERS)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self.gateway = gateway
        self.name: str | None = None
        self.topics: list[str] = []
        self.outbox: queue.Queue = queue.Queue(gateway.client_queue)
        self.kicked_at: float | None = None   # the monotonic time it was found too slow (disconnect)
        self.kick_reason = ""
        self.pending_drops = 0                # drop mode: events dropped since its last gap status
        # The sink thread sends to a client itself (never waiting: MSG_DONTWAIT) while nothing is queued for it;
        # what the socket does not take goes through the client's thread, in order. Every write holds send_lock;
        # `leftover` is the unsent end of a message the socket took in part, sent before anything else.
        self.send_lock = threading.Lock()
        self.leftover = b""
        self.queued = 0                       # messages put in the outbox (the sink thread counts)
        self.sent = 0                         # ...and sent by the client's thread (it counts): equal when idle
        self.direct = False                   # plain sockets only: an SSL socket takes no send flags
        self.held_in: tuple[str, ...] | None = None  # the group whose held messages include this client's

    # -- the handshake ------------------------------------------------------------------------------------------

    def serve(self) -> None:
        gateway = self.gateway
        deadline = time.monotonic() + HANDSHAKE_SECS
        if gateway.tls is not None:
            self._start_tls(deadline)
        self.upgrade(deadline)
        if self.cluster != gateway.cluster:
            self.send([status("error", f"this endpoint serves /{gateway.cluster} only")])
            self.close(1008, "wrong cluster", CLOSE_WAIT_SECS)
            return
        self.send([status("connected", "Connected Successfully")])
        while self.name is None:
            message = self.next_message(max(0.0, deadline - time.monotonic()))
            if message is None:
                self.check_deadline(deadline)
                if self.stopping.is_set():
                    raise Closed()
                continue
            if message.get("action") == "auth":
                self.name = gateway.authenticate(message.get("params"))
                if self.name is None:
                    gateway.stats.add(auth_failures=1)
                    self.send([status("auth_failed", "authentication failed")])
                    self.abort()
                self.send([status("auth_success", "authenticated")])
            elif message:
                self.send([status("auth_required", "authentication required")])
        self.direct = gateway.tls is None
        gateway.add(self)
        try:
            self._stream()
        finally:
            gateway.remove(self)

    def _start_tls(self, deadline: float) -> None:
        tls = self.gateway.tls
        assert tls is not None
        self.sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            self.sock = tls.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError):
            self.stats.add(handshake_timeouts=1)
            raise Closed() from None
        self.sock.settimeout(None)

    # -- streaming ----------------------------------------------------------------------------------------------

    def _stream(self) -> None:
        outbox = self.outbox
        while True:
            if self.kicked_at is not None:
                self._kick()
                return
            try:
                first = outbox.get(timeout=0.05)
            except queue.Empty:
                first = None
            if first is not None:
                items = [first]
                while len(items) < SEND_BATCH:
                    try:
                        items.append(outbox.get_nowait())
                    except queue.Empty:
                        break
                if items[-1] is _GOING_AWAY:
                    self._send_items(items[:-1])
                    self.close(1001, "going away", CLOSE_WAIT_SECS)
                    return
                self._send_items(items)
            self.pump(0)
            while self.inbox:
                self._handle(self.parse(self.inbox.pop(0)))

    def write(self, data: bytes) -> None:
        with self.send_lock:
            if self.leftover:
                data, self.leftover = self.leftover + data, b""
            self.sock.sendall(data)

    def _send_items(self, items: list[tuple[bytes, int, int]]) -> None:
        if not items:
            return
        with self.send_lock:
            data = b"".join(wire for wire, _, _ in items)
            if self.leftover:
                data, self.leftover = self.leftover + data, b""
            try:
                self.sock.sendall(data)
            finally:
                self.sent += len(items)
        self.gateway.stats.add(frames_sent=sum(messages for _, _, messages in items),
                               events_sent=sum(events for _, events, _ in items))

    def _kick(self) -> None:
        try:
            self.sock.settimeout(0.2)
            self.send([status(self.kick_reason, "client too slow: its queue was full")])
            self.close(1008, self.kick_reason, CLOSE_WAIT_SECS)
        except OSError:
            pass

    def _handle(self, message: dict) -> None:
        action = message.get("action")
        params = message.get("params")
        topics = [topic.strip() for topic in params.split(",") if topic.strip()] if isinstance(params, str) else []
        if action == "subscribe":
            self.gateway.subscribe(self, topics)
        elif action == "unsubscribe":
            self.gateway.unsubscribe(self, topics)
        elif action == "auth":
            self.send([status("success", "already authenticated")])
        elif message:
            self.send([status("error", f"unknown action {str(action)[:40]!r}")])


class GatewaySink(Sink):
    name = "gateway"
    takes = "frames"  # FramedBatch: a frame whose events a client takes all of is sent as it came
    extra_topics = True  # GATEWAY_UPSTREAM=union: its batches hold its clients' added topics too

    @staticmethod
    def queue_settings(config: Config) -> tuple[int, bool, float]:
        # Never waits: clients are strangers, nothing they do may hold the dispatcher.
        return config.gateway_channel_cap, True, config.bp_warn_interval_secs

    def __init__(self, config: Config):
        super().__init__()
        self.cluster = config.cluster
        self.addr = config.gateway_addr
        self.client_queue = config.gateway_client_queue
        self.drop_slow = config.gateway_slow_client == "drop"
        self.max_clients = config.gateway_max_clients
        self._keys_file = config.gateway_keys_file
        self._service_key = config.api_key
        self.union = config.gateway_upstream == "union"
        self.linger_secs = config.gateway_linger_secs
        self._subscriptions: Subscriptions | None = None
        self._own_topics = [topic for topic in config.subscription.split(",") if topic]
        self._own_version = -1
        self.upstream = client_filter(self.cluster, self._own_topics)
        # union: each topic added upstream for clients -> the clients holding it; a topic no one holds any more
        # stays until its linger time (a client that reconnects does not churn the upstream)
        self._holders: dict[str, set[int]] = {}
        self._lingering: dict[str, float] = {}
        self.topics_added = 0
        self.topics_removed = 0
        self._config = config
        self.tls: ssl.SSLContext | None = None
        self._keys: dict[str, str] = {}
        self.stats = GatewayStats()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._clients: list[_Client] = []
        self._matchers: dict[tuple[str, ...], tuple[IncludeFilter, bool]] = {}
        self._sent_frames = 0  # sent by the sink thread in the current write (added to stats once a write)
        # GATEWAY_SEND_INTERVAL_MS: a group of clients (by topics) gets at most one write an interval; what comes
        # sooner waits in _held (for the same clients; other clients: what waits goes first) until `due`.
        self.send_interval = config.gateway_send_interval_ms / 1000.0
        self._sent_at: dict[tuple[str, ...], float] = {}
        self._held: dict[tuple[str, ...], _Held] = {}
        self._sent_events = 0
        self._listener: Listener | None = None

    def destination(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{format_addr(self.addr)}/{self.cluster}"

    def open(self) -> None:
        config = self._config
        if config.gateway_keys_file is None and not _loopback(config.gateway_addr[0]):
            raise SinkConfigError(f"GATEWAY_ADDR {format_addr(config.gateway_addr)} is not a loopback address: set "
                                  "GATEWAY_KEYS_FILE (the service's own key must not be handed to other hosts)")
        if (config.gateway_tls_cert is None) != (config.gateway_tls_key is None):
            raise SinkConfigError("GATEWAY_TLS_CERT and GATEWAY_TLS_KEY go together")
        if config.gateway_tls_cert is not None:
            self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                self.tls.load_cert_chain(config.gateway_tls_cert, config.gateway_tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise SinkConfigError(f"GATEWAY_TLS_CERT/GATEWAY_TLS_KEY: cannot load them ({exc})") from None
        self._keys = load_keys(self._keys_file, self._service_key)
        try:
            self._listener = Listener(self.addr[0], self.addr[1], lambda sock: _Client(self, sock),
                                      self.stats, lambda: self.max_clients, "gateway")
        except OSError as exc:
            raise SinkConfigError(f"GATEWAY_ADDR {format_addr(self.addr)}: cannot listen ({exc.strerror or exc})") \
                from None
        self.stopping = self._listener.stopping
        self._listener.start()
        _log.info("gateway: Polygon clients connect to %s", self.destination(),
                  extra={"fields": {"address": self.destination(), "keys": sorted(self._keys)}})

    # -- the clients (their threads) ----------------------------------------------------------------------------

    def authenticate(self, key: object) -> str | None:
        """The name of the key, compared in constant time with every known key; None if none matches."""
        if not isinstance(key, str):
            return None
        given = key.encode("utf-8", "replace")
        found = None
        for name, known in self._keys.items():
            if hmac.compare_digest(given, known.encode("utf-8", "replace")):
                found = name
        return found

    def add(self, client: _Client) -> None:
        with self._lock:
            self._clients = self._clients + [client]
        _log.info("gateway client %s connected", client.name, extra={"fields": {"client": client.name}})

    def remove(self, client: _Client) -> None:
        with self._lock:
            self._clients = [other for other in self._clients if other is not client]
            self._release(client, client.topics)
        _log.info("gateway client %s left", client.name, extra={"fields": {"client": client.name}})

    def use_subscriptions(self, subscriptions: Subscriptions) -> None:
        self._subscriptions = subscriptions

    def _own(self) -> IncludeFilter:
        """The service's own subscription as a filter (it may change on SIGHUP)."""
        subscriptions = self._subscriptions
        if subscriptions is not None and subscriptions.version != self._own_version:
            self._own_version = subscriptions.version
            self._own_topics = subscriptions.desired
            self.upstream = client_filter(self.cluster, self._own_topics)
            self._matchers.clear()
        return self.upstream

    def _hold(self, client: _Client, topic: str) -> None:
        """(under the lock) A client holds a topic added upstream for it."""
        holders = self._holders.get(topic)
        if holders is None:
            holders = self._holders[topic] = set()
            if self._lingering.pop(topic, None) is None:
                self.topics_added += 1
                _log.info("gateway: %s added upstream for client %s", topic, client.name,
                          extra={"fields": {"topic": topic, "client": client.name}})
        holders.add(id(client))

    def _release(self, client: _Client, topics) -> None:
        """(under the lock) The client no longer holds these topics: one no one holds lingers, then goes."""
        for topic in topics:
            holders = self._holders.get(topic)
            if holders is None:
                continue
            holders.discard(id(client))
            if not holders:
                del self._holders[topic]
                self._lingering[topic] = time.monotonic() + self.linger_secs

    def _sync_upstream(self) -> None:
        if self._subscriptions is not None:
            self._subscriptions.set_extra(sorted({*self._holders, *self._lingering}))
            self._matchers.clear()

    def subscribe(self, client: _Client, topics: list[str]) -> None:
        acks, refused = [], []
        held = 0  # topics added upstream for it: the upstream gets them in one subscribe message
        for topic in topics:
            code, dot, ticker = topic.partition(".")
            if not dot or not code or not ticker:
                refused.append(status("error", f"invalid topic {topic[:60]!r}: expected CODE.TICKER"))
            elif len(client.topics) >= TOPICS_PER_CLIENT:
                refused.append(status("error", f"too many topics (at most {TOPICS_PER_CLIENT:,} a client)"))
                break
            elif covered(self.cluster, self._own(), topic):
                if topic not in client.topics:
                    client.topics = client.topics + [topic]
                acks.append(status("success", f"subscribed to: {topic}"))
            elif not self.union or self._subscriptions is None:
                refused.append(status("error", f"not subscribed upstream: {topic} (the service's subscription "
                                               "does not cover it; GATEWAY_UPSTREAM=fixed)"))
            else:
                with self._lock:
                    if topic not in client.topics:
                        client.topics = client.topics + [topic]
                        self._hold(client, topic)
                        held += 1
                acks.append(status("success", f"subscribed to: {topic}"))
        if held:
            with self._lock:
                self._sync_upstream()
        if acks or refused:
            client.send(acks + refused)

    def unsubscribe(self, client: _Client, topics: list[str]) -> None:
        gone = set(topics)
        with self._lock:
            client.topics = [topic for topic in client.topics if topic not in gone]
            self._release(client, [topic for topic in topics if topic in self._holders])
        if topics:
            client.send([status("success", f"unsubscribed to: {topic}") for topic in topics])

    # -- the sink thread ----------------------------------------------------------------------------------------

    def write(self, records: list, ingest_ms: int) -> None:
        clients = self._clients
        if not clients:
            return
        groups: dict[tuple[str, ...], list[_Client]] = {}
        for client in clients:
            if client.topics and client.kicked_at is None:
                groups.setdefault(tuple(client.topics), []).append(client)
        if not groups:
            return
        segments = _segments(records)
        self._sent_frames = self._sent_events = 0
        everything: tuple[bytes, int, int, bool] | None = None  # what a group that takes every event gets
        now = time.monotonic()
        interval = self.send_interval
        held_groups = self._held
        for topics, members in groups.items():
            matcher, takes_all = self._matcher(topics)
            if takes_all:
                if everything is None or everything[3]:
                    everything = self._build(segments, matcher, True)
                wire, count, messages, _ = everything
            else:
                wire, count, messages, _ = self._build(segments, matcher, False)
            if not messages:
                continue
            held = held_groups.get(topics)
            if held is not None and held.members == members:
                held.add(wire, count, messages)
                continue
            if held_groups:  # what waits for any of these clients goes first (this group's, or one a client left)
                for client in members:
                    if client.held_in is not None:
                        self._release_group(client.held_in, now)
            if interval and now - self._sent_at.get(topics, -interval) < interval:
                due = self._sent_at[topics] + interval
                held_groups[topics] = _Held(members, wire, count, messages, due)
                for client in members:
                    client.held_in = topics
                if self.due is None or due < self.due:
                    self.due = due
                continue
            self._sent_at[topics] = now
            self._send(members, wire, count, messages)
        if self._sent_frames:
            self.stats.add(frames_sent=self._sent_frames, events_sent=self._sent_events)
        self.observe_written(ingest_ms, len(records))

    def _send(self, members: list[_Client], wire: bytes, count: int, messages: int) -> None:
        self.stats.add(writes=len(members))
        for client in members:
            self._offer(client, wire, count, messages)

    def _release_group(self, topics: tuple[str, ...], now: float) -> None:
        held = self._held.pop(topics, None)
        if held is None:
            return
        for client in held.members:
            if client.held_in == topics:
                client.held_in = None
        self._sent_at[topics] = now
        self._send(held.members, b"".join(held.parts), held.count, held.messages)

    def release(self, now: float, everything: bool = False) -> None:
        """What waited for its group's interval (GATEWAY_SEND_INTERVAL_MS), once due (or all of it: at a stop)."""
        self._sent_frames = self._sent_events = 0
        for topics, held in list(self._held.items()):
            if held.due <= now or everything:
                self._release_group(topics, now)
        self.due = min((held.due for held in self._held.values()), default=None)
        if self._sent_frames:
            self.stats.add(frames_sent=self._sent_frames, events_sent=self._sent_events)

    def _build(self, segments: list["_Segment"], matcher: IncludeFilter, takes_all: bool
               ) -> tuple[bytes, int, int, bool]:
        """A group's messages for one batch, in order: each gap as a status message; each frame's bytes when the
        group takes all of it, else its matching events in one message. Returns (wire, events, messages, whether
        it depended on the matcher beyond takes_all: events of topics added upstream)."""
        parts: list[bytes] = []
        count = 0
        matched = False
        cluster = self.cluster
        for segment in segments:
            if segment.gaps:
                parts.append(segment.gap_wire())
            if segment.raw is not None and takes_all and not segment.added:
                parts.append(_frame(segment.raw))
                count += segment.size
                continue
            events = segment.events()
            if takes_all and not segment.added:
                payloads = [payload for _, _, payload, _ in events]
            else:
                matched = matched or segment.added > 0
                payloads = [payload for code, symbol, payload, extra in events
                            if (takes_all and not extra) or matcher.matches(code, canonical_symbol(cluster, symbol))]
            if payloads:
                parts.append(_frame(("[" + ",".join(payloads) + "]").encode("utf-8")))
                count += len(payloads)
        return b"".join(parts), count, len(parts), matched

    def _matcher(self, topics: tuple[str, ...]) -> tuple[IncludeFilter, bool]:
        """A set of topics' filter, and whether it takes every event the upstream subscription brings."""
        found = self._matchers.get(topics)
        if found is None:
            if len(self._matchers) > 4 * len(self._clients) + 64:
                self._matchers.clear()
            matcher = client_filter(self.cluster, topics)
            takes_all = all(covered(self.cluster, matcher, topic) for topic in self._own_topics)
            found = self._matchers[topics] = (matcher, takes_all)
        return found

    def _offer(self, client: _Client, wire: bytes, events: int, messages: int) -> None:
        """Messages (`wire`: `messages` WebSocket messages holding `events` events) for a client: into its socket now
        if nothing waits for it, else into its queue; a full queue is its drop or its disconnect."""
        if client.pending_drops and not self._tell_drops(client):
            client.pending_drops += events
            self.stats.add(dropped_events=events)
            return
        if client.direct and client.queued == client.sent and client.send_lock.acquire(blocking=False):
            # Nothing queued or being sent for it: straight into its socket, as much as it takes now.
            try:
                if not client.leftover:
                    try:
                        taken = client.sock.send(wire, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        taken = 0
                    except OSError:
                        return  # gone: its thread sees it and leaves
                    if taken == len(wire):
                        self._sent_frames += messages
                        self._sent_events += events
                        return
                    if taken:  # the rest is sent first by its thread, woken by an empty message counting it
                        client.leftover = wire[taken:]
                        self._sent_frames += messages
                        wire = b""
                        messages = 0
                # Queued while the lock is held: its thread cannot write between the part sent and the rest.
                self._queue(client, (wire, events, messages))
                return
            except queue.Full:  # only its going-away mark in a one-message outbox: the stop is under way
                pass
            finally:
                client.send_lock.release()
        try:
            self._queue(client, (wire, events, messages))
        except queue.Full:
            if self.drop_slow:
                client.pending_drops += events
                self.stats.add(dropped_events=events)
                return
            client.kick_reason = "slow_consumer"
            client.kicked_at = time.monotonic()
            self.stats.add(slow_disconnects=1)
            _log.warning("gateway client %s too slow (%d messages queued): disconnected", client.name,
                         self.client_queue, extra={"fields": {"client": client.name}})

    @staticmethod
    def _queue(client: _Client, item: tuple[bytes, int, int]) -> None:
        """(the sink thread) A message for the client's thread to send; queue.Full if its outbox is."""
        client.outbox.put_nowait(item)
        client.queued += 1

    def _tell_drops(self, client: _Client) -> bool:
        """The gap status of what a client (GATEWAY_SLOW_CLIENT=drop) missed, once its queue has room again."""
        note = status("gap", f"{client.pending_drops} event(s) dropped: this client read too slowly")
        note.update(reason="slow_client", dropped_events=client.pending_drops)
        try:
            self._queue(client, (_frame(ujson.dumps([note]).encode("utf-8")), 0, 1))
        except queue.Full:
            return False
        client.pending_drops = 0
        return True

    def tick(self, now: float) -> None:
        """Drops are told as soon as there is room, data or not; a disconnected slow client still blocked in a
        send (it reads nothing) is cut; a topic added upstream that no one held for its linger time goes, and one
        the server refused is refused to the clients that asked."""
        self._own()
        if len(self._sent_at) > len(self._held):  # groups that had no write for an interval need no entry
            self._sent_at = {topics: at for topics, at in self._sent_at.items()
                             if now - at < self.send_interval or topics in self._held}
        if self._lingering or self._holders:
            self._upstream_housekeeping()
        for client in self._clients:
            if client.pending_drops:
                self._tell_drops(client)
            if client.kicked_at is not None and time.monotonic() - client.kicked_at > KICK_GRACE_SECS:
                try:
                    client.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _upstream_housekeeping(self) -> None:
        subscriptions = self._subscriptions
        if subscriptions is None:
            return
        now = time.monotonic()
        refused = {topic: message for topic, (state, message) in list(subscriptions.states.items())
                   if state == REFUSED and topic in self._holders}
        with self._lock:
            expired = [topic for topic, until in self._lingering.items() if until <= now]
            for topic in expired:
                del self._lingering[topic]
                self.topics_removed += 1
                _log.info("gateway: %s removed upstream (no client held it for %gs)", topic, self.linger_secs,
                          extra={"fields": {"topic": topic}})
            for topic, message in refused.items():
                del self._holders[topic]
                self.topics_removed += 1
                _log.warning("gateway: the server refused %s (%s): refused to the clients that asked", topic, message,
                             extra={"fields": {"topic": topic, "server_message": message}})
                note = status("error", f"{message or 'not authorized'}: {topic}")
                wire = _frame(ujson.dumps([note]).encode("utf-8"))
                for client in self._clients:
                    if topic in client.topics:
                        client.topics = [held for held in client.topics if held != topic]
                        try:
                            self._queue(client, (wire, 0, 1))
                        except queue.Full:
                            pass
            if expired or refused:
                self._sync_upstream()

    def reopen(self) -> None:
        """SIGHUP: the keys file again; the clients of a key that is gone are closed."""
        try:
            keys = load_keys(self._keys_file, self._service_key)
        except SinkConfigError as exc:
            _log.error("%s: the keys stay as they were", exc)
            return
        self._keys = keys
        for client in self._clients:
            if client.name not in keys:
                client.kick_reason = "auth_failed"
                client.kicked_at = time.monotonic()
                self.stats.add(removed_key_disconnects=1)
        _log.info("gateway: %d key(s) loaded", len(keys), extra={"fields": {"keys": sorted(keys)}})

    def close(self, deadline: float | None = None) -> None:
        """Each client gets what was queued for it, then a close 1001; by the deadline every connection is cut."""
        listener = self._listener
        if listener is None:
            return
        self.release(time.monotonic(), everything=True)
        for client in self._clients:
            try:
                client.outbox.put(_GOING_AWAY, timeout=0.1)
            except queue.Full:
                client.kicked_at = 0.0
                client.kick_reason = "going_away"
        end = deadline if deadline is not None else time.monotonic() + 5.0
        while self._clients and time.monotonic() < end:
            time.sleep(0.05)
        listener.stopping.set()
        for client in self._clients:
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        listener.stop(join_secs=1.0)
        self._listener = None

    def health_note(self) -> str:
        clients = len(self._clients)
        slow = self.stats.slow_disconnects
        return (f"gateway: {clients} client{'s' if clients != 1 else ''} on {self.destination()}"
                + (f", {slow} disconnected as slow (GATEWAY_CLIENT_QUEUE)" if slow else ""))

    def subscriptions_view(self) -> dict:
        """Each client by name (never by key), with its topics; several clients of one key are numbered."""
        clients: dict[str, list[str]] = {}
        for client in self._clients:
            name = str(client.name)
            if name in clients:
                name = f"{name}#{sum(1 for key in clients if key.split('#')[0] == client.name) + 1}"
            clients[name] = list(client.topics)
        return {"address": self.destination(), "clients": clients}

    def describe_metrics(self, queue_stats) -> list:
        stats = self.stats
        by_name: dict[tuple[str], int] = {(name,): 0 for name in self._keys}
        for client in self._clients:
            by_name[(str(client.name),)] = by_name.get((str(client.name),), 0) + 1
        return [
            ("polygon_gateway_clients", "Gateway clients connected and authenticated, by key name", ["client"],
             by_name),
            ("polygon_gateway_client_topics", "Topics the gateway's clients hold, summed over the clients",
             sum(len(client.topics) for client in self._clients)),
            ("polygon_gateway_connections_total", "Connections accepted by the gateway", stats.connections),
            ("polygon_gateway_refused_clients_total", "Connections closed at accept: GATEWAY_MAX_CLIENTS served",
             stats.refused_clients),
            ("polygon_gateway_auth_failures_total", "Gateway clients that gave an unknown key", stats.auth_failures),
            ("polygon_gateway_handshake_timeouts_total", "Gateway connections cut before their handshake was done",
             stats.handshake_timeouts),
            ("polygon_gateway_protocol_errors_total",
             "Gateway connections that sent no WebSocket upgrade (TLS to a ws:// address, plain HTTP): 400, closed",
             stats.protocol_errors),
            ("polygon_gateway_accept_errors_total",
             "Gateway accepts that failed for want of descriptors (the listener backs off)", stats.accept_errors),
            ("polygon_gateway_frames_sent_total", "Messages sent to gateway clients", stats.frames_sent),
            ("polygon_gateway_writes_total",
             "Writes of messages to gateway clients (those that come within GATEWAY_SEND_INTERVAL_MS go in one)",
             stats.writes),
            ("polygon_gateway_events_sent_total", "Events sent to gateway clients (one per client it reached)",
             stats.events_sent),
            ("polygon_gateway_dropped_events_total",
             "Events not sent to a gateway client whose queue was full (GATEWAY_SLOW_CLIENT=drop)",
             stats.dropped_events),
            ("polygon_gateway_disconnects_total",
             "Gateway clients the gateway closed, by reason: slow_consumer (its queue full), key_removed (SIGHUP)",
             ["reason"], {("slow_consumer",): stats.slow_disconnects,
                          ("key_removed",): stats.removed_key_disconnects}),
            ("polygon_gateway_upstream_topics_added_total",
             "Topics the gateway added to the upstream subscription for its clients (GATEWAY_UPSTREAM=union)",
             self.topics_added),
            ("polygon_gateway_upstream_topics_removed_total",
             "Topics the gateway removed from the upstream subscription (unused past GATEWAY_LINGER_SECS, or refused)",
             self.topics_removed),
            ("polygon_gateway_drops_total", "Batches' events dropped at the gateway's own queue (full)",
             queue_stats.dropped),
        ]


class _Held:
    """Messages for a group of clients that wait for its next write (GATEWAY_SEND_INTERVAL_MS)."""

    __slots__ = ("members", "parts", "count", "messages", "due")

    def __init__(self, members: list[_Client], wire: bytes, count: int, messages: int, due: float):
        self.members = members
        self.parts = [wire]
        self.count = count
        self.messages = messages
        self.due = due

    def add(self, wire: bytes, count: int, messages: int) -> None:
        self.parts.append(wire)
        self.count += count
        self.messages += messages


class _Segment:
    """Part of a batch, shared by every group of clients: a live frame's records (raw: its bytes when whole), or
    records with no frame (gap records, backfill, a batch that is not a FramedBatch)."""

    __slots__ = ("items", "raw", "added", "gaps", "_events", "_gap_wire")

    def __init__(self, items: list, raw: bytes | None, added: int | None):
        self.items = items
        self.raw = raw
        self._events: list[tuple[str, str, str, bool]] | None = None
        self._gap_wire: bytes | None = None
        if added is None:  # not a frame: what is in it is found out
            self.gaps = [item[5] for item in items if item[3] == GAP]
            self.added = sum(1 for item in items if item[3] == EXTRA)
        else:
            self.gaps = []
            self.added = added

    @property
    def size(self) -> int:
        return len(self.items)

    def events(self) -> list[tuple[str, str, str, bool]]:
        """(code, symbol, the event's JSON as received, whether it is of a topic added upstream), live ones only."""
        if self._events is None:
            events = self._events = []
            for _, code, symbol, kind, _, line in self.items:
                if kind == EXTRA:
                    events.append((code, symbol, line, True))
                    continue
                if kind == GAP or kind == BACKFILL:
                    continue
                end = line.rindex(PAYLOAD_END)
                if line.startswith(BACKFILLED, end - _BACKFILLED_CHARS):
                    continue  # backfilled: late and out of order for a live client
                events.append((code, symbol, line[line.index(PAYLOAD_START, 0, end) + _PAYLOAD_START_CHARS:end],
                               False))
        return self._events

    def gap_wire(self) -> bytes:
        if self._gap_wire is None:
            self._gap_wire = _gap_statuses(self.gaps)
        return self._gap_wire


def _segments(records: list) -> list[_Segment]:
    """A batch in segments, in order: each live frame of a FramedBatch, and the records between them."""
    frames = getattr(records, "frames", None)
    if not frames:
        return [_Segment(records, None, None)]
    segments = []
    at = 0
    for start, end, raw, added in frames:
        if start > at:
            segments.append(_Segment(records[at:start], None, None))
        segments.append(_Segment(records[start:end], raw, added))
        at = end
    if at < len(records):
        segments.append(_Segment(records[at:], None, None))
    return segments


def _gap_statuses(gaps: list[str]) -> bytes:
    messages = []
    for line in gaps:
        value = ujson.loads(line)
        payload = value.get("payload") if isinstance(value.get("payload"), dict) else {}
        message = {"ev": "status", "status": "gap",
                   "message": payload.get("detail") or f"gap: {payload.get('reason')}"}
        message.update((key, item) for key, item in payload.items() if key not in message)
        message["seq"] = value.get("seq")
        messages.append(message)
    return _frame(ujson.dumps(messages, ensure_ascii=False, escape_forward_slashes=False).encode("utf-8"))


def _frame(payload: bytes) -> bytes:
    return ws_frame(1, payload)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
