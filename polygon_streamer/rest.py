"""A small client of the Polygon / Massive REST API for backfill (shared/spec/rest.md): the stdlib's http.client, one
kept-alive connection, TLS verified, requests paced, retries with backoff and jitter, pages followed by `next_url`.

The API key travels only in the `Authorization` header; a `next_url` must stay on the configured host (the key is
never sent anywhere else), and what is logged or raised names the path only, never a query. A response body is read
up to MAX_RESPONSE_BYTES (a 50,000-result page is about 10 MB), so no answer can grow memory without bound.
"""

from __future__ import annotations

import email.utils
import http.client
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
TIMEOUT_SECS = 30.0
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
        self._connection: http.client.HTTPConnection | None = None
        self._random = random.Random()

    def pages(self, path: str, params: dict) -> Iterator[dict]:
        """Every page of one query, in order: the first from path and params, the next ones from `next_url`."""
        target = f"{path}?{urlencode(params)}"
        while target:
            body = self._get(target)
            yield body
            next_url = body.get("next_url")
            if not next_url:
                return
            if type(next_url) is not str:
                raise RestError("error", f"GET {path}: next_url is not a string")
            target = self._same_host(next_url, path)

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

    def _get(self, target: str) -> dict:
        path = target.split("?", 1)[0]
        failure = ""
        for attempt in range(ATTEMPTS):
            if self._stopping.is_set():
                raise Stopped()
            self._pace()
            try:
                status, headers, body = self._exchange(target)
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                label = "timeout" if isinstance(exc, (socket.timeout, TimeoutError)) else "error"
                self._count(label)
                failure = f"GET {path}: {label}: {exc.__class__.__name__}"
                self._wait(self._backoff(attempt))
                continue
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
            self._wait(delay)
        raise RestError("rate_limited" if failure.startswith(f"GET {path}: HTTP 429") else "error", failure)

    def _exchange(self, target: str) -> tuple[int, http.client.HTTPMessage, bytes]:
        if self._connection is None:
            if self._scheme == "https":
                self._connection = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                                               context=ssl.create_default_context())
            else:
                self._connection = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        self._connection.request("GET", target, headers=self._headers)
        response = self._connection.getresponse()
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
