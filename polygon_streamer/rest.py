"""A small client of the Polygon / Massive REST API for backfill (shared/spec/rest.md): the stdlib's http.client, one
kept-alive connection, TLS verified, requests paced, retries with backoff and jitter, pages followed by `next_url`.

The API key travels only in the `Authorization` header; a `next_url` must stay on the configured host (the key is
never sent anywhere else), and what is logged or raised names the path only, never a query. A response body is read
up to MAX_RESPONSE_BYTES (a 50,000-result page is about 10 MB), so no answer can grow memory without bound.

Nothing the server does can hold the caller past a deadline: each attempt has an overall one (REQUEST_DEADLINE_SECS,
or the caller's budget if that ends first), enforced on every read of the socket, so a server trickling a byte at a
time is cut like a silent one; a chain of pages ends at the caller's page bound or at a `next_url` already asked.
"""

from __future__ import annotations

import email.utils
import http.client
import io
import math
import random
import socket
import ssl
import threading
import time
import zlib
from typing import Callable, Iterator
from urllib.parse import urlencode, urlsplit

import ujson

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
TIMEOUT_SECS = 30.0  # one read of the socket
REQUEST_DEADLINE_SECS = 60.0  # one attempt, connect to the last byte of the body
ATTEMPTS = 5  # per request: the first and four retries
BACKOFF_SECS = (0.5, 1.0, 2.0, 4.0, 8.0)
RETRY_AFTER_MAX_SECS = 60.0
# The official client retries these (rest.md); 429 waits for Retry-After when the server sends it.
RETRIED = frozenset({413, 429, 499, 500, 502, 503, 504})
# polygon_backfill_requests_total's status label: the answer's code where it means something, else a word.
STATUS_LABELS = frozenset({"200", "401", "403", "404", "413", "429", "499", "500", "502", "503", "504"})


class RestError(Exception):
    """A request that did not give data. reason: the backfill summary's word (not_entitled, rate_limited, error)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Stopped(Exception):
    """The service is stopping: the request was abandoned."""


class _DeadlineSocket:
    """A connected socket whose every read ends by the attempt's deadline: the time left is the read's timeout, so a
    trickle of bytes cannot stretch an answer past it (http.client reads through makefile(); writes go straight)."""

    def __init__(self, sock: socket.socket, connection: "_Deadlined"):
        self._sock = sock
        self._connection = connection

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        left = self._connection.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline passed")
        self._sock.settimeout(min(left, self._connection.read_timeout))
        return self._sock.recv_into(buffer, nbytes, flags)

    def makefile(self, mode: str = "r", buffering=None, **_) -> io.BufferedReader:
        self._sock._io_refs += 1  # type: ignore[attr-defined]  # socket.makefile's bookkeeping, for close()
        return io.BufferedReader(socket.SocketIO(self, "rb"), io.DEFAULT_BUFFER_SIZE)  # type: ignore[arg-type]

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class _Deadlined(http.client.HTTPConnection):
    deadline = math.inf
    read_timeout = TIMEOUT_SECS

    def connect(self) -> None:
        super().connect()
        # http.client reads through whatever stands in sock: the wrapper has the socket's interface where it reads
        self.sock = _DeadlineSocket(self.sock, self)


class _HTTP(_Deadlined):
    pass


class _HTTPS(_Deadlined, http.client.HTTPSConnection):
    pass


class RestClient:
    """One connection to POLYGON_REST_URL, used by one thread (the backfill thread)."""

    def __init__(self, base_url: str, api_key: str, max_rps: float, stopping: threading.Event,
                 count: Callable[[str], None] = lambda status: None, timeout_secs: float = TIMEOUT_SECS):
        parts = urlsplit(base_url)
        self._scheme = parts.scheme
        self._host = parts.hostname or ""
        self._port = parts.port
        self._netloc = parts.netloc.rpartition("@")[2]
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json",
                         "Accept-Encoding": "gzip", "User-Agent": "polygon-streamer backfill"}
        self._interval = 1.0 / max_rps
        self._next_at = 0.0
        self._stopping = stopping
        self._count = count  # called with the status label of every answer (or failure)
        self._timeout = timeout_secs
        self._connection: _HTTP | _HTTPS | None = None
        self._random = random.Random()

    def pages(self, path: str, params: dict, max_pages: int = 1_000_000, deadline: float = math.inf,
              budget: str = "") -> Iterator[dict]:
        """Every page of one query, in order: the first from path and params, the next ones from `next_url`; at most
        max_pages of them, each asked before `deadline` (monotonic; `budget` names it in the error), never the same
        page twice (a `next_url` that repeats a cursor would be asked forever)."""
        target = f"{path}?{urlencode(params)}"
        asked = {target}
        for _ in range(max_pages):
            body = self._get(target, deadline, budget)
            yield body
            next_url = body.get("next_url")
            if not next_url:
                return
            if type(next_url) is not str:
                raise RestError("error", f"GET {path}: next_url is not a string")
            target = self._same_host(next_url, path)
            if target in asked:
                raise RestError("error", f"GET {path}: next_url repeats a page already asked (page {len(asked)}): "
                                         "the rest of the window is not asked")
            asked.add(target)
        raise RestError("limit", f"GET {path}: more than {max_pages:,} pages for the window")

    def abort(self) -> None:
        """From another thread: end a request blocked on the network now (the stop of the service)."""
        connection = self._connection
        sock = connection.sock if connection is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _same_host(self, url: str, path: str) -> str:
        parts = urlsplit(url)
        if parts.scheme and (parts.scheme != self._scheme or parts.netloc.rpartition("@")[2] != self._netloc):
            raise RestError("error", f"GET {path}: next_url points to another host ({parts.netloc.rpartition('@')[2]});"
                                     " the key is not sent there")
        if not parts.path.startswith("/"):
            raise RestError("error", f"GET {path}: next_url is not a URL")
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def _get(self, target: str, deadline: float = math.inf, budget: str = "") -> dict:
        path = target.split("?", 1)[0]
        failure = ""
        for attempt in range(ATTEMPTS):
            if self._stopping.is_set():
                raise Stopped()
            self._pace()
            if time.monotonic() >= deadline:
                raise RestError("limit", f"GET {path}: {budget or 'the deadline'} ran out" +
                                (f" ({failure})" if failure else ""))
            try:
                status, headers, body = self._exchange(target, min(deadline, time.monotonic()
                                                                   + REQUEST_DEADLINE_SECS))
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if self._stopping.is_set():
                    raise Stopped() from None  # abort() cut it: the service stops, not the server failed
                label = "timeout" if isinstance(exc, (socket.timeout, TimeoutError)) else "error"
                self._count(label)
                failure = f"GET {path}: {label}: {exc.__class__.__name__}"
                self._wait(min(self._backoff(attempt), max(0.0, deadline - time.monotonic())))
                continue
            if self._stopping.is_set():
                raise Stopped()  # an answer cut short by abort() may look whole
            if status == 200:
                return self._decode(body, path)  # counted there: 200, or bad_response
            self._count(str(status) if str(status) in STATUS_LABELS else "other")
            if status == 403:
                raise RestError("not_entitled", f"GET {path}: 403 not entitled ({self._message(body)})")
            if status == 401:
                raise RestError("error", f"GET {path}: 401 ({self._message(body)}): check the API key")
            if status not in RETRIED:
                raise RestError("error", f"GET {path}: HTTP {status} ({self._message(body)})")
            failure = f"GET {path}: HTTP {status} after {attempt + 1} attempt(s)"
            delay = self._backoff(attempt)
            if status == 429:
                delay = max(delay, self._retry_after(headers.get("Retry-After")))
            self._wait(min(delay, max(0.0, deadline - time.monotonic())))
        raise RestError("rate_limited" if failure.startswith(f"GET {path}: HTTP 429") else "error", failure)

    def _exchange(self, target: str, deadline: float) -> tuple[int, http.client.HTTPMessage, bytes]:
        if self._connection is None:
            if self._scheme == "https":
                self._connection = _HTTPS(self._host, self._port, timeout=self._timeout,
                                          context=ssl.create_default_context())
            else:
                self._connection = _HTTP(self._host, self._port, timeout=self._timeout)
        connection = self._connection
        connection.deadline, connection.read_timeout = deadline, self._timeout
        if connection.sock is None:
            connection.timeout = max(0.001, min(self._timeout, deadline - time.monotonic()))  # connect and TLS
        connection.request("GET", target, headers=self._headers)
        response = connection.getresponse()
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > MAX_RESPONSE_BYTES:
            self.close()
            raise RestError("error", f"GET {target.split('?', 1)[0]}: a {int(length):,}-byte answer, more than "
                                     f"{MAX_RESPONSE_BYTES:,}")
        body = response.read(MAX_RESPONSE_BYTES + 1)
        if len(body) > MAX_RESPONSE_BYTES:
            self.close()
            raise RestError("error", f"GET {target.split('?', 1)[0]}: an answer over {MAX_RESPONSE_BYTES:,} bytes")
        if response.getheader("Content-Encoding", "").lower() == "gzip":
            body = self._gunzip(body, target)
        if response.will_close:
            self.close()
        return response.status, response.headers, body

    def _gunzip(self, body: bytes, target: str) -> bytes:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            data = inflater.decompress(body, MAX_RESPONSE_BYTES + 1)
        except zlib.error:
            raise RestError("error", f"GET {target.split('?', 1)[0]}: a gzip answer that does not inflate") from None
        if len(data) > MAX_RESPONSE_BYTES:
            raise RestError("error", f"GET {target.split('?', 1)[0]}: an answer over {MAX_RESPONSE_BYTES:,} bytes")
        return data

    def _decode(self, body: bytes, path: str) -> dict:
        try:
            value = ujson.loads(body)
        except ValueError:
            value = None
        if not isinstance(value, dict) or not isinstance(value.get("results", []), list):
            self._count("bad_response")
            raise RestError("error", f"GET {path}: the answer is not a JSON object with a results list")
        self._count("200")
        return value

    @staticmethod
    def _message(body: bytes) -> str:
        try:
            value = ujson.loads(body)
        except ValueError:
            return "no JSON"
        text = value.get("message") or value.get("error") or value.get("status") if isinstance(value, dict) else ""
        return str(text)[:200] if text else "no message"

    def _pace(self) -> None:
        now = time.monotonic()
        if now < self._next_at:
            self._wait(self._next_at - now)
            now = time.monotonic()
        self._next_at = now + self._interval

    def _wait(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise Stopped()

    def _backoff(self, attempt: int) -> float:
        base = BACKOFF_SECS[min(attempt, len(BACKOFF_SECS) - 1)]
        return base * (0.5 + self._random.random())  # jitter: clients cut together do not retry together

    @staticmethod
    def _retry_after(value: str | None) -> float:
        """Retry-After in seconds (a number or an HTTP date), at most RETRY_AFTER_MAX_SECS; 0 when absent."""
        if not value:
            return 0.0
        value = value.strip()
        if value.isdigit():
            return min(float(value), RETRY_AFTER_MAX_SECS)
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return 0.0
        return min(max(0.0, when - time.time()), RETRY_AFTER_MAX_SECS)
