"""The ZeroMQ sink with a real SUB socket on loopback."""

import threading

import pytest
import ujson
import zmq

from helpers import free_port, wait_for


class Subscriber:
    """A real SUB socket read by a thread; `stalled` keeps it from reading (its queue fills up)."""

    def __init__(self, endpoint, bind, topics=("",), rcvhwm=None, stalled=False):
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.SUB)
        if rcvhwm is not None:
            self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        for topic in topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.sock.bind(endpoint) if bind else self.sock.connect(endpoint)
        self.messages = []
        self.stalled = stalled
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while not self.done.is_set():
            if self.stalled:
                self.done.wait(0.05)
                continue
            if self.sock.poll(50):
                self.messages.append(self.sock.recv_multipart())

    def close(self):
        self.done.set()
        self.thread.join(5)
        self.sock.close(0)
        self.context.term()


@pytest.fixture
def run(spawn):
    subscribers = []

    def launch(**settings):
        return spawn(LOG_LEVEL="info,polygon_zmq=debug", **settings)

    def subscribe(*args, **kwargs):
        subscriber = Subscriber(*args, **kwargs)
        subscribers.append(subscriber)
        return subscriber

    yield launch, subscribe
    for subscriber in subscribers:
        subscriber.close()


def joined(streamer, count=1):
    """The XPUB has seen `count` subscriptions: from here on nothing is lost to ZeroMQ's slow joiner."""
    return lambda: sum(1 for r in streamer.logs() if r["fields"].get("message") == "subscription added") >= count


@pytest.mark.parametrize("streamer_binds", [True, False], ids=["streamer-binds", "streamer-connects"])
def test_every_event_arrives_with_its_topic_and_the_ndjson_payload(mock_server, run, tmp_path, streamer_binds):
    launch, subscribe = run
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    mock_server.streaming.clear()
    mock_server.options.count = 2000
    dest = tmp_path / "same.ndjson"
    if streamer_binds:
        streamer = launch(SINK="zmq,ndjson", ZMQ_ENDPOINT=endpoint, ZMQ_BIND="true", NDJSON_DEST=str(dest))
        wait_for(lambda: any("ZeroMQ bound" in m for m in streamer.log_messages()), what="the bind")
        subscriber = subscribe(endpoint, bind=False)
    else:
        subscriber = subscribe(endpoint, bind=True)
        streamer = launch(SINK="zmq,ndjson", ZMQ_ENDPOINT=endpoint, NDJSON_DEST=str(dest))
    wait_for(joined(streamer), what="the subscription to reach the XPUB")
    mock_server.streaming.set()
    wait_for(lambda: len(subscriber.messages) >= 2000, what="2000 messages")
    assert streamer.stop() == 0
    lines = dest.read_text().splitlines()
    assert [payload.decode() for _, payload in subscriber.messages] == lines, "payload = the NDJSON line"
    for topic, payload in subscriber.messages:
        record = ujson.loads(payload)
        assert topic.decode() == f"{record['type']}:{record['symbol']}"
    assert [ujson.loads(p)["seq"] for _, p in subscriber.messages] == list(range(1, 2001))


def test_topic_prefix_and_subscriber_side_filtering(mock_server, run):
    launch, subscribe = run
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    mock_server.streaming.clear()
    mock_server.options.count = 1000
    subscriber = subscribe(endpoint, bind=True, topics=("mkt.T:AAPL", "mkt.Q:M"))
    streamer = launch(SINK="zmq", SUBSCRIPTION="T.*,Q.*", ZMQ_ENDPOINT=endpoint, ZMQ_TOPIC_PREFIX="mkt.")
    wait_for(joined(streamer, 2), what="both subscriptions")
    mock_server.streaming.set()
    wait_for(lambda: streamer.metric("polygon_zmq_sent_total") >= 1000, what="1000 published")
    wait_for(lambda: {t for t, _ in subscriber.messages} == {b"mkt.T:AAPL", b"mkt.Q:MSFT", b"mkt.Q:META"},
             what="only the subscribed topics")
    assert streamer.stop() == 0
    assert all(t in (b"mkt.T:AAPL", b"mkt.Q:MSFT", b"mkt.Q:META") for t, _ in subscriber.messages)


def test_a_stalled_subscriber_causes_counted_drops_while_ndjson_gets_everything(mock_server, run, tmp_path):
    launch, subscribe = run
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    mock_server.streaming.clear()
    mock_server.options.rate = 0
    mock_server.options.batch = 20
    mock_server.options.count = 30000
    subscriber = subscribe(endpoint, bind=True, rcvhwm=100)
    dest = tmp_path / "all.ndjson"
    streamer = launch(SINK="zmq,ndjson", ZMQ_ENDPOINT=endpoint, ZMQ_SND_HWM="100", NDJSON_DEST=str(dest),
                      NDJSON_CHANNEL_CAP="100000", CHANNEL_CAP="100000")
    wait_for(joined(streamer), what="the subscription")
    # A subscriber that stops reading (a bound SUB attaches peers only while its thread uses the socket).
    subscriber.stalled = True
    mock_server.streaming.set()
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= 30000, timeout=60, what="NDJSON complete")
    wait_for(lambda: streamer.metric("polygon_zmq_sent_total") + streamer.metric("polygon_zmq_drops_total")
             >= 30000, what="every ZeroMQ event sent or counted as dropped")
    sent = streamer.metric("polygon_zmq_sent_total")
    dropped = streamer.metric("polygon_zmq_drops_total")
    assert dropped > 0 and sent + dropped == 30000
    assert any("high-water mark" in m for m in streamer.log_messages())
    subscriber.stalled = False
    wait_for(lambda: len(subscriber.messages) >= sent, what="the stalled subscriber to catch up")
    assert len(subscriber.messages) == sent, "what the socket accepted is exactly what arrived"
    assert streamer.stop() == 0
    assert len(dest.read_text().splitlines()) == 30000


def test_bad_endpoints_are_exit_2(mock_server, spawn):
    busy = zmq.Context.instance().socket(zmq.PUB)
    port = busy.bind_to_random_port("tcp://127.0.0.1")
    try:
        for settings, expected in [({"ZMQ_ENDPOINT": "tcp://nohost:1"}, "cannot resolve host"),
                                   ({"ZMQ_ENDPOINT": f"tcp://127.0.0.1:{port}", "ZMQ_BIND": "true"},
                                    "Address already in use")]:
            streamer = spawn(SINK="zmq", **settings)
            assert streamer.proc.wait(20) == 2
            streamer.stop()
            assert len(streamer.stderr_lines) == 1 and "ZMQ_ENDPOINT" in streamer.stderr_lines[0]
            assert expected in streamer.stderr_lines[0]
    finally:
        busy.close(0)
    assert mock_server.stats.connections == 0


def test_with_no_peer_the_service_says_so_in_metrics_health_and_the_stop_line(mock_server, run):
    launch, subscribe = run
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    streamer = launch(SINK="zmq", ZMQ_ENDPOINT=endpoint, ZMQ_BIND="false")
    wait_for(lambda: streamer.metric("polygon_zmq_sent_total") > 0, what="events published into the void")
    assert streamer.metric("polygon_zmq_peers") == 0
    status, text = streamer.get("/health")
    assert status == 200 and "degraded" in text and "no peer" in text, text
    # A subscriber binds there: one peer, healthy.
    subscriber = subscribe(endpoint, bind=True)
    wait_for(lambda: streamer.metric("polygon_zmq_peers") == 1, what="the peer counted")
    wait_for(lambda: subscriber.messages, what="messages at the subscriber")
    assert streamer.get("/health")[1].strip() == "OK"
    subscriber.close()
    wait_for(lambda: streamer.metric("polygon_zmq_peers") == 0, what="the peer gone")
    assert streamer.stop() == 0
    assert "no peer" in streamer.shutdown_report()["message"]
