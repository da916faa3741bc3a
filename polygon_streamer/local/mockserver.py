"""A local Polygon-protocol WebSocket server for the demo, the benchmark and the tests.

It speaks protocol.md for every cluster (the URL path picks it): `connected`, auth with a key check, subscribe with
acks (codes, symbols, `*` and `PREFIX*`), then a stream of realistic events shaped like shared/fixtures, with a
per-(code, symbol) sequence in `q`, at a chosen rate and batch size. Fault modes reproduce what the real service does
to clients (rejected auth, eviction, drops, silence, garbage frames, odd events, a hung upgrade, a close frame with a
code, silence while statuses still flow, repeated and backwards `q`).
Threads and blocking sockets; the server side of the protocol (the upgrade, what the client sends, the bounds on
strangers, the accept loop) is wsserver.py's, shared with the gateway.
"""

from __future__ import annotations

import dataclasses
import queue
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import ujson

if TYPE_CHECKING:
    from .mockrest import Market, RestServer

from ..wsserver import Closed as _Closed
from ..wsserver import Listener, ServerConnection, ServerStats, ws_frame
from ..wsserver import status as _status

try:
    from wsproto.events import CloseConnection
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("the local Polygon server needs wsproto: pip install 'polygon-streamer[mockserver]' "
                      "or apt install python3-wsproto") from exc

SYMBOLS = {
    "stocks": ["AAPL", "MSFT", "AMZN", "NVDA", "GOOGL", "META", "TSLA", "BRK.A", "SPY", "QQQ", "AMD", "NFLX",
               "INTC", "JPM", "XOM", "KO"],
    "options": ["O:SPY241220P00720000", "O:AAPL250117C00200000", "O:TSLA250321P00150000", "O:QQQ241231C00500000"],
    "futures": ["ESZ4", "NQZ4", "GCJ5", "CLF5", "ZNH5"],
    "crypto": ["BTC-USD", "ETH-USD", "SOL-USD", "DOGE-USD"],
    "forex": ["EUR/USD", "USD/JPY", "GBP/USD", "USD/CNH"],
    "indices": ["I:SPX", "I:NDX", "I:DJI", "I:VIX"],
}


def _trade(symbol, seq, now, price):
    return {"ev": "T", "sym": symbol, "x": 4, "i": str(seq * 7 + 11), "z": 3, "p": price, "s": 100,
            "c": [14, 41], "t": now, "q": seq}


def _quote(symbol, seq, now, price):
    return {"ev": "Q", "sym": symbol, "bx": 4, "bp": round(price - 0.01, 4), "bs": 2, "ax": 7,
            "ap": round(price + 0.01, 4), "as": 3, "c": 0, "i": [604], "t": now, "q": seq, "z": 3}


def _agg(code):
    def make(symbol, seq, now, price):
        start = now - now % 1000 if code == "A" else now - now % 60000
        return {"ev": code, "sym": symbol, "v": 200, "av": 8642007 + seq, "op": price, "vw": price, "o": price,
                "c": price, "h": round(price + 0.05, 4), "l": round(price - 0.05, 4), "a": price, "z": 50,
                "s": start, "e": start + (1000 if code == "A" else 60000), "q": seq}
    return make


# (cluster, code) -> maker(symbol, seq, now_ms, price) -> event dict. Shapes follow shared/fixtures.
TEMPLATES: dict[str, dict[str, Callable]] = {
    "stocks": {
        "T": _trade, "Q": _quote, "A": _agg("A"), "AM": _agg("AM"),
        "LULD": lambda s, q, now, p: {"ev": "LULD", "T": s, "h": round(p * 1.05, 2), "l": round(p * 0.95, 2),
                                      "i": [21], "z": 3, "t": now * 1_000_000 + 683_746, "q": q},
        "NOI": lambda s, q, now, p: {"ev": "NOI", "T": s, "t": now * 1_000_000 + 223_013, "at": 930, "a": "M",
                                     "i": q, "x": 10, "o": 480, "p": 440, "b": p, "q": q},
        "FMV": lambda s, q, now, p: {"ev": "FMV", "fmv": p, "sym": s, "t": now, "q": q},
    },
    "options": {
        "T": lambda s, q, now, p: {"ev": "T", "sym": s, "x": 65, "p": round(p / 100, 2), "s": 1, "c": [233],
                                   "t": now, "q": q},
        "Q": lambda s, q, now, p: {"ev": "Q", "sym": s, "bx": 302, "ax": 302, "bp": round(p / 100 - 0.05, 2),
                                   "ap": round(p / 100 + 0.05, 2), "bs": 17, "as": 24, "t": now, "q": q},
        "A": _agg("A"), "AM": _agg("AM"),
        "FMV": lambda s, q, now, p: {"ev": "FMV", "fmv": round(p / 100, 2), "sym": s, "t": now * 1_000_000,
                                     "q": q},
    },
    "futures": {
        "T": lambda s, q, now, p: {"ev": "T", "sym": s, "p": p, "s": 2, "t": now, "q": q},
        "Q": lambda s, q, now, p: {"ev": "Q", "sym": s, "bp": p - 0.25, "bs": 14, "bt": now - 3, "ap": p,
                                   "as": 9, "at": now - 2, "t": now, "q": q},
        "AM": lambda s, q, now, p: {"ev": "AM", "sym": s, "v": 312, "dv": round(p * 312, 2), "o": p, "c": p,
                                    "h": p + 0.5, "l": p - 0.5, "n": 201, "s": now - now % 60000,
                                    "e": now - now % 60000 + 60000, "q": q},
    },
    "crypto": {
        "XT": lambda s, q, now, p: {"ev": "XT", "pair": s, "p": p, "t": now, "s": 0.01616617, "c": [2], "i": q,
                                    "x": 3, "r": now + 12, "q": q},
        "XQ": lambda s, q, now, p: {"ev": "XQ", "pair": s, "bp": p - 1, "bs": 0.48, "ap": p + 1, "as": 0.601,
                                    "t": now, "x": 1, "r": now + 13, "q": q},
        "XL2": lambda s, q, now, p: {"ev": "XL2", "pair": s, "t": now, "r": now + 13, "x": 1,
                                     "b": [[p - 1, 0.18635], [p - 2, 0.134]], "a": [[p + 1, 3.5527483]], "q": q},
        "XA": lambda s, q, now, p: {"ev": "XA", "pair": s, "v": 951.6112, "vw": p, "z": 73, "o": p, "c": p,
                                    "h": p + 1, "l": p - 1, "s": now - now % 60000,
                                    "e": now - now % 60000 + 60000, "q": q},
        "XAS": lambda s, q, now, p: {"ev": "XAS", "pair": s, "v": 951.6112, "vw": p, "z": 73, "o": p, "c": p,
                                     "h": p + 1, "l": p - 1, "s": now - now % 1000, "e": now - now % 1000 + 1000,
                                     "q": q},
    },
    "forex": {
        "C": lambda s, q, now, p: {"ev": "C", "p": s, "x": "44", "a": round(p / 100 + 0.0002, 5),
                                   "b": round(p / 100, 5), "t": now, "q": q},
        "CA": lambda s, q, now, p: {"ev": "CA", "pair": s, "o": p / 100, "c": p / 100, "h": p / 100, "l": p / 100,
                                    "v": 20, "s": now - now % 60000, "q": q},
        "CAS": lambda s, q, now, p: {"ev": "CAS", "pair": s, "o": p / 100, "c": p / 100, "h": p / 100,
                                     "l": p / 100, "v": 20, "s": now - now % 1000, "q": q},
    },
    "indices": {
        "V": lambda s, q, now, p: {"ev": "V", "val": p * 10, "T": s, "t": now, "q": q},
        "A": lambda s, q, now, p: {"ev": "A", "sym": s, "op": p, "o": p, "c": p, "h": p, "l": p,
                                   "s": now - 1000, "e": now, "q": q},
        "AM": lambda s, q, now, p: {"ev": "AM", "sym": s, "op": p, "o": p, "c": p, "h": p, "l": p,
                                    "s": now - 60000, "e": now, "q": q},
    },
}

# Events that exercise a client's per-event isolation (protocol.md 8): the good ones among them must come out.
ODD_EVENTS = [
    {"ev": "ZZ", "sym": "ODD", "t": 1700000000000},            # unknown code
    {"ev": "T", "x": 4, "p": 1.5, "s": 1, "t": 1700000000000},  # missing symbol
    {"ev": "T", "sym": "ODD", "p": "abc", "s": "100", "t": "1700000000000"},  # strings where numbers belong
    {"ev": "LULD", "T": "ODD", "h": 1.0, "l": 0.9, "t": 1788877046310003385},  # 19-digit ns time
    {"ev": "A", "sym": "ODD", "z": 12.0, "v": 10**30, "e": 1700000000000},      # float int, huge int
    {"sym": "NOEV"},                                                          # no ev: skipped
    42,                                                                       # not an object: skipped
]
ODD_EVENTS_KEPT = 5


@dataclass
class MockOptions:
    """What the server does; tests may change fields between connections."""

    api_key: str | None = None         # None: any key is accepted
    rate: float = 0.0                  # events per second per connection; 0: as fast as the client reads
    batch: int = 1                     # events per frame
    count: int = 0                     # events per connection, then silence; 0: unlimited
    seed: int = 1
    reject_auth: bool = False          # auth_failed, then an abrupt close (what the real server does)
    auth_failed_message: str = "authentication failed"
    auth_failed_as_error: bool = False  # reject_auth answers with an `error` status and keeps the connection open
    max_connections: bool = False      # after the acks: max_connections status, then close 1008
    not_authorized_codes: tuple[str, ...] = ()  # subscribe to these codes -> status error "not authorized"
    refuse_topics: tuple[str, ...] = ()  # subscribe to these topics (exactly as written) -> error "not authorized"
    drop_after: int = 0                # abrupt close after this many events on each connection
    bad_json_every: int = 0            # every Nth data frame is not JSON
    odd_events_every: int = 0          # every Nth data frame also carries ODD_EVENTS
    binary_every: int = 0              # every Nth data frame is sent as a binary frame
    not_array_every: int = 0           # every Nth data frame is a JSON object, not an array
    huge_frame_every: int = 0          # every Nth data frame is padded past 10 MB with events
    status_in_data_every: int = 0      # every Nth data frame also carries a status object (status_in_data)...
    status_in_data: str = "success"    # ...in the middle of its events
    hang_upgrade: bool = False         # accept TCP and never answer the upgrade
    trickle_upgrade: float = 0.0       # answer the upgrade one byte every this many seconds
    record: bool = False               # keep (code, symbol, q) of every data event sent, in order
    silent_status_every: float = 0.0   # once `count` is reached: a status frame every this many seconds (data stops,
                                       # the connection looks alive)
    duplicate_q_every: int = 0         # every Nth data frame also repeats its first event (same q)
    backwards_q_every: int = 0         # every Nth data frame also carries its first event with q two lower
    evict_after: int = 0               # after this many events: max_connections status, then close 1008
    close_after: int = 0               # send a close frame (close_code, close_reason) after this many events
    close_code: int = 1011
    close_reason: str = "internal server error"
    frame_pool: int = 0                # benchmarks: cycle this many pre-rendered frames, sent in large chunks
    max_clients: int = 0               # connections served at once (0: no cap); more are closed at accept
    deaf_after_auth: bool = False      # after auth_success, read nothing more (the client's sends back up)
    handshake_secs: float = 10.0       # upgrade, auth and the first subscribe within this long, or the connection
                                       # is cut (0: no deadline)
    # The REST side (mockrest.py), once MockServer.start_rest() runs: every generated event is kept for it, and the
    # market goes on across connections (q and prices continue instead of starting again).
    lose_on_reconnect: int = 0         # at each connection after the first: this many events happen unsent (lost)
    rest_page_size: int = 0            # results per REST page at most (0: the request's limit)
    rest_not_entitled: tuple[str, ...] = ()  # REST kinds (trades, quotes, aggs) answered 403
    rest_throttle: int = 0             # the first N REST requests are answered 429 (Retry-After: rest_retry_after)
    rest_retry_after: str = "1"
    rest_errors: int = 0               # the next N REST requests (after the throttled ones) are answered 500
    rest_hang: bool = False            # REST requests are read and never answered
    rest_api_key: str | None = None    # the REST side accepts this key instead of api_key (401 for the WebSocket's)


@dataclass
class MockStats(ServerStats):
    auth_attempts: list = field(default_factory=list)     # monotonic times
    subscribes: list = field(default_factory=list)        # params strings
    unsubscribes: list = field(default_factory=list)      # params strings
    events_sent: int = 0
    frames_sent: int = 0
    sent: list = field(default_factory=list)              # (code, symbol, q) when options.record
    huge_frame_events: int = 0
    sequence_faults: list = field(default_factory=list)  # (reason, code, q) of each extra event sent
    lost_events: int = 0            # generated while no client was connected (lose_on_reconnect): REST has them
    rest_requests: list = field(default_factory=list)  # (path, status) of each REST request
    rest_headers: list = field(default_factory=list)   # the Authorization header of each REST request



class EventGenerator:
    """Round-robin over the subscribed (code, symbol) streams, each with its own sequence and price walk. With a
    market (the REST side is on), the sequences and prices are the server's, going on across connections, and every
    event generated is kept in the market's history."""

    def __init__(self, cluster: str, streams: list[tuple[str, str]], seed: int, market=None):
        self._cluster = cluster
        self._templates = TEMPLATES[cluster]
        self._streams = streams
        self._next = 0
        self._market = market
        self._seq: dict[tuple[str, str], int] = market.seq if market is not None else {}
        self._price: dict[str, float] = market.price if market is not None else {}
        self._random = random.Random(seed)

    def __bool__(self) -> bool:
        return bool(self._streams)

    @property
    def streams(self) -> list[tuple[str, str]]:
        """The (code, symbol) streams served, a list the connection changes in place (subscribe, unsubscribe)."""
        return self._streams

    def take(self, count: int) -> list[dict]:
        if self._market is None:
            return self._take(count)
        with self._market.lock:
            return self._take(count)

    def _take(self, count: int) -> list[dict]:
        now = time.time_ns() // 1_000_000
        out = []
        streams = self._streams
        for _ in range(count):
            self._next %= len(streams)  # the list may have shrunk (unsubscribe)
            code, symbol = streams[self._next]
            self._next = (self._next + 1) % len(streams)
            seq = self._seq.get((code, symbol), 0) + 1
            self._seq[(code, symbol)] = seq
            price = self._price.get(symbol) or (50 + self._random.random() * 400)
            price = round(max(1.0, price + self._random.uniform(-0.05, 0.05)), 2)
            self._price[symbol] = price
            out.append(self._templates[code](symbol, seq, now, price))
        if self._market is not None:
            self._market.history.add(out)
        return out


def streams_for(cluster: str, params: str) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Subscribe params -> ((code, symbol) streams, acked topics, topics with codes the cluster lacks)."""
    templates = TEMPLATES[cluster]
    symbols = SYMBOLS[cluster]
    streams: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    acked, unknown = [], []
    for topic in (part.strip() for part in params.split(",") if part.strip()):
        code, _, ticker = topic.partition(".")
        if code not in templates:
            unknown.append(topic)
            continue
        acked.append(topic)
        if ticker == "*":
            chosen = symbols
        elif ticker.endswith("*"):
            chosen = [symbol for symbol in symbols if symbol.startswith(ticker[:-1])]
        else:
            chosen = [ticker]
        for symbol in chosen:
            if (code, symbol) not in seen:
                seen.add((code, symbol))
                streams.append((code, symbol))
    if len(streams) <= INTERLEAVE_STREAMS:
        interleave(cluster, streams)
    return streams, acked, unknown


INTERLEAVE_STREAMS = 10_000  # more streams keep the order they were subscribed in (sorting them at every subscribe
                             # message of a huge subscription would cost more than serving it)


def interleave(cluster: str, streams: list[tuple[str, str]]) -> None:
    """Codes interleaved per symbol (T:AAPL, Q:AAPL, T:MSFT, ...), the way a live mixed feed looks; in place."""
    order = {symbol: index for index, symbol in enumerate(SYMBOLS[cluster])}
    streams.sort(key=lambda stream: order.get(stream[1], len(order)))


class _Connection(ServerConnection):
    def __init__(self, server: "MockServer", sock: socket.socket):
        super().__init__(sock, server.stopping, server.stats, TEMPLATES)
        self.server = server
        self.options = dataclasses.replace(server.options)
        self.cluster = "stocks"
        self.key: str | None = None  # the API key it authenticated with
        self.sent_events = 0
        self.data_frames = 0
        self.subscribed: list[str] = []  # every subscribe's params, in order
        self._known_streams: set[tuple[str, str]] = set()  # the streams list's members (_subscribe)

    # -- socket plumbing --------------------------------------------------------------------------------------

    _pump = ServerConnection.pump
    _next_message = ServerConnection.next_message

    def send_upgrade(self, response: bytes) -> None:
        if not self.options.trickle_upgrade:
            self.sock.sendall(response)
            return
        for index in range(len(response)):
            if self.stopping.wait(self.options.trickle_upgrade):
                raise _Closed()
            self.sock.sendall(response[index:index + 1])

    # -- the protocol -------------------------------------------------------------------------------------------

    def serve(self) -> None:
        options = self.options
        stats = self.server.stats
        handshake_deadline = time.monotonic() + options.handshake_secs if options.handshake_secs else None
        while options.hang_upgrade:
            if self.server.stopping.wait(0.2):
                raise _Closed()
        self.upgrade(handshake_deadline)
        self.send([_status("connected", "Connected Successfully")])
        streams: list[tuple[str, str]] = []
        authed = False
        while True:
            subscribed = authed and bool(streams or (self.server.source is not None and self.subscribed))
            if not (authed and self.subscribed):
                self.check_deadline(handshake_deadline)
            message = self._next_message(0.2 if subscribed or handshake_deadline else 3600)
            if message is None:
                if self.server.stopping.is_set():
                    raise _Closed()
                if subscribed:
                    break
                continue
            action = message.get("action")
            if action == "auth":
                stats.auth_attempts.append(time.monotonic())
                self.key = str(message.get("params"))
                key_ok = options.api_key is None or message.get("params") == options.api_key
                if options.reject_auth or not key_ok:
                    if options.auth_failed_as_error:
                        self.send([_status("error", options.auth_failed_message)])
                        continue
                    self.send([_status("auth_failed", options.auth_failed_message)])
                    self.abort()
                authed = True
                self.send([_status("auth_success", "authenticated")])
                if options.deaf_after_auth:
                    while not self.server.stopping.wait(0.2):
                        pass
                    raise _Closed()
            elif action == "subscribe":
                if not authed:
                    self.send([_status("auth_required", "authentication required")])
                    continue
                self._subscribe(str(message.get("params", "")), streams)
                if options.max_connections:
                    self.send([_status("max_connections", "Maximum number of websocket connections exceeded. ")])
                    self.sock.sendall(self.ws.send(CloseConnection(code=1008, reason="max connections")))
                    raise _Closed()
        if self.server.source is not None:  # replay: frames from captures instead of generated events
            self.server.source(self, ",".join(self.subscribed))
            return
        market = self.server.market
        generator = EventGenerator(self.cluster, streams, options.seed + stats.connections, market)
        if market is not None and options.lose_on_reconnect and market.connected(self.cluster):
            # What happened while the client was away: in the history (REST has it), never sent.
            generator.take(options.lose_on_reconnect)
            stats.add(lost_events=options.lose_on_reconnect)
        if options.frame_pool:
            self._stream_pool(generator)
        else:
            self._stream(generator)

    def _subscribe(self, params: str, streams: list[tuple[str, str]]) -> None:
        """Ack each topic (or refuse it: not_authorized_codes, refuse_topics) and add its streams."""
        options = self.options
        self.server.stats.subscribes.append(params)
        self.subscribed.append(params)
        _streams, acked, _unknown = streams_for(self.cluster, params)
        if self.server.source is not None:  # a replay serves whatever the captures hold
            acked = [topic.strip() for topic in params.split(",") if topic.strip()]
        refused = [t for t in acked
                   if t.partition(".")[0] in options.not_authorized_codes or t in options.refuse_topics]
        acks = [_status("success", f"subscribed to: {t}") for t in acked if t not in refused]
        if refused:
            acks.append(_status("error", "not authorized"))
        if acks:
            self.send(acks)
        known = self._known_streams  # a subscription may hold a million topics: no list scans
        if len(known) != len(streams):
            known.clear()
            known.update(streams)
        refused_set = set(refused)
        for stream in streams_for(self.cluster, ",".join(t for t in acked if t not in refused_set))[0]:
            if stream not in known:
                known.add(stream)
                streams.append(stream)
        if len(streams) <= INTERLEAVE_STREAMS:
            interleave(self.cluster, streams)

    def _unsubscribe(self, params: str, streams: list[tuple[str, str]]) -> None:
        """Stop the topics' streams (at once: the next frame has none of them) and ack each."""
        self.server.stats.unsubscribes.append(params)
        topics = [topic.strip() for topic in params.split(",") if topic.strip()]
        for topic in topics:
            for stream in streams_for(self.cluster, topic)[0]:
                if stream in streams:
                    streams.remove(stream)
        self.send([_status("success", f"unsubscribed to: {t}") for t in topics])

    def _live_messages(self, streams: list[tuple[str, str]]) -> None:
        """Subscribe and unsubscribe while streaming (what the client sent is in inbox, read by _pump)."""
        while self.inbox:
            try:
                message = ujson.loads(self.inbox.pop(0))
            except ValueError:
                self.send([_status("error", "Invalid JSON")])
                continue
            if not isinstance(message, dict):
                continue
            if message.get("action") == "subscribe":
                self._subscribe(str(message.get("params", "")), streams)
            elif message.get("action") == "unsubscribe":
                self._unsubscribe(str(message.get("params", "")), streams)

    def _stream_pool(self, generator: EventGenerator) -> None:
        """As fast as the socket takes it: pre-rendered frames, many per send, so the server outruns the client."""
        options = self.options
        stats = self.server.stats
        batch = max(1, options.batch)
        pool = [ws_frame(1, ujson.dumps(generator.take(batch)).encode()) for _ in range(options.frame_pool)]
        self.server.primed.set()
        limit = options.count
        index = 0
        # Paced (options.rate): chunks of about 2 ms of events; otherwise 256 KiB chunks, as fast as TCP takes them.
        chunk_events = max(batch, int(options.rate / 500)) if options.rate > 0 else 0
        while not self.server.streaming.wait(0.05):
            self._pump(0)
            if self.server.stopping.is_set():
                return
        started = time.monotonic()
        while not self.server.stopping.is_set():
            if limit and self.sent_events >= limit:
                self._pump(0.2)
                continue
            if chunk_events:
                wait = started + self.sent_events / options.rate - time.monotonic()
                if wait > 0:
                    self._pump(wait)
                    continue
            chunk, size, events = [], 0, 0
            while (events < chunk_events if chunk_events else size < 256 * 1024) \
                    and not (limit and self.sent_events + events + batch > limit):
                frame = pool[index]
                index = (index + 1) % len(pool)
                chunk.append(frame)
                size += len(frame)
                events += batch
            if not chunk:  # a last, shorter frame
                chunk = [ws_frame(1, ujson.dumps(generator.take(limit - self.sent_events)).encode())]
                events = limit - self.sent_events
            self.sock.sendall(b"".join(chunk))
            self.sent_events += events
            stats.add(events_sent=events, frames_sent=len(chunk))
            self._pump(0)

    def _send_injected(self) -> None:
        """Bytes handed to MockServer.inject go out as they are, between generated frames."""
        while True:
            try:
                wire = self.server.injected.get_nowait()
            except queue.Empty:
                return
            self.sock.sendall(wire)

    def _stream(self, generator: EventGenerator) -> None:
        self.server.primed.set()
        options = self.options
        stats = self.server.stats
        batch = max(1, options.batch)
        limit = options.count
        drop_after = options.drop_after  # fixed for this connection; a test may change it for the next one
        if drop_after and (not limit or drop_after < limit):
            limit = drop_after
        interval = batch / options.rate if options.rate > 0 else 0.0
        next_send = time.monotonic()
        next_status = 0.0
        while not self.server.stopping.is_set():
            self._send_injected()
            self._live_messages(generator.streams)
            if not generator:  # everything unsubscribed: quiet, answering pings
                self._pump(0.05)
                continue
            if not self.server.streaming.is_set():
                self._pump(0.05)
                next_send = time.monotonic()
                continue
            if options.evict_after and self.sent_events >= options.evict_after:
                self.send([_status("max_connections", "Maximum number of websocket connections exceeded. ")])
                self.sock.sendall(self.ws.send(CloseConnection(code=1008, reason="max connections")))
                raise _Closed()
            if options.close_after and self.sent_events >= options.close_after:
                self.sock.sendall(self.ws.send(CloseConnection(code=options.close_code,
                                                               reason=options.close_reason)))
                self._pump(1.0)  # the client's answering close
                raise _Closed()
            if limit and self.sent_events >= limit:
                if drop_after and self.sent_events >= drop_after:
                    self.abort()
                if options.silent_status_every and time.monotonic() >= next_status:
                    self.send([_status("success", "still here")])
                    next_status = time.monotonic() + options.silent_status_every
                self._pump(min(0.2, options.silent_status_every or 0.2))  # silence: keep answering pings, closes
                continue
            if interval:
                wait = next_send - time.monotonic()
                if wait > 0:
                    self._pump(wait)
                    continue
                next_send += interval
            else:
                self._pump(0)
            size = batch if not limit else min(batch, limit - self.sent_events)
            events = generator.take(size)
            self.data_frames += 1
            n = self.data_frames
            if options.record:
                stats.sent.extend((e["ev"], e.get("sym") or e.get("pair") or e.get("T") or e.get("p"), e["q"])
                                  for e in events)
            if options.bad_json_every and n % options.bad_json_every == 0:
                self.sock.sendall(ws_frame(1, b"this is not json {"))
            if options.not_array_every and n % options.not_array_every == 0:
                self.sock.sendall(ws_frame(1, b'{"ev":"T","sym":"NOTARRAY","t":1700000000000}'))
            if options.huge_frame_every and n % options.huge_frame_every == 0:
                filler = generator.take(1)[0]
                filler_text = ujson.dumps(filler)
                copies = 10 * 1024 * 1024 // len(filler_text) + 1
                self.sock.sendall(ws_frame(1, ("[" + ",".join([filler_text] * copies) + "]").encode()))
                stats.add(frames_sent=1, huge_frame_events=copies)
            payload: list = events
            if options.duplicate_q_every and n % options.duplicate_q_every == 0:
                payload = payload + [dict(events[0])]
                stats.sequence_faults.append(("duplicate", events[0]["ev"], events[0]["q"]))
            if options.backwards_q_every and n % options.backwards_q_every == 0 and events[0]["q"] > 2:
                payload = payload + [dict(events[0], q=events[0]["q"] - 2)]
                stats.sequence_faults.append(("backwards", events[0]["ev"], events[0]["q"] - 2))
            if options.odd_events_every and n % options.odd_events_every == 0:
                payload = events[:1] + ODD_EVENTS + events[1:]
            if options.status_in_data_every and n % options.status_in_data_every == 0:
                half = len(payload) // 2
                payload = payload[:half] + [_status(options.status_in_data, "mixed with data")] + payload[half:]
            self.send(payload, binary=bool(options.binary_every and n % options.binary_every == 0))
            self.sent_events += len(events)
            stats.add(events_sent=len(events), frames_sent=1)


class MockServer:
    """Listens on host:port (0: a free port) until stop()."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, options: MockOptions | None = None,
                 source: Callable[["_Connection", str], None] | None = None):
        """source: replaces the generated events (replay.py): called on each connection's thread once it has
        subscribed, with the connection and its subscribe params; the handshake stays this server's."""
        self.options = options or MockOptions()
        self.source = source
        self.stats = MockStats()
        self.streaming = threading.Event()  # clear it to hold data events (handshakes still complete)
        self.streaming.set()
        self.primed = threading.Event()  # a subscribed connection has its data ready (frame pool rendered)
        self.injected: queue.Queue = queue.Queue()  # raw wire bytes for the streaming connection (tests)
        self._listener = Listener(host, port, lambda sock: _Connection(self, sock), self.stats,
                                  lambda: self.options.max_clients, "mock-polygon")
        self.stopping = self._listener.stopping
        self.host, self.port = self._listener.host, self._listener.port
        self.market: Market | None = None  # once start_rest() runs
        self.rest: RestServer | None = None

    def url(self, cluster: str = "stocks") -> str:
        return f"ws://{self.host}:{self.port}/{cluster}"

    def start_rest(self, host: str | None = None, port: int = 0) -> str:
        """Serve the REST API too (mockrest.py) over the events this server generates; returns its base URL."""
        from .mockrest import Market, RestServer

        if self.market is None:
            self.market = Market()
        rest = self.rest = RestServer(self, host or self.host, port).start()
        return rest.url

    def start(self) -> "MockServer":
        self._listener.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.rest is not None:
            self.rest.stop()
        self._listener.stop()

    def inject(self, wire: bytes) -> None:
        """Send these bytes as they are (whole frames, a bare header, anything) on the streaming connection."""
        self.injected.put(wire)

    def __enter__(self) -> "MockServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
