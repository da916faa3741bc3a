"""Every metric declared once, and the HTTP server for /metrics, /health and /ready.

The hot path only bumps plain integers owned by its thread (reader, dispatcher, sinks); a collector turns them into
Prometheus families at scrape time, on a private registry. Nothing here takes a lock per event.
"""

from __future__ import annotations

import bisect
import platform
import selectors
import socket
import threading
import time
import typing
from http.server import ThreadingHTTPServer
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import MetricsHandler

from . import __version__, logs, protocol
from .normalize import GAP_REASONS, SEQUENCED
from .threads import set_os_thread_name

# The HTTP port must not let its clients starve the service, or each other. A connection gets a thread only once its
# request head has arrived whole: until then it waits in one selector loop (HTTP_PENDING_MAX of them at most, the
# oldest closed to make room, each closed HTTP_HEAD_SECS after it connected), so clients that dawdle (a byte a
# second) cannot hold the slots a scrape needs. At most HTTP_MAX_CONNECTIONS requests are answered at once (more are
# answered 503 and closed), each idle at most HTTP_IDLE_SECS per write and closed at HTTP_REQUEST_SECS whatever it is
# doing. Prometheus, a health checker and a person with curl need a handful.
HTTP_MAX_CONNECTIONS = 32
HTTP_PENDING_MAX = 64
HTTP_HEAD_SECS = 5.0
HTTP_HEAD_BYTES = 16 * 1024
HTTP_ACCEPTS_PER_TURN = 16
HTTP_IDLE_SECS = 5.0
HTTP_REQUEST_SECS = 15.0
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WRITE_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BAD_EVENT_REASONS = ("not_an_event", "unencodable", "invalid_unicode")
ANOMALY_REASONS = ("unknown_code", "missing_symbol", "bad_symbol", "bad_time")


class LatencyHistogram:
    """A histogram written by one thread and read at scrape time: event latency (dispatcher, once per frame) and
    receive-to-write latency (each sink, once per batch, weighted by its events)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += count
        self.sum += seconds * count

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-quantile (what a reader of the buckets can know)."""
        total = sum(self.counts)
        if not total:
            return float("nan")
        running = 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            running += count
            if running >= q * total:
                return bound
        return float("inf")

    def cumulative(self) -> list[tuple[str, int]]:
        counts = list(self.counts)
        out = []
        running = 0
        for bound, count in zip(self.bounds + (float("inf"),), counts):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


def _counter(name: str, documentation: str, value: float | None = None,
             labels: Iterable[str] = (), samples: dict | None = None) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, value=value, labels=list(labels) or None)
    for key, amount in (samples or {}).items():
        family.add_metric(list(key) if isinstance(key, tuple) else [key], amount)
    return family


def _gauge(name: str, documentation: str, value: float | None = None,
           labels: Iterable[str] = (), samples: dict | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, value=value, labels=list(labels) or None)
    for key, amount in (samples or {}).items():
        family.add_metric(list(key) if isinstance(key, tuple) else [key], amount)
    return family


def _with_zeros(known: Iterable[str], seen: dict[str, int]) -> dict[str, int]:
    out = {name: 0 for name in known}
    out.update(dict(seen))
    return out


class ServiceCollector:
    """Reads the service's counters at scrape time. `service` is duck-typed: see service.Service."""

    def __init__(self, service):
        self._service = service
        self._started_ms = time.time() * 1000
        import websocket

        self._build_labels = {"version": __version__, "python": platform.python_version(),
                              "websocket_client": getattr(websocket, "__version__", "unknown"),
                              "cluster": service.config.cluster}

    def collect(self) -> Iterable:
        service = self._service
        reader = service.reader.stats
        normalizer = service.normalizer
        shapes = protocol.SHAPES[service.config.cluster]

        build = GaugeMetricFamily("polygon_build_info", "Build information; the value is always 1",
                                  labels=list(self._build_labels))
        build.add_metric(list(self._build_labels.values()), 1)
        yield build

        yield _counter("polygon_messages_received_total", "WebSocket data messages (frames) received",
                       reader.messages_received)
        by_type = dict(normalizer.events_by_type)
        known_types = sorted(shapes)
        yield _counter("polygon_events_total", "Normalized events offered to the sinks, by event code",
                       labels=["type"], samples=_with_zeros(known_types, by_type))
        by_kind: dict[str, int] = {}
        for code, count in by_type.items():
            kind = shapes.get(code, protocol.OTHER).kind
            by_kind[kind] = by_kind.get(kind, 0) + count
        yield _counter("polygon_trades_total", "Trade events (T, XT)", by_kind.get("trade", 0))
        yield _counter("polygon_quotes_total", "Quote events (Q, XQ, C), before sampling",
                       by_kind.get("quote", 0) + normalizer.sampled_out)
        yield _counter("polygon_status_total", "Status messages received, by status", labels=["status"],
                       samples=_with_zeros(protocol.KNOWN_STATUSES, reader.statuses))
        yield _counter("polygon_parse_errors_total", "Frames skipped because they were not a JSON array",
                       normalizer.parse_errors)
        yield _counter("polygon_bad_events_total", "Events skipped (the rest of their frame kept), by reason",
                       labels=["reason"], samples=_with_zeros(BAD_EVENT_REASONS, normalizer.bad_events))
        yield _counter("polygon_event_anomalies_total",
                       "Events delivered with an oddity (symbol \"\" or ts null where unusable), by reason",
                       labels=["reason"], samples=_with_zeros(ANOMALY_REASONS, normalizer.anomalies))
        yield _counter("polygon_filtered_events_total", "Events not offered to sinks by choice, by reason",
                       labels=["reason"], samples={"include": normalizer.filtered, "sample": normalizer.sampled_out})
        yield _counter("polygon_reconnects_total", "Connection attempts after the first", reader.reconnects)
        yield _counter("polygon_reconnect_success_total", "Reconnects that reached subscribe", reader.reconnect_success)
        yield _counter("polygon_reconnect_failure_total", "Reconnects that failed before subscribe",
                       reader.reconnect_failure)
        yield _counter("polygon_read_timeouts_total", "Connections dropped after READ_TIMEOUT_SECS without a frame",
                       reader.read_timeouts)
        yield _counter("polygon_oversize_frames_total",
                       "Sessions ended by a message larger than MAX_FRAME_BYTES", reader.oversize_frames)
        yield _counter("polygon_heartbeats_sent_total", "WebSocket pings sent", reader.heartbeats_sent)
        yield _counter("polygon_errors_total",
                       "Connection errors and error statuses (auth_failed, max_connections, error)", reader.errors)
        yield _counter("polygon_channel_drops_total", "Events dropped because the inbound queue was full",
                       service.reader.handover.stats.channel_drops)
        yield _counter("polygon_channel_dropped_frames_total", "Frames dropped because the inbound queue was full",
                       service.reader.handover.stats.channel_dropped_frames)
        yield _gauge("polygon_connected", "1 while authenticated to the server", 1 if reader.connected else 0)
        subscribed = service.subscriptions.snapshot()["counts"]
        yield _gauge("polygon_subscriptions", "Desired topics by state: pending (sent, unanswered), active "
                     "(acknowledged), refused (the server said error)", labels=["state"], samples=subscribed)
        yield _counter("polygon_stale_timeouts_total",
                       "Sessions ended after STALE_AFTER_SECS without a data event while subscribed",
                       reader.stale_timeouts)
        yield _counter("polygon_gaps_total", "Gap records: interruptions of the data stream, by reason",
                       labels=["reason"], samples=_with_zeros(GAP_REASONS, normalizer.gaps))
        yield _counter("polygon_gap_seconds_total",
                       "Sum of the gap records' gap_ms: last data event before a hole to the first after it",
                       normalizer.gap_seconds)
        now_ms = time.time() * 1000
        last_ms = normalizer.last_ingest_ms if normalizer.last_ingest_ms is not None else self._started_ms
        yield _gauge("polygon_last_event_age_seconds",
                     "Seconds since the last data event was received (since start if none yet)",
                     max(0.0, (now_ms - last_ms) / 1000.0))
        last_seen: dict[str, float] = {}
        for code, ingest_ms in list(service.dispatcher.last_seen_ms.items()):
            label = code if code in shapes else protocol.UNKNOWN_LABEL
            last_seen[label] = max(last_seen.get(label, 0.0), ingest_ms / 1000.0)
        yield _gauge("polygon_last_event_timestamp_seconds",
                     "When the last event of each code was received (Unix time); absent until one is",
                     labels=["type"], samples=last_seen)
        sequence = {(code, reason): 0 for code in SEQUENCED.get(service.config.cluster, ())
                    for reason in ("duplicate", "backwards")}
        sequence.update(dict(normalizer.sequence_anomalies))
        yield _counter("polygon_sequence_anomalies_total",
                       "Events whose q repeats or goes back within a session (delivered as received), by code and "
                       "reason",
                       labels=["type", "reason"], samples=sequence)

        depth = {"inbound": service.inbound.qsize()}
        capacity = {"inbound": service.config.channel_cap}
        written, dropped = {}, {}
        for sink_queue in service.sink_queues:
            depth[sink_queue.name] = sink_queue.queue.qsize()
            capacity[sink_queue.name] = sink_queue.capacity
            written[sink_queue.name] = sink_queue.stats.written
            dropped[sink_queue.name] = sink_queue.stats.dropped
        yield _gauge("polygon_queue_depth", "Batches waiting in each queue (inbound: hand-overs, the frames of one "
                     "socket read)", labels=["queue"], samples=depth)
        yield _gauge("polygon_queue_capacity", "Capacity of each queue in batches (inbound: hand-overs)",
                     labels=["queue"], samples=capacity)
        yield _counter("polygon_sink_written_total",
                       "Records (events and gap records) each sink's thread took from its queue and handed to the sink "
                       "(a file sink may still buffer them: polygon_ndjson_written_total counts those written to the "
                       "file; the capture counts frames)", labels=["sink"], samples=written)
        yield _counter("polygon_sink_drops_total", "Events dropped because a sink's queue was full",
                       labels=["sink"], samples=dropped)
        yield _counter("polygon_sink_write_errors_total", "Writes each sink could not make and retries (a full or "
                       "failing disk, Redis away): the alert PolygonSinkWriteFailing", labels=["sink"],
                       samples={sink.name: sink.failed_writes() for sink in service.sinks})
        for sink, sink_queue in zip(service.sinks, service.sink_queues):
            yield from sink_metrics(sink, sink_queue.stats)

        server = service.metrics_server
        yield _counter("polygon_http_rejected_connections_total",
                       "Connections to the metrics port refused (over the connection cap)",
                       server.rejected_connections if server else 0)
        yield _counter("polygon_http_expired_connections_total",
                       "Connections to the metrics port closed at the request deadline",
                       server.expired_connections if server else 0)

        yield _counter("polygon_state_write_errors_total",
                       "Saves of the stream position (STATE_DIR) that failed: a restart then may not be marked",
                       service.position.file.errors if service.position is not None else 0)
        yield _counter("polygon_notify_errors_total",
                       "systemd notify messages (READY, STATUS, WATCHDOG) the notify socket refused (not retried)",
                       service.notifier.errors)

        if service.backfill is not None:
            yield from backfill_metrics(service.backfill_stats)

        latency = service.latency
        yield HistogramMetricFamily("polygon_event_latency_seconds",
                                    "Ingest time minus event time, per frame (its newest event)",
                                    buckets=latency.cumulative(), sum_value=latency.sum)
        write_latency = HistogramMetricFamily("polygon_sink_write_latency_seconds",
                                              "Frame received to its events written (NDJSON: flushed) per sink",
                                              labels=["sink"])
        for sink in service.sinks:
            write_latency.add_metric([sink.name], sink.write_latency.cumulative(), sink.write_latency.sum)
        yield write_latency


def backfill_metrics(stats) -> Iterable:
    """BACKFILL's metrics (backfill.BackfillStats): read at scrape time, written by the backfill thread (requests)
    and the dispatcher (events, duplicates, summaries)."""
    yield _counter("polygon_backfill_requests_total", "REST requests of backfill, by kind and answer (an HTTP status, "
                   "timeout, error, bad_response)", labels=["kind", "status"], samples=dict(stats.requests))
    yield _counter("polygon_backfill_events_total", "Events backfilled from the REST API and delivered, by kind",
                   labels=["kind"], samples=dict(stats.events))
    yield _counter("polygon_backfill_duplicates_total",
                   "Events the REST API returned that the live stream had delivered (not delivered again)",
                   stats.duplicates)
    yield _counter("polygon_backfill_bad_results_total",
                   "REST results that are not what the API documents (skipped)", stats.bad_results)
    yield _counter("polygon_backfill_gaps_total", "Backfill summaries written, by result (complete or the reason)",
                   labels=["result"], samples=dict(stats.summaries))
    seconds = stats.seconds
    yield HistogramMetricFamily("polygon_backfill_seconds", "A gap's backfill, from its first request to its summary",
                                buckets=seconds.cumulative(), sum_value=seconds.sum)


def sink_metrics(sink, queue_stats) -> Iterable:
    """The metrics a sink declares for itself (polygon_ndjson_*, polygon_zmq_*): (name, help, value), or
    (name, help, label names, {label values: value}) for a labelled family."""
    describe = getattr(sink, "describe_metrics", None)
    if describe is None:
        return ()
    families = []
    for name, documentation, *rest in describe(queue_stats):
        make = _counter if name.endswith("_total") else _gauge
        if len(rest) == 1:
            families.append(make(name, documentation, rest[0]))
        else:
            families.append(make(name, documentation, labels=rest[0], samples=rest[1]))
    return families


class _Handler(MetricsHandler):
    health: Callable[[], tuple[bool, str]]
    ready: Callable[[], tuple[bool, str]]
    subscriptions: Callable[[], dict] | None = None
    redact: Callable[[str], str] = staticmethod(lambda text: text)
    timeout = HTTP_IDLE_SECS

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            super().do_GET()
        elif path == "/health":
            self._plain(*self.health())
        elif path == "/ready":
            self._plain(*self.ready())
        elif path == "/subscriptions" and self.subscriptions is not None:
            self._send(200, logs.dumps(self.subscriptions()) + "\n", "application/json")
        else:
            self._send(404, "not found: try /metrics, /health, /ready or /subscriptions\n")

    def _plain(self, ok: bool, text: str) -> None:
        self._send(200 if ok else 503, text + "\n")

    def _send(self, status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> None:
        body = self.redact(text).encode("utf-8")  # a server's message quoted in a text may echo the key
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    """One thread per connection, as the stdlib does, but a bounded number of them, each with a deadline."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 2 * HTTP_MAX_CONNECTIONS  # the listen backlog: a burst is answered, not left in SYN retries

    def __init__(self, addr: tuple[str, int], handler):
        host = addr[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(addr, handler)
        self._open: dict[socket.socket, float] = {}  # connection -> when it must be closed
        self._lock = threading.Lock()
        self.rejected = 0
        self.expired = 0

    def process_request(self, request, client_address) -> None:
        with self._lock:
            full = len(self._open) >= HTTP_MAX_CONNECTIONS
            if not full:
                self._open[request] = time.monotonic() + HTTP_REQUEST_SECS
        if full:
            self.rejected += 1
            try:
                request.setblocking(False)
                request.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 21\r\n\r\n"
                             b"too many connections\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Runs between accepts (every poll interval): end the connections past their deadline."""
        now = time.monotonic()
        with self._lock:
            late = [request for request, deadline in self._open.items() if deadline <= now]
        for request in late:
            self.expired += 1
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class MetricsServer:
    """/metrics from a private registry, /health and /ready from the service; 404 otherwise."""

    def __init__(self, addr: tuple[str, int], registry: CollectorRegistry,
                 health: Callable[[], tuple[bool, str]], ready: Callable[[], tuple[bool, str]],
                 subscriptions: Callable[[], dict] | None = None, redact: Callable[[str], str] | None = None):
        handler = type("PolygonHandler", (_Handler,), {
            "registry": registry, "health": staticmethod(health), "ready": staticmethod(ready),
            "subscriptions": staticmethod(subscriptions) if subscriptions else None,
            **({"redact": staticmethod(redact)} if redact else {})})
        # Binding here, before any connection, turns a port in use into a config error (exit 2).
        self._server = _Server(addr, handler)
        self.address: tuple[str, int] = self._server.socket.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
        self.crashed: BaseException | None = None
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        # Connections waiting for their request head: socket -> (when it is closed, the peer's address); oldest first.
        self._pending: dict[socket.socket, tuple[float, tuple]] = {}

    @property
    def rejected_connections(self) -> int:
        return self._server.rejected

    @property
    def expired_connections(self) -> int:
        return self._server.expired

    def _serve(self) -> None:
        set_os_thread_name(self._thread.name)
        try:
            self._loop()
        except BaseException as exc:
            self.crashed = exc
            logs.get("polygon_streamer").error("metrics server crashed: %s", exc, exc_info=True)
        finally:
            for request in list(self._pending):
                self._drop(request)
            self._selector.close()

    def _loop(self) -> None:
        """Accept, wait for each request head in the selector, hand a whole one to a thread (see HTTP_PENDING_MAX)."""
        server = self._server
        listener = server.socket
        listener.setblocking(False)
        selector = self._selector
        selector.register(listener, selectors.EVENT_READ)
        pending = self._pending
        while not self._stop.is_set():
            for key, _ in selector.select(0.25):
                if key.fileobj is listener:
                    self._accept(listener)
                else:
                    self._peek(typing.cast(socket.socket, key.fileobj))
            now = time.monotonic()
            for request in [request for request, (deadline, _) in pending.items() if deadline <= now]:
                server.expired += 1
                self._drop(request)
            server.service_actions()

    def _accept(self, listener: socket.socket) -> None:
        pending = self._pending
        for _ in range(HTTP_ACCEPTS_PER_TURN):
            try:
                request, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and the like: the oldest waiting connection makes room, else try later
                if pending:
                    self._server.expired += 1
                    self._drop(next(iter(pending)))
                else:
                    self._stop.wait(0.05)
                return
            if len(pending) >= HTTP_PENDING_MAX:
                self._server.expired += 1
                self._drop(next(iter(pending)))  # the oldest: a client that sends its request at once never is
            request.setblocking(False)
            pending[request] = (time.monotonic() + HTTP_HEAD_SECS, address)
            self._selector.register(request, selectors.EVENT_READ)
            self._peek(request)

    def _peek(self, request: socket.socket) -> None:
        """Whether the request head has arrived whole (read with MSG_PEEK: the handler reads it again)."""
        if request not in self._pending:
            return
        try:
            head = request.recv(HTTP_HEAD_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            head = b""
        if b"\r\n\r\n" in head or b"\n\n" in head:
            _, address = self._pending.pop(request)
            self._selector.unregister(request)
            request.setblocking(True)
            self._server.process_request(request, address)
        elif not head or len(head) >= HTTP_HEAD_BYTES:
            self._drop(request)  # gone, or a head no client of this port sends

    def _drop(self, request: socket.socket) -> None:
        self._pending.pop(request, None)
        try:
            self._selector.unregister(request)
        except (KeyError, ValueError):
            pass
        try:
            request.close()
        except OSError:
            pass

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(2.0)
        self._server.server_close()

    def close(self) -> None:
        """Release the port of a server never started (config --check)."""
        self._server.server_close()
        self._selector.close()


def make_registry(service) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service))
    return registry
