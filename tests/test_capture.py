"""Capture (SINK=capture): every frame as received, over a reconnect and a SIGHUP reopen, against the local server."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import ujson
import websocket

from helpers import ROOT, TEST_KEY, Streamer, base_env, free_port, wait_for
from polygon_streamer.capture_format import CAPTURE_LINE, CaptureBatch, SessionEnd, frame_json
from polygon_streamer.normalize import Gap


def capture_lines(*paths):
    out = []
    for path in paths:
        for line in path.read_bytes().split(b"\n")[:-1]:
            record = json.loads(line)  # the stdlib's strict parser
            assert list(record)[:3] == ["recv_ns", "cluster", "session"] and len(record) == 4, list(record)
            assert list(record)[3] in ("frame", "frame_text", "frame_b64", "end"), list(record)
            assert CAPTURE_LINE.match(line)
            out.append((line, record))
    return out


def test_capture_keeps_every_frame_as_received_over_a_reconnect_and_a_sighup(mock_server, spawn, tmp_path):
    mock_server.options.drop_after = 100
    mock_server.options.bad_json_every = 9
    capture, ndjson = tmp_path / "stocks.capture", tmp_path / "stocks.ndjson"
    streamer = spawn(SINK="ndjson,capture", NDJSON_DEST=str(ndjson), CAPTURE_DEST=str(capture),
                     NDJSON_FLUSH_INTERVAL_MS="50", SUBSCRIPTION="T.*,Q.*")
    wait_for(lambda: mock_server.stats.connections >= 2, what="a reconnect")
    wait_for(lambda: capture.exists() and capture.stat().st_size > 0, what="capture lines")
    rotated = tmp_path / "stocks.capture.1"
    os.rename(capture, rotated)  # what logrotate does, then HUP
    streamer.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: capture.exists() and capture.stat().st_size > 0, what="the reopened capture")
    wait_for(lambda: mock_server.stats.connections >= 3, what="a second reconnect")
    # The third session's subscription acknowledged (a stop before it arrives would leave it out of the capture).
    wait_for(lambda: streamer.metric("polygon_status_total", status="success") >= 3, what="the third session's ack")
    assert streamer.stop() == 0
    lines = capture_lines(rotated, capture)
    records = [record for _, record in lines]
    assert [r["recv_ns"] for r in records] == sorted(r["recv_ns"] for r in records)
    assert {r["cluster"] for r in records} == {"stocks"}
    sessions = [r["session"] for r in records]
    assert sessions == sorted(sessions) and set(sessions) >= {1, 2, 3}
    # Handshakes are in it, every session: connected, auth_success, the subscribe ack.
    for session in (1, 2, 3):
        statuses = [e["status"] for r in records if r["session"] == session and "frame" in r
                    for e in r["frame"] if isinstance(e, dict) and e.get("ev") == "status"]
        assert statuses[:3] == ["connected", "auth_success", "success"], (session, statuses)
    # Frames that are not JSON are kept as text, exactly.
    texts = [r["frame_text"] for r in records if "frame_text" in r]
    assert texts and set(texts) == {"this is not json {"}
    # The data frames hold exactly the events the NDJSON sink wrote, in order; and each frame is embedded byte for
    # byte (the mock server renders frames with ujson.dumps).
    events = [e for r in records if "frame" in r for e in r["frame"] if e.get("ev") != "status"]
    written = [ujson.loads(line) for line in ndjson.read_text().splitlines()]
    assert [e for e in (w["payload"] for w in written if w["kind"] != "gap")] == events
    for line, record in lines:
        if "frame" in record:
            assert line.endswith(b',"frame":' + ujson.dumps(record["frame"]).encode() + b"}")
    metrics_written = streamer.shutdown_report()["written"]["capture"]
    assert metrics_written == len(lines)


def test_a_frame_that_cannot_be_embedded_is_kept_as_text():
    assert frame_json(b'[{"ev":"T","sym":"A","p":1.5}]') == '[{"ev":"T","sym":"A","p":1.5}]'
    assert frame_json(b'[ {"ev" : "status", "status": "success"} ]') == '[ {"ev" : "status", "status": "success"} ]'
    for bad in (b"this is not json {", b'[{"ev":"T","p":NaN}]', b'[{"ev":"T","p":01}]', b'[{"ev":"T"},\n{"ev":"Q"}]',
                b'[{"ev":"T","sym":"\xff"}]', b"[" * 100_000 + b"]" * 100_000):
        assert frame_json(bad) is None, bad


def test_the_capture_embeds_the_frames_the_dispatcher_already_proved_strict(mock_server, tmp_path, monkeypatch):
    # Capturing must cost little: each data frame is parsed once, by the dispatcher, whose parse proves it strict JSON;
    # the capture embeds that text and checks by itself only what the dispatcher did not prove (here the handshake's
    # statuses). A hand-over split at HANDOVER_BYTES once sent every later frame to the capture's own full check.
    import polygon_streamer.sinks.capture as capture_module
    from polygon_streamer.config import build_config
    from polygon_streamer.service import Service

    checked = []
    check = capture_module.frame_field
    monkeypatch.setattr(capture_module, "frame_field", lambda data: checked.append(data) or check(data))
    mock_server.options.rate = 0
    mock_server.options.batch = 1
    mock_server.options.count = 20_000
    mock_server.options.frame_pool = 100
    config = build_config({"api_key": TEST_KEY, "ws_url": mock_server.url("stocks"), "sink": "ndjson,capture",
                           "subscription": "T.*,Q.*", "metrics_addr": "127.0.0.1:0", "cpu_affinity": "off",
                           "ndjson_dest": str(tmp_path / "out.ndjson"), "capture_dest": str(tmp_path / "c.capture")})
    service = Service(config)
    service.start()  # (CPU_AFFINITY off: in this process, auto would confine pytest's thread, and every later child)
    try:
        wait_for(lambda: service.normalizer.events >= 20_000, timeout=30, what="every event")
    finally:
        assert service.shutdown("test") == 0
    lines = capture_lines(tmp_path / "c.capture")
    assert len(lines) == 20_000 + 3 + 1, "every frame, and the session's end (the stop)"
    assert lines[-1][1]["end"]["reason"] == "shutdown" and lines[-1][1]["end"]["gap"] is False
    assert len(checked) == 3 and all(b'"status"' in data for data in checked), checked[:5]


def reprocess(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "polygon_streamer", "reprocess", "--no-progress", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith(("POLYGON_", "NDJSON_", "SINK"))})


def live_capture(mock_server, spawn, tmp_path, odd_events=True):
    """A live run with two reconnects: its capture and what its NDJSON sink wrote."""
    mock_server.options.drop_after = 150
    mock_server.options.odd_events_every = 11 if odd_events else 0
    capture, ndjson = tmp_path / "live.capture", tmp_path / "live.ndjson"
    streamer = spawn(SINK="ndjson,capture", NDJSON_DEST=str(ndjson), CAPTURE_DEST=str(capture),
                     SUBSCRIPTION="T.*,Q.*", NDJSON_SAMPLE_QUOTES="3", NDJSON_FLUSH_INTERVAL_MS="50")
    wait_for(lambda: mock_server.stats.connections >= 3, what="two reconnects")
    wait_for(lambda: streamer.metric("polygon_gaps_total", reason="disconnect") >= 2, what="data after them")
    assert streamer.stop() == 0
    return capture, ndjson


def without_host(path):
    return [{k: v for k, v in json.loads(line).items() if k != "hostname"} for line in path.read_text().splitlines()]


def test_reprocess_writes_what_the_live_service_wrote(mock_server, spawn, tmp_path):
    capture, live = live_capture(mock_server, spawn, tmp_path)
    out = tmp_path / "again.ndjson"
    result = reprocess(capture, "--sink", "ndjson", "--ndjson-dest", out, "--ndjson-sample-quotes", "3")
    assert result.returncode == 0, result.stderr
    live_records, again = without_host(live), without_host(out)
    data = [r for r in live_records if r["kind"] != "gap"]
    assert data and [r for r in again if r["kind"] != "gap"] == data, "every data record, ingest_ts included"
    # Gap records where the live ones were, with their seq (the reason of a cut is not in the capture).
    assert [(r["seq"], r["ts"]) for r in again if r["kind"] == "gap"] == \
        [(r["seq"], r["ts"]) for r in live_records if r["kind"] == "gap"]
    assert "skipped" not in result.stderr


def test_reprocess_uses_what_it_can_of_damaged_captures_and_says_where(mock_server, spawn, tmp_path):
    capture, live = live_capture(mock_server, spawn, tmp_path)
    lines = capture.read_bytes().split(b"\n")[:-1]
    half = len(lines) // 2
    first, second = tmp_path / "a.capture", tmp_path / "b.capture.gz"
    # The first half with a line that is not a capture record in it, and a torn last line.
    first.write_bytes(b"\n".join(lines[:5] + [b'{"hello":"world"}'] + lines[5:half]) + b"\n" + lines[half][:40])
    # The second half gzipped, then cut short.
    packed = gzip.compress(b"\n".join(lines[half:]) + b"\n")
    second.write_bytes(packed[:-30])
    out = tmp_path / "again.ndjson"
    result = reprocess(second, first, "--sink", "ndjson", "--ndjson-dest", out)
    assert result.returncode == 1, result.stderr
    assert f"{first}:6: not a capture record" in result.stderr
    assert f"{first}:{half + 2}: a torn last line" in result.stderr
    assert f"{second}:" in result.stderr and "the gzip stream ends early" in result.stderr
    records = without_host(out)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    captured = [e for _, r in capture_lines(capture) if "frame" in r for e in r["frame"]
                if isinstance(e, dict) and e.get("ev") not in ("status", None)]
    got = [r["payload"] for r in records if r["kind"] != "gap"]
    assert len(got) > len(captured) // 3 and all(p in captured for p in got), "the rest is used"


class ReplayProcess:
    """`polygon-streamer replay` as a child process; url is its ws://host:port."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "polygon_streamer", "replay", "--port", "0",
                                      "--no-progress", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("ws://"), self.proc.stderr.read()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)


def consume(url, params, until_quiet=1.5, limit=100_000, key="any-key", sessions=None):
    """A plain websocket-client consumer, as the official clients do it: (monotonic arrival, events) per frame, until
    the connection is quiet. `sessions`: a list to which each connection's end is added ("quiet", or how the server
    ended it), reconnecting (with the same key) after each end but a quiet one."""
    frames = []
    for _ in range(100):
        ws = websocket.create_connection(url, timeout=5)
        try:
            assert json.loads(ws.recv())[0]["status"] == "connected"
            ws.send(json.dumps({"action": "auth", "params": key}))
            assert json.loads(ws.recv())[0]["status"] == "auth_success"
            ws.send(json.dumps({"action": "subscribe", "params": params}))
            assert json.loads(ws.recv())[0]["status"] == "success"
            ws.settimeout(until_quiet)
            ended = "quiet"
            while len(frames) < limit:
                try:
                    opcode, message = ws.recv_data()
                except websocket.WebSocketTimeoutException:
                    break
                except websocket.WebSocketConnectionClosedException:
                    ended = "cut"
                    break
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    ended = f"close {int.from_bytes(message[:2], 'big')}"
                    break
                frames.append((time.monotonic(), json.loads(message)))
        finally:
            ws.close()
        if sessions is None:
            return frames
        sessions.append(ended)
        if ended == "quiet" or len(frames) >= limit:
            return frames
    raise AssertionError("more than 100 connections")


def captured_events(capture):
    return [(r["recv_ns"], e) for _, r in capture_lines(capture) if "frame" in r for e in r["frame"]
            if isinstance(e, dict) and e.get("ev") not in ("status", None)]


def test_replay_serves_the_capture_to_the_service_and_to_a_plain_client(mock_server, spawn, tmp_path):
    # (No odd events here: a replay, as the real server, sends only the codes subscribed to.)
    capture, live = live_capture(mock_server, spawn, tmp_path, odd_events=False)
    replay = ReplayProcess(capture, "--speed", "max")
    try:
        out = tmp_path / "replayed.ndjson"
        streamer = Streamer(base_env(replay.url + "/stocks", free_port(), SINK="ndjson", NDJSON_DEST=str(out),
                                     SUBSCRIPTION="T.*,Q.*", NDJSON_SAMPLE_QUOTES="3",
                                     NDJSON_FLUSH_INTERVAL_MS="50"))
        live_data = [r for r in without_host(live) if r["kind"] != "gap"]
        wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= len(live_data), timeout=20,
                 what="the replayed events")
        assert streamer.stop() == 0
        replayed = [r for r in without_host(out) if r["kind"] != "gap"]
        assert [r["payload"] for r in replayed] == [r["payload"] for r in live_data], "every event, in order"
        # The captured sessions are the replay's: its connection was cut where the live one was, so the replayed run
        # has the live run's gap records, at the same places.
        live_gaps = [(r["seq"], r["ts"], r["payload"]["reason"]) for r in without_host(live) if r["kind"] == "gap"]
        assert len(live_gaps) == 2
        assert [(r["seq"], r["ts"], r["payload"]["reason"]) for r in without_host(out) if r["kind"] == "gap"] \
            == live_gaps
        # A client that subscribes to some symbols gets their events alone, as captured, over the same reconnects.
        sessions = []
        frames = consume(replay.url + "/stocks", "T.A*,Q.MSFT", sessions=sessions)
        assert sessions == ["cut", "cut", "quiet"]
        got = [event for _, events in frames for event in events]
        expected = [e for _, e in captured_events(capture)
                    if (e["ev"] == "T" and str(e.get("sym", "")).startswith("A")) or
                    (e["ev"] == "Q" and e.get("sym") == "MSFT")]
        assert got == expected and got
        assert consume(replay.url + "/crypto", "XT.*", until_quiet=0.5) == [], "another cluster's capture: nothing"
    finally:
        assert replay.stop() == 0


def test_replay_keeps_the_captured_timing_scaled_by_speed_within_the_chosen_window(mock_server, spawn, tmp_path):
    mock_server.options.rate = 200
    mock_server.options.batch = 2
    capture = tmp_path / "paced.capture"
    streamer = spawn(SINK="capture", CAPTURE_DEST=str(capture), SUBSCRIPTION="T.*", NDJSON_FLUSH_INTERVAL_MS="50")
    wait_for(lambda: len(captured_events(capture)) >= 400 if capture.exists() else False, what="2 s of capture")
    assert streamer.stop() == 0
    events = captured_events(capture)
    start_ns, end_ns = events[len(events) // 4][0], events[3 * len(events) // 4][0]
    replay = ReplayProcess(capture, "--speed", "4", "--from", f"{start_ns / 1e9:.3f}", "--to", f"{end_ns / 1e9:.3f}")
    try:
        frames = consume(replay.url + "/stocks", "T.*")
    finally:
        assert replay.stop() == 0
    by_first = {json.dumps(e, sort_keys=True): ns for ns, e in events}
    sent_ns = [by_first[json.dumps(events_[0], sort_keys=True)] for _, events_ in frames]
    window_ms = (start_ns // 1_000_000, end_ns // 1_000_000)
    assert sent_ns and all(window_ms[0] <= ns // 1_000_000 <= window_ms[1] for ns in sent_ns), "only the window"
    assert sent_ns[0] // 1_000_000 - window_ms[0] <= 50 and window_ms[1] - sent_ns[-1] // 1_000_000 <= 50
    # Each frame arrives when the capture says, divided by 4 (measured against the capture's times).
    arrival0, capture0 = frames[0][0], sent_ns[0]
    for (arrived, _), ns in zip(frames, sent_ns):
        expected = (ns - capture0) / 1e9 / 4
        assert abs((arrived - arrival0) - expected) <= 0.1 + 0.1 * expected, (arrived - arrival0, expected)
    span = (sent_ns[-1] - capture0) / 1e9
    assert span >= 0.4, "a window long enough to tell the speed"


def test_messages_still_queued_for_capture_count_as_unwritten(tmp_path):
    # With capture on, an inbound item also carries the capture entries of every message the read completed: a
    # shutdown that cannot drain them must count them, in the capture's unit (the frame), apart from the events.
    from polygon_streamer.config import build_config
    from polygon_streamer.service import Service

    config = build_config({"api_key": "k", "cluster": "stocks", "sink": "ndjson,capture",
                           "ndjson_dest": str(tmp_path / "out.ndjson"), "capture_dest": str(tmp_path / "c.capture")})
    service = Service(config)
    three = b'[{"ev":"T","sym":"A","t":1},{"ev":"T","sym":"B","t":1},{"ev":"Q","sym":"A","t":1}]'
    one = b'[{"ev":"T","sym":"C","t":2}]'
    status = b'[{"ev":"status","status":"success","message":"subscribed to: T.*"}]'
    service.inbound.put((1, [three, one], [CaptureBatch(1_000_000, 1, [status, three, one])]))
    service.inbound.put((3, [], [CaptureBatch(3_000_000, 1, [status]), CaptureBatch(3_000_001, 1, [status])]))
    gap = Gap("disconnect", "cut", 2)  # a hole told with the frames is not an event
    service.inbound.put((4, [gap, one], [CaptureBatch(4_000_000, 2, [one, SessionEnd("shutdown", "stopped")])]))
    assert service.unwritten_events() == 4 + 1
    assert service.unwritten_capture_frames() == 3 + 2 + 1
    assert service._unwritten() == (5, 6, "5 event(s) and 6 captured frame(s)")


def test_the_capture_keeps_the_frames_a_full_inbound_queue_dropped_in_order(mock_server, spawn, tmp_path):
    # The dispatcher cannot keep up with a 2-hand-over inbound queue: hand-overs are dropped (counted, told by gap
    # records in the NDJSON file), but the capture is of the wire: the reader holds the dropped frames' entries for
    # the next hand-over that finds room, so the capture has every frame sent, in order. With a capture cap of 2
    # held hand-overs, what it could not hold is counted as capture drops: nothing goes missing uncounted.
    mock_server.options.rate = 0
    mock_server.options.batch = 10
    mock_server.options.frame_pool = 100
    mock_server.options.count = 100_000
    for cap in ("100000", "2"):
        capture, ndjson = tmp_path / f"{cap}.capture", tmp_path / f"{cap}.ndjson"
        streamer = spawn(SINK="ndjson,capture", NDJSON_DEST=str(ndjson), CAPTURE_DEST=str(capture), CHANNEL_CAP="2",
                         NDJSON_CHANNEL_CAP="100000", CAPTURE_CHANNEL_CAP=cap, SUBSCRIPTION="T.*,Q.*")
        wait_for(lambda: streamer.metric("polygon_ndjson_written_total")
                 + streamer.metric("polygon_channel_drops_total")
                 - streamer.metric("polygon_gaps_total", reason="inbound_drop") >= 100_000, timeout=60,
                 what="every event written or counted as dropped")
        assert streamer.metric("polygon_channel_drops_total") > 0, "the inbound queue overflowed"
        assert streamer.stop() == 0, "\n".join(streamer.stderr_lines[-3:])
        capture_drops = streamer.shutdown_report()["sink_drops"]  # the NDJSON sink drops nothing: it is the capture
        lines = capture_lines(capture)
        records = [record for _, record in lines]
        assert [r["recv_ns"] for r in records] == sorted(r["recv_ns"] for r in records)
        data_frames = [r["frame"] for r in records if "frame" in r and r["frame"][0]["ev"] != "status"]
        statuses = [r for r in records if "frame" in r and r["frame"][0]["ev"] == "status"]
        written = [ujson.loads(line)["payload"] for line in ndjson.read_text().splitlines()]
        written = [payload for payload in written if "reason" not in payload]
        captured = [event for frame in data_frames for event in frame]
        if cap == "2":
            # Any message may be among the capture's drops, the handshake's statuses too (on a busy machine the
            # acks' hand-over can meet a full backlog): every one is either in the file or counted.
            ends = [r for r in records if "end" in r]  # the session's end line (the stop)
            assert capture_drops > 0
            assert len(data_frames) + len(statuses) + len(ends) + capture_drops == 10_000 + 3 + 1
            continue
        assert len(statuses) == 3  # the handshake: connected, auth_success, the subscribe acks
        assert capture_drops == 0 and len(data_frames) == 10_000 and len(captured) == 100_000
        assert len(written) < len(captured)
        # The frames cycle through the server's pool of 100: the capture holds them all, in the order sent...
        pool = data_frames[:100]
        assert all(frame == pool[index % 100] for index, frame in enumerate(data_frames))
        # ...and what the NDJSON sink wrote is a part of it, in the same order.
        position = 0
        for payload in written:
            while captured[position] != payload:
                position += 1
            position += 1


def test_a_stalled_capture_holds_frames_not_their_parse(mock_server, spawn, tmp_path):
    # The capture queue must hold only each frame's text, never its parse: when the reader parsed each frame once for
    # the capture and the dispatcher, holding the parsed events too, a full CAPTURE_CHANNEL_CAP of batch-100 frames
    # took 1.2 GB.
    fifo = tmp_path / "capture.fifo"
    os.mkfifo(fifo)
    holder = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads: the capture's writes stall
    try:
        mock_server.options.rate = 0
        mock_server.options.batch = 100
        mock_server.options.frame_pool = 100
        streamer = spawn(SINK="ndjson,capture", NDJSON_DEST=str(tmp_path / "out.ndjson"), CAPTURE_DEST=str(fifo),
                         CAPTURE_CHANNEL_CAP="3000", SUBSCRIPTION="T.*,Q.*")
        # (drops may begin before the queue is full: batches the reader holds while the inbound queue is full count
        # in the capture's backlog too)
        wait_for(lambda: streamer.metric("polygon_queue_depth", queue="capture") >= 2990, timeout=60,
                 what="the capture queue full")
        wait_for(lambda: streamer.metric("polygon_capture_drops_total") > 0, what="capture drops")
        with open(f"/proc/{streamer.proc.pid}/status") as status:
            peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
        # 3,000 frames of about 11 KB are 33 MB of text; their parsed events would be about 400 MB more.
        assert peak_kb < 250 * 1024, f"peak RSS {peak_kb} kB"
        assert streamer.stop() == 1  # what the capture could not write is reported
    finally:
        os.close(holder)
