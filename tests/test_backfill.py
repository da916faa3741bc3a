"""Gap healing (BACKFILL, issue 28): the real service against the local server's WebSocket and REST sides, over
loopback. The local server keeps every event it generates, loses some at each reconnect (lose_on_reconnect) and
serves them over REST: the NDJSON file must then hold every event of the subscribed tickers exactly once."""

import json
import subprocess
import sys
import time

import pytest
import ujson

from helpers import ROOT, TEST_KEY, records_in, report, wait_for
from polygon_streamer import backfill
from polygon_streamer.backfill import jobs, mapping
from polygon_streamer.backfill import thread as backfill_thread
from polygon_streamer.config import ConfigError, build_config
from polygon_streamer.rest import RestClient, RestError
from test_capture import reprocess

EXPLICIT = "T.AAPL,Q.AAPL,T.MSFT,Q.MSFT"


def records_of(path):
    return records_in(path)


def so_far(path):
    """The records of a file the service is still writing (its last line counts once whole)."""
    return records_in(path, writing=True)


def summaries(records):
    return [r for r in records if r["kind"] == "backfill"]


def lossy(mock_server, page_size=0, lose=400, cut=2000):
    """The local server cuts each connection after `cut` events and loses `lose` at each reconnect; REST on."""
    mock_server.options.rate = 4000
    mock_server.options.batch = 4
    mock_server.options.drop_after = cut
    mock_server.options.lose_on_reconnect = lose
    mock_server.options.rest_page_size = page_size
    mock_server.options.record = True
    return mock_server.start_rest()


def backfilling(spawn, rest_url, dest, subscription=EXPLICIT, **settings):
    settings = dict(dict(SINK="ndjson", NDJSON_DEST=str(dest), NDJSON_FLUSH_INTERVAL_MS="20",
                         SUBSCRIPTION=subscription, BACKFILL="on", POLYGON_REST_URL=rest_url,
                         BACKFILL_MAX_RPS="200"), **settings)
    return spawn(**settings)


def history_of(mock_server, subscription=EXPLICIT):
    wanted = [tuple(topic.split(".", 1)) for topic in subscription.split(",")]
    return {(code, symbol): [e["q"] for e in mock_server.market.history.events(code, symbol)]
            for code, symbol in wanted}


def test_two_lossy_cuts_are_healed_every_event_exactly_once_backfilled_ones_marked(mock_server, spawn, tmp_path):
    rest_url = lossy(mock_server, page_size=40)
    dest = tmp_path / "healed.ndjson"
    streamer = backfilling(spawn, rest_url, dest)
    wait_for(lambda: mock_server.stats.connections >= 2, timeout=30, what="the first cut")
    # The third connection (after the second cut) streams 1,500 events and falls silent.
    mock_server.options.count = 1500  # first: a connection taking the settings in between is silent at 1,500 too
    mock_server.options.drop_after = 0
    total = 2000 + (400 + 2000) + (400 + 1500)

    def data_records():
        return sum(1 for r in so_far(dest) if r["kind"] not in ("gap", "backfill"))
    def progress():
        return (f"every event and both summaries: the market made {sum(map(len, history_of(mock_server).values()))} "
                f"of {total} in {mock_server.stats.connections} connections, the file has {data_records()} and "
                f"{len(summaries(so_far(dest)))} summaries")
    wait_for(lambda: sum(map(len, history_of(mock_server).values())) == total and data_records() >= total
             and len(summaries(so_far(dest))) >= 2, timeout=60, what=progress)
    metrics = streamer.metrics()

    def metric(name, **labels):
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)
    assert streamer.stop() == 0
    records = records_of(dest)
    data = [r for r in records if r["kind"] not in ("gap", "backfill")]
    got: dict[tuple, list] = {}
    for record in data:
        got.setdefault((record["type"], record["symbol"]), []).append(record["payload"]["q"])
    history = history_of(mock_server)
    lost = mock_server.stats.lost_events
    assert lost == 2 * 400
    for key, qs in history.items():
        assert qs == list(range(1, len(qs) + 1)), "the market's own sequence is whole"
        assert sorted(got[key]) == qs, f"{key}: every event exactly once"
    backfilled = [r for r in data if r.get("backfill") is True]
    assert len(backfilled) >= lost, "at least what the server lost (a cut may also lose what was in flight)"
    gaps = [r for r in records if r["kind"] == "gap" and r["payload"]["reason"] != "shutdown"]
    done = summaries(records)
    assert len(gaps) == len(done) == 2
    for gap, summary in zip(gaps, done):
        payload = summary["payload"]
        assert payload["gap_seq"] == gap["seq"] and payload["gap_reason"] == gap["payload"]["reason"]
        assert payload["complete"] is True and payload["reason"] is None
        assert [t["topic"] for t in payload["topics"]] == EXPLICIT.split(",")
        assert all(t["complete"] and t["recovered"] > 0 for t in payload["topics"])
        assert summary["seq"] > gap["seq"] and summary["topic"] == "backfill" and summary["ts"] is None
    assert sum(s["payload"]["recovered"] for s in done) == len(backfilled)
    # Backfilled records come after their gap, never before.
    first_gap = gaps[0]["seq"]
    assert all(r["seq"] > first_gap for r in backfilled)
    live = [r["seq"] for r in records]
    assert live == list(range(1, len(records) + 1)), "one seq for everything written"
    assert metric("polygon_backfill_events_total", kind="trades") + metric(
        "polygon_backfill_events_total", kind="quotes") == len(backfilled)
    pages = metric("polygon_backfill_requests_total", kind="trades", status="200")
    assert pages >= 2 * 2 * (400 / 4 / 40), "40 results a page: every window took several pages"
    assert metric("polygon_backfill_duplicates_total") == sum(s["payload"]["duplicates"] for s in done)
    report_ = streamer.shutdown_report()
    assert report_["events"] == len(data) - len(backfilled), "the exit report counts the live stream only"
    assert set(mock_server.stats.rest_headers) == {f"Bearer {TEST_KEY}"}, "the key in the header, every time"
    assert not any(TEST_KEY in path for path, _ in mock_server.stats.rest_requests)
    report("backfill: two lossy cuts", lost=lost, backfilled=len(backfilled), pages=int(pages),
           duplicates=int(metric("polygon_backfill_duplicates_total")), events=len(data))


def test_crypto_trades_are_healed_by_id_and_bars_are_asked_as_the_aggregates_endpoint_names_them(mock_server, spawn,
                                                                                                    tmp_path):
    """Crypto trades have no sequence number over REST: their identity is (t, p, s, x, i). The REST API names a pair
    X:BTC-USD for trades and X:BTCUSD for bars."""
    rest_url = lossy(mock_server, lose=300, cut=1500)
    dest = tmp_path / "crypto.ndjson"
    subscription = "XT.BTC-USD,XT.ETH-USD,XA.BTC-USD"
    streamer = backfilling(spawn, rest_url, dest, subscription, cluster="crypto")
    wait_for(lambda: mock_server.stats.connections >= 2, timeout=30, what="the cut")
    mock_server.options.count = 1000  # first, as above
    mock_server.options.drop_after = 0
    wait_for(lambda: summaries(so_far(dest)) and sum(
        len(mock_server.market.history.events("XT", pair)) for pair in ("BTC-USD", "ETH-USD")) == sum(
        1 for r in so_far(dest) if r["type"] == "XT"), timeout=60, what="the summary and every trade")
    assert streamer.stop() == 0
    records = records_of(dest)
    for pair in ("BTC-USD", "ETH-USD"):
        ids = sorted(int(r["payload"]["i"]) for r in records if r["type"] == "XT" and r["symbol"] == pair)
        assert ids == sorted(e["i"] for e in mock_server.market.history.events("XT", pair)), f"{pair}: exactly once"
    done = [summary["payload"] for summary in summaries(records)]
    assert all(summary["complete"] is True and [t["topic"] for t in summary["topics"]] == subscription.split(",")
               for summary in done)
    backfilled = sum(1 for r in records if r["type"] == "XT" and r.get("backfill") is True)
    assert backfilled > 0 and backfilled == sum(t["recovered"] for summary in done for t in summary["topics"]
                                                if t["kind"] == "trades")
    paths = {path for path, status in mock_server.stats.rest_requests if status == 200}
    assert {"/v3/trades/X:BTC-USD", "/v3/trades/X:ETH-USD"} <= paths
    assert any(path.startswith("/v2/aggs/ticker/X:BTCUSD/range/1/minute/") for path in paths), paths


def test_429_is_retried_after_retry_after_and_the_backfill_completes(mock_server, spawn, tmp_path):
    rest_url = lossy(mock_server, lose=80)
    mock_server.options.rest_throttle = 2
    mock_server.options.rest_errors = 1
    dest = tmp_path / "throttled.ndjson"
    streamer = backfilling(spawn, rest_url, dest)
    wait_for(lambda: summaries(so_far(dest)), timeout=40, what="the summary")
    assert streamer.stop() == 0
    summary = summaries(records_of(dest))[0]["payload"]
    assert summary["complete"] is True and summary["recovered"] > 0
    assert streamer_requests(mock_server, 429) == 2 and streamer_requests(mock_server, 500) == 1


def streamer_requests(mock_server, status):
    return sum(1 for _, answered in mock_server.stats.rest_requests if answered == status)


def test_403_turns_that_kind_off_until_restart_and_says_not_entitled(mock_server, spawn, tmp_path):
    rest_url = lossy(mock_server, lose=80)
    mock_server.options.rest_not_entitled = ("quotes",)
    dest = tmp_path / "entitled.ndjson"
    streamer = backfilling(spawn, rest_url, dest)
    wait_for(lambda: len(summaries(so_far(dest))) >= 2, timeout=40, what="two summaries")
    assert streamer.stop() == 0
    for summary in summaries(records_of(dest))[:2]:
        payload = summary["payload"]
        assert payload["complete"] is False and payload["reason"] == "not_entitled"
        by_topic = {t["topic"]: t for t in payload["topics"]}
        assert by_topic["Q.AAPL"]["reason"] == "not_entitled" and by_topic["T.AAPL"]["complete"] is True
        assert by_topic["T.AAPL"]["recovered"] > 0
    assert streamer_requests(mock_server, 403) == 1, "asked once, then off until restart"
    assert sum(1 for m in streamer.log_messages() if m.startswith("backfill of quotes is off until restart")) == 1


def test_a_key_the_rest_api_refuses_is_an_error_summary_and_never_leaks(mock_server, spawn, tmp_path):
    rest_url = lossy(mock_server, lose=80)
    mock_server.options.rest_api_key = "another-key"
    dest = tmp_path / "refused.ndjson"
    streamer = backfilling(spawn, rest_url, dest)
    wait_for(lambda: summaries(so_far(dest)), timeout=40, what="the summary")
    assert streamer.stop() == 0
    payload = summaries(records_of(dest))[0]["payload"]
    assert payload["complete"] is False and payload["reason"] == "error"
    assert "401" in payload["detail"] and "check the API key" in payload["detail"]
    assert streamer_requests(mock_server, 401) >= 1 and streamer_requests(mock_server, 200) == 0
    assert TEST_KEY not in dest.read_text() and TEST_KEY not in streamer.all_output()


def test_sigterm_while_the_rest_server_hangs_stops_at_once_and_the_summary_says_shutdown(mock_server, spawn,
                                                                                        tmp_path):
    rest_url = lossy(mock_server, lose=80)
    mock_server.options.rest_hang = True
    dest = tmp_path / "hung.ndjson"
    streamer = backfilling(spawn, rest_url, dest)
    wait_for(lambda: mock_server.stats.rest_headers, timeout=30, what="a backfill request")
    stopped_at = time.monotonic()
    assert streamer.stop() == 0
    took = time.monotonic() - stopped_at
    assert took < 5, f"{took:.1f}s to stop"
    done = summaries(records_of(dest))
    assert done and done[-1]["payload"]["reason"] == "shutdown" and done[-1]["payload"]["complete"] is False
    report("backfill: SIGTERM during a hung request", seconds_to_exit=round(took, 2))


def test_a_wildcard_topic_is_named_unrecoverable_and_the_explicit_ones_are_filled(mock_server, spawn, tmp_path):
    rest_url = lossy(mock_server, lose=80)
    dest = tmp_path / "wildcard.ndjson"
    streamer = backfilling(spawn, rest_url, dest, subscription="T.*,Q.AAPL")
    wait_for(lambda: summaries(so_far(dest)), timeout=40, what="the summary")
    assert streamer.stop() == 0
    payload = summaries(records_of(dest))[0]["payload"]
    assert payload["complete"] is False and payload["reason"] == "wildcard"
    assert "flat files" in payload["detail"]
    by_topic = {t["topic"]: t for t in payload["topics"]}
    assert by_topic["T.*"]["reason"] == "wildcard" and by_topic["Q.AAPL"]["complete"] is True
    assert by_topic["Q.AAPL"]["recovered"] > 0


def test_reprocess_of_a_capture_delivers_the_backfilled_records_again(mock_server, spawn, tmp_path):
    rest_url = lossy(mock_server, lose=80, cut=600)
    live, capture = tmp_path / "live.ndjson", tmp_path / "live.capture"
    streamer = backfilling(spawn, rest_url, live, SINK="ndjson,capture", CAPTURE_DEST=str(capture))
    wait_for(lambda: len(summaries(so_far(live))) >= 2, timeout=40, what="two summaries")
    assert streamer.stop() == 0
    out = tmp_path / "reprocessed.ndjson"
    result = reprocess(capture, "--sink", "ndjson", "--ndjson-dest", out)
    assert result.returncode == 0, result.stderr
    live_lines = live.read_text().splitlines()
    assert out.read_text().splitlines() == live_lines
    assert any('"backfill":true' in line for line in live_lines)
    assert "backfill_summary" in capture.read_text()


def test_backfill_settings_are_checked_in_one_line():
    def error(**raw):
        with pytest.raises(ConfigError) as caught:
            build_config(dict(raw), require_key=False)
        return str(caught.value)

    assert "BACKFILL (--backfill) 'ticks'" in error(backfill="ticks")
    assert "POLYGON_REST_URL" in error(rest_url="ftp://x")
    assert "BACKFILL_MAX_RPS" in error(backfill_max_rps="0")
    assert build_config({"backfill": "trades, aggs"}, require_key=False).backfill == ("trades", "aggs")
    assert build_config({"backfill": "on"}, require_key=False).backfill == ("trades", "quotes", "aggs")
    assert build_config({}, require_key=False).backfill == ()
    result = subprocess.run([sys.executable, "-m", "polygon_streamer", "config", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin", "POLYGON_API_KEY": "k", "BACKFILL": "everything"})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- pure parts ---------------------------------------------------------------------------------------------------

def test_rest_results_become_the_websocket_events_letters():
    trade = {"conditions": [12, 37], "exchange": 11, "id": "52983525034825", "price": 171.55, "sequence_number": 1063,
             "sip_timestamp": 1690000000123456789, "size": 100, "tape": 3, "trf_id": 202,
             "trf_timestamp": 1690000000122000000, "participant_timestamp": 1690000000120000000}
    assert mapping.to_event("stocks", "T", "trades", "AAPL", trade) == {
        "ev": "T", "sym": "AAPL", "x": 11, "i": "52983525034825", "z": 3, "p": 171.55, "s": 100, "c": [12, 37],
        "q": 1063, "trfi": 202, "trft": 1690000000122, "t": 1690000000123}
    quote = {"ask_exchange": 12, "ask_price": 171.6, "ask_size": 2, "bid_exchange": 11, "bid_price": 171.5,
             "bid_size": 3, "conditions": [1], "indicators": [604], "sequence_number": 7, "sip_timestamp":
             1690000000001000000, "tape": 3}
    assert mapping.to_event("stocks", "Q", "quotes", "MSFT", quote) == {
        "ev": "Q", "sym": "MSFT", "bx": 11, "bp": 171.5, "bs": 3, "ax": 12, "ap": 171.6, "as": 2, "c": 1,
        "i": [604], "q": 7, "z": 3, "t": 1690000000001}
    bar = {"v": 500, "vw": 10.5, "o": 10, "c": 11, "h": 12, "l": 9, "t": 1690000020000, "n": 7}
    assert mapping.to_event("stocks", "AM", "aggs", "SPY", bar) == {
        "ev": "AM", "sym": "SPY", "o": 10, "h": 12, "l": 9, "c": 11, "v": 500, "vw": 10.5, "n": 7,
        "s": 1690000020000, "e": 1690000080000}
    crypto = {"exchange": 1, "id": "991", "price": 30000.5, "size": 0.01, "conditions": [2],
              "sip_timestamp": 1690000000000000000}
    assert mapping.to_event("crypto", "XT", "trades", "BTC-USD", crypto)["pair"] == "BTC-USD"
    for bad in (None, 42, [], {}, {"sip_timestamp": "x", "price": 1}, {"sip_timestamp": 1, "price": "1"},
                {"sip_timestamp": -5, "price": 1.0}):
        assert mapping.to_event("stocks", "T", "trades", "AAPL", bad) is None
    assert mapping.to_event("stocks", "AM", "aggs", "SPY", {"t": "soon", "c": 1}) is None


def test_the_identity_of_an_event_is_the_same_live_and_over_rest():
    live = {"ev": "XT", "pair": "BTC-USD", "p": 30000.5, "t": 1690000000000, "s": 0.01, "c": [2], "i": 991, "x": 1}
    rest = mapping.to_event("crypto", "XT", "trades", "BTC-USD", {"exchange": 1, "id": "991", "price": 30000.5,
                                                                   "size": 0.01, "sip_timestamp": 1690000000000999999})
    assert mapping.identity("trades", False, live) == mapping.identity("trades", False, rest)
    assert mapping.identity("trades", True, {"q": 5, "p": 1}) == mapping.identity("trades", True, {"q": 5, "p": 2})
    path, params = mapping.request("stocks", "T", "trades", "AAPL", 1000, 2000)
    assert path == "/v3/trades/AAPL" and params["timestamp.gte"] == 1000 * 10**6
    assert params["timestamp.lte"] == 2000 * 10**6 + 999_999 and params["order"] == "asc"
    assert params["limit"] == 50_000
    assert mapping.request("crypto", "XA", "aggs", "BTC-USD", 60_000, 120_000)[0] == \
        "/v2/aggs/ticker/X:BTCUSD/range/1/minute/60000/120000"


def test_a_next_url_on_another_host_is_refused_and_retry_after_is_bounded():
    import threading

    client = RestClient("https://api.massive.com", "KEY", 10, threading.Event())
    assert client._same_host("https://api.massive.com/v3/trades/AAPL?cursor=abc", "/v3") == \
        "/v3/trades/AAPL?cursor=abc"
    with pytest.raises(RestError) as caught:
        client._same_host("https://evil.example/v3/trades/AAPL?cursor=abc", "/v3/trades/AAPL")
    assert "another host" in caught.value.detail and "KEY" not in caught.value.detail
    assert RestClient._retry_after("3") == 3.0 and RestClient._retry_after("99999") == 60.0
    assert RestClient._retry_after(None) == 0.0 and RestClient._retry_after("garbage") == 0.0
    assert json.dumps(jobs.REASONS)


def test_a_window_that_could_not_remember_every_live_event_delivers_nothing_and_says_so(monkeypatch):
    import queue

    from polygon_streamer.normalize import FrameNormalizer
    from polygon_streamer.subscriptions import Subscriptions

    monkeypatch.setattr(jobs, "SEEN_LIMIT", 2)
    normalizer = FrameNormalizer("stocks", "ingest-1", "0.2.0")
    desk = backfill.Desk("stocks", ("trades",), normalizer, Subscriptions(["T.AAPL"], "SUBSCRIPTION"),
                         jobs.BackfillStats(), queue.Queue(4))
    emitted = []
    desk.gap("disconnect", 1, 1000, 2000, lambda note, ms: emitted.append(note))
    window = desk.open_jobs[0].windows[0]
    for q in range(1, 5):  # live events after the hole, all inside the window
        normalizer.normalize(f'[{{"ev":"T","sym":"AAPL","p":1.0,"s":1,"t":{1000 + q},"q":{q}}}]', 3000)
    assert window.overflow
    desk.deliveries.put(jobs.Chunk(desk.open_jobs[0], window, [("q", 9)],
                                       ['{"ev":"T","sym":"AAPL","t":1001,"q":9}']))
    desk.deliver(lambda note, ms: emitted.append(note))
    assert emitted == [] and window.reason == "error" and "not delivered" in window.detail


# -- a hostile REST server (issue 34): nothing it answers can write wrong data or grow without bound ----------------

def one_cut(mock_server):
    """The local server cuts the first connection after 300 events (a gap that lost data), then streams on."""
    mock_server.options.rate = 2000
    mock_server.options.batch = 2
    mock_server.options.drop_after = 300


def hostile_backfill(spawn, mock_server, rest, dest, **settings):
    one_cut(mock_server)
    streamer = backfilling(spawn, rest.url, dest, subscription="T.AAPL", **settings)
    wait_for(lambda: mock_server.stats.connections >= 2, timeout=30, what="the cut")
    mock_server.options.drop_after = 0
    return streamer


def test_rest_results_outside_the_window_or_not_strict_json_are_counted_never_written(mock_server, spawn, tmp_path):
    from hostile_rest import HostileRest, page, trade, window_ms

    day = 86_400_000

    def answer(path, query):
        low, high = window_ms(query)
        results = [trade(low - day, 10**9 + 1), trade(high + day, 10**9 + 2)]  # a day either side
        results += [trade(low + n % max(1, high - low), 10**9 + 10 + n) for n in range(7)]
        text = page(results).decode()
        # NaN, 1e999 and a lone surrogate, as a server could spell them (the API never should)
        nasty = [ujson.dumps(trade(low, 10**9 + 3)).replace('"price":10.0', '"price":NaN'),
                 ujson.dumps(trade(low, 10**9 + 4)).replace('"size":100', '"size":1e999'),
                 ujson.dumps(trade(low, 10**9 + 5)).replace('"conditions":[12]', '"conditions":["\\ud800"]')]
        return 200, text.replace('"results":[', '"results":[' + ",".join(nasty) + ",", 1).encode()
    rest = HostileRest(answer)
    try:
        dest = tmp_path / "window.ndjson"
        streamer = hostile_backfill(spawn, mock_server, rest, dest)
        wait_for(lambda: every_gap_summarized(dest), timeout=30, what="a summary for every cut")
        recovered_metric = streamer.metric("polygon_backfill_events_total", kind="trades")
        assert streamer.stop() == 0
    finally:
        rest.stop()
    records = records_of(dest)  # every line strict JSON, valid against the schema
    done = [summary["payload"] for summary in summaries(records)]  # one per cut (the local server may cut twice)
    backfilled = [r for r in records if r.get("backfill")]
    assert len(backfilled) == 7 * len(done) == sum(s["recovered"] for s in done) == recovered_metric
    for summary in done:
        topic = summary["topics"][0]
        assert topic["recovered"] == 7 and summary["complete"] is True
        assert topic["skipped"] == {"outside_window": 2, "invalid": 0, "unencodable": 3, "filtered": 0}
        assert summary["skipped"] == topic["skipped"]
    windows = [(s["topics"][0]["from_ts"], s["topics"][0]["to_ts"]) for s in done]
    assert all(any(low <= r["ts"] <= high for low, high in windows) for r in backfilled)


def test_a_rest_chain_that_never_ends_or_repeats_its_cursor_is_bounded_and_said(mock_server, spawn, tmp_path):
    from hostile_rest import HostileRest, page, trade, window_ms

    served = {"pages": 0}

    def answer(path, query):
        if "cursor" in query:
            low, high = int(query["low"]), int(query["high"])
            n = int(query["cursor"])
        else:
            (low, high), n = window_ms(query), 0
        if path.endswith("/MSFT"):  # the same cursor again and again
            return 200, page([trade(low, 10**9 + n)], f"{path}?cursor=1&low={low}&high={high}")
        served["pages"] += 1
        results = [trade(low + (i % max(1, high - low + 1)), 10**9 + n * 5000 + i) for i in range(5000)]
        return 200, page(results, f"{path}?cursor={n + 1}&low={low}&high={high}")
    rest = HostileRest(answer)
    try:
        dest = tmp_path / "chain.ndjson"
        one_cut(mock_server)
        streamer = backfilling(spawn, rest.url, dest, subscription="T.AAPL,T.MSFT", BACKFILL_MAX_RPS="1000")
        wait_for(lambda: mock_server.stats.connections >= 2, timeout=30, what="the cut")
        mock_server.options.drop_after = 0
        wait_for(lambda: every_gap_summarized(dest), timeout=60, what="a summary for every cut")
        assert streamer.stop() == 0
    finally:
        rest.stop()
    # Only the summaries are read back (100,000 records through the schema would take longer than the test).
    done = [json.loads(line)["payload"] for line in dest.read_bytes().splitlines()
            if b'"type":"backfill","kind":"backfill"' in line]
    for summary in done:
        by_topic = {t["topic"]: t for t in summary["topics"]}
        endless, repeating = by_topic["T.AAPL"], by_topic["T.MSFT"]
        span = endless["to_ts"] - endless["from_ts"] + 1
        limit = mapping.PAGE_LIMIT + span * jobs.EVENTS_PER_MS
        assert endless["reason"] == "limit" and endless["recovered"] <= limit
        assert repeating["reason"] == "error" and repeating["recovered"] == 2 and "repeats" in summary["detail"]
        assert summary["complete"] is False and summary["reason"] == "error"
    assert sum(1 for path, _ in rest.requests if path.endswith("/MSFT")) == 2 * len(done), \
        "the repeated page is not asked"
    report("backfill: endless chain", pages=served["pages"], recovered=endless["recovered"], limit=limit)


def every_gap_summarized(dest) -> bool:
    """Every gap record of a cut has its summary (counted in the bytes: the file may hold many records)."""
    data = dest.read_bytes() if dest.exists() else b""
    cuts = data.count(b'"reason":"disconnect"')
    return bool(cuts) and data.count(b'"type":"backfill","kind":"backfill"') == cuts


def test_a_trickling_rest_answer_is_cut_at_the_request_deadline():
    import threading

    from hostile_rest import HostileRest, elapsed_since, page

    rest = HostileRest(lambda path, query: (200, page([])), trickle_secs=0.3)
    try:
        client = RestClient(rest.url, "KEY", 100, threading.Event(), timeout_secs=1.0)
        started = time.monotonic()
        with pytest.raises(RestError) as caught:
            list(client.pages("/v3/trades/AAPL", {}, deadline=time.monotonic() + 2.0, budget="the test's budget"))
        took = elapsed_since(started)
    finally:
        rest.stop()
    assert caught.value.reason == "limit" and "the test's budget ran out" in caught.value.detail
    assert took < 3.5, f"{took:.1f}s: each read waited less than 1 s, the answer must still end by the deadline"


def test_sigterm_during_a_trickling_answer_says_shutdown_not_error(mock_server, spawn, tmp_path):
    from hostile_rest import HostileRest, page

    rest = HostileRest(lambda path, query: (200, page([])), trickle_secs=0.5)
    try:
        dest = tmp_path / "trickle.ndjson"
        streamer = hostile_backfill(spawn, mock_server, rest, dest)
        wait_for(lambda: rest.requests, timeout=30, what="a backfill request")
        stopped_at = time.monotonic()
        assert streamer.stop() == 0
        assert time.monotonic() - stopped_at < 5
    finally:
        rest.stop()
    summary = summaries(records_of(dest))[-1]["payload"]
    assert summary["reason"] == "shutdown", summary


def test_the_hole_of_a_restart_is_healed_and_a_capture_of_it_reprocesses_the_same(mock_server, spawn, tmp_path):
    """STATE_DIR: the second run starts with a restart record; BACKFILL fills what the market did between the runs
    (the local server loses 300 events at the reconnect), so the two runs' files hold every event exactly once."""
    rest_url = lossy(mock_server, lose=300, cut=0)
    mock_server.options.drop_after = 0
    state = tmp_path / "state"
    state.mkdir()
    first, second, capture = tmp_path / "first.ndjson", tmp_path / "second.ndjson", tmp_path / "second.capture"
    run = backfilling(spawn, rest_url, first, STATE_DIR=str(state))
    wait_for(lambda: len(so_far(first)) >= 400, what="the first run's data")
    assert run.stop() == 0
    run = backfilling(spawn, rest_url, second, STATE_DIR=str(state), SINK="ndjson,capture",
                      CAPTURE_DEST=str(capture))
    wait_for(lambda: summaries(so_far(second)), timeout=40, what="the restart's backfill summary")
    assert run.stop() == 0
    one, two = records_of(first), records_of(second)
    assert two[0]["kind"] == "gap" and two[0]["payload"]["reason"] == "restart" and two[0]["seq"] == one[-1]["seq"] + 1
    summary = summaries(two)[0]["payload"]
    assert summary["gap_reason"] == "restart" and summary["complete"] is True and summary["recovered"] >= 300
    got: dict[tuple, list] = {}
    for record in one + two:
        if record["kind"] not in ("gap", "backfill"):
            got.setdefault((record["type"], record["symbol"]), []).append(record["payload"]["q"])
    for key, qs in got.items():
        assert sorted(qs) == list(range(1, max(qs) + 1)), f"{key}: every event exactly once across the restart"
    out = tmp_path / "reprocessed.ndjson"
    result = reprocess(capture, "--sink", "ndjson", "--ndjson-dest", out)
    assert result.returncode == 0, result.stderr
    assert out.read_text().splitlines() == second.read_text().splitlines(), "the restart record and seq too"


def test_a_gap_whose_rest_answers_never_end_spends_its_budget_and_the_next_gap_is_served(monkeypatch):
    """In process, over loopback: the first gap's windows each trickle until the topic's budget ends them, the gap's
    budget ends the rest ('limit'), and the gap queued behind it is then fetched and completes."""
    import queue
    import threading

    from hostile_rest import HostileRest, page, trade, window_ms
    from polygon_streamer.normalize import FrameNormalizer
    from polygon_streamer.subscriptions import Subscriptions

    monkeypatch.setattr(backfill_thread, "SETTLE_SECS", 0.0)
    monkeypatch.setattr(backfill_thread, "WINDOW_BUDGET_SECS", 1.0)
    monkeypatch.setattr(backfill_thread, "JOB_BUDGET_SECS", 2.5)
    slow = threading.Event()
    slow.set()

    def answer(path, query):
        low, high = window_ms(query)
        return 200, page([trade(low, 7)])
    rest = HostileRest(answer)
    fast_answer = rest.answer
    rest.answer = lambda path, query: (200, b" " * 200 + page([])) if slow.is_set() else fast_answer(path, query)
    rest.trickle_secs = 0.05
    config = build_config({"api_key": "k", "cluster": "stocks", "backfill": "trades", "rest_url": rest.url,
                           "backfill_max_rps": "100"}, require_key=False)
    normalizer = FrameNormalizer("stocks", "ingest-1", "0.3.0")
    desk = backfill.Desk("stocks", ("trades",), normalizer, Subscriptions(["T.AAPL", "T.MSFT", "T.NVDA", "T.AMD"],
                                                                          "SUBSCRIPTION"),
                         jobs.BackfillStats(), queue.Queue(4))
    thread = backfill.BackfillThread(config, desk, desk.stats)
    emitted = []
    now = time.time_ns() // 1_000_000
    desk.gap("disconnect", 1, now - 500, now, lambda note, ms: emitted.append(note))
    thread.start()
    try:
        started = time.monotonic()
        first = wait_for(lambda: next((item for item in list(desk.deliveries.queue) if item.__class__ is jobs.Done),
                                      None), timeout=10, what="the first gap's end")
        took = time.monotonic() - started
        slow.clear()
        rest.trickle_secs = 0.0
        desk.gap("disconnect", 2, now - 400, now, lambda note, ms: emitted.append(note))
        wait_for(lambda: sum(1 for item in list(desk.deliveries.queue) if item.__class__ is jobs.Done) == 2,
                 timeout=10, what="the second gap's end")
    finally:
        thread.stop()
        thread.join(5)
        rest.stop()
    reasons = [window.reason for window in first.job.windows]
    assert reasons[:2] == ["limit", "limit"] and set(reasons) == {"limit"}, reasons
    assert "budget" in first.job.windows[0].detail and "gap's backfill budget" in first.job.windows[-1].detail
    assert took < 4, f"{took:.1f}s for a gap budget of 2.5 s"
    second = [item for item in desk.deliveries.queue if item.__class__ is jobs.Done][1].job
    assert all(window.reason is None for window in second.windows), [w.reason for w in second.windows]
