"""Gaps made visible (issue 15): one gap record per interruption, in order, in every sink; staleness; q checks;
exact connection reasons. The real service as a child process against the local Polygon server, over loopback."""

import re
import time

import ujson
import zmq

from helpers import ROOT, free_port, records_in, report, valid_record, wait_for
from polygon_streamer.wsserver import ws_frame


def records_of(path):
    return records_in(path)


def so_far(path):
    """The records of a file the service is still writing (its last line counts once whole)."""
    return records_in(path, writing=True)


def gaps_in(records):
    return [(index, r) for index, r in enumerate(records) if r["kind"] == "gap"]


def check_gap_shape(record, cluster="stocks"):
    assert list(record) == ["ingest_ts", "type", "kind", "symbol", "topic", "feed", "ts", "payload", "hostname",
                            "app_version", "schema_version", "seq"]
    assert (record["type"], record["kind"], record["symbol"], record["topic"], record["feed"]) == \
        ("gap", "gap", "", "gap", cluster)
    assert list(record["payload"]) == ["reason", "detail", "close_code", "close_reason", "subscription",
                                       "last_ingest_ts", "resumed_ingest_ts", "gap_ms", "dropped_events"]


def test_a_close_frame_is_one_server_close_gap_with_its_code_and_reason(mock_server, spawn, tmp_path):
    mock_server.options.record = True
    dest = tmp_path / "close.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), NDJSON_FLUSH_INTERVAL_MS="50", SUBSCRIPTION="T.*")
    wait_for(lambda: streamer.metric("polygon_events_total", type="T") >= 100, what="the first session")
    mock_server.inject(ws_frame(8, (1011).to_bytes(2, "big") + b"internal server error"))
    wait_for(lambda: streamer.metric("polygon_gaps_total", reason="server_close") == 1, what="the gap record")
    wait_for(lambda: sum(1 for r in so_far(dest) if r["kind"] == "gap") == 1
             and len(so_far(dest)) >= gaps_in(so_far(dest))[0][0] + 50, what="data after the gap")
    assert streamer.stop() == 0
    records = records_of(dest)
    gaps = gaps_in(records)
    assert len(gaps) == 1, "once"
    index, gap = gaps[0]
    check_gap_shape(gap)
    before, after = records[index - 1], records[index + 1]
    assert after["payload"]["q"] == 1 and before["payload"]["q"] > 1, "where it happened: between the sessions"
    payload = gap["payload"]
    assert payload["reason"] == "server_close" and payload["close_code"] == 1011
    assert payload["close_reason"] == "internal server error"
    assert payload["detail"] == "closed by the server (code 1011, internal server error)"
    assert payload["subscription"] == "T.*" and payload["dropped_events"] is None
    assert payload["last_ingest_ts"] == before["ingest_ts"] and gap["ts"] == before["ts"]
    assert payload["resumed_ingest_ts"] == after["ingest_ts"] == gap["ingest_ts"]
    assert payload["gap_ms"] == after["ingest_ts"] - before["ingest_ts"]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    ends = [r["fields"] for r in streamer.logs() if r["fields"].get("message", "").startswith("disconnected")]
    assert ends[0]["reason"] == "closed by the server (code 1011, internal server error)"
    assert not any("AttributeError" in m for m in streamer.log_messages())
    assert streamer.shutdown_report()["gaps"] == 1
    report("close frame 1011", gap_ms=payload["gap_ms"], gap_records=1)


def test_a_read_timeout_gap_and_the_last_event_age(mock_server, spawn, tmp_path):
    mock_server.options.count = 50  # then silence, pings answered
    dest = tmp_path / "timeout.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), NDJSON_FLUSH_INTERVAL_MS="50", READ_TIMEOUT_SECS="1",
                     HEARTBEAT_INTERVAL_SECS="0.2", BACKOFF_INITIAL_SECS="0.5")
    wait_for(lambda: streamer.metric("polygon_events_total", type="T") >= 25, what="the first session's events")
    assert streamer.metric("polygon_last_event_age_seconds") < 5
    assert abs(streamer.metric("polygon_last_event_timestamp_seconds", type="T") - time.time()) < 5
    # Silence: the age grows past the read timeout, then the session ends and the next one streams.
    wait_for(lambda: streamer.metric("polygon_last_event_age_seconds") >= 0.9, what="the age to grow")
    wait_for(lambda: streamer.metric("polygon_gaps_total", reason="read_timeout") == 1, what="the gap record")
    assert streamer.metric("polygon_gap_seconds_total") >= 1.0, "at least the read timeout"
    assert streamer.stop() == 0
    records = records_of(dest)
    (index, gap), = gaps_in(records)
    assert index == 50 and gap["payload"]["reason"] == "read_timeout"
    assert gap["payload"]["detail"] == "read timeout: no data message for 1s"
    assert gap["payload"]["gap_ms"] >= 1000 and gap["payload"]["close_code"] is None


def test_stale_after_secs_ends_a_session_whose_statuses_flow_but_data_does_not(mock_server, spawn, tmp_path):
    mock_server.options.count = 30
    mock_server.options.silent_status_every = 0.2  # the connection looks alive: READ_TIMEOUT_SECS never fires
    dest = tmp_path / "stale.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), NDJSON_FLUSH_INTERVAL_MS="50", READ_TIMEOUT_SECS="30",
                     STALE_AFTER_SECS="1")
    wait_for(lambda: streamer.metric("polygon_stale_timeouts_total") >= 1, what="a stale timeout")
    wait_for(lambda: streamer.metric("polygon_gaps_total", reason="stale") >= 1, what="the stale gap record")
    assert streamer.metric("polygon_read_timeouts_total") == 0
    assert streamer.metric("polygon_status_total", status="success") >= 5, "statuses kept flowing"
    assert streamer.stop() == 0
    gap = gaps_in(records_of(dest))[0][1]
    assert gap["payload"]["reason"] == "stale" and gap["payload"]["gap_ms"] >= 1000
    assert "STALE_AFTER_SECS" in gap["payload"]["detail"]


def test_a_terminal_status_mid_stream_is_a_status_gap(mock_server, spawn, tmp_path):
    mock_server.options.status_in_data_every = 20
    mock_server.options.status_in_data = "force_disconnect"
    dest = tmp_path / "status.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), NDJSON_FLUSH_INTERVAL_MS="50")
    wait_for(lambda: streamer.metric("polygon_gaps_total", reason="status") >= 1, what="the status gap")
    assert streamer.stop() == 0
    gap = gaps_in(records_of(dest))[0][1]
    assert gap["payload"]["reason"] == "status" and gap["payload"]["detail"] == "server sent force_disconnect"


def test_an_eviction_mid_stream_is_a_max_connections_gap(mock_server, spawn, tmp_path):
    mock_server.options.evict_after = 50
    dest = tmp_path / "evicted.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), NDJSON_FLUSH_INTERVAL_MS="50",
                     BACKOFF_INITIAL_SECS="0.05", BACKOFF_MAX_SECS="0.3")
    wait_for(lambda: streamer.metric("polygon_gaps_total", reason="max_connections") >= 1, what="the gap")
    assert streamer.stop() == 0
    records = records_of(dest)
    index, gap = gaps_in(records)[0]
    assert index == 50 and gap["payload"]["reason"] == "max_connections"
    # The cool-down is the ceiling, so the hole is at least that long.
    assert gap["payload"]["gap_ms"] >= 300


def test_a_reconnect_gap_reaches_a_zeromq_subscriber_of_topic_gap(mock_server, spawn):
    port = free_port()
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"gap")
    sub.setsockopt(zmq.RCVTIMEO, 200)
    sub.bind(f"tcp://127.0.0.1:{port}")
    mock_server.options.drop_after = 40
    try:
        streamer = spawn(SINK="zmq", ZMQ_ENDPOINT=f"tcp://127.0.0.1:{port}", SUBSCRIPTION="T.*")
        received = []

        def a_gap():
            try:
                received.append(sub.recv_multipart())
            except zmq.Again:
                pass
            return received
        wait_for(a_gap, timeout=15, what="a gap message on topic gap")
        topic, payload = received[0]
        assert topic == b"gap"
        record = valid_record(payload.decode())
        check_gap_shape(record)
        assert record["payload"]["reason"] == "disconnect"
        assert streamer.stop() == 0
    finally:
        sub.close(0)
        context.term()


def test_split_files_each_tell_the_gap_where_it_happened(mock_server, spawn, tmp_path):
    mock_server.options.drop_after = 60
    dest = tmp_path / "feed.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), NDJSON_SPLIT_PER_TYPE="true", SUBSCRIPTION="T.*,Q.*",
                     NDJSON_FLUSH_INTERVAL_MS="50")
    wait_for(lambda: streamer.metric("polygon_gaps_total", reason="disconnect") >= 1, what="a gap")
    wait_for(lambda: streamer.metric("polygon_events_total", type="T") >= 60, what="data after it")
    assert streamer.stop() == 0
    for kind in ("trade", "quote"):
        records = records_of(tmp_path / f"feed.{kind}.ndjson")
        gaps = gaps_in(records)
        assert gaps and gaps[0][0] == 30, (kind, [index for index, _ in gaps])
        assert {r["kind"] for r in records} == {kind, "gap"}
    assert not (tmp_path / "feed.gap.ndjson").exists()


def test_repeated_and_backwards_q_are_counted_and_delivered_as_received(mock_server, spawn, tmp_path):
    mock_server.options.duplicate_q_every = 7
    mock_server.options.backwards_q_every = 11
    mock_server.options.count = 1000
    dest = tmp_path / "q.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), SUBSCRIPTION="T.*,Q.*", NDJSON_FLUSH_INTERVAL_MS="50")
    wait_for(lambda: mock_server.stats.events_sent >= 1000, what="the stream")
    faults = list(mock_server.stats.sequence_faults)
    wait_for(lambda: streamer.metric("polygon_events_total", type="T") + streamer.metric("polygon_events_total",
                                                                                         type="Q")
             == 1000 + len(faults), what="every event, the repeated ones too")
    for reason in ("duplicate", "backwards"):
        for code in ("T", "Q"):
            expected = sum(1 for r, c, _ in faults if (r, c) == (reason, code))
            assert streamer.metric("polygon_sequence_anomalies_total", type=code, reason=reason) == expected, \
                (reason, code)
    assert any(m.startswith("sequence anomaly: ") for m in streamer.log_messages())
    assert streamer.stop() == 0
    assert len(records_of(dest)) == 1000 + len(faults), "never dropped"


def test_status_and_data_written_with_spaces_keep_the_data(mock_server, spawn, tmp_path):
    dest = tmp_path / "spaced.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), NDJSON_FLUSH_INTERVAL_MS="50", SUBSCRIPTION="T.AAPL")
    streamer.wait_ready()
    mock_server.inject(ws_frame(1, b'[{"ev" : "status", "status" : "success", "message" : "spaced"}, '
                                   b'{"ev" : "T", "sym" : "SPACED", "p" : 1.5, "t" : 1700000000000, "q" : 9}]'))
    wait_for(lambda: any(r["symbol"] == "SPACED" for r in so_far(dest)), what="the spaced data event")
    assert streamer.stop() == 0
    spaced = [r for r in records_of(dest) if r["symbol"] == "SPACED"]
    assert len(spaced) == 1 and spaced[0]["payload"] == {"ev": "T", "sym": "SPACED", "p": 1.5, "t": 1700000000000,
                                                        "q": 9}


def test_a_status_spelled_with_escapes_is_still_a_status(mock_server, spawn, tmp_path):
    dest = tmp_path / "escaped.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), NDJSON_FLUSH_INTERVAL_MS="50", SUBSCRIPTION="T.AAPL")
    streamer.wait_ready()
    before = streamer.metric("polygon_status_total", status="success")
    mock_server.inject(ws_frame(1, b'[{"ev":"st\\u0061tus","st\\u0061tus":"succ\\u0065ss","message":"escaped"},'
                                   b'{"ev":"T","sym":"ESCAPED","p":1.5,"t":1700000000000,"q":9}]'))
    wait_for(lambda: any(r["symbol"] == "ESCAPED" for r in so_far(dest)), what="the data event")
    assert streamer.metric("polygon_status_total", status="success") == before + 1
    assert any(r["fields"].get("server_message") == "escaped" for r in streamer.logs())
    assert streamer.stop() == 0


def test_stopping_inside_a_hole_writes_a_shutdown_gap(mock_server, spawn, tmp_path):
    mock_server.options.drop_after = 30
    dest = tmp_path / "hole.ndjson"
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), NDJSON_FLUSH_INTERVAL_MS="50")
    wait_for(lambda: streamer.metric("polygon_events_total", type="T") >= 30, what="the first session")
    mock_server.options.reject_auth = True  # no data comes back
    wait_for(lambda: streamer.metric("polygon_status_total", status="auth_failed") >= 1, what="a refused reconnect")
    assert streamer.stop() == 0
    records = records_of(dest)
    last = records[-1]
    check_gap_shape(last)
    assert last["payload"]["reason"] == "shutdown" and last["payload"]["resumed_ingest_ts"] is None
    assert last["payload"]["detail"].startswith("the service stopped before data resumed after: connection closed")
    assert last["payload"]["gap_ms"] is None and last["seq"] == records[-2]["seq"] + 1
    assert ujson.loads(dest.read_text().splitlines()[-1])["kind"] == "gap"


def test_every_metric_the_alert_rules_use_is_exported(mock_server, spawn):
    # BACKFILL on (the local server's REST side): polygon_backfill_* exist only then; the gateway's with it only.
    streamer = spawn(SUBSCRIPTION="T.*", BACKFILL="on", POLYGON_REST_URL=mock_server.start_rest(),
                     SINK="stdout,gateway", GATEWAY_ADDR=f"127.0.0.1:{free_port()}")
    streamer.wait_ready()
    exported = {name for name, _ in streamer.metrics()}
    used = set(re.findall(r"\b(polygon_[a-z_]+)", (ROOT / "polygon_streamer" / "ops" / "alerts.yml").read_text()))
    used -= {"polygon_zmq_peers"}  # (a ZeroMQ sink's: this service has none)
    used = {name for name in used if not name.startswith("polygon_kafka_")}  # (test_ops_kit's, with a broker)
    assert used and used <= exported, used - exported
    assert streamer.stop() == 0


# -- STATE_DIR: a restart is a gap record, and seq goes on (issue 34, item 4) ------------------------------------------

def test_a_restart_is_one_gap_record_before_the_first_data_and_seq_goes_on(mock_server, spawn, tmp_path):
    import signal

    state = tmp_path / "state"
    state.mkdir()
    settings = dict(SINK="ndjson", NDJSON_FLUSH_INTERVAL_MS="20", STATE_DIR=str(state), SUBSCRIPTION="T.*")
    first, second, third, fourth = (tmp_path / f"run{n}.ndjson" for n in range(1, 5))
    run = spawn(NDJSON_DEST=str(first), **settings)
    wait_for(lambda: len(so_far(first)) >= 200, what="the first run's data")
    assert run.stop() == 0
    one = records_of(first)
    assert one[0]["seq"] == 1 and not gaps_in(one), "a fresh start: no restart record"
    assert any("no stream position" in m for m in run.log_messages())

    # A clean stop, then a start: one restart record before the first data, seq exactly one on.
    run = spawn(NDJSON_DEST=str(second), **settings)
    wait_for(lambda: len(so_far(second)) >= 200, what="the second run's data")
    run.proc.send_signal(signal.SIGKILL)  # and then a crash
    run.proc.wait(10)
    two = so_far(second)
    restart = two[0]
    check_gap_shape(restart)
    payload = restart["payload"]
    assert payload["reason"] == "restart" and "stopped cleanly" in payload["detail"]
    assert restart["seq"] == one[-1]["seq"] + 1 and two[1]["seq"] == restart["seq"] + 1
    assert payload["last_ingest_ts"] == one[-1]["ingest_ts"] and restart["ts"] == one[-1]["ts"]
    assert payload["resumed_ingest_ts"] == two[1]["ingest_ts"] == restart["ingest_ts"]
    assert payload["gap_ms"] == two[1]["ingest_ts"] - one[-1]["ingest_ts"] and payload["subscription"] == "T.*"
    assert sum(1 for r in two if r["kind"] == "gap") == 1

    # After the crash: the restart record says so, and seq goes on past every number the crashed run could give.
    run = spawn(NDJSON_DEST=str(third), **settings)
    wait_for(lambda: len(so_far(third)) >= 50, what="the third run's data")
    assert run.stop() == 0
    three = records_of(third)
    assert three[0]["payload"]["reason"] == "restart" and "did not stop cleanly" in three[0]["payload"]["detail"]
    assert three[0]["seq"] > two[-1]["seq"], "no seq given twice"
    assert three[0]["payload"]["last_ingest_ts"] <= two[-1]["ingest_ts"]

    # A damaged position file: one line, a fresh start.
    (state / "stocks.position.json").write_text("{not json")
    run = spawn(NDJSON_DEST=str(fourth), **settings)
    wait_for(lambda: len(so_far(fourth)) >= 20, what="the fourth run's data")
    assert run.stop() == 0
    assert records_of(fourth)[0]["seq"] == 1
    assert sum(1 for m in run.log_messages() if "is damaged" in m) == 1
    report("restart records", first_seq=one[-1]["seq"], restart_seq=restart["seq"], after_crash=three[0]["seq"])
