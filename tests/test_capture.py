"""Capture (SINK=capture): every frame as received, over a reconnect and a SIGHUP reopen, against the local server."""

import json
import os
import signal

import ujson

from helpers import wait_for
from polygon_streamer.sinks.capture import CAPTURE_LINE, frame_json


def capture_lines(*paths):
    out = []
    for path in paths:
        for line in path.read_bytes().split(b"\n")[:-1]:
            record = json.loads(line)  # the stdlib's strict parser
            assert list(record) in (["recv_ns", "cluster", "session", "frame"],
                                    ["recv_ns", "cluster", "session", "frame_text"]), list(record)
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
