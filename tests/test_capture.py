"""Capture (SINK=capture): every frame as received, over a reconnect and a SIGHUP reopen, against the local server."""

import gzip
import json
import os
import signal
import subprocess
import sys

import ujson

from helpers import ROOT, wait_for
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


def reprocess(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "polygon_streamer", "reprocess", "--no-progress", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if not k.startswith(("POLYGON_", "NDJSON_", "SINK"))})


def live_capture(mock_server, spawn, tmp_path):
    """A live run with two reconnects: its capture and what its NDJSON sink wrote."""
    mock_server.options.drop_after = 150
    mock_server.options.odd_events_every = 11
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
