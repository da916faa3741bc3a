"""Normalization of every cluster's fixture frames, exactly as schema.md says (pure functions, no I/O)."""

import jsonschema
import pytest
import ujson

from helpers import FIXTURES, valid_record
from polygon_streamer import protocol
from polygon_streamer.normalize import (RETIRE_MS, FrameError, FrameNormalizer, Gap, IncludeFilter, parse_frame,
                                      time_to_ms)

INGEST = 1700000000150


def normalize(cluster, frame, **kwargs):
    normalizer = FrameNormalizer(cluster, "ingest-1", "0.1.0", **kwargs)
    records, _ = normalizer.normalize(frame.encode() if isinstance(frame, str) else frame, INGEST)
    return normalizer, [ujson.loads(record[5]) for record in records], records


def fixture_frames(cluster):
    return [line for line in (FIXTURES / f"{cluster}.jsonl").read_text().splitlines() if line.strip()]


def test_schema_example_is_reproduced_byte_for_byte():
    frame = ('[{"ev":"T","sym":"AAPL","x":4,"i":"52983525029461","z":3,"p":187.12,"s":100,"c":[14,41],'
             '"t":1700000000123,"q":3456}]')
    _, _, records = normalize("stocks", frame)
    assert records[0][5] == (
        '{"ingest_ts":1700000000150,"type":"T","kind":"trade","symbol":"AAPL","topic":"T:AAPL","feed":"stocks",'
        '"ts":1700000000123,"payload":{"ev":"T","sym":"AAPL","x":4,"i":"52983525029461","z":3,"p":187.12,'
        '"s":100,"c":[14,41],"t":1700000000123,"q":3456},"hostname":"ingest-1","app_version":"0.1.0",'
        '"schema_version":1,"seq":1}')


EXPECTED = {
    # cluster: [(type, kind, symbol, ts)] in fixture order
    "stocks": [("T", "trade", "MSFT", 1536036818784), ("T", "trade", "AMZN", 1651684192536),
               ("T", "trade", "AMZN", 1651684192717), ("Q", "quote", "MSFT", 1536036818784),
               ("A", "agg_second", "SPCE", 1610144869000), ("AM", "agg_minute", "GTE", 1610144700000),
               ("LULD", "luld", "MSFT", 1601316752683), ("NOI", "imbalance", "NTEST.Q", 1601318039223),
               ("FMV", "fmv", "AAPL", 1678220098130), ("LV", "value", "AAPL", 1678220098130)],
    "options": [("T", "trade", "O:AMC210827C00037000", 1629820676333),
                ("Q", "quote", "O:SPY241220P00720000", 1644506128351),
                ("AM", "agg_minute", "O:ONEM220121C00025000", 1632419700000),
                ("FMV", "fmv", "O:TSLA210903C00700000", 1401715883806)],
    "futures": [("T", "trade", "ESZ4", 1733159400123), ("Q", "quote", "ESZ4", 1733159400123),
                ("AM", "agg_minute", "GCJ5", 1733159400000)],
    "crypto": [("XT", "trade", "BTC-USD", 1610462007425), ("XQ", "quote", "BTC-USD", 1610462411115),
               ("XL2", "book", "BTC-USD", 1610462411115), ("XA", "agg_minute", "BCD-USD", 1610463300000),
               ("XAS", "agg_second", "BCD-USD", 1610463300000), ("FMV", "fmv", "X:BTC-USD", 1610462007425)],
    "forex": [("C", "quote", "USD/CNH", 1536036818784), ("CA", "agg_minute", "USD/EUR", 1539145740000),
              ("CAS", "agg_second", "USD/EUR", 1539145740000), ("FMV", "fmv", "C:EURUSD", 1678220098130)],
    "indices": [("V", "value", "I:SPX", 1678220098130), ("A", "agg_second", "I:SPX", 1678220675805),
                ("AM", "agg_minute", "I:SPX", 1678220675805)],
}


@pytest.mark.parametrize("cluster", sorted(EXPECTED))
def test_every_fixture_frame_normalizes(cluster):
    normalizer = FrameNormalizer(cluster, "ingest-1", "0.1.0")
    got = []
    for frame in fixture_frames(cluster):
        records, _ = normalizer.normalize(frame.encode(), INGEST)
        for record in records:
            got.append(ujson.loads(record[5]))
        originals = ujson.loads(frame)
        assert [r["payload"] for r in got[-len(originals):]] == originals, "payload must be the event as received"
    assert [(r["type"], r["kind"], r["symbol"], r["ts"]) for r in got] == EXPECTED[cluster]
    for index, record in enumerate(got, start=1):
        assert list(record) == ["ingest_ts", "type", "kind", "symbol", "topic", "feed", "ts", "payload",
                                "hostname", "app_version", "schema_version", "seq"]
        assert record["seq"] == index
        assert record["feed"] == cluster
        assert record["topic"] == f"{record['type']}:{record['symbol']}"
        assert record["ingest_ts"] == INGEST and record["schema_version"] == 1
    assert normalizer.anomalies == {} and normalizer.bad_events == {}


def test_forex_pair_keeps_its_slash_and_non_ascii_stays_as_is():
    _, out, records = normalize("forex", '[{"ev":"C","p":"USD/EUR","x":"44","a":1.1,"b":1.0,"t":1536036818784,'
                                         '"note":"café"}]')
    assert '"symbol":"USD/EUR"' in records[0][5] and '"topic":"C:USD/EUR"' in records[0][5]
    assert "café" in records[0][5] and "\\/" not in records[0][5]
    assert out[0]["payload"]["note"] == "café"


def test_time_units_are_told_apart_by_magnitude():
    assert time_to_ms(1700000000123) == 1700000000123
    assert time_to_ms(1601316752683746) == 1601316752683          # µs
    assert time_to_ms(1788877046310003385) == 1788877046310       # ns
    assert time_to_ms(1700000000123.0) == 1700000000123
    assert time_to_ms("1700000000123") is None
    assert time_to_ms(True) is None and time_to_ms(-5) is None and time_to_ms(float("inf")) is None


def test_a_bad_event_loses_only_itself():
    frame = ('[{"ev":"T","sym":"A","p":1,"t":1700000000000},'
             '42,{"sym":"NOEV"},{"ev":"T","sym":"INF","p":1e400,"t":1700000000000},'
             '{"ev":"ZZ","sym":"ODD","t":1700000000000},{"ev":"T","p":1.5,"t":1700000000000},'
             '{"ev":"T","sym":"S","p":"abc","t":"1700000000000"},{"ev":"T","sym":7,"t":1700000000000},'
             '{"ev":"A","sym":"BIG","v":100000000000000000000000000000,"z":12.0,"e":1700000000000},'
             '{"ev":"T","sym":"B","p":2,"t":1700000000001}]')
    normalizer, out, _ = normalize("stocks", frame)
    assert [(r["type"], r["symbol"], r["ts"]) for r in out] == [
        ("T", "A", 1700000000000), ("ZZ", "ODD", 1700000000000), ("T", "", 1700000000000),
        ("T", "S", None), ("T", "", 1700000000000), ("A", "BIG", 1700000000000), ("T", "B", 1700000000001)]
    assert out[2]["kind"] == "trade" and out[1]["kind"] == "other"
    assert out[5]["payload"]["v"] == 10**29 and out[5]["payload"]["z"] == 12.0
    assert [r["seq"] for r in out] == list(range(1, 8)), "a skipped event must not leave a seq gap"
    assert normalizer.bad_events == {"not_an_event": 2, "unencodable": 1}
    assert normalizer.anomalies == {"unknown_code": 1, "missing_symbol": 1, "bad_time": 1, "bad_symbol": 1}


def test_status_objects_are_control_not_records():
    frame = '[{"ev":"status","status":"success","message":"subscribed to: T.*"},{"ev":"T","sym":"A","t":1}]'
    _, out, _ = normalize("stocks", frame)
    assert [r["type"] for r in out] == ["T"]


@pytest.mark.parametrize("frame", [b"not json {", b'{"ev":"T"}', b"\xff\xfe", b""])
def test_a_frame_that_is_not_a_json_array_is_a_frame_error(frame):
    normalizer = FrameNormalizer("stocks", "h", "v")
    with pytest.raises(FrameError):
        normalizer.normalize(frame, INGEST)
    assert normalizer.parse_errors == 1


def test_integers_beyond_64_bits_parse():
    assert parse_frame(b'[{"ev":"T","q":123456789012345678901234567890}]')[0]["q"] == 123456789012345678901234567890


def test_include_patterns():
    include = IncludeFilter(["T:AAPL", "Q:MS*", "AM:*", "*:SPY"])
    assert include.matches("T", "AAPL") and not include.matches("T", "AAPLX")
    assert include.matches("Q", "MSFT") and not include.matches("Q", "AAPL")
    assert include.matches("AM", "ANY") and include.matches("LULD", "SPY")
    assert not include.matches("A", "AAPL")


def test_include_filter_and_quote_sampling_leave_no_seq_gap():
    events = []
    for i in range(12):
        events.append({"ev": "Q", "sym": "MSFT", "t": 1700000000000 + i, "q": i})
        events.append({"ev": "T", "sym": "AAPL" if i % 2 else "IBM", "t": 1700000000000 + i, "q": i})
    normalizer, out, _ = normalize("stocks", ujson.dumps(events), include=["T:AAPL", "Q:*"], sample_quotes=4)
    assert [(r["type"], r["payload"]["q"]) for r in out if r["type"] == "Q"] == [("Q", 0), ("Q", 4), ("Q", 8)]
    assert [r["payload"]["q"] for r in out if r["type"] == "T"] == [1, 3, 5, 7, 9, 11]
    assert [r["seq"] for r in out] == list(range(1, len(out) + 1))
    assert normalizer.filtered == 6 and normalizer.sampled_out == 9


def test_every_cluster_has_a_shape_table_and_unknown_codes_fall_back():
    for cluster in protocol.CLUSTERS:
        _, out, _ = normalize(cluster, '[{"ev":"NEW","pair":"X-Y","e":1700000000000}]')
        assert (out[0]["kind"], out[0]["symbol"], out[0]["ts"]) == ("other", "X-Y", 1700000000000)


def test_compact_frames_keep_each_payload_byte_for_byte():
    frame = b'[{"ev":"T","sym":"A","p":1.10,"t":1700000000000,"x":1e2},{"ev":"Q","sym":"B","t":1700000000001}]'
    _, _, records = normalize("stocks", frame)
    assert ',"payload":{"ev":"T","sym":"A","p":1.10,"t":1700000000000,"x":1e2},' in records[0][5]
    assert ',"payload":{"ev":"Q","sym":"B","t":1700000000001},' in records[1][5]


@pytest.mark.parametrize("frame", [
    '[{"ev":"T","sym":"A","note":"x},{y","t":1}]',          # the separator inside a string
    '[{"ev":"T","sym":"A","n":[{"a":1},{"b":2}],"t":1}]',   # nested objects
    '[{"ev":"T", "sym":"A","t":1}]',                        # whitespace
    '[{"ev":"T","sym":"A\\/B","t":1}]',                     # an escape
])
def test_frames_that_cannot_be_split_safely_are_re_encoded(frame):
    _, out, records = normalize("stocks", frame)
    assert len(records) == 1
    assert out[0]["payload"] == ujson.loads(frame)[0]
    assert "\\/" not in records[0][5]


def test_a_gap_record_follows_the_schema_and_takes_the_next_seq():
    normalizer = FrameNormalizer("forex", "ingest-1", "0.1.0", subscription="C.*")
    normalizer.normalize(b'[{"ev":"C","p":"USD/EUR","a":1.1,"b":1.0,"t":1700000000100,"q":1}]', INGEST)
    gap = Gap("server_close", "closed by the server (code 1011, bad \udc80 day)", INGEST + 10, INGEST + 5000,
              close_code=1011, close_reason="bad \udc80 day")
    seq, code, symbol, kind, ts, line = normalizer.gap_record(gap, INGEST + 5000)
    assert (seq, code, symbol, kind, ts) == (2, "gap", "", "gap", 1700000000100)
    record = ujson.loads(line)
    assert line.encode("utf-8").decode("utf-8") == line, "valid UTF-8 whatever the server sent"
    assert record == {
        "ingest_ts": INGEST + 5000, "type": "gap", "kind": "gap", "symbol": "", "topic": "gap", "feed": "forex",
        "ts": 1700000000100,
        "payload": {"reason": "server_close", "detail": "closed by the server (code 1011, bad ? day)",
                    "close_code": 1011, "close_reason": "bad ? day", "subscription": "C.*",
                    "last_ingest_ts": INGEST, "resumed_ingest_ts": INGEST + 5000, "gap_ms": 5000,
                    "dropped_events": None},
        "hostname": "ingest-1", "app_version": "0.1.0", "schema_version": 1, "seq": 2}
    assert normalizer.gaps == {"server_close": 1} and normalizer.gap_seconds == 5.0
    assert normalizer.events == 1 and normalizer.seq == 2


def test_q_repeats_and_steps_back_are_counted_per_symbol_and_every_event_is_kept():
    normalizer = FrameNormalizer("stocks", "h", "v")
    events = [("T", "A", 1), ("T", "B", 1), ("T", "A", 2), ("T", "A", 2), ("Q", "A", 1), ("T", "A", 1),
              ("T", "A", 3), ("T", "B", 5), ("Q", "A", 0)]
    frame = ujson.dumps([{"ev": code, "sym": sym, "t": 1700000000000, "q": q} for code, sym, q in events])
    records, _ = normalizer.normalize(frame.encode(), INGEST)
    assert len(records) == len(events)
    assert normalizer.sequence_anomalies == {("T", "duplicate"): 1, ("T", "backwards"): 1, ("Q", "backwards"): 1}
    assert normalizer.last_sequence_anomaly == ("Q", "A", 0, 1, "backwards")
    normalizer.new_session()  # q restarts with each connection
    normalizer.normalize(b'[{"ev":"T","sym":"A","t":1700000000000,"q":1}]', INGEST)
    assert normalizer.sequence_anomalies_total == 3
    crypto = FrameNormalizer("crypto", "h", "v")
    crypto.normalize(b'[{"ev":"XT","pair":"X","t":1,"q":5},{"ev":"XT","pair":"X","t":1,"q":5}]', INGEST)
    assert crypto.sequence_anomalies_total == 0, "only stocks and options T and Q carry a per-symbol q"


def test_the_compiled_schema_gives_the_reference_validators_verdict_on_every_shape_and_its_mutations():
    """valid_record uses the schema compiled by fastjsonschema (the suite checks a million records); jsonschema is the
    reference: on every record shape the service writes, and on each with a key removed or its value of another
    type, both must say the same."""
    import fastjsonschema

    from helpers import RECORD_SCHEMA, REFERENCE_VALIDATOR
    from polygon_streamer.backfill.jobs import Job
    from polygon_streamer.normalize import GAP_REASONS

    compiled = fastjsonschema.compile(RECORD_SCHEMA)

    def verdict(record):
        try:
            compiled(record)
        except fastjsonschema.JsonSchemaValueException:
            return False
        return True

    shapes = []
    for cluster in protocol.CLUSTERS:
        normalizer = FrameNormalizer(cluster, "ingest-1", "0.1.0")
        for frame in fixture_frames(cluster):
            shapes += [ujson.loads(record[5]) for record in normalizer.normalize(frame.encode(), INGEST)[0]]
            shapes += [ujson.loads(record[5]) for record in normalizer.normalize(frame.encode(), INGEST,
                                                                                  backfill=True)[0]]
        for reason in GAP_REASONS:
            gap = Gap(reason, "why", INGEST, INGEST + 10, dropped_events=3 if reason.endswith("drop") else None)
            shapes.append(ujson.loads(normalizer.gap_record(gap, INGEST)[5]))
        summary = Job(1, "disconnect", INGEST - 1000, INGEST).summary()
        shapes.append(ujson.loads(normalizer.summary_record(ujson.dumps(summary), INGEST)[5]))
    # one record of each shape: per type, live and backfilled, per gap reason
    shapes = list({(record["type"], "backfill" in record, str(record["payload"].get("reason"))
                    if isinstance(record["payload"], dict) else ""): record for record in shapes}.values())
    kinds = {record["kind"] for record in shapes}
    assert {"gap", "backfill"} <= kinds and len(kinds) > 4
    others = [None, "x", -1, {}]
    checked = disagreements = 0
    for record in shapes:
        variants = [record]
        for key in record:
            variants.append({k: v for k, v in record.items() if k != key})
            variants += [dict(record, **{key: other}) for other in others]
        if isinstance(record.get("payload"), dict) and record["kind"] in ("gap", "backfill"):
            for key in record["payload"]:
                variants += [dict(record, payload=dict(record["payload"], **{key: other})) for other in others]
        for variant in variants:
            checked += 1
            disagreements += REFERENCE_VALIDATOR.is_valid(variant) != verdict(variant)
    assert checked > 1000 and disagreements == 0, f"{disagreements} of {checked} verdicts differ"


def test_every_fixture_record_and_a_gap_record_are_valid_against_the_shipped_json_schema():
    for cluster in protocol.CLUSTERS:
        normalizer = FrameNormalizer(cluster, "ingest-1", "0.1.0")
        for frame in fixture_frames(cluster):
            records, _ = normalizer.normalize(frame.encode(), INGEST)
            for record in records:
                valid_record(record[5])
        gap = Gap("inbound_drop", "inbound queue full", INGEST, INGEST + 10, dropped_events=3)
        valid_record(normalizer.gap_record(gap, INGEST)[5])
    with pytest.raises(jsonschema.ValidationError):  # the schema does refuse: a gap that hides how much is missing
        valid_record(FrameNormalizer("stocks", "h", "v").gap_record(Gap("sink_drop", "x", INGEST), INGEST)[5])


def test_a_gateway_clients_topic_is_diverted_and_stays_so_while_its_unsubscribe_crosses_the_wire():
    normalizer = FrameNormalizer("crypto", "host", "1.0")
    frame = ujson.dumps([{"ev": "XT", "pair": "BTC-USD", "t": 1700000000000, "q": 1},
                         {"ev": "XQ", "pair": "BTC-USD", "t": 1700000000001},
                         {"ev": "XT", "pair": "ETH-USD", "t": 1700000000002}])

    def run(now_ms):
        normalizer.extra.clear()
        records, _ = normalizer.normalize(frame, now_ms)
        return [r[1] for r in records], [(at, code, symbol) for at, code, symbol, _ in normalizer.extra]

    assert run(0) == (["XT", "XQ", "XT"], []), "without a union every event is a record"
    normalizer.set_union(["XT.*"], ["XQ.X:BTCUSD"], 1_000)  # another spelling of the pair: canonical form
    assert run(1_000) == (["XT", "XT"], [(1, "XQ", "BTC-USD")]), "the client's topic only, at its place"
    normalizer.set_union(["XT.*"], [], 2_000)  # let go: the unsubscribe and the events on their way cross
    assert run(2_000 + RETIRE_MS - 1) == (["XT", "XT"], [(1, "XQ", "BTC-USD")])
    normalizer.expire_retired(2_000 + RETIRE_MS)
    assert normalizer.retire_due is None
    assert run(2_000 + RETIRE_MS) == (["XT", "XQ", "XT"], []), "then it is what the upstream sends, as without"
    normalizer.set_union(["XT.*", "XQ.*"], ["XT.ETH-USD"], 3_000)
    assert run(3_000) == (["XT", "XQ", "XT"], []), "a topic the service's own set covers is never diverted"
