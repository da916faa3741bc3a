"""The local server's REST side (demo, tests): the endpoints backfill uses (shared/spec/rest.md), over the very events
the WebSocket side generated, sent or lost (MockOptions.lose_on_reconnect), with the same API key, pagination by
`next_url` and fault modes (403 per kind, 429 with Retry-After, 500, a server that never answers)."""

from __future__ import annotations

import base64
import bisect
import json
import re
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# Events kept per (code, symbol): the oldest go first (a long demo must not grow memory).
HISTORY_PER_STREAM = 500_000
_KIND_CODES = {"trades": ("T", "XT"), "quotes": ("Q",)}
_BAR_CODES = {"second": ("A",), "minute": ("AM", "XA")}
_AGGS = re.compile(r"/v2/aggs/ticker/([^/]+)/range/(\d+)/(second|minute)/(\d+)/(\d+)")
_TICKS = re.compile(r"/v3/(trades|quotes)/([^/]+)")
MAX_LIMIT = 50_000


class History:
    """Every event generated, per (code, symbol), in time order."""

    def __init__(self, per_stream: int = HISTORY_PER_STREAM):
        self._lock = threading.Lock()
        self._streams: dict[tuple[str, str | None], deque] = {}
        self._per_stream = per_stream

    def add(self, events: list[dict]) -> None:
        with self._lock:
            for event in events:
                symbol = event.get("sym") or event.get("pair") or event.get("p") or event.get("T")
                key = (event["ev"], symbol)
                stream = self._streams.get(key)
                if stream is None:
                    stream = self._streams[key] = deque(maxlen=self._per_stream)
                stream.append(event)

    def events(self, code: str, symbol: str) -> list[dict]:
        with self._lock:
            return list(self._streams.get((code, symbol), ()))

    def pair_of(self, code: str, compact: str) -> str:
        """The crypto pair (BTC-USD) the aggregates endpoint names without its dash (X:BTCUSD)."""
        with self._lock:
            return next((symbol for stream_code, symbol in self._streams
                         if stream_code == code and symbol is not None and symbol.replace("-", "") == compact), compact)


class Market:
    """What goes on across connections: each stream's sequence and price, the history, who connected before."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seq: dict[tuple[str, str], int] = {}
        self.price: dict[str, float] = {}
        self.history = History()
        self._seen: set[str] = set()

    def connected(self, cluster: str) -> bool:
        """Whether a connection of this cluster came before (then the market went on while nobody listened)."""
        with self.lock:
            before = cluster in self._seen
            self._seen.add(cluster)
            return before


def _trade(event: dict) -> dict:
    result = {"conditions": event.get("c"), "exchange": event.get("x"), "price": event["p"], "size": event.get("s"),
              "sip_timestamp": event["t"] * 1_000_000, "participant_timestamp": event["t"] * 1_000_000 - 1500}
    if event["ev"] == "XT":  # crypto: an id, no sequence number
        result["id"] = str(event.get("i"))
    elif event.get("i") is not None:  # stocks; options trades have neither (rest.md)
        result.update(id=event["i"], sequence_number=event["q"], tape=event.get("z"))
    return {key: value for key, value in result.items() if value is not None}


def _quote(event: dict) -> dict:
    result = {"bid_exchange": event.get("bx"), "bid_price": event.get("bp"), "bid_size": event.get("bs"),
              "ask_exchange": event.get("ax"), "ask_price": event.get("ap"), "ask_size": event.get("as"),
              "conditions": [event["c"]] if isinstance(event.get("c"), int) else event.get("c"),
              "indicators": event.get("i"), "sequence_number": event.get("q"), "tape": event.get("z"),
              "sip_timestamp": event["t"] * 1_000_000}
    return {key: value for key, value in result.items() if value is not None}


def _bar(event: dict) -> dict:
    return {"t": event["s"], "o": event["o"], "h": event["h"], "l": event["l"], "c": event["c"],
            "v": event.get("v"), "vw": event.get("vw"), "n": 1}


class RestServer:
    """A ThreadingHTTPServer on its own port, next to the WebSocket server (MockServer.start_rest)."""

    def __init__(self, mock, host: str, port: int):
        self.mock = mock
        self.stopping = threading.Event()
        self._counter_lock = threading.Lock()
        self._requests = 0
        handler = type("Handler", (_Handler,), {"rest": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.socket.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.2,), name="mock-rest",
                                        daemon=True)

    def start(self) -> "RestServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def next_request(self) -> int:
        with self._counter_lock:
            self._requests += 1
            return self._requests

    def answer(self, path: str, query: dict, authorization: str | None) -> tuple[int, dict, dict]:
        """(status, headers, body) for one GET."""
        options = self.mock.options
        key = (authorization or "").removeprefix("Bearer ").strip() or query.get("apiKey", [""])[0]
        wanted = options.rest_api_key if options.rest_api_key is not None else options.api_key
        if wanted is not None and key != wanted:
            return 401, {}, {"status": "ERROR", "request_id": "mock", "error": "Unknown API Key"}
        number = self.next_request()
        if number <= options.rest_throttle:
            return 429, {"Retry-After": options.rest_retry_after}, {"status": "ERROR", "error": "too many requests"}
        if number <= options.rest_throttle + options.rest_errors:
            return 500, {}, {"status": "ERROR", "error": "internal error"}
        cursor = query.get("cursor", [None])[0]
        if cursor is not None:
            try:
                saved = json.loads(base64.urlsafe_b64decode(cursor.encode()))
                path, query, offset = saved["path"], saved["query"], int(saved["offset"])
            except (ValueError, KeyError, TypeError):
                return 400, {}, {"status": "ERROR", "error": "bad cursor"}
        else:
            offset = 0
        match, aggs = _TICKS.fullmatch(path), _AGGS.fullmatch(path)
        if match:
            kind, ticker = match.group(1), unquote(match.group(2))
        elif aggs:
            kind, ticker = "aggs", unquote(aggs.group(1))
        else:
            return 404, {}, {"status": "NOT_FOUND", "message": "no such endpoint"}
        if kind in options.rest_not_entitled:
            return 403, {}, {"status": "NOT_AUTHORIZED", "request_id": "mock",
                             "message": "You are not entitled to this data. Please upgrade your plan."}
        symbol = ticker[2:] if ticker.startswith("X:") else ticker
        if aggs and ticker.startswith("X:"):  # the real API: X:BTC-USD for trades, X:BTCUSD for bars
            symbol = self.mock.market.history.pair_of("XA", symbol)
        if aggs is None:
            results = self._ticks(kind, symbol, query)
        else:
            results = self._bars(aggs.group(3), symbol, int(aggs.group(4)), int(aggs.group(5)))
        try:
            limit = min(MAX_LIMIT, int(query.get("limit", ["1000"])[0]))
        except ValueError:
            return 400, {}, {"status": "ERROR", "error": "bad limit"}
        if options.rest_page_size:
            limit = min(limit, options.rest_page_size)
        page = results[offset:offset + limit]
        body: dict[str, object] = {"status": "OK", "request_id": f"mock-{number}", "results": page}
        if kind == "aggs":
            body.update(ticker=ticker, resultsCount=len(page), queryCount=len(page))
        if offset + limit < len(results):
            token = base64.urlsafe_b64encode(json.dumps({"path": path, "query": query,
                                                         "offset": offset + limit}).encode()).decode()
            body["next_url"] = f"{self.url}{path}?cursor={token}"
        return 200, {}, body

    def _ticks(self, kind: str, symbol: str, query: dict) -> list[dict]:
        def bound(name: str, default: int) -> int:
            try:
                return int(query.get(name, [default])[0])
            except ValueError:
                return default

        low, high = bound("timestamp.gte", 0), bound("timestamp.lte", 1 << 62)
        out = []
        for code in _KIND_CODES[kind]:
            events = self.mock.market.history.events(code, symbol)
            times = [event["t"] * 1_000_000 for event in events]
            for event in events[bisect.bisect_left(times, low):bisect.bisect_right(times, high)]:
                out.append(_trade(event) if kind == "trades" else _quote(event))
        return out

    def _bars(self, span: str, symbol: str, low_ms: int, high_ms: int) -> list[dict]:
        bars: dict[int, dict] = {}
        for code in _BAR_CODES[span]:
            for event in self.mock.market.history.events(code, symbol):
                if low_ms <= event["s"] <= high_ms:
                    bars[event["s"]] = _bar(event)  # the bar as it last stood
        return [bars[start] for start in sorted(bars)]


class _Handler(BaseHTTPRequestHandler):
    rest: RestServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the real API

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        stats = self.rest.mock.stats
        stats.rest_headers.append(self.headers.get("Authorization"))
        if self.rest.mock.options.rest_hang:
            self.rest.stopping.wait(600)
            self.close_connection = True
            return
        status, headers, body = self.rest.answer(parts.path, parse_qs(parts.query), self.headers.get("Authorization"))
        stats.rest_requests.append((parts.path, status))
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away (a service that stopped): nothing to answer
            self.close_connection = True

    def log_message(self, *args) -> None:
        pass
