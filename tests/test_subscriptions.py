"""Live subscriptions (SUBSCRIPTION_FILE, SIGHUP): the difference sent on the live connection, states per topic,
the whole set after a reconnect; against the local server, over loopback."""

import json
import signal
import subprocess
import sys

import pytest

from helpers import ROOT, records_in, wait_for
from polygon_streamer.subscriptions import CHUNK_TOPICS, SubscriptionFileError, chunks, parse_file


def topics_of(streamer):
    """GET /subscriptions; before the metrics port is up, an empty state."""
    try:
        status, text = streamer.get("/subscriptions")
    except OSError:
        return {"counts": {}, "topics": {}}
    assert status == 200
    return json.loads(text)


def records(path, writing=False):
    return records_in(path, writing)


def per_symbol_q(lines, wanted):
    out = {}
    for record in lines:
        if record["kind"] != "gap" and (record["type"], record["symbol"]) in wanted:
            out.setdefault((record["type"], record["symbol"]), []).append(record["payload"]["q"])
    return out


def test_sighup_sends_the_difference_on_the_live_connection(mock_server, spawn, tmp_path):
    mock_server.options.record = True
    mock_server.options.refuse_topics = ("Q.TSLA",)
    topics = tmp_path / "stocks.topics"
    topics.write_text("# what we stream\nT.AAPL\nT.MSFT   # keep\n\nQ.AAPL\n")
    dest = tmp_path / "stocks.ndjson"
    streamer = spawn(SUBSCRIPTION_FILE=str(topics), SINK="ndjson", NDJSON_DEST=str(dest),
                     NDJSON_FLUSH_INTERVAL_MS="50")
    streamer.wait_ready()
    state = topics_of(streamer)
    assert state["source"] == str(topics) and state["counts"] == {"pending": 0, "active": 3, "refused": 0}
    wait_for(lambda: len(records(dest, writing=True)) >= 60, what="the first set streaming")
    # Remove Q.AAPL, add T.NVDA and a topic the server refuses; T.AAPL and T.MSFT untouched.
    topics.write_text("T.AAPL\nT.MSFT\nT.NVDA\nQ.TSLA\n")
    streamer.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: topics_of(streamer)["counts"] == {"pending": 0, "active": 3, "refused": 1},
             what="the new set acknowledged")
    state = topics_of(streamer)["topics"]
    assert state["Q.TSLA"] == {"state": "refused", "message": "not authorized"} and "Q.AAPL" not in state
    assert mock_server.stats.unsubscribes == ["Q.AAPL"] and mock_server.stats.subscribes[-1] == "T.NVDA,Q.TSLA"
    assert mock_server.stats.connections == 1, "no reconnect"
    assert streamer.metric("polygon_subscriptions", state="refused") == 1
    count = len(records(dest, writing=True))
    wait_for(lambda: len(records(dest, writing=True)) >= count + 120, what="streaming on with the new set")
    # A bad file keeps the running set.
    topics.write_text("T.AAPL\nnot a topic\n")
    streamer.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any("stocks.topics:2: 'not a topic'" in m for m in streamer.log_messages()),
             what="the bad line reported")
    assert set(topics_of(streamer)["topics"]) == {"T.AAPL", "T.MSFT", "T.NVDA", "Q.TSLA"}
    # The table for an operator.
    table = subprocess.run([sys.executable, "-m", "polygon_streamer", "subscriptions", "--metrics-addr",
                            streamer.metrics_url.split("//")[1]], cwd=ROOT, capture_output=True, text=True,
                           timeout=30)
    assert table.returncode == 0 and "Q.TSLA" in table.stdout and "refused   not authorized" in table.stdout
    assert "4 topic(s) from" in table.stdout
    assert streamer.stop() == 0
    lines = records(dest)
    # Untouched topics: no gap and no duplicate, by the server's own per-symbol q.
    for stream, qs in per_symbol_q(lines, {("T", "AAPL"), ("T", "MSFT")}).items():
        assert qs == list(range(1, len(qs) + 1)), stream
    # Removed topics stop; added ones start.
    last_q_aapl = max(i for i, r in enumerate(lines) if (r["type"], r["symbol"]) == ("Q", "AAPL"))
    first_nvda = min(i for i, r in enumerate(lines) if (r["type"], r["symbol"]) == ("T", "NVDA"))
    assert last_q_aapl < first_nvda + 10 and len(lines) - first_nvda > 100
    assert not any(r["symbol"] == "TSLA" for r in lines)


def test_a_reconnect_subscribes_to_the_current_set(mock_server, spawn, tmp_path):
    topics = tmp_path / "topics"
    topics.write_text("T.AAPL\n")
    mock_server.options.drop_after = 200
    streamer = spawn(SUBSCRIPTION_FILE=str(topics))
    streamer.wait_ready()
    topics.write_text("T.AAPL\nQ.MSFT\n")
    streamer.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: mock_server.stats.connections >= 3, what="reconnects after the change")
    wait_for(lambda: topics_of(streamer)["counts"].get("active") == 2, what="both active again")
    assert mock_server.stats.subscribes[0] == "T.AAPL"
    assert mock_server.stats.subscribes[-1] == "T.AAPL,Q.MSFT", "the whole current set, in one message"
    assert streamer.stop() == 0


def test_ready_needs_an_acknowledged_topic(mock_server, spawn):
    mock_server.options.not_authorized_codes = ("T",)
    streamer = spawn(SUBSCRIPTION="T.AAPL")
    wait_for(lambda: topics_of(streamer)["counts"].get("refused") == 1, what="the refusal")
    status, text = streamer.get("/ready")
    assert status == 503 and "no topic acknowledged" in text
    assert streamer.stop() == 0


def test_the_file_format_and_chunks():
    assert parse_file("T.AAPL\n# c\n\n  Q.* # all\nT.AAPL\n") == ["T.AAPL", "Q.*"]
    with pytest.raises(SubscriptionFileError, match=r"f:2: 'T AAPL'"):
        parse_file("T.AAPL\nT AAPL\n", "f")
    with pytest.raises(SubscriptionFileError, match="no topic"):
        parse_file("# nothing\n", "f")
    many = [f"T.S{index}" for index in range(CHUNK_TOPICS * 2 + 1)]
    sent = chunks(many)
    assert len(sent) == 3 and ",".join(sent).split(",") == many


def test_a_bad_subscription_file_at_start_is_exit_2(tmp_path):
    path = tmp_path / "topics"
    path.write_text("T.AAPL\nXT BTC\n")
    result = subprocess.run([sys.executable, "-m", "polygon_streamer", "config", "--subscription-file", str(path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and f"{path}:2: 'XT BTC'" in result.stderr


def test_a_ten_megabyte_subscription_file_subscribes_whole_and_the_data_flows(mock_server, spawn, tmp_path):
    """953,252 topics (10 MB, under the 64 MB limit): the messages go out between reads of the server's acks, so
    neither side waits for the other; every topic becomes active on one connection and data flows."""
    count = 953_252
    topics = tmp_path / "huge.topics"
    topics.write_text("".join(f"T.S{n:07d}\n" for n in range(count)))
    assert topics.stat().st_size >= 10_000_000
    mock_server.options.rate = 500
    dest = tmp_path / "huge.ndjson"
    streamer = spawn(SUBSCRIPTION_FILE=str(topics), SINK="ndjson", NDJSON_DEST=str(dest), READ_TIMEOUT_SECS="30")

    def active():
        try:
            return streamer.metric("polygon_subscriptions", state="active")
        except AssertionError:
            return 0
    wait_for(lambda: active() == count, timeout=120, interval=0.5, what="every topic acknowledged")
    wait_for(lambda: dest.exists() and dest.stat().st_size > 10_000, timeout=30, what="data")
    status, text = streamer.get("/health")
    assert status == 200 and "not subscribed" not in text, text
    assert mock_server.stats.connections == 1, "one session: nothing timed out"
    assert len(mock_server.stats.subscribes) == -(-count // CHUNK_TOPICS)
    acks = [m for m in streamer.log_messages() if "topic(s) acknowledged" in m]
    assert len(acks) <= len(mock_server.stats.subscribes), "one line per message of acks, not one per topic"
    assert streamer.stop() == 0


def test_a_subscription_the_server_does_not_take_is_said_in_health(mock_server, spawn, tmp_path):
    topics = tmp_path / "big.topics"
    topics.write_text("".join(f"T.S{n:07d}\n" for n in range(300_000)))  # more than the socket buffers hold
    mock_server.options.deaf_after_auth = True
    streamer = spawn(SUBSCRIPTION_FILE=str(topics), READ_TIMEOUT_SECS="1")

    def health():
        try:
            return streamer.get("/health")
        except OSError:
            return 0, ""
    status, text = wait_for(lambda: (lambda answer: answer if "not subscribed" in answer[1] else None)(health()),
                            timeout=30, what="/health naming the unsent subscription")
    assert status == 200 and "not taken by the server" in text, text
    assert streamer.stop() == 0
