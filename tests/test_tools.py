"""The tools that touch captured data (capture, reprocess, replay) are faithful, hostile input and reconnects
included, and no input can hang, spin or grow them: property-based live runs with their reprocess and replay, then
each bound of replay and reprocess over real sockets."""

from __future__ import annotations

import gzip
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time

from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from helpers import ROOT, TEST_KEY, Streamer, base_env, cpu_seconds, free_port, wait_for
from polygon_streamer.local.mockserver import MockOptions, MockServer
from polygon_streamer.wsserver import ws_frame
from test_capture import ReplayProcess, capture_lines, consume, reprocess
from test_hostile import frames as hostile_frames

# Valid input a strict writer would not produce: what the capture must keep as frame_text / frame_b64.
NON_CANONICAL = [
    b'[{"ev":"T","sym":"CRLF","t":1700000000001,"p":1.5}\r\n]',
    b'[{"ev":"T",\t"sym":"TAB","t":1700000000002}]',
    b'[{"ev":"T","sym":"CTRL\x01","t":1700000000003}]',
    b'[{"ev":"T","sym":"ZERO","t":1700000000004,"p":01}]',
    b'[{"ev":"T","sym":"DOT","t":1700000000005,"p":1.}]',
    b'\xef\xbb\xbf[{"ev":"T","sym":"BOM","t":1700000000006}]',
    b'[{"ev":"T","sym":"\xff\xfe\xfd","t":1700000000007}]',        # invalid UTF-8: skipped live, counted
    b'[{"ev":"Q","sym":"OK","t":1700000000008,"bp":1.25}]',
]
SENTINEL = b'[{"ev":"T","sym":"SENTINEL-%d","t":1700000000000}]'


def noncanonical_frames():
    return st.sampled_from(NON_CANONICAL)


def records_of(path):
    return [{key: value for key, value in json.loads(line).items() if key != "hostname"}
            for line in path.read_bytes().split(b"\n")[:-1]]  # (not splitlines: U+2028 and \x85 are in strings)


def live_run(tmp_path, sessions):
    """The service against the local server, each session's frames injected after the server's own first event,
    each session but the last cut by a close frame (code 4001, 4002, ...): its capture and NDJSON file."""
    server = MockServer(options=MockOptions(api_key=TEST_KEY, rate=0, batch=1, count=1)).start()
    capture, ndjson = tmp_path / "live.capture", tmp_path / "live.ndjson"
    streamer = Streamer(base_env(server.url("stocks"), free_port(), SINK="ndjson,capture", NDJSON_DEST=str(ndjson),
                                 CAPTURE_DEST=str(capture), SUBSCRIPTION="T.*,Q.*", NDJSON_FLUSH_INTERVAL_MS="10",
                                 READ_TIMEOUT_SECS="30"))
    try:
        for number, frames in enumerate(sessions, 1):
            wait_for(lambda: ndjson.exists() and ndjson.read_bytes().count(b'"kind":"gap"') == number - 1
                     and server.stats.connections == number, timeout=20, what=f"session {number} streaming")
            for frame, opcode in frames:
                server.inject(ws_frame(opcode, frame))
            server.inject(ws_frame(1, SENTINEL % number))
            wait_for(lambda: b"SENTINEL-%d" % number in ndjson.read_bytes(), timeout=20, what="the sentinel")
            if number < len(sessions):
                server.inject(ws_frame(8, struct.pack("!H", 4000 + number) + b"cut"))
        assert streamer.stop() == 0, streamer.stderr_lines[-3:]
    finally:
        if streamer.proc.poll() is None:
            streamer.proc.kill()
        server.stop()
    return capture, ndjson


sessions_strategy = st.lists(st.lists(st.tuples(st.one_of(hostile_frames(), noncanonical_frames()),
                                                st.sampled_from([1, 2])), min_size=1, max_size=5),
                             min_size=1, max_size=3)


# Each example is three services and a replay: few examples, no shrinking (a failure prints its example whole).
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@example(sessions=[[(frame, 1) for frame in NON_CANONICAL[:4]], [(frame, 2) for frame in NON_CANONICAL[4:]],
                   [(b"not json {", 1), (b'[{"ev":"T","sym":"A","t":1,"p":NaN},42]', 1), (b"", 1)]])
@given(sessions=sessions_strategy)
def test_captures_of_hostile_streams_reprocess_and_replay_to_exactly_the_live_output(tmp_path_factory, sessions):
    tmp_path = tmp_path_factory.mktemp("faithful")
    capture, live = live_run(tmp_path, sessions)
    live_records = records_of(live)
    assert sum(1 for r in live_records if r["kind"] == "gap") == len(sessions) - 1
    # The capture holds every message byte for byte: frame, frame_text or frame_b64, and each session's end.
    kept = {line.split(b'"session":', 1)[1].split(b",", 1)[1].split(b'":', 1)[0] for line, _ in capture_lines(capture)}
    assert kept <= {b'"frame', b'"frame_text', b'"frame_b64', b'"end'}

    # Reprocess: the live file, record for record (ingest_ts and seq included; hostname aside).
    out = tmp_path / "reprocessed.ndjson"
    result = reprocess(capture, "--sink", "ndjson", "--ndjson-dest", out)
    assert result.returncode == 0, result.stderr
    assert records_of(out) == live_records

    # Replay into the service: the same records (the replay's own receive times aside), the same gap records.
    replay = ReplayProcess(capture, "--speed", "max")
    try:
        again = tmp_path / "replayed.ndjson"
        streamer = Streamer(base_env(replay.url + "/stocks", free_port(), SINK="ndjson", NDJSON_DEST=str(again),
                                     SUBSCRIPTION="T.*,Q.*", NDJSON_FLUSH_INTERVAL_MS="10"))
        last = b"SENTINEL-%d" % len(sessions)
        wait_for(lambda: again.exists() and last in again.read_bytes(), timeout=30, what="the replayed run")
        assert streamer.stop() == 0
    finally:
        assert replay.stop() == 0

    def comparable(records):
        out = []
        for record in records:
            record = dict(record, ingest_ts=None)
            if record["kind"] == "gap":
                record["payload"] = {key: record["payload"][key] for key in ("reason", "detail", "close_code",
                                                                            "close_reason")}
            out.append(record)
        return out
    assert comparable(records_of(again)) == comparable(live_records)


def test_one_hole_is_one_gap_record_however_often_the_full_queue_refuses(mock_server, spawn, tmp_path):
    mock_server.options.rate = 0
    mock_server.options.batch = 10
    mock_server.options.frame_pool = 100
    mock_server.options.count = 200_000
    ndjson = tmp_path / "out.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(ndjson), CHANNEL_CAP="4", SUBSCRIPTION="T.*,Q.*")
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") + streamer.metric("polygon_channel_drops_total")
             - streamer.metric("polygon_gaps_total", reason="inbound_drop") >= 200_000, timeout=60,
             what="every event written or counted as dropped")
    assert streamer.stop() == 0
    holes = streamer.shutdown_report()["gaps"]  # (the last hole is told at the stop: no data came after it)
    records = [json.loads(line) for line in ndjson.read_text().splitlines()]
    gaps = [index for index, record in enumerate(records) if record["kind"] == "gap"]
    assert len(gaps) == holes > 0
    adjacent = [index for index in gaps if index + 1 in gaps]
    assert not adjacent, f"{len(adjacent)} gap records followed by another: one hole told twice"
    assert sum(records[index]["payload"]["dropped_events"] for index in gaps) == \
        streamer.shutdown_report()["channel_drops"]


def test_a_topic_longer_than_the_logged_message_becomes_active(mock_server, spawn, tmp_path):
    topic = "T." + "L" * 400
    # (a file of the test's own: the build user may not write /dev/null's directory, which the sink checks)
    streamer = spawn(SUBSCRIPTION=f"{topic},T.AAPL", SINK="ndjson", NDJSON_DEST=str(tmp_path / "out.ndjson"))
    def active():
        try:
            return json.loads(streamer.get("/subscriptions")[1])["counts"]["active"]
        except OSError:  # not listening yet
            return 0
    wait_for(lambda: active() == 2, what="both topics active")
    assert streamer.stop() == 0


def test_a_fifo_as_subscription_file_is_refused_and_sigterm_still_stops(mock_server, spawn, tmp_path):
    topics = tmp_path / "topics.txt"
    topics.write_text("T.AAPL\n")
    streamer = spawn(SUBSCRIPTION_FILE=str(topics), SINK="ndjson", NDJSON_DEST=str(tmp_path / "out.ndjson"))
    streamer.wait_ready()
    topics.unlink()
    os.mkfifo(topics)  # nobody ever writes it: opening it for reading would block for good
    streamer.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any("not a regular file" in message for message in streamer.log_messages()),
             what="the refusal")
    started = time.monotonic()
    assert streamer.stop(timeout=10) == 0
    assert time.monotonic() - started < 5
    # At start it is a configuration error.
    done = subprocess.run([sys.executable, "-m", "polygon_streamer", "run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=20, env=base_env(mock_server.url("stocks"), free_port(),
                                                   SUBSCRIPTION_FILE=str(topics)))
    assert done.returncode == 2 and "not a regular file" in done.stderr, done.stderr


# -- replay: strangers, windows and loops -------------------------------------------------------------------------

def small_capture(tmp_path, frames=20):
    path = tmp_path / "small.capture"
    lines = [b'{"recv_ns":%d,"cluster":"stocks","session":1,"frame":[{"ev":"T","sym":"AAPL","t":%d,"q":%d}]}'
             % (1_700_000_000_000_000_000 + index * 1_000_000, 1_700_000_000_000 + index, index)
             for index in range(frames)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def replay_run(*args):
    return subprocess.run([sys.executable, "-m", "polygon_streamer", "replay", "--port", "0", "--no-progress",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_replay_refuses_at_start_what_it_could_never_serve(tmp_path):
    done = replay_run(tmp_path / "nope.capture")
    assert done.returncode == 2 and "No such file" in done.stderr and len(done.stderr.splitlines()) == 1
    capture = small_capture(tmp_path)
    done = replay_run(capture, "--from", "2030-01-01T00:00:00Z")
    assert done.returncode == 2 and "nothing to replay" in done.stderr and "2023-11-14T22:13:20Z" in done.stderr
    statuses = tmp_path / "statuses.capture"
    statuses.write_bytes(b'{"recv_ns":1,"cluster":"stocks","session":1,"frame":[{"ev":"status","status":"connected"}]}\n')
    done = replay_run(statuses, "--loop")
    assert done.returncode == 2 and "no data frame" in done.stderr


def test_replay_loop_with_nothing_for_the_subscription_stays_quiet(tmp_path):
    replay = subprocess.Popen([sys.executable, "-m", "polygon_streamer", "replay", "--port", "0", "--loop",
                               "--speed", "max", str(small_capture(tmp_path))], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        url = replay.stdout.readline().strip()
        frames = consume(url + "/stocks", "Q.NOTHING", until_quiet=2.5)
        assert frames == []
        before = cpu_seconds(replay.pid)
        frames = consume(url + "/stocks", "Q.NOTHING", until_quiet=2.5)
        assert cpu_seconds(replay.pid) - before < 0.5, "a loop with nothing to send spins"
    finally:
        replay.send_signal(signal.SIGTERM)
        assert replay.wait(10) == 0
    assert len(replay.stderr.read().splitlines()) < 10


def test_replay_caps_clients_cuts_silent_ones_and_bounds_what_a_client_sends(tmp_path):
    replay = ReplayProcess(small_capture(tmp_path, 5), "--max-clients", "3", "--handshake-timeout", "1")
    host, port = replay.url[len("ws://"):].split(":")
    idle = []
    try:
        for _ in range(3):
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        extra = socket.create_connection((host, int(port)), timeout=5)
        assert extra.recv(10) == b"", "the fourth client is closed at accept"
        extra.close()
        for sock in idle:  # silent clients are cut after the handshake deadline
            sock.settimeout(5)
            assert sock.recv(10) == b""
        # A client that floods the server while it streams: what it sends is read and bounded, never buffered.
        import websocket
        ws = websocket.create_connection(replay.url + "/stocks", timeout=5)
        ws.recv()
        ws.send(json.dumps({"action": "auth", "params": "k"}))
        ws.recv()
        ws.send(json.dumps({"action": "subscribe", "params": "T.*"}))
        ws.recv()
        message = "x" * 60_000
        for _ in range(3000):  # 180 MB
            ws.send(message)
        with open(f"/proc/{replay.proc.pid}/status") as status:
            rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
        assert rss_kb < 150 * 1024, f"{rss_kb} kB after 180 MB sent"
        ws.close()
        assert len(consume(replay.url + "/stocks", "T.*")) == 5, "and it still serves"
    finally:
        for sock in idle:
            sock.close()
        assert replay.stop() == 0


def test_replay_backs_off_when_out_of_descriptors(tmp_path):
    def few_descriptors():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    replay = subprocess.Popen([sys.executable, "-m", "polygon_streamer", "replay", "--port", "0", "--no-progress",
                               "--max-clients", "1000", "--handshake-timeout", "30", str(small_capture(tmp_path, 5))],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=few_descriptors)
    clients = []
    try:
        url = replay.stdout.readline().strip()
        host, port = url[len("ws://"):].split(":")
        for _ in range(100):
            clients.append(socket.create_connection((host, int(port)), timeout=5))
        time.sleep(0.5)  # (let the accept loop run into EMFILE; measured below, not waited for)
        before = cpu_seconds(replay.pid)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            time.sleep(0.1)
        assert cpu_seconds(replay.pid) - before < 0.5, "the accept loop spins on EMFILE"
        for sock in clients:
            sock.close()
        clients = []
        frames = wait_for(lambda: consume(url + "/stocks", "T.*", until_quiet=1.0), timeout=40,
                          what="a client served once descriptors are free")
        assert len(frames) == 5
    finally:
        for sock in clients:
            sock.close()
        replay.send_signal(signal.SIGTERM)
        assert replay.wait(10) == 0


# -- reprocess: bounds and messages -------------------------------------------------------------------------------

def with_a_big_frame(tmp_path, events: int):
    """A capture of 10 small frames with a frame of `events` events as its 6th line; and reprocess of it."""
    capture = small_capture(tmp_path, 10)
    lines = capture.read_bytes().split(b"\n")[:-1]
    big = b'{"recv_ns":1700000000004500000,"cluster":"stocks","session":1,"frame":[' + \
        b",".join([b'{"ev":"T","sym":"BIG","t":1}'] * events) + b"]}"
    capture.write_bytes(b"\n".join(lines[:5] + [big] + lines[5:]) + b"\n")
    out = tmp_path / "out.ndjson"

    def run(*args):
        return subprocess.run([sys.executable, "-m", "polygon_streamer", "reprocess", "--no-progress", "--sink",
                               "ndjson", "--ndjson-dest", str(out), *args, str(capture)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    return capture, out, run


def test_reprocess_skips_a_frame_over_max_frame_bytes_by_line_and_keeps_the_rest(tmp_path):
    capture, out, run = with_a_big_frame(tmp_path, 50_000)
    done = run("--max-frame-bytes", "100000")
    assert done.returncode == 1
    assert f"{capture}:6: a line of" in done.stderr and "MAX_FRAME_BYTES (100000)" in done.stderr, done.stderr
    assert [json.loads(line)["payload"]["q"] for line in out.read_text().splitlines()] == list(range(10))


def test_reprocess_waits_for_its_sinks_instead_of_a_shutdown_deadline(tmp_path):
    _capture, out, run = with_a_big_frame(tmp_path, 400_000)
    done = run("--shutdown-timeout-secs", "0.1")
    assert done.returncode == 0, done.stderr
    assert sum(1 for _ in out.open()) == 400_010


def test_reprocess_says_why_an_input_cannot_be_used(tmp_path):
    def run(*paths):
        return subprocess.run([sys.executable, "-m", "polygon_streamer", "reprocess", "--no-progress", "--sink",
                               "ndjson", "--ndjson-dest", str(tmp_path / "out.ndjson"), *map(str, paths)],
                              cwd=ROOT, capture_output=True, text=True, timeout=30)
    done = run(tmp_path / "nope.capture")
    assert done.returncode == 2 and "No such file or directory" in done.stderr
    empty = tmp_path / "empty.capture"
    empty.write_bytes(b"")
    done = run(empty)
    assert done.returncode == 1 and "empty" in done.stderr
    not_gzip = tmp_path / "bad.capture.gz"
    not_gzip.write_bytes(b"this is not gzip\n")
    done = run(not_gzip)
    assert done.returncode == 1 and "gzip" in done.stderr
    torn = small_capture(tmp_path, 3)
    torn.write_bytes(torn.read_bytes() + b'{"recv_ns":1700000000009000000,"cluster":"stocks","session":1,'
                                         b'"frame":[{"ev":"T"}\n')
    done = run(torn)
    assert done.returncode == 1 and "damaged" in done.stderr, done.stderr
    assert sum(1 for _ in (tmp_path / "out.ndjson").open()) == 3
    gz = tmp_path / "ok.capture.gz"
    gz.write_bytes(gzip.compress(small_capture(tmp_path, 4).read_bytes()))
    assert run(gz).returncode == 0


def test_a_short_api_key_is_redacted_only_where_it_stands_as_a_token():
    from polygon_streamer.logs import redact_text
    assert redact_text('{"path":"/var/lib/data.ndjson","key":"a"}', ["a"]) == \
        '{"path":"/var/lib/data.ndjson","key":"<redacted>"}'
    assert redact_text("apiKey=k9&x=1 k9x", ["k9"]) == "apiKey=<redacted>&x=1 k9x"
    assert redact_text("abcdefgh123abcdefgh123x", ["abcdefgh123"]) == "<redacted><redacted>x"
