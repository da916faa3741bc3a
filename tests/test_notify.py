"""systemd's notify protocol, received on a datagram socket of the test's own (no systemd needed): READY once the sinks
are open, STATUS, RELOADING/READY around SIGHUP, STOPPING when draining, and WATCHDOG only while no sink is stuck."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from helpers import wait_for


class NotifySocket:
    """An AF_UNIX datagram socket, as systemd's; `messages` collects each datagram's fields with its arrival time."""

    def __init__(self, path: str | None = None, abstract: str | None = None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract is not None:
            self.sock.bind("\0" + abstract)
            self.address = "@" + abstract
        else:
            self.sock.bind(path)
            self.address = path
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def having(self, key: str, value: str | None = None) -> list[tuple[float, dict]]:
        return [(at, fields) for at, fields in list(self.messages)
                if key in fields and (value is None or fields[key] == value)]

    def close(self):
        self._done.set()
        self._thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_status_reload_watchdog_and_stopping(mock_server, spawn, tmp_path, abstract):
    notify = NotifySocket(abstract=f"polygon-test-{os.getpid()}") if abstract else \
        NotifySocket(str(tmp_path / "notify.sock"))
    try:
        streamer = spawn(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="400000", SINK="ndjson",
                         NDJSON_DEST=str(tmp_path / "out.ndjson"))
        wait_for(lambda: notify.having("READY", "1"), what="READY=1")
        wait_for(lambda: streamer.metrics(), what="the metrics port")  # bound before READY
        ready_at = notify.having("READY", "1")[0][0]
        wait_for(lambda: any(fields["STATUS"].startswith("streaming") for _, fields in notify.having("STATUS")),
                 what="STATUS=streaming ...")
        wait_for(lambda: len([at for at, _ in notify.having("WATCHDOG", "1") if at > ready_at]) >= 5,
                 what="watchdog pings every 0.2 s")
        dest = tmp_path / "out.ndjson"
        dest.rename(tmp_path / "out.ndjson.1")  # as logrotate does before its SIGHUP
        streamer.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: notify.having("RELOADING", "1"), what="RELOADING=1")
        reload_at, reload_fields = notify.having("RELOADING", "1")[0]
        assert int(reload_fields["MONOTONIC_USEC"]) > 0
        wait_for(lambda: [at for at, _ in notify.having("READY", "1") if at >= reload_at], what="READY=1 again")
        assert dest.exists(), "READY=1 after the reload means the files are open again"
        assert streamer.stop() == 0
        stopping = notify.having("STOPPING", "1")
        assert stopping and "draining" in stopping[0][1]["STATUS"]
    finally:
        notify.close()


def test_a_wedged_sink_stops_the_watchdog_and_health_says_why(mock_server, spawn, tmp_path):
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    holder = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads: the sink's write blocks
    try:
        mock_server.options.rate = 0
        mock_server.options.batch = 100
        streamer = spawn(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="400000", SINK="ndjson", NDJSON_DEST=str(fifo),
                         SINK_STUCK_SECS="1", SHUTDOWN_TIMEOUT_SECS="1")
        wait_for(lambda: notify.having("READY", "1"), what="READY=1")

        def health():
            try:
                return streamer.get("/health")
            except OSError:
                return 0, ""
        wait_for(lambda: health()[0] == 503, timeout=20, what="/health 503 once the write is stuck")
        assert "sink stuck" in health()[1] and "ndjson" in health()[1]
        stuck_at = time.monotonic()
        wait_for(lambda: any("sink stuck" in fields["STATUS"] for _, fields in notify.having("STATUS")),
                 what="STATUS says so")
        # No watchdog ping after the write got stuck (one may have been in flight as it did).
        wait_for(lambda: time.monotonic() - stuck_at >= 1.0, what="a second of watchdog intervals")
        assert len([at for at, _ in notify.having("WATCHDOG", "1") if at > stuck_at + 0.3]) == 0
        assert streamer.stop() == 1, "the wedged sink's events are not written, and it says so"
    finally:
        os.close(holder)
        notify.close()


def test_a_notify_socket_nobody_reads_never_blocks_signals_or_the_stop(mock_server, spawn, tmp_path):
    """A receiver whose queue is full (a stalled systemd): the datagrams are refused and counted, logged once; SIGHUP
    is applied and SIGTERM stops the service cleanly, as without a notify socket."""
    path = str(tmp_path / "stalled.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)  # never read
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    try:
        for _ in range(100_000):  # until the receiver's queue is full (net.unix.max_dgram_qlen)
            try:
                filler.sendto(b"STATUS=filler", path)
            except BlockingIOError:
                break
        else:
            raise AssertionError("the receiver's queue never filled")
        streamer = spawn(NOTIFY_SOCKET=path, WATCHDOG_USEC="200000", SINK="ndjson",
                         NDJSON_DEST=str(tmp_path / "out.ndjson"))
        wait_for(lambda: streamer.metric("polygon_notify_errors_total") >= 5, what="refused notify messages counted")
        streamer.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: reopening files" in streamer.log_messages(), what="SIGHUP applied")
        started = time.monotonic()
        assert streamer.stop(timeout=10) == 0
        assert time.monotonic() - started < 5
        refused = [m for m in streamer.log_messages() if m.startswith("NOTIFY_SOCKET")]
        assert len(refused) == 1 and "refused" in refused[0], refused
    finally:
        filler.close()
        receiver.close()


def test_a_key_echoed_by_the_server_is_redacted_in_health_ready_and_status(mock_server, spawn, tmp_path):
    from helpers import TEST_KEY

    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        mock_server.options.auth_failed_message = f"key {TEST_KEY} is not authorized"
        mock_server.options.reject_auth = True
        streamer = spawn(NOTIFY_SOCKET=notify.address, SINK="ndjson", NDJSON_DEST=str(tmp_path / "out.ndjson"))

        def refused(path):
            try:
                status, text = streamer.get(path)
            except OSError:
                return ""
            return text if "is not authorized" in text else ""
        health = wait_for(lambda: refused("/health"), what="/health quoting the server")
        ready = wait_for(lambda: refused("/ready"), what="/ready quoting the server")
        wait_for(lambda: any("is not authorized" in fields["STATUS"] for _, fields in notify.having("STATUS")),
                 what="STATUS= quoting the server")
        statuses = [fields["STATUS"] for _, fields in notify.having("STATUS")]
        for text in [health, ready, *statuses]:
            assert TEST_KEY not in text, text
        assert "key <redacted> is not authorized" in health and "key <redacted> is not authorized" in ready
        assert streamer.stop() == 0
    finally:
        notify.close()
