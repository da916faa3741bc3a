"""A REST server that misbehaves on purpose (issue 34): answers outside the window, chains of pages that never end,
a `next_url` that repeats its cursor, an answer trickled a byte at a time. Over real sockets on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import ujson


class HostileRest:
    """`answer(path, query) -> (status, body bytes)` is the test's; `trickle_secs` > 0 sends the body one byte at a
    time with that pause. Every request is recorded (path, query)."""

    def __init__(self, answer, trickle_secs: float = 0.0):
        self.answer = answer
        self.trickle_secs = trickle_secs
        self.requests: list[tuple[str, dict]] = []
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                parts = urlsplit(self.path)
                query = {key: values[0] for key, values in parse_qs(parts.query).items()}
                server.requests.append((parts.path, query))
                status, body = server.answer(parts.path, query)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not server.trickle_secs:
                    self.wfile.write(body)
                    return
                for at in range(len(body)):
                    if server.stopping.wait(server.trickle_secs):
                        return
                    try:
                        self.wfile.write(body[at:at + 1])
                        self.wfile.flush()
                    except OSError:
                        return

            def log_message(self, *args):
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def stop(self):
        self.stopping.set()
        self._http.shutdown()
        self._http.server_close()


def window_ms(query: dict) -> tuple[int, int]:
    """The window a /v3 request asks for, in ms."""
    return int(query["timestamp.gte"]) // 1_000_000, int(query["timestamp.lte"]) // 1_000_000


def trade(t_ms: int, q: int, price=10.0, size=100, conditions=(12,)) -> dict:
    return {"sip_timestamp": t_ms * 1_000_000 + 1, "price": price, "size": size, "exchange": 4, "id": str(q),
            "sequence_number": q, "tape": 3, "conditions": list(conditions)}


def page(results: list, next_url: str | None = None) -> bytes:
    body = {"status": "OK", "results": results}
    if next_url:
        body["next_url"] = next_url
    return ujson.dumps(body).encode()


def elapsed_since(started: float) -> float:
    return time.monotonic() - started
