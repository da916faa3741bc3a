"""The real service as a child process against the local Polygon server, over loopback sockets."""

import os
import signal
import subprocess
import sys

import pytest
import ujson

import polygon_streamer

from helpers import ROOT, Streamer, base_env, free_port, report, wait_for
from polygon_streamer.local.mockserver import ODD_EVENTS_KEPT
from polygon_streamer.affinity import parse as parse_cpus
from polygon_streamer.reader import Backoff


def identities(events):
    return [(e["fields"]["type"], e["fields"]["symbol"]) for e in events]


def sent_by_server(server):
    return [(code, symbol, q) for code, symbol, q in server.stats.sent]


def received(streamer):
    """(type, symbol, q) of every data event on stdout (gap records left out)."""
    out = []
    for record in streamer.events():
        fields = record["fields"]
        if record["target"] == "polygon_gaps":
            continue
        payload = fields["line"].split(" ", 1)[1]
        out.append((fields["type"], fields["symbol"], ujson.loads(payload).get("q")))
    return out


def test_happy_path_streams_records_with_gapless_seq_and_exits_0(mock_server, spawn):
    mock_server.options.count = 500
    mock_server.options.record = True
    streamer = spawn(SUBSCRIPTION="T.*,Q.*", HEARTBEAT_INTERVAL_SECS="0.2")
    wait_for(lambda: len(streamer.stdout_lines) >= 500, what="500 events on stdout")
    streamer.wait_ready()
    assert streamer.get("/health") == (200, "OK\n")
    assert streamer.get("/nope")[0] == 404
    wait_for(lambda: streamer.metric("polygon_heartbeats_sent_total") >= 1, what="a heartbeat ping")
    # A line is on stdout a moment before its sink counts it, and a ping is sent before the server reads it.
    wait_for(lambda: streamer.metric("polygon_sink_written_total", sink="stdout") == 500
             and mock_server.stats.pings >= 1, what="the count of what was written, and the ping received")
    metrics = streamer.metrics()
    assert metrics[("polygon_events_total", (("type", "T"),))] == 250
    assert metrics[("polygon_events_total", (("type", "Q"),))] == 250
    assert metrics[("polygon_trades_total", ())] == 250 and metrics[("polygon_quotes_total", ())] == 250
    assert metrics[("polygon_status_total", (("status", "success"),))] == 2
    assert metrics[("polygon_connected", ())] == 1
    assert metrics[("polygon_sink_written_total", (("sink", "stdout"),))] == 500
    assert metrics[("polygon_event_latency_seconds_count", ())] > 0
    build = [dict(labels) for name, labels in metrics if name == "polygon_build_info"]
    assert build and build[0]["version"] == polygon_streamer.__version__ and build[0]["cluster"] == "stocks"
    assert mock_server.stats.pings >= 1
    tasks = f"/proc/{streamer.proc.pid}/task"
    os_names = {open(f"{tasks}/{tid}/comm").read().strip() for tid in os.listdir(tasks)}
    assert {"reader", "dispatcher", "sink-stdout", "heartbeat", "metrics-http"} <= os_names, "named for top -H"
    assert streamer.stop() == 0
    events = streamer.events()
    assert [e["fields"]["seq"] for e in events] == list(range(1, 501))
    assert received(streamer) == sent_by_server(mock_server)
    first = events[0]
    assert first["target"] == "polygon_events" and first["level"] == "INFO"
    assert first["fields"]["line"].startswith("T:AAPL {\"ev\":\"T\"")
    assert "stopped: every accepted event was handed to the sinks and flushed" in streamer.log_messages()


def test_ready_waits_for_min_messages_and_delay(mock_server, spawn):
    mock_server.options.rate = 20
    mock_server.options.batch = 1
    streamer = spawn(READY_MIN_MESSAGES="10", READY_DELAY_MS="300")
    wait_for(lambda: streamer.metric("polygon_connected") == 1, what="connected")
    status, text = streamer.get("/ready")
    assert status == 503 and text.startswith("NOT READY")
    streamer.wait_ready()
    assert len(streamer.stdout_lines) >= 9
    assert streamer.stop() == 0


def test_ready_is_503_before_any_connection(spawn, mock_server):
    mock_server.options.hang_upgrade = True
    streamer = spawn()
    wait_for(lambda: mock_server.stats.connections >= 1, what="a TCP connection")
    wait_for(lambda: streamer.get("/ready")[0] == 503, what="/ready 503")
    assert streamer.get("/ready")[1] == "NOT READY: not subscribed\n"
    assert streamer.get("/health")[0] == 200
    assert streamer.stop() == 0


def test_reconnects_after_dropped_connections_and_loses_nothing_it_read(mock_server, spawn):
    mock_server.options.drop_after = 60
    mock_server.options.record = True
    streamer = spawn(SUBSCRIPTION="T.*")
    wait_for(lambda: mock_server.stats.connections >= 4, timeout=20, what="4 connections")
    wait_for(lambda: streamer.metric("polygon_reconnect_success_total") >= 3, what="3 successful reconnects")
    assert streamer.stop() == 0
    assert len(mock_server.stats.subscribes) == mock_server.stats.connections, "re-subscribe after every reconnect"
    sent = sent_by_server(mock_server)
    got = received(streamer)
    assert got == sent[:len(got)] and len(got) >= 180
    records = streamer.events()
    assert [e["fields"]["seq"] for e in records] == list(range(1, len(records) + 1)), "gap records take a seq too"
    # One gap record per interruption, in order: just before the first event of each later connection.
    gaps = [index for index, e in enumerate(records) if e["target"] == "polygon_gaps"]
    assert len(gaps) >= 3 and all(records[index + 1]["fields"]["seq"] == records[index]["fields"]["seq"] + 1
                                  and ujson.loads(records[index + 1]["fields"]["line"].split(" ", 1)[1])["q"] == 1
                                  for index in gaps)
    assert [index - previous for previous, index in zip([-1] + gaps, gaps)] == [61] * len(gaps)
    for index in gaps:
        gap = records[index]
        assert gap["level"] == "WARN" and gap["fields"]["type"] == "gap"
        payload = ujson.loads(gap["fields"]["line"].split(" ", 1)[1])
        assert payload["reason"] == "disconnect" and payload["detail"].startswith("connection closed by the server")
        assert payload["subscription"] == "T.*" and payload["dropped_events"] is None
        assert payload["gap_ms"] == payload["resumed_ingest_ts"] - payload["last_ingest_ts"] >= 0
        assert gap["fields"]["ts"] == ujson.loads(records[index - 1]["fields"]["line"].split(" ", 1)[1])["t"]
    messages = streamer.log_messages()
    assert any(m.startswith("disconnected: connection closed by the server") for m in messages), messages


def test_read_timeout_reconnects_and_is_counted(mock_server, spawn):
    mock_server.options.count = 10  # then the server goes silent
    streamer = spawn(READ_TIMEOUT_SECS="0.5", HEARTBEAT_INTERVAL_SECS="0")
    wait_for(lambda: streamer.metric("polygon_read_timeouts_total") >= 1, what="a read timeout")
    wait_for(lambda: streamer.metric("polygon_reconnects_total") >= 1, what="a reconnect")
    wait_for(lambda: len(streamer.stdout_lines) >= 20, what="events from the second connection")
    timeouts = streamer.metric("polygon_read_timeouts_total")
    assert streamer.stop() == 0
    assert any("read timeout" in m for m in streamer.log_messages())
    assert [e["fields"]["seq"] for e in streamer.events()] == list(range(1, len(streamer.stdout_lines) + 1))
    report("server goes silent", read_timeouts=int(timeouts), events=len(streamer.stdout_lines), losses=0)


def test_auth_failed_is_logged_with_the_server_message_and_cools_down_for_the_ceiling(mock_server, spawn):
    mock_server.options.reject_auth = True
    mock_server.options.auth_failed_message = "Your plan doesn't include websocket access."
    streamer = spawn(BACKOFF_INITIAL_SECS="0.05", BACKOFF_MAX_SECS="0.6")
    wait_for(lambda: len(mock_server.stats.auth_attempts) >= 4, timeout=15, what="4 auth attempts")
    status, text = streamer.get("/ready")
    assert status == 503 and text.startswith("NOT READY: authentication failed (auth_failed while waiting"), text
    status, text = streamer.get("/health")
    assert status == 200 and text.startswith("OK (not ready: authentication failed"), text
    times = list(mock_server.stats.auth_attempts)
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Retrying a refused key soon cannot help: every retry waits for the ceiling, from the first one.
    assert all(gap >= 0.6 for gap in gaps), gaps
    errors = [r for r in streamer.logs() if r.get("level") == "ERROR" and r["fields"].get("status") == "auth_failed"]
    assert errors and errors[0]["fields"]["server_message"] == "Your plan doesn't include websocket access."
    assert errors[0]["fields"]["cluster"] == "stocks"
    mock_server.options.reject_auth = False
    streamer.wait_ready(timeout=10)
    assert streamer.get("/health") == (200, "OK\n")
    assert streamer.metric("polygon_status_total", status="auth_failed") >= 4
    report("auth_failed", attempts=len(times), gaps_s="/".join(f"{g:.2f}" for g in gaps), ready_meanwhile=503)
    assert streamer.stop() == 0


def test_an_error_status_answering_auth_ends_the_handshake_at_once(mock_server, spawn):
    """The older form of auth_failed: an `error` status, the connection left open. Not a READ_TIMEOUT_SECS wait."""
    mock_server.options.reject_auth = True
    mock_server.options.auth_failed_as_error = True
    streamer = spawn(BACKOFF_INITIAL_SECS="0.05", BACKOFF_MAX_SECS="0.3", READ_TIMEOUT_SECS="30")
    wait_for(lambda: len(mock_server.stats.auth_attempts) >= 3, timeout=10, what="3 auth attempts")
    ends = [r["fields"] for r in streamer.logs() if r["fields"].get("message", "").startswith("disconnected")]
    assert ends and ends[0]["reason"].startswith("auth_failed (an error status) while waiting for auth_success")
    assert ends[0]["status"] == "auth_failed" and ends[0]["session_secs"] < 5
    assert streamer.stop() == 0


def test_max_connections_cools_down_for_the_ceiling(mock_server, spawn):
    mock_server.options.max_connections = True
    streamer = spawn(BACKOFF_INITIAL_SECS="0.05", BACKOFF_MAX_SECS="1")
    wait_for(lambda: len(mock_server.stats.auth_attempts) >= 3, timeout=10, what="3 attempts")
    times = mock_server.stats.auth_attempts
    assert all(b - a >= 1.0 for a, b in zip(times, times[1:3]))
    assert streamer.get("/ready")[0] == 503
    assert any(r["fields"].get("status") == "max_connections" and r["level"] == "ERROR" for r in streamer.logs())
    assert streamer.metric("polygon_status_total", status="max_connections") >= 2
    report("max_connections", attempts=len(times), min_gap_s=round(min(b - a for a, b in zip(times, times[1:])), 2),
           ready_meanwhile=503)
    assert streamer.stop() == 0


def test_error_status_is_logged_and_counted_and_the_rest_streams(mock_server, spawn):
    mock_server.options.not_authorized_codes = ("Q",)
    streamer = spawn(SUBSCRIPTION="T.*,Q.*")
    wait_for(lambda: len(streamer.stdout_lines) >= 50, what="trades")
    assert {e["fields"]["type"] for e in streamer.events()} == {"T"}
    assert streamer.metric("polygon_status_total", status="error") == 1
    assert streamer.metric("polygon_errors_total") >= 1
    assert any(r["fields"].get("server_message") == "not authorized" for r in streamer.logs())
    assert streamer.stop() == 0
    report("error status (Q not authorized)", trade_events=len(streamer.stdout_lines), losses=0)


def test_a_status_inside_a_data_frame_is_handled_and_the_frames_events_all_come_out(mock_server, spawn):
    mock_server.options.batch = 10
    mock_server.options.count = 300
    mock_server.options.status_in_data_every = 5
    mock_server.options.record = True
    streamer = spawn(SUBSCRIPTION="T.*,Q.*", READY_MIN_MESSAGES="301")
    wait_for(lambda: len(streamer.stdout_lines) >= 300, what="300 events")
    # The 6 status objects are not data events: 300 of the 301 needed.
    assert streamer.get("/ready") == (503, "NOT READY: 300 of 301 data events since subscribe\n")
    assert streamer.metric("polygon_status_total", status="success") == 2 + 300 // 10 // 5  # 2 subscribe acks
    assert streamer.metric("polygon_reconnects_total") == 0
    assert streamer.stop() == 0
    assert received(streamer) == sent_by_server(mock_server), "every data event, in order, no status among them"
    assert [e["fields"]["seq"] for e in streamer.events()] == list(range(1, 301))


def test_a_terminal_status_inside_a_data_frame_ends_the_session_after_its_events(mock_server, spawn):
    mock_server.options.batch = 10
    mock_server.options.count = 100
    mock_server.options.status_in_data_every = 3
    mock_server.options.status_in_data = "force_disconnect"
    mock_server.options.record = True
    streamer = spawn(SUBSCRIPTION="T.*,Q.*")
    wait_for(lambda: streamer.metric("polygon_reconnect_success_total") >= 1, what="a reconnect")
    assert any(m.startswith("status force_disconnect") for m in streamer.log_messages())
    assert streamer.stop() == 0
    # The first session: frames 1-3, the third carrying the status; its events are delivered, then the session ends.
    assert received(streamer)[:30] == sent_by_server(mock_server)[:30]


def test_bad_frames_and_bad_events_are_counted_and_the_good_ones_all_come_out(mock_server, spawn):
    mock_server.options.record = True
    mock_server.options.count = 400
    mock_server.options.bad_json_every = 3
    mock_server.options.odd_events_every = 2
    mock_server.options.binary_every = 5
    streamer = spawn()
    frames = 400 // mock_server.options.batch
    expected_total = 400 + (frames // 2) * ODD_EVENTS_KEPT
    wait_for(lambda: len(streamer.stdout_lines) >= expected_total, what="every good event")
    assert streamer.metric("polygon_parse_errors_total") == frames // 3
    assert streamer.metric("polygon_bad_events_total", reason="not_an_event") == (frames // 2) * 2
    assert streamer.metric("polygon_event_anomalies_total", reason="unknown_code") == frames // 2
    normal = [item for item in received(streamer) if item[1] != "ODD" and item[1] != ""]
    assert normal == sent_by_server(mock_server)
    assert streamer.stop() == 0
    report("non-JSON, binary, odd events", events=expected_total, parse_errors=frames // 3,
           bad_events=(frames // 2) * 2, losses=0)


def test_sigterm_drains_everything_accepted(mock_server, spawn):
    mock_server.options.rate = 0
    mock_server.options.batch = 100
    streamer = spawn(CHANNEL_CAP="100000")
    wait_for(lambda: len(streamer.stdout_lines) >= 1000, what="a running stream")
    assert streamer.stop(signal.SIGTERM) == 0
    final = streamer.shutdown_report()
    accepted = final["events"]
    assert final["channel_drops"] == 0
    assert [e["fields"]["seq"] for e in streamer.events()] == list(range(1, accepted + 1))


def test_sigint_also_stops_cleanly(mock_server, spawn):
    streamer = spawn()
    wait_for(lambda: len(streamer.stdout_lines) >= 10, what="events")
    assert streamer.stop(signal.SIGINT) == 0


@pytest.mark.parametrize("sink", ["stdout", "ndjson"])
def test_stdout_closed_by_its_reader_is_one_clear_line_not_a_crash(mock_server, sink):
    """`polygon-streamer run | head -1`: the sink stops with one line, the rest drains, exit 1, nothing hidden."""
    env = base_env(mock_server.url("stocks"), free_port(), SINK=sink, NDJSON_DEST="stdout", NDJSON_FLUSH_EVERY="5")
    proc = subprocess.Popen([sys.executable, "-m", "polygon_streamer", "run"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline()
        proc.stdout.close()  # what `head -1` does after its line
        code = proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
    records = [ujson.loads(line) for line in proc.stderr.read().decode().splitlines()]
    assert code == 1
    messages = [r["fields"]["message"] for r in records]
    assert f"{sink} sink stopped: stdout was closed by its reader (broken pipe); the events queued for it will " \
           "not be written" in messages
    assert not any("Traceback" in r["fields"].get("error", "") for r in records)
    final = records[-1]["fields"]
    assert final["message"].startswith("stopped: ") and f"{sink}: " in final["message"]
    assert 0 < final["unwritten_events"] <= final["events"]
    # One account: what the sink wrote and what it did not add up to what was accepted, and the line's
    # parenthesis names the same number as its total (it said "4 not written (stdout: 2)").
    assert final["written"][sink] + final["unwritten_events"] == final["events"], final
    assert f"{final['unwritten_events']} event(s) accepted were not written ({sink}: " \
           f"{final['unwritten_events']})" in final["message"], final["message"]


def test_redis_sub_without_redis_py_is_one_line(tmp_path):
    shim = tmp_path / "no-redis" / "redis"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("No module named \'redis\' (a test shim)")\n')
    env = dict(os.environ, PYTHONPATH=str(shim.parent))
    done = subprocess.run([sys.executable, "-m", "polygon_streamer", "redis-sub", "--group", "g", "--consumer", "c"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "redis-sub: " in done.stderr and "python3-redis" in done.stderr


def test_log_level_directives_silence_events_but_not_warnings(mock_server, spawn):
    streamer = spawn(LOG_LEVEL="warn,polygon_conn=info")
    wait_for(lambda: streamer.metric("polygon_sink_written_total", sink="stdout") >= 20, what="events")
    assert streamer.stdout_lines == []
    targets = {r.get("target") for r in streamer.logs()}
    assert "polygon_conn" in targets and "polygon_config" not in targets
    assert streamer.stop() == 0


def test_demo_runs_with_no_key_and_stops_after_max_events():
    port = free_port()
    env = base_env("ws://unused/stocks", port)
    del env["POLYGON_API_KEY"], env["POLYGON_WS_URL"]
    streamer = Streamer(env, "demo", ("--max-events", "25", "--rate", "500"))
    code = streamer.proc.wait(30)
    streamer.stop()
    assert code == 0, streamer.stderr_lines
    assert [e["fields"]["seq"] for e in streamer.events()] == list(range(1, 26))


def test_backoff_doubles_with_jitter_within_bounds():
    backoff = Backoff(1.0, 60.0, uniform=lambda low, high: high)
    assert [backoff.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    backoff = Backoff(1.0, 60.0, uniform=lambda low, high: low)
    assert [backoff.next_delay() for _ in range(4)] == [1, 1, 2, 4]
    backoff.reset()
    assert backoff.next_delay() == 1
    real = Backoff(0.5, 10.0)
    for _ in range(200):
        assert 0.5 <= real.next_delay() <= 10.0


def allowed_cpus_by_thread(pid):
    """OS thread name -> the CPUs it may run on (Cpus_allowed_list)."""
    tasks = f"/proc/{pid}/task"
    out = {}
    for tid in os.listdir(tasks):
        try:
            name = open(f"{tasks}/{tid}/comm").read().strip()
            status = open(f"{tasks}/{tid}/status").read()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        listed = next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
        out[name] = set(parse_cpus(listed))
    return out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to choose from")
def test_cpu_affinity_auto_confines_the_python_threads_to_one_cpu_and_off_does_not(mock_server, spawn):
    everything = os.sched_getaffinity(0)
    confined = spawn(SINK="zmq", ZMQ_BIND="true", ZMQ_ENDPOINT=f"tcp://127.0.0.1:{free_port()}")
    confined.wait_ready()
    threads = allowed_cpus_by_thread(confined.proc.pid)
    chosen = [threads[name] for name in ("reader", "dispatcher", "sink-zmq", "heartbeat", "metrics-http")]
    assert len({frozenset(cpus) for cpus in chosen}) == 1 and len(chosen[0]) == 1, threads
    assert any(name.startswith("ZMQbg") and cpus == everything for name, cpus in threads.items()), \
        "libzmq's threads keep every CPU"
    # (stderr is collected by a thread of this test process: the line may still be on its way)
    wait_for(lambda: any(m.startswith("threads confined to CPU") for m in confined.log_messages()),
             what="the confinement logged")
    assert confined.stop() == 0
    free = spawn(CPU_AFFINITY="off")
    free.wait_ready()
    assert allowed_cpus_by_thread(free.proc.pid)["dispatcher"] == everything
    assert free.stop() == 0
    outside = spawn(CPU_AFFINITY="4095")
    assert outside.proc.wait(20) == 2
    outside.stop()
    assert "CPU_AFFINITY" in outside.stderr_lines[-1] and "is allowed" in outside.stderr_lines[-1]


def test_ready_names_the_connect_error_while_connects_are_refused(spawn, mock_server):
    from helpers import free_port

    streamer = spawn(POLYGON_WS_URL=f"ws://127.0.0.1:{free_port()}/stocks")  # nothing listens there

    def ready_text():
        try:
            return streamer.get("/ready")[1]
        except OSError:
            return ""
    text = wait_for(lambda: (lambda t: t if "not connected" in t else None)(ready_text()), what="/ready naming it")
    assert text.startswith("NOT READY: not connected: connect failed: ConnectionRefusedError"), text
    assert streamer.stop() == 0
