"""SINK=gateway: unchanged Polygon clients share the service's connection (issue 36), over loopback with the real
service, the local server, the official client and websocket-client."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import websocket

from helpers import ROOT, TEST_KEY, cpu_seconds, free_port, records_in, report, wait_for

from polygon_streamer.capture_format import CAPTURE_LINE

OFFICIAL = r"""
import asyncio, sys
from massive import WebSocketClient

client = WebSocketClient(api_key=sys.argv[2], feed=sys.argv[1], market="stocks", secure=False, raw=True,
                         subscriptions=sys.argv[3].split(","), max_reconnects=0)

async def handle(message):
    text = message.decode() if isinstance(message, bytes) else message
    print(text, flush=True)

asyncio.run(client.connect(handle))
"""


def start_official(port: int, topics: str, key: str = TEST_KEY) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", OFFICIAL, f"127.0.0.1:{port}", key, topics], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines: list[str] = []

    def collect():
        for raw in iter(proc.stdout.readline, b""):
            lines.append(raw.decode())
    threading.Thread(target=collect, daemon=True).start()
    return proc, lines


class Client:
    """A plain WebSocket client of the gateway (websocket-client), reading on a thread of its own."""

    def __init__(self, port: int, key: str | None = TEST_KEY, cluster: str = "stocks", read: bool = True):
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}/{cluster}", timeout=10,
                                              sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)] if not read
                                              else [])
        self.messages: list[dict] = []
        self.texts: list[str] = []  # each text message as it came
        self.closed: tuple | None = None
        self.messages += json.loads(self.ws.recv())
        if key is not None:
            self.ws.send(json.dumps({"action": "auth", "params": key}))
            self.messages += json.loads(self.ws.recv())
        if read:
            self.ws.settimeout(None)  # a quiet market is not an error: it reads until the close
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                opcode, data = self.ws.recv_data(control_frame=True)
            except (websocket.WebSocketException, OSError) as exc:
                self.closed = ("error", str(exc))
                return
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self.closed = (int.from_bytes(data[:2], "big") if len(data) >= 2 else None, data[2:].decode())
                return
            if opcode == websocket.ABNF.OPCODE_TEXT:
                self.texts.append(data.decode())
                self.messages += json.loads(data)

    def send(self, action: str, params: str) -> None:
        self.ws.send(json.dumps({"action": action, "params": params}))

    def statuses(self) -> list[dict]:
        return [message for message in list(self.messages) if message.get("ev") == "status"]

    def events(self) -> list[dict]:
        return [message for message in list(self.messages) if message.get("ev") != "status"]

    def data_texts(self) -> list[str]:
        """The data messages' texts, as they came."""
        return [text for text in list(self.texts) if '"ev":"status"' not in text]


def try_client(port: int, **options) -> "Client | None":
    """A client, or None while the gateway turns it away (a slot or a descriptor not free yet)."""
    try:
        return Client(port, **options)
    except (websocket.WebSocketException, OSError):
        return None


def listening(streamer) -> bool:
    try:
        return ("polygon_gateway_connections_total", ()) in streamer.metrics()
    except OSError:
        return False


def clients(streamer) -> dict[str, float]:
    """polygon_gateway_clients by key name."""
    return {dict(labels)["client"]: value for (name, labels), value in streamer.metrics().items()
            if name == "polygon_gateway_clients"}


def gateway_env(tmp_path, port: int, **settings) -> dict:
    return {"SINK": "ndjson,gateway", "NDJSON_DEST": str(tmp_path / "out.ndjson"), "GATEWAY_ADDR": f"127.0.0.1:{port}",
            **settings}


def test_the_official_client_gets_every_event_of_its_topics_as_polygon_sent_them_and_each_hole(
        mock_server, spawn, tmp_path):
    # (the official client is a pip test extra: Debian does not package it, so the package build's run skips this)
    pytest.importorskip("massive", reason="the official client (pip install '.[test]') is not installed")
    mock_server.options.count = 400
    mock_server.options.drop_after = 200  # the first upstream connection is cut: a hole, then a reconnect
    mock_server.streaming.clear()          # data waits for the client
    port = free_port()
    streamer = spawn(**gateway_env(tmp_path, port))
    wait_for(lambda: listening(streamer), what="the gateway to listen")
    official, lines = start_official(port, "T.*")
    try:
        wait_for(lambda: streamer.metric("polygon_gateway_client_topics") == 1, timeout=20,
                 what="the official client subscribed")
        mock_server.streaming.set()
        out = tmp_path / "out.ndjson"
        wait_for(lambda: sum(1 for r in records_in(out, writing=True) if r["kind"] != "gap") >= 600, timeout=30,
                 what="two upstream sessions written")
        # The stop: every client gets what was queued for it, then a close 1001, and the official client returns.
        assert streamer.stop() == 0
        official.wait(20)
    finally:
        if official.poll() is None:
            official.kill()
            official.wait(5)
    records = records_in(out)
    trades = [r for r in records if r["type"] == "T"]
    received = [m for line in lines for m in json.loads(line)]
    events = [m for m in received if m.get("ev") != "status"]
    assert events == [r["payload"] for r in trades], "every trade once, in order, as Polygon sent it; nothing else"
    gaps = [index for index, m in enumerate(received) if m.get("status") == "gap"]
    gap_records = [r for r in records if r["kind"] == "gap"]
    assert len(gaps) == len(gap_records) and any(r["payload"]["reason"] == "disconnect" for r in gap_records), \
        "each hole told once"
    for index, record in zip(gaps, gap_records):
        assert received[index]["reason"] == record["payload"]["reason"]
        before_hole = sum(1 for r in trades if r["seq"] < record["seq"])
        assert sum(1 for m in received[:index] if m.get("ev") == "T") == before_hole, "in order with the data"
    report("gateway: official client", events=len(events), gap_statuses=len(gaps))


def test_each_frame_goes_out_as_it_came_or_as_its_matching_events(mock_server, spawn, tmp_path):
    # Frames of 5 events, every 4th with a status object in its middle (not every element an event of the topics)
    mock_server.options.count = 1000
    mock_server.options.status_in_data_every = 4
    mock_server.streaming.clear()
    port = free_port()
    capture = tmp_path / "wire.capture"
    streamer = spawn(**gateway_env(tmp_path, port, SINK="ndjson,gateway,capture", CAPTURE_DEST=str(capture),
                                   SUBSCRIPTION="T.*,Q.*"))
    wait_for(lambda: listening(streamer), what="the gateway to listen")
    everything, trades = Client(port), Client(port)
    everything.send("subscribe", "T.*,Q.*")
    trades.send("subscribe", "T.*")
    wait_for(lambda: streamer.metric("polygon_gateway_client_topics") == 3, what="both subscribed")
    mock_server.streaming.set()
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= 1000, timeout=30, what="every event")
    assert streamer.stop() == 0
    frames = []  # each data frame's bytes, as the capture kept them (byte for byte)
    for line in capture.read_bytes().split(b"\n")[:-1]:
        match = CAPTURE_LINE.match(line)
        assert match
        if match.group(4) == b"frame" and any(e["ev"] != "status" for e in json.loads(line)["frame"]):
            frames.append(line[match.end():-1])
    assert len(frames) == 200, len(frames)
    whole = [frame for frame in frames if b'"ev":"status"' not in frame]
    mixed = [frame for frame in frames if b'"ev":"status"' in frame]
    assert len(mixed) == 50
    got = everything.data_texts()
    assert len(got) == len(frames), "one message per frame"
    for frame, text in zip(frames, got):
        if frame in whole:
            assert text.encode() == frame, "a frame whose events all match: the same bytes"
        else:  # the events' JSON as received, without the status object
            events = [part for part in frame[2:-2].split(b"},{") if not part.startswith(b'"ev":"status"')]
            assert text.encode() == b"[{" + b"},{".join(events) + b"}]"
    expected = [[e for e in json.loads(frame) if e["ev"] == "T"] for frame in frames]
    expected = [events for events in expected if events]
    assert [json.loads(text) for text in trades.data_texts()] == expected, \
        "the matching events of each frame, one message"
    report("gateway: frames as received", frames=len(frames), same_bytes=len(whole), matching_events=len(mixed))


def test_a_busy_feed_is_one_write_an_interval_a_lone_message_goes_at_once_and_order_holds(mock_server, spawn,
                                                                                           tmp_path):
    # A busy feed (200 frames/s) with GATEWAY_SEND_INTERVAL_MS=200: a client gets about 5 writes a second, not 200;
    # the client that adds Q.* while its trades wait still gets everything in the order received.
    mock_server.options.rate = 1000
    mock_server.options.count = 2000
    mock_server.streaming.clear()
    port = free_port()
    streamer = spawn(**gateway_env(tmp_path, port, GATEWAY_SEND_INTERVAL_MS="200", SUBSCRIPTION="T.*,Q.*"))
    wait_for(lambda: listening(streamer), what="the gateway to listen")
    full, mover = Client(port), Client(port)
    full.send("subscribe", "T.*,Q.*")
    mover.send("subscribe", "T.*")
    wait_for(lambda: streamer.metric("polygon_gateway_client_topics") == 3, what="subscribed")
    mock_server.streaming.set()
    out = tmp_path / "out.ndjson"
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= 1000, timeout=30, what="half the events")
    mover.send("subscribe", "Q.*")
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= 2000, timeout=30, what="every event")
    wait_for(lambda: len(full.events()) >= 2000, timeout=10, what="the full client's events")
    records = [r for r in records_in(out, writing=True) if r["kind"] != "gap"]
    assert full.events() == [r["payload"] for r in records]
    moved = mover.events()
    quotes = {(m["sym"], m["q"]) for m in moved if m["ev"] == "Q"}
    assert moved == [r["payload"] for r in records
                     if r["type"] == "T" or (r["payload"]["sym"], r["payload"]["q"]) in quotes], \
        "in the order received, across the change of topics"
    assert moved[-1] == records[-1]["payload"] and any(m["ev"] == "Q" for m in moved)
    writes, messages = streamer.metric("polygon_gateway_writes_total"), streamer.metric(
        "polygon_gateway_frames_sent_total")
    assert writes <= 2 * (2 / 0.2 + 4), (writes, messages)  # two clients, a write each 200 ms (+ acks' edges)
    assert messages >= 2 * 300
    assert streamer.stop() == 0
    # A quiet feed (an event every 500 ms): every message goes at once, a write each.
    mock_server.options.rate = 2
    mock_server.options.count = 5
    mock_server.options.batch = 1
    port = free_port()
    quiet = spawn(**gateway_env(tmp_path, port, GATEWAY_SEND_INTERVAL_MS="200", NDJSON_DEST=str(tmp_path / "q")))
    wait_for(lambda: listening(quiet), what="the gateway to listen")
    lone = Client(port)
    lone.send("subscribe", "T.*,Q.*")
    wait_for(lambda: len(lone.events()) >= 5, timeout=20, what="five lone events, 500 ms apart")
    assert quiet.metric("polygon_gateway_writes_total") == quiet.metric("polygon_gateway_frames_sent_total") == 5
    assert quiet.stop() == 0
    report("gateway: send interval", busy_writes=writes, busy_messages=messages)


def test_keys_by_name_topics_the_upstream_lacks_unsubscribe_and_bad_input(mock_server, spawn, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# the team's programs\nalice alice-key-123\n\nbob bob-key-456  # the notebook\n")
    mock_server.options.rate = 1000
    port = free_port()
    streamer = spawn(**gateway_env(tmp_path, port, GATEWAY_KEYS_FILE=str(keys), GATEWAY_UPSTREAM="fixed"))
    wait_for(lambda: listening(streamer), what="the gateway to listen")
    stranger = Client(port, key=TEST_KEY, read=False)  # the service's own key is not one of the file's
    assert stranger.messages[-1]["status"] == "auth_failed"
    with pytest.raises((websocket.WebSocketException, OSError)):
        stranger.ws.recv()
    alice = Client(port, key="alice-key-123")
    assert alice.messages[-1] == {"ev": "status", "status": "auth_success", "message": "authenticated"}
    alice.send("subscribe", "T.AAPL,Z.FOO,nonsense")
    wait_for(lambda: len(alice.statuses()) >= 5, what="the acks and refusals")
    texts = [m["message"] for m in alice.statuses()[2:5]]
    assert texts[0] == "subscribed to: T.AAPL"
    assert texts[1].startswith("not subscribed upstream: Z.FOO") and texts[2].startswith("invalid topic")
    wait_for(lambda: len(alice.events()) >= 20, what="AAPL trades")
    assert {(m["ev"], m["sym"]) for m in alice.events()} == {("T", "AAPL")}
    alice.ws.send("this is not json {")
    wait_for(lambda: any(m["message"] == "Invalid JSON" for m in alice.statuses()), what="the error status")
    alice.send("unsubscribe", "T.AAPL")
    wait_for(lambda: any(m["message"] == "unsubscribed to: T.AAPL" for m in alice.statuses()), what="the ack")
    wait_for(lambda: streamer.metric("polygon_gateway_client_topics") == 0, what="no topic held")
    assert streamer.metric("polygon_gateway_auth_failures_total") == 1
    assert clients(streamer) == {"alice": 1, "bob": 0}
    status, body = streamer.get("/subscriptions")
    assert status == 200 and json.loads(body)["sinks"]["gateway"]["clients"] == {"alice": []}
    assert not any(key in streamer.all_output() for key in ("alice-key-123", "bob-key-456")), "keys never logged"
    assert any("gateway client alice connected" in m for m in streamer.log_messages()), "known by name"
    # SIGHUP with alice's key gone: she is closed; the file's errors keep the keys as they were
    keys.write_text("bob bob-key-456\n")
    streamer.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: alice.closed is not None, what="alice closed")
    assert streamer.stop() == 0


def test_a_client_that_reads_nothing_is_disconnected_and_no_one_else_loses_anything(mock_server, spawn, tmp_path):
    mock_server.options.rate = 20_000
    mock_server.options.batch = 50
    mock_server.options.count = 60_000
    mock_server.streaming.clear()
    port = free_port()
    streamer = spawn(**gateway_env(tmp_path, port, GATEWAY_CLIENT_QUEUE="256"))
    wait_for(lambda: listening(streamer), what="the gateway to listen")
    reader = Client(port)
    reader.send("subscribe", "T.MSFT")
    deaf = Client(port, read=False)
    deaf.send("subscribe", "T.*")
    wait_for(lambda: streamer.metric("polygon_gateway_client_topics") == 2, what="both subscribed")
    mock_server.streaming.set()
    out = tmp_path / "out.ndjson"
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= 60_000, timeout=60, what="every event written")
    slow = {"reason": "slow_consumer"}
    wait_for(lambda: streamer.metric("polygon_gateway_disconnects_total", **slow) >= 1, timeout=20,
             what="the deaf client disconnected")
    assert streamer.metric("polygon_gateway_disconnects_total", **slow) == 1, "the reading client was not"
    msft = [r["payload"] for r in records_in(out) if r["type"] == "T" and r["symbol"] == "MSFT"]
    wait_for(lambda: len(reader.events()) >= len(msft), timeout=20, what="the reading client's trades")
    assert reader.events() == msft and reader.closed is None
    assert clients(streamer) == {"default": 1}
    status, text = streamer.get("/health")
    assert status == 200 and text.startswith("OK (") and \
        f"gateway: 1 client on ws://127.0.0.1:{port}/stocks, 1 disconnected as slow" in text, text
    assert streamer.stop() == 0
    wait_for(lambda: reader.closed is not None, what="the close at the stop")
    assert reader.closed[0] == 1001
    report("gateway: a deaf client", written=60_000, reader_events=len(msft), slow_disconnects=1)


def test_a_non_loopback_address_needs_a_keys_file(mock_server, spawn, tmp_path):
    streamer = spawn(SINK="gateway", GATEWAY_ADDR=f"0.0.0.0:{free_port()}")
    assert streamer.proc.wait(20) == 2
    errors = [line for line in streamer.stderr_lines if "GATEWAY" in line]
    assert len(errors) == 1 and "GATEWAY_KEYS_FILE" in errors[0] and TEST_KEY not in streamer.all_output()


def test_with_drop_a_client_that_pauses_loses_only_what_it_is_told_of(mock_server, spawn, tmp_path):
    mock_server.options.rate = 20_000
    mock_server.options.batch = 50
    mock_server.options.count = 80_000
    mock_server.streaming.clear()
    port = free_port()
    streamer = spawn(**gateway_env(tmp_path, port, GATEWAY_CLIENT_QUEUE="64", GATEWAY_SLOW_CLIENT="drop"))
    wait_for(lambda: listening(streamer), what="the gateway to listen")
    paused = Client(port, read=False)
    paused.send("subscribe", "T.*")
    wait_for(lambda: streamer.metric("polygon_gateway_client_topics") == 1, what="subscribed")
    mock_server.streaming.set()
    wait_for(lambda: streamer.metric("polygon_gateway_dropped_events_total") > 0, timeout=20, what="drops")
    paused.ws.settimeout(None)
    threading.Thread(target=paused._read, daemon=True).start()  # it reads again
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= 80_000, timeout=60, what="every event")
    dropped = streamer.metric("polygon_gateway_dropped_events_total")

    def told():
        return sum(m["dropped_events"] for m in paused.statuses() if m["status"] == "gap")
    wait_for(lambda: len(paused.events()) + told() >= 80_000, timeout=20,
             what=lambda: f"received + told = every event ({len(paused.events())} + {told()}, dropped {dropped})")
    assert len(paused.events()) + told() == 80_000 and told() == dropped and paused.closed is None
    assert all(m["reason"] == "slow_client" for m in paused.statuses() if m["status"] == "gap")
    assert streamer.metric("polygon_gateway_disconnects_total", reason="slow_consumer") == 0
    assert streamer.stop() == 0
    report("gateway: drop", received=len(paused.events()), dropped_and_told=int(dropped))


def test_strangers_are_bounded_a_big_message_a_wrong_cluster_and_the_client_cap(mock_server, spawn, tmp_path):
    port = free_port()
    streamer = spawn(**gateway_env(tmp_path, port, GATEWAY_MAX_CLIENTS="3"))
    wait_for(lambda: listening(streamer), what="the gateway to listen")
    held = [Client(port) for _ in range(3)]
    wait_for(lambda: sum(clients(streamer).values()) == 3, what="three clients")
    with pytest.raises((websocket.WebSocketException, OSError)):
        Client(port)
    wait_for(lambda: streamer.metric("polygon_gateway_refused_clients_total") == 1, what="the fourth refused")
    assert all(client.closed is None for client in held)
    for client in held:
        client.ws.close()

    # (a slot frees when the closed connection's thread ends)
    big = wait_for(lambda: try_client(port, read=False), what="a free slot")
    big.ws.send("x" * 1_000_000)
    opcode, data = big.ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 1009
    wrong = wait_for(lambda: try_client(port, read=False, key=None, cluster="options"), what="a free slot")
    assert wrong.messages[0]["status"] == "error" and "/stocks" in wrong.messages[0]["message"]
    assert streamer.stop() == 0


def closed_by_server(sock: socket.socket) -> bytes:
    """What the server sends before it closes the connection (bounded: 64 KiB, the socket's timeout)."""
    received = b""
    while len(received) < 65536:
        chunk = sock.recv(4096)
        if not chunk:
            return received
        received += chunk
    raise AssertionError("the server keeps sending")


def test_no_auth_garbage_and_running_out_of_descriptors_end_only_that_connection(mock_server, spawn, tmp_path):
    mock_server.options.rate = 200
    port = free_port()
    streamer = spawn(**gateway_env(tmp_path, port))
    wait_for(lambda: listening(streamer), what="the gateway to listen")
    reader = Client(port)
    reader.send("subscribe", "T.*")
    # A TLS ClientHello to the ws:// address (a wss:// client), plain HTTP: 400 and the end of that connection
    tls = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n")
    assert closed_by_server(tls).startswith(b"HTTP/1.1 400")
    plain = socket.create_connection(("127.0.0.1", port), timeout=10)
    plain.sendall(b"GET /stocks HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed_by_server(plain).startswith(b"HTTP/1.1 400")
    # Garbage frames after the upgrade: a reserved opcode, an unmasked frame, text that is not UTF-8: closed 1002/1007
    for garbage, code in ((b"\x83\x80\x00\x00\x00\x00", 1002), (b"\x81\x05hello", 1002),
                          (b"\x81\x85\x00\x00\x00\x00\xff\xfe\xfd\xfc\xfb", 1007)):
        bad = Client(port, read=False)
        bad.ws.sock.sendall(garbage)
        opcode, data = bad.ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == code, (garbage, data)
    # A client that never authenticates is cut at the handshake deadline (10 s)
    silent = Client(port, key=None, read=False)
    silent.ws.settimeout(20)
    with pytest.raises((websocket.WebSocketException, OSError)):
        while True:
            silent.ws.recv()
    assert streamer.metric("polygon_gateway_handshake_timeouts_total") == 1
    assert streamer.metric("polygon_gateway_protocol_errors_total") == 2
    # Out of descriptors: the service's limit lowered to what it has open, then 20 connections knock
    pid = streamer.proc.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")), limits[1]))
    knocking = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    try:
        before, started = cpu_seconds(pid), time.monotonic()
        seen = len(reader.events())
        wait_for(lambda: len(reader.events()) >= seen + 200, timeout=20, what="the reader streaming meanwhile")
        spent = cpu_seconds(pid) - before
        assert spent < 0.5 * (time.monotonic() - started) + 0.2, f"{spent:.2f} s of CPU: the accept loop spins"
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        for sock in knocking:
            sock.close()
    assert streamer.metric("polygon_gateway_accept_errors_total") >= 1
    late = wait_for(lambda: try_client(port), timeout=20, what="a client served once descriptors are free")
    late.send("subscribe", "T.*")
    wait_for(lambda: len(late.events()) >= 10, what="the late client's events")
    assert reader.closed is None
    assert "Traceback" not in streamer.all_output()
    assert streamer.stop() == 0


def test_two_hundred_clients_each_get_every_event_of_their_topic(mock_server, spawn, tmp_path):
    mock_server.options.rate = 2000
    mock_server.options.count = 4000
    mock_server.streaming.clear()
    port = free_port()
    streamer = spawn(**gateway_env(tmp_path, port))
    wait_for(lambda: listening(streamer), what="the gateway to listen")
    symbols = ["AAPL", "MSFT", "NVDA", "AMZN"]
    crowd = [Client(port) for _ in range(200)]
    for index, client in enumerate(crowd):
        client.send("subscribe", f"T.{symbols[index % 4]}")
    wait_for(lambda: streamer.metric("polygon_gateway_client_topics") == 200, timeout=30, what="200 subscribed")
    mock_server.streaming.set()
    out = tmp_path / "out.ndjson"
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= 4000, timeout=30, what="every event")
    expected = {symbol: [r["payload"] for r in records_in(out) if r["type"] == "T" and r["symbol"] == symbol]
                for symbol in symbols}
    wait_for(lambda: all(len(c.events()) >= len(expected[symbols[i % 4]]) for i, c in enumerate(crowd)),
             timeout=30, what="every client's events")
    assert all(c.events() == expected[symbols[i % 4]] for i, c in enumerate(crowd))
    assert streamer.stop() == 0
    wait_for(lambda: all(c.closed is not None for c in crowd), what="every client closed at the stop")
    assert {c.closed[0] for c in crowd} == {1001}
    report("gateway: 200 clients", clients=200, events_each=len(expected["AAPL"]))


def test_tls_serves_wss(mock_server, spawn, tmp_path):
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=gateway", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    mock_server.options.rate = 1000
    port = free_port()
    streamer = spawn(**gateway_env(tmp_path, port, GATEWAY_TLS_CERT=str(cert), GATEWAY_TLS_KEY=str(key)))
    wait_for(lambda: listening(streamer), what="the gateway to listen")
    ws = websocket.create_connection(f"wss://127.0.0.1:{port}/stocks", timeout=10,
                                     sslopt={"ca_certs": str(cert), "cert_reqs": ssl.CERT_REQUIRED})
    assert json.loads(ws.recv())[0]["status"] == "connected"
    ws.send(json.dumps({"action": "auth", "params": TEST_KEY}))
    assert json.loads(ws.recv())[0]["status"] == "auth_success"
    ws.send(json.dumps({"action": "subscribe", "params": "T.*"}))
    assert json.loads(ws.recv())[0]["message"] == "subscribed to: T.*"
    assert json.loads(ws.recv())[0]["ev"] == "T"
    with pytest.raises((websocket.WebSocketException, OSError)):  # plain ws:// on a TLS port: the handshake fails
        websocket.create_connection(f"ws://127.0.0.1:{port}/stocks", timeout=5).recv()
    ws.close()
    assert streamer.stop() == 0


def test_union_adds_a_clients_topic_upstream_and_the_other_sinks_never_see_it(mock_server, spawn, tmp_path):
    mock_server.options.refuse_topics = ("Q.MSFT",)
    port = free_port()
    streamer = spawn(**gateway_env(tmp_path, port, SUBSCRIPTION="T.*", GATEWAY_LINGER_SECS="0.5"))
    wait_for(lambda: listening(streamer), what="the gateway to listen")
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= 100, what="the service's own data")
    client = Client(port)
    client.send("subscribe", "T.AAPL,Q.AAPL,Q.MSFT")
    wait_for(lambda: any(s.get("message", "").endswith("Q.MSFT") and s["status"] == "error"
                         for s in client.statuses()), what="the server's refusal passed on")
    assert "Q.AAPL,Q.MSFT" in mock_server.stats.subscribes, "one subscribe message of the difference"
    wait_for(lambda: sum(1 for m in client.events() if m["ev"] == "Q") >= 20, what="the added topic's quotes")
    status, body = streamer.get("/subscriptions")
    view = json.loads(body)
    assert list(view["client_topics"]) == ["Q.AAPL"] and view["client_topics"]["Q.AAPL"]["state"] == "active"
    assert view["sinks"]["gateway"]["clients"] == {"default": ["T.AAPL", "Q.AAPL"]}
    client.send("unsubscribe", "Q.AAPL")
    wait_for(lambda: "Q.AAPL" in mock_server.stats.unsubscribes, what="removed upstream after the linger time")
    assert streamer.metric("polygon_gateway_upstream_topics_added_total") == 2
    assert streamer.metric("polygon_gateway_upstream_topics_removed_total") == 2  # refused, then let go
    assert streamer.metric("polygon_events_total", type="Q") == 0, "nor do the service's own counts"
    assert streamer.stop() == 0
    records = records_in(tmp_path / "out.ndjson")
    assert {r["type"] for r in records} == {"T"}, "the other sinks get SUBSCRIPTION's topics only"
    seqs = [r["seq"] for r in records]
    assert seqs == list(range(1, len(seqs) + 1)), "no seq taken by a client's topic"
    quotes = [m for m in client.events() if m["ev"] == "Q"]
    assert quotes and {m["sym"] for m in quotes} == {"AAPL"}
    trades = [m for m in client.events() if m["ev"] == "T"]
    assert trades and {m["sym"] for m in trades} == {"AAPL"}
