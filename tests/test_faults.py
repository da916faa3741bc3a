"""Fault suite: the real service under a hostile network, a stalled sink and operator signals.

Each case checks that the service keeps working, loses nothing it accepted (or counts exactly what it dropped),
and tells the operator. The cases not here live beside the feature they test: dropped connections, silence,
auth_failed / max_connections / error statuses and odd events in test_service.py; SIGTERM under load and a full
disk in test_ndjson.py; a stalled ZeroMQ subscriber in test_zmq.py.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import ujson

from helpers import ROOT, base_env, free_port, http_get, parse_metrics, report, strict_json, valid_record, wait_for
from polygon_streamer.wsserver import ws_frame, ws_header


def seqs_of(path):
    return [valid_record(line)["seq"] for line in path.read_text().splitlines()]


def test_a_connect_that_hangs_is_bounded_by_the_socket_timeout(mock_server, spawn):
    mock_server.options.hang_upgrade = True
    streamer = spawn(READ_TIMEOUT_SECS="1", BACKOFF_INITIAL_SECS="0.1", BACKOFF_MAX_SECS="0.2")
    started = time.monotonic()
    wait_for(lambda: streamer.metric("polygon_reconnect_failure_total") >= 2, timeout=10,
             what="3 attempts against a hung upgrade")
    assert time.monotonic() - started < 6, "each attempt must end at the 1 s socket timeout"
    assert any(m.startswith("connect failed") and "timed out" in m for m in streamer.log_messages())
    assert streamer.get("/ready")[0] == 503 and streamer.get("/health")[0] == 200
    attempts = streamer.metric("polygon_reconnect_failure_total")
    assert streamer.stop() == 0
    report("hung upgrade", attempts=int(attempts), seconds=round(time.monotonic() - started, 1), events=0, losses=0)


def test_dropped_every_n_events_for_a_whole_run_counters_match(mock_server, spawn, tmp_path):
    mock_server.options.drop_after = 200
    mock_server.options.record = True
    dest = tmp_path / "drops.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), NDJSON_FLUSH_INTERVAL_MS="50")
    wait_for(lambda: mock_server.stats.connections >= 6, timeout=30, what="6 connections")
    mock_server.options.drop_after = 0  # the connection after the current one stays up: the counters settle
    wait_for(lambda: mock_server.stats.connections >= 7 and streamer.metric("polygon_connected") == 1
             and streamer.metric("polygon_reconnect_success_total") == mock_server.stats.connections - 1,
             timeout=20, what="the last reconnect")
    connections = mock_server.stats.connections
    assert streamer.metric("polygon_reconnects_total") == connections - 1
    assert streamer.metric("polygon_reconnect_failure_total") == 0
    assert len(mock_server.stats.subscribes) == connections, "re-subscribed after every reconnect"
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= (connections - 1) * 200 + 100,
             what="events of the last connection")
    assert streamer.stop() == 0
    # Backoff: the k-th reconnect waits at least half of min(BACKOFF_MAX_SECS, BACKOFF_INITIAL_SECS * 2**k).
    attempts = mock_server.stats.auth_attempts
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert all(gap >= min(0.5, 0.05 * 2 ** k) / 2 for k, gap in enumerate(gaps)), gaps
    records = [ujson.loads(line) for line in dest.read_text().splitlines()]
    got = [(r["type"], r["symbol"], r["payload"]["q"]) for r in records if r["kind"] != "gap"]
    assert got == [tuple(sent) for sent in mock_server.stats.sent[:len(got)]], "every event, in order"
    assert len(got) >= (connections - 1) * 200 + 100
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    gaps = [index for index, r in enumerate(records) if r["kind"] == "gap"]
    assert gaps == [200 + 201 * k for k in range(connections - 1)], "one gap record per reconnect, where it happened"
    assert all(records[i]["payload"]["reason"] == "disconnect" and records[i]["payload"]["gap_ms"] >= 0 for i in gaps)
    assert streamer.shutdown_report()["gaps"] == connections - 1
    report("dropped every 200 events", connections=connections, reconnects=connections - 1, events=len(got),
           losses=0)


def test_frames_that_are_not_arrays_and_10_mb_frames(mock_server, spawn, tmp_path):
    mock_server.options.batch = 5
    mock_server.options.count = 100
    mock_server.options.not_array_every = 4
    mock_server.options.huge_frame_every = 10
    dest = tmp_path / "huge.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest))
    wait_for(lambda: mock_server.stats.events_sent >= 100, timeout=30, what="the server to send everything")
    expected = 100 + mock_server.stats.huge_frame_events
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= expected, timeout=60,
             what="every event, the 10 MB frames' included")
    assert streamer.metric("polygon_parse_errors_total") == 20 // 4
    assert streamer.stop() == 0
    assert seqs_of(dest) == list(range(1, expected + 1))
    report("not arrays + 10 MB frames", events=expected, parse_errors=5, losses=0)


class FifoReader:
    """Reads the streamer's NDJSON FIFO; pause() stops reading (a stalled downstream), resume() goes on."""

    def __init__(self, path):
        self.path = path
        self.lines = []
        self.running = threading.Event()
        self.running.set()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        buffer = b""
        with open(self.path, "rb", buffering=0) as fifo:
            while True:
                self.running.wait()
                chunk = fifo.read(65536)
                if not chunk:
                    break
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                self.lines.extend(complete)
        self.closed.set()


def test_a_sink_stalled_for_30_s_stays_bounded_counts_drops_exactly_and_recovers(mock_server, spawn, tmp_path):
    fifo = tmp_path / "downstream.fifo"
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    mock_server.options.rate = 2500
    mock_server.options.batch = 10
    mock_server.options.count = 100_000
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(fifo), NDJSON_CHANNEL_CAP="100", NDJSON_FLUSH_EVERY="10",
                      NDJSON_WARN_INTERVAL_SECS="5")
    wait_for(lambda: len(reader.lines) >= 2000, what="the stream to flow")
    reader.running.clear()
    stalled_at = time.monotonic()
    peak_depth, peak_rss = 0, 0
    while time.monotonic() - stalled_at < 30:
        peak_depth = max(peak_depth, streamer.metric("polygon_queue_depth", queue="ndjson"))
        with open(f"/proc/{streamer.proc.pid}/status") as status:
            peak_rss = max(peak_rss, next(int(line.split()[1]) for line in status if line.startswith("VmRSS")))
        time.sleep(0.5)
    drops_during_stall = streamer.metric("polygon_ndjson_drops_total")
    assert drops_during_stall > 30_000, "a 30 s stall at 2,500 events/s must overflow a 100-frame queue"
    assert peak_depth <= 100 and streamer.metric("polygon_queue_depth", queue="inbound") <= 1024
    assert peak_rss < 300 * 1024, f"RSS {peak_rss} kB"
    assert streamer.metric("polygon_channel_drops_total") == 0, "the dispatcher never waits on a dropping sink"
    assert any("ndjson sink: queue full" in m for m in streamer.log_messages())
    reader.running.set()
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") + streamer.metric("polygon_ndjson_drops_total")
             >= 100_000, timeout=60, what="the rest of the stream after the stall")
    assert streamer.stop() == 0
    reader.closed.wait(10)
    lines = [ujson.loads(line) for line in reader.lines]
    seqs = [line["seq"] for line in lines if line["kind"] != "gap"]
    final = streamer.shutdown_report()
    assert final["events"] == 100_000 and final["sink_drops"] > 0
    assert len(seqs) + final["sink_drops"] == 100_000, "events in = written + dropped, exactly"
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[-1] == 100_000
    gaps = sum(b - a - 1 for a, b in zip(seqs, seqs[1:]))
    assert gaps == final["sink_drops"], "every gap in seq is a counted drop"
    # ...and the file says so itself: a sink_drop record where each hole is, with its count, at the hole's last seq.
    records = [(index, line) for index, line in enumerate(lines) if line["kind"] == "gap"]
    assert records and sum(line["payload"]["dropped_events"] for _, line in records) == final["sink_drops"]
    for index, line in records:
        assert line["payload"]["reason"] == "sink_drop" and line["type"] == "gap"
        assert lines[index - 1]["seq"] + line["payload"]["dropped_events"] == line["seq"] == lines[index + 1]["seq"] - 1
        assert line["ingest_ts"] >= lines[index - 1]["ingest_ts"] and line["ts"] == lines[index - 1]["ts"]
    report("sink stalled 30 s", events=100_000, written=len(seqs), counted_drops=final["sink_drops"],
           peak_rss_mb=peak_rss // 1024, peak_sink_queue=int(peak_depth), uncounted=0)


def test_an_overflowing_inbound_queue_counts_every_dropped_event_and_frame(mock_server, spawn, tmp_path):
    # The server sends pre-rendered frames as fast as TCP takes them, about ten times what the dispatcher can
    # parse: a 2-frame inbound queue overflows. The reader counts a frame's events only when it drops it.
    mock_server.options.rate = 0
    mock_server.options.batch = 10
    mock_server.options.frame_pool = 100
    mock_server.options.count = 200_000
    dest = tmp_path / "inbound.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), CHANNEL_CAP="2", BP_WARN_INTERVAL_SECS="1",
                     NDJSON_CHANNEL_CAP="100000")
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") + streamer.metric("polygon_channel_drops_total")
             - streamer.metric("polygon_gaps_total", reason="inbound_drop") >= 200_000, timeout=60,
             what="every event written or counted as dropped")
    drops = streamer.metric("polygon_channel_drops_total")
    frames = streamer.metric("polygon_channel_dropped_frames_total")
    gap_records = streamer.metric("polygon_gaps_total", reason="inbound_drop")
    written = streamer.metric("polygon_ndjson_written_total")  # lines: events and gap records
    assert drops > 0 and drops == frames * 10, (drops, frames)
    assert gap_records > 0 and written - gap_records + drops == 200_000 == mock_server.stats.events_sent
    assert streamer.metric("polygon_ndjson_drops_total") == 0
    assert any(m.startswith("inbound queue full") for m in streamer.log_messages())
    assert streamer.stop() == 0
    final = streamer.shutdown_report()
    assert final["channel_drops"] == drops
    seqs = seqs_of(dest)
    assert seqs == list(range(1, len(seqs) + 1)), "seq is given after the inbound queue: no gap"
    # Drops after the last frame that found room are told at shutdown: the file may end with one more gap record.
    told = [r["payload"] for r in map(ujson.loads, dest.read_text().splitlines()) if r["kind"] == "gap"]
    assert len(told) == final["gaps"] in (gap_records, gap_records + 1)
    assert len(seqs) - len(told) == written - gap_records
    assert sum(p["dropped_events"] for p in told) == drops, "the file tells every drop"
    assert all(p["reason"] == "inbound_drop" and (p["gap_ms"] or 0) >= 0 for p in told)
    assert all(p["gap_ms"] is not None for p in told[:int(gap_records)]), "resumed: the gap's length is known"
    report("inbound queue overflow", events=200_000, written=int(written), counted_drops=int(drops),
           dropped_frames=int(frames), uncounted=0)


def test_fifty_sighups_during_a_heavy_stream_lose_and_tear_nothing(mock_server, spawn, tmp_path):
    mock_server.options.rate = 20_000
    mock_server.options.batch = 20
    mock_server.options.count = 200_000
    dest = tmp_path / "hup.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), NDJSON_CHANNEL_CAP="100000", CHANNEL_CAP="100000")
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") > 0, what="the stream to start")
    for hups in range(1, 51):
        before = streamer.metric("polygon_ndjson_written_total")
        streamer.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: sum(1 for m in streamer.log_messages() if m.startswith("reopened")) == hups,
                 what=f"reopen #{hups}")
        wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= before + 1000, what="the stream to go on")
    assert streamer.metric("polygon_ndjson_written_total") < 200_000, "every SIGHUP came during the stream"
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= 200_000, timeout=60, what="all events")
    assert sum(1 for m in streamer.log_messages() if m.startswith("SIGHUP: reopening")) == 50
    assert streamer.stop() == 0
    assert seqs_of(dest) == list(range(1, 200_001))
    report("50 SIGHUPs", events=200_000, reopens=50, losses=0, torn=0)


def test_sigkill_leaves_a_file_valid_line_by_line_and_a_restart_appends_cleanly(mock_server, spawn, tmp_path):
    mock_server.options.rate = 20_000
    mock_server.options.batch = 20
    dest = tmp_path / "kill.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), NDJSON_FLUSH_EVERY="1")
    wait_for(lambda: dest.exists() and dest.stat().st_size > 200_000, what="a file being written")
    streamer.proc.kill()
    streamer.proc.wait(10)
    lines = dest.read_bytes().split(b"\n")
    complete, last = lines[:-1], lines[-1]
    assert all(ujson.loads(line)["seq"] for line in complete)
    assert [ujson.loads(line)["seq"] for line in complete] == list(range(1, len(complete) + 1))
    with open(dest, "ab") as handle:
        if not last:
            handle.write(b'{"ingest_ts":17000000')  # the torn write a crash mid-line leaves
    restarted = spawn(SINK="ndjson", NDJSON_DEST=str(dest))
    wait_for(lambda: restarted.metric("polygon_ndjson_written_total") >= 500, what="the restarted stream")
    assert restarted.stop() == 0
    bad = []
    good = 0
    for line in dest.read_bytes().split(b"\n")[:-1]:
        try:
            ujson.loads(line)
            good += 1
        except ValueError:
            bad.append(line)
    assert len(bad) == 1 and bad[0].startswith(b'{"ingest_ts":'), "exactly one torn line, on a line of its own"
    assert good >= len(complete) + 500
    assert any("torn line" in m for m in restarted.log_messages())
    report("SIGKILL + restart", lines_before_kill=len(complete), lines_after=good, torn_lines=len(bad))


# -- issue 13: hostile peers and unlucky operators --------------------------------------------------------------

def rss_kb(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


def test_lone_surrogates_and_non_finite_numbers_are_counted_and_every_sink_lives(mock_server, spawn, tmp_path):
    mock_server.options.count = 1
    dest = tmp_path / "odd.ndjson"
    streamer = spawn(SINK="ndjson,zmq,stdout", NDJSON_DEST=str(dest), ZMQ_BIND="true",
                     ZMQ_ENDPOINT=f"tcp://127.0.0.1:{free_port()}", NDJSON_FLUSH_INTERVAL_MS="20")
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") == 1, what="the first event")
    bad = [b'{"ev":"T","sym":"A","t":1,"p":"\\ud800"}', b'{"ev":"T","sym":"\\udfff","t":1}',
           b'{"ev":"\\ud800","sym":"A","t":1}', b'{"ev":"T","sym":"A","t":1,"p":NaN}',
           b'{"ev":"T","sym":"A","t":1,"p":Infinity}', b'{"ev":"T","sym":"A","t":1,"p":-Infinity}']
    good = b'{"ev":"T","sym":"GOOD","t":1,"p":01,"s":1.,"x":-}'
    for _ in range(3):
        mock_server.inject(ws_frame(1, b"[" + b",".join(bad + [good]) + b"]"))
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") == 4 and len(streamer.stdout_lines) == 4,
             what="the good events")
    assert streamer.metric("polygon_bad_events_total", reason="invalid_unicode") == 9
    assert streamer.metric("polygon_bad_events_total", reason="unencodable") == 9
    assert streamer.metric("polygon_zmq_sent_total") + streamer.metric("polygon_zmq_drops_total") == 4
    assert streamer.get("/health")[0] == 200
    assert streamer.stop() == 0
    lines = dest.read_bytes().decode("utf-8").splitlines()
    payloads = [valid_record(line)["payload"] for line in lines[1:]]
    assert payloads == [{"ev": "T", "sym": "GOOD", "t": 1, "p": 1, "s": 1.0, "x": 0}] * 3
    for line in streamer.stdout_lines:
        strict_json(line)
    report("surrogates, NaN, lenient numbers", frames=3, bad_events=18, written=3, sink_deaths=0)


def test_every_frame_shape_in_one_socket_read_arrives_whole_and_in_order(mock_server, spawn, tmp_path):
    # The reader takes plain data frames itself (7- and 16-bit lengths, text and binary) and leaves the rest to
    # websocket-client (64-bit lengths, pings, fragments, RSV-free continuations); all of them in one TCP write, so
    # one socket read holds frames of every kind, some cut at its end. Order and content must survive the mix.
    mock_server.options.count = 1
    dest = tmp_path / "mix.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), NDJSON_FLUSH_INTERVAL_MS="20")
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") == 1, what="the first event")

    def event(n: int, pad: int = 0) -> bytes:
        return b'{"ev":"T","sym":"S%d","t":%d,"x":"%s"}' % (n, 1000 + n, b"p" * pad)

    wire, n = [], 0
    for round_ in range(40):
        for _ in range(20):  # small text and binary frames
            n += 1
            wire.append(ws_frame(1 if n % 2 else 2, b"[" + event(n) + b"]"))
        n += 1
        wire.append(ws_frame(1, b"[" + event(n, 2000) + b"]"))  # a 16-bit length
        wire.append(ws_frame(9, b"ping %d" % round_))
        n += 1
        text = b"[" + event(n, 100) + b"]"
        wire += [ws_frame(1, text[:30], fin=False), ws_frame(0, text[30:60], fin=False), ws_frame(0, text[60:])]
        if round_ % 10 == 0:
            n += 1
            wire.append(ws_frame(1, b"[" + event(n, 70_000) + b"]"))  # a 64-bit length
    mock_server.inject(b"".join(wire))
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") == n + 1, what="every event")
    assert streamer.metric("polygon_parse_errors_total") == 0
    assert streamer.stop() == 0
    symbols = [valid_record(line)["symbol"] for line in dest.read_text().splitlines()[1:]]
    assert symbols == [f"S{i}" for i in range(1, n + 1)]


def test_nesting_ten_thousand_deep_is_a_parse_error_not_a_dead_dispatcher(mock_server, spawn, tmp_path):
    mock_server.options.count = 1
    dest = tmp_path / "deep.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), NDJSON_FLUSH_INTERVAL_MS="20")
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") == 1, what="the first event")
    for depth in (1100, 10_000, 100_000):
        mock_server.inject(ws_frame(1, b"[" * depth + b"]" * depth))
    mock_server.inject(ws_frame(1, b'[{"ev":"T","sym":"AFTER","t":1}]'))
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") == 2, what="the event after")
    assert streamer.metric("polygon_parse_errors_total") == 3
    assert streamer.get("/health")[0] == 200
    assert streamer.stop() == 0


def test_a_ping_only_server_and_endless_fragments_still_hit_the_read_timeout(mock_server, spawn):
    mock_server.options.count = 1
    streamer = spawn(READ_TIMEOUT_SECS="1", HEARTBEAT_INTERVAL_SECS="0.3")
    wait_for(lambda: streamer.metric("polygon_connected") == 1, what="the session")
    started = time.monotonic()
    while not mock_server.stats.connections == 2 and time.monotonic() - started < 10:
        mock_server.inject(ws_frame(9, b"are you there"))  # a ping every 0.1 s, no data
        time.sleep(0.1)
    wait_for(lambda: streamer.metric("polygon_read_timeouts_total") == 1, what="the read timeout")
    ping_secs = time.monotonic() - started
    wait_for(lambda: mock_server.stats.connections == 2 and mock_server.stats.events_sent == 2,
             what="the reconnect and its one event")
    mock_server.inject(ws_frame(1, b'[{"ev":"T","sym":"A","t":1}', fin=False))
    started = time.monotonic()
    while not mock_server.stats.connections == 3 and time.monotonic() - started < 10:
        mock_server.inject(ws_frame(0, b",", fin=False))  # a continuation every 0.1 s that never ends
        time.sleep(0.1)
    wait_for(lambda: streamer.metric("polygon_read_timeouts_total") == 2, what="the second read timeout")
    assert any("read timeout: no data message for 1s" in m for m in streamer.log_messages())
    assert streamer.stop() == 0
    report("ping-only server, endless fragments", read_timeout_secs=1, pings_until_timeout_secs=round(ping_secs, 1),
           fragments_until_timeout_secs=round(time.monotonic() - started, 1))


def test_a_frame_announcing_exabytes_ends_the_session_without_buffering_it(mock_server, spawn, tmp_path):
    mock_server.options.count = 1
    streamer = spawn(MAX_FRAME_BYTES="1000000")
    wait_for(lambda: streamer.metric("polygon_connected") == 1, what="the session")
    before = rss_kb(streamer.proc.pid)
    mock_server.inject(ws_header(1, 2 ** 62) + b"[" * 65536)
    wait_for(lambda: streamer.metric("polygon_oversize_frames_total") == 1, what="the oversize frame")
    wait_for(lambda: mock_server.stats.connections == 2 and streamer.metric("polygon_connected") == 1,
             what="the reconnect")
    mock_server.inject(ws_frame(1, b"[" + b",".join([b'{"ev":"T","sym":"A","t":1}'] * 40000) + b"]"))  # 1.05 MB
    wait_for(lambda: streamer.metric("polygon_oversize_frames_total") == 2, what="a 1 MB frame in one piece")
    growth = rss_kb(streamer.proc.pid) - before
    assert growth < 50 * 1024
    assert any("exceeds MAX_FRAME_BYTES" in m for m in streamer.log_messages())
    assert streamer.stop() == 0
    report("2^62-byte frame header, 1 MB frame over a 1 MB cap", oversize_frames=2, rss_growth_mb=growth // 1024)


def test_an_upgrade_trickled_a_byte_at_a_time_is_bounded_in_total(mock_server, spawn):
    mock_server.options.trickle_upgrade = 0.3
    streamer = spawn(READ_TIMEOUT_SECS="2", BACKOFF_INITIAL_SECS="0.1", BACKOFF_MAX_SECS="0.2")
    started = time.monotonic()
    wait_for(lambda: streamer.metric("polygon_errors_total") >= 2, timeout=15, what="two attempts")
    assert time.monotonic() - started < 7, "each attempt ends at the 2 s total deadline"
    assert any("took longer than 2s" in m for m in streamer.log_messages())
    assert streamer.stop() == 0


def test_idle_and_dawdling_clients_cannot_starve_the_metrics_port_or_the_service(mock_server, spawn):
    """100 idle connections and 32 that send their request a byte at a time, reconnecting as they are cut: every
    scrape of /metrics and /health still gets through at once, and the service's descriptors stay bounded."""
    import socket
    import threading

    streamer = spawn()
    streamer.wait_ready()
    host, port = streamer.metrics_url.rsplit("/", 1)[1].split(":")
    address = (host, int(port))
    idle = [socket.create_connection(address) for _ in range(100)]
    done = threading.Event()
    trickled = [0]

    def dawdle():
        while not done.is_set():
            try:
                with socket.create_connection(address, timeout=2) as sock:
                    for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n":
                        if done.wait(0.3):
                            return
                        sock.send(bytes([byte]))
                        trickled[0] += 1
            except OSError:
                done.wait(0.05)
    dawdlers = [threading.Thread(target=dawdle, daemon=True) for _ in range(32)]
    for thread in dawdlers:
        thread.start()
    try:
        wait_for(lambda: trickled[0] >= 64, what="the dawdlers sending")
        slowest = 0.0
        for number in range(100):
            started = time.monotonic()
            status, _ = streamer.get("/metrics" if number % 2 else "/health")
            slowest = max(slowest, time.monotonic() - started)
            assert status == 200, f"scrape {number} got {status}"
        fds = len(os.listdir(f"/proc/{streamer.proc.pid}/fd"))
        assert fds < 150, fds
    finally:
        done.set()
        for thread in dawdlers:
            thread.join(5)
        for sock in idle:
            sock.close()
    assert streamer.metric("polygon_http_expired_connections_total") >= 100 - 64, "the oldest made room"
    assert streamer.stop() == 0
    report("100 idle and 32 dawdling HTTP clients", scrapes=100, slowest_scrape_secs=round(slowest, 3),
           service_fds=fds)


def _reachable(streamer):
    try:
        return streamer.get("/health")[0] == 200
    except OSError:
        return False


def test_a_second_sigterm_while_the_inbound_queue_is_full_exits_at_once(mock_server, tmp_path):
    # stdout is a FIFO whose reader never reads: the stdout sink blocks (it never drops), the dispatcher waits on
    # it and the inbound queue fills, so the drain cannot finish; a second SIGTERM must not wait for the deadline.
    mock_server.options.rate = 0
    mock_server.options.batch = 10
    fifo = tmp_path / "stdout.fifo"
    os.mkfifo(fifo)
    holder = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    env = base_env(mock_server.url("stocks"), free_port(), CHANNEL_CAP="2", SHUTDOWN_TIMEOUT_SECS="30")
    with open(fifo, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "polygon_streamer", "run"], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.PIPE)
    stderr_lines = []
    collector = threading.Thread(target=lambda: stderr_lines.extend(iter(proc.stderr.readline, b"")), daemon=True)
    collector.start()
    url = f"http://{env['METRICS_ADDR']}"

    def inbound_depth():
        try:
            return parse_metrics(http_get(url + "/metrics")[1]).get(("polygon_queue_depth", (("queue", "inbound"),)))
        except OSError:
            return None

    # Full for good, not just for a moment while the pipe still takes lines: the inbound queue full and the stdout
    # sink's count unchanged over ten scrapes in a row (the FIFO's buffer is full and nobody reads it).
    seen = []

    def stuck():
        try:
            samples = parse_metrics(http_get(url + "/metrics")[1])
        except OSError:
            return False
        seen.append((samples.get(("polygon_queue_depth", (("queue", "inbound"),))),
                     samples.get(("polygon_sink_written_total", (("sink", "stdout"),)))))
        return seen[-1][0] == 2 and len(seen) >= 10 and len(set(seen[-10:])) == 1
    try:
        wait_for(stuck, timeout=30, interval=0.05, what="the inbound queue full behind the blocked stdout sink")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: any(b"stopping (received SIGTERM)" in line for line in stderr_lines), what="the drain")
        assert proc.poll() is None and inbound_depth() == 2, "the drain is stuck behind the blocked stdout sink"
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(10) == 1
        assert time.monotonic() - started < 3
        collector.join(5)
        assert any(b"second SIGTERM: exiting now" in line for line in stderr_lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(holder)


def test_a_key_echoed_by_the_server_or_written_into_the_url_never_reaches_the_output(mock_server, spawn):
    from helpers import TEST_KEY

    mock_server.options.auth_failed_message = f"key {TEST_KEY} is not authorized"
    mock_server.options.reject_auth = True
    url = mock_server.url("stocks").replace("ws://", f"ws://user:{TEST_KEY}@") + f"?apiKey={TEST_KEY}"
    streamer = spawn(POLYGON_WS_URL=url)
    wait_for(lambda: any("is not authorized" in m for m in streamer.log_messages()), what="the echoed status")
    assert any("key <redacted> is not authorized" in m for m in streamer.log_messages())
    assert streamer.stop() == 0
    shown = spawn(command="config", POLYGON_WS_URL=url)
    assert shown.proc.wait(10) == 0
    shown.stop()
    assert "apiKey=<redacted>" in shown.all_output() and "<redacted>@127.0.0.1" in shown.all_output()
    bad = spawn(POLYGON_WS_URL=f"http://user:{TEST_KEY}@nowhere/")
    assert bad.proc.wait(10) == 2
    bad.stop()
    # The spawn fixture asserts that TEST_KEY appears in none of these outputs.
