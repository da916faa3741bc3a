"""The Redis Streams sink against real redis-server processes on loopback: one server, a 3-master cluster, a server
killed and restarted mid-stream, a server that is not there, and consumer groups reading with redis-sub."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import ujson

from helpers import ROOT, Streamer, free_port, valid_record, wait_for
from polygon_streamer.tools.bench import LocalRedis
from polygon_streamer.sinks.redis import shard_of

redis = pytest.importorskip("redis", reason="the Python module redis is not installed (pip install redis)")

if shutil.which("redis-server") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI must run the Redis tests: redis-server is missing (make test installs it in CI)")
    pytest.skip("redis-server is not installed (Debian: apt install redis-server; make test installs it in CI)",
                allow_module_level=True)

DURABLE = ("--appendonly", "yes", "--appendfsync", "always")


@pytest.fixture
def redis_server(tmp_path):
    server = LocalRedis(str(tmp_path / "redis"), DURABLE).start()
    yield server
    server.stop(kill=True)


@pytest.fixture
def redis_cluster(tmp_path):
    """Three masters, no replicas, slots spread by redis-cli --cluster create."""
    nodes = [LocalRedis(str(tmp_path / f"node{index}"), ("--cluster-enabled", "yes", "--cluster-config-file",
                                                         "nodes.conf", "--cluster-node-timeout", "5000"))
             for index in range(3)]
    try:
        for node in nodes:
            node.start()
        created = subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{node.port}" for node in nodes],
                                  "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, timeout=60)
        assert created.returncode == 0, created.stdout.decode() + created.stderr.decode()
        clients = [redis.Redis(host="127.0.0.1", port=node.port) for node in nodes]

        def cluster_ok():
            return all(client.cluster("info")["cluster_state"] == "ok" for client in clients)
        wait_for(cluster_ok, timeout=30, what="cluster_state:ok on every node")
        yield nodes
    finally:
        for node in nodes:
            node.stop(kill=True)


def stream_records(url: str, key: str) -> list[dict]:
    client = redis.Redis.from_url(url)
    entries = client.xrange(key)
    client.close()
    return [{"record": valid_record(fields[b"record"].decode()), "type": fields[b"type"].decode(),
             "symbol": fields[b"symbol"].decode()} for _id, fields in entries]


def health(streamer) -> str:
    try:
        return streamer.get("/health")[1]
    except OSError:  # not listening yet
        return ""


def assert_drops_declared(records: list[dict], dropped: int) -> None:
    """Nothing twice or out of order; every missing seq inside a declared hole; the holes add up to the drops
    counted (dropped > 0). A sink_drop record takes the seq of the last event it stands for, so each hole is its
    dropped events' seqs, ending at the record's own seq."""
    seqs = [record["seq"] for record in records]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), "a record added twice or out of order"
    holes = [record for record in records if record["type"] == "gap"]
    assert holes and all(record["payload"]["reason"] == "sink_drop" for record in holes)
    declared = sum(record["payload"]["dropped_events"] for record in holes)
    assert declared == dropped > 0
    missing = set(range(1, seqs[-1] + 1)) - set(seqs)
    in_holes = set()
    for record in holes:
        in_holes.update(range(record["seq"] - record["payload"]["dropped_events"] + 1, record["seq"] + 1))
    assert missing <= in_holes, sorted(missing - in_holes)[:10]
    assert len(missing) + len(holes) == declared


def check_fields(entries: list[dict]) -> None:
    for entry in entries:
        assert entry["type"] == entry["record"]["type"] and entry["symbol"] == entry["record"]["symbol"]


def test_every_record_arrives_once_in_order_with_routing_fields(mock_server, spawn, redis_server, tmp_path):
    mock_server.options.batch = 10
    ndjson = tmp_path / "out.ndjson"
    streamer = spawn(SINK="redis,ndjson", REDIS_URL=redis_server.url, NDJSON_DEST=str(ndjson),
                     SUBSCRIPTION="T.*,Q.*")
    wait_for(lambda: streamer.metric("polygon_redis_sent_total") >= 3000, timeout=20, what="3000 records in Redis")
    assert streamer.stop() == 0
    entries = stream_records(redis_server.url, "polygon:stocks")
    check_fields(entries)
    written = [ujson.loads(line) for line in ndjson.read_text().splitlines()]
    assert [entry["record"] for entry in entries] == written  # the same records, once each, in order
    assert [record["seq"] for record in written] == list(range(1, len(written) + 1))
    assert streamer.shutdown_report()["written"]["redis"] == len(entries)


def test_key_template_kinds_and_shards_and_trimming(mock_server, spawn, redis_server):
    streamer = spawn(SINK="redis", REDIS_URL=redis_server.url, REDIS_STREAM="md:{cluster}:{kind}:{symbol_shard}",
                     REDIS_SHARDS="4", REDIS_MAXLEN="100", SUBSCRIPTION="T.*,Q.*")
    wait_for(lambda: streamer.metric("polygon_redis_sent_total") >= 3000, timeout=20, what="3000 records")
    assert streamer.stop() == 0
    client = redis.Redis.from_url(redis_server.url)
    keys = sorted(key.decode() for key in client.keys("md:*"))
    assert keys and all(key.split(":")[2] in ("trade", "quote") for key in keys), keys
    for key in keys:
        entries = stream_records(redis_server.url, key)
        kind, shard = key.split(":")[2], int(key.split(":")[3].strip("{}"))
        assert all(e["record"]["kind"] == kind and shard_of(e["symbol"], 4) == shard for e in entries)
        assert client.xlen(key) < 1000  # MAXLEN ~ 100: trimmed (approximately, by whole nodes)
    client.close()


def test_redis_down_at_start_is_degraded_then_delivers(mock_server, spawn, tmp_path):
    port = free_port()
    streamer = spawn(SINK="redis", REDIS_URL=f"redis://127.0.0.1:{port}/0", SUBSCRIPTION="T.*",
                     REDIS_CHANNEL_CAP="100000")

    def degraded():
        try:
            status, text = streamer.get("/health")
        except OSError:
            return False
        return status == 200 and "degraded: redis sink" in text
    wait_for(degraded, timeout=15, what="/health naming the degraded redis sink")
    assert any("unreachable" in message for message in streamer.log_messages())
    server = LocalRedis(str(tmp_path / "late"), DURABLE, port=port).start()
    try:
        wait_for(lambda: streamer.metric("polygon_redis_sent_total") >= 500, timeout=20, what="records after start")
        wait_for(lambda: "degraded" not in streamer.get("/health")[1], what="/health OK again")
        assert streamer.stop() == 0
        records = [entry["record"] for entry in stream_records(server.url, "polygon:stocks")]
        assert [record["seq"] for record in records] == list(range(1, len(records) + 1))  # nothing lost
    finally:
        server.stop(kill=True)


def test_a_key_of_the_wrong_type_refuses_records_counted_never_a_crash(mock_server, spawn, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.set("polygon:stocks:quote", "not a stream")  # an operator's mistake: the quotes' key holds a string
    streamer = spawn(SINK="redis", REDIS_URL=redis_server.url, REDIS_STREAM="polygon:{cluster}:{kind}",
                     SUBSCRIPTION="T.*,Q.*")
    wait_for(lambda: streamer.metric("polygon_redis_drops_total") >= 100, timeout=20, what="refused quotes counted")
    wait_for(lambda: streamer.metric("polygon_redis_sent_total") >= 100, what="trades still written")
    assert streamer.metric("polygon_redis_errors_total") >= 100
    assert streamer.stop() == 1  # accepted records were not written: said, and exit 1
    report = streamer.shutdown_report()
    trades = client.xlen("polygon:stocks:trade")
    # "written" is what Redis took (the trades); the refused quotes are the unwritten ones (it once said written
    # beside not written for the same records)
    assert report["written"]["redis"] == trades and report["unwritten_events"] > 0
    assert any("WRONGTYPE" in message for message in streamer.log_messages())
    client.close()


def test_redis_out_of_memory_is_retried_and_shown_then_writes_resume(mock_server, spawn, tmp_path):
    server = LocalRedis(str(tmp_path / "oom"), ("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")).start()
    client = redis.Redis.from_url(server.url)
    try:
        streamer = spawn(SINK="redis", REDIS_URL=server.url, SUBSCRIPTION="T.*,Q.*", REDIS_CHANNEL_CAP="50")
        wait_for(lambda: "degraded: redis sink" in health(streamer) and "refuses writes" in health(streamer),
                 timeout=30, what="/health: Redis refuses writes (OOM)")
        wait_for(lambda: streamer.metric("polygon_redis_drops_total") > 0, timeout=20, what="queue drops, counted")
        client.config_set("maxmemory", "0")  # the operator gives Redis memory
        sent = streamer.metric("polygon_redis_sent_total")
        wait_for(lambda: streamer.metric("polygon_redis_sent_total") >= sent + 1000, timeout=20, what="writes again")
        wait_for(lambda: health(streamer).strip() == "OK", what="/health OK again")
        assert streamer.stop() == 0
        records = [entry["record"] for entry in stream_records(server.url, "polygon:stocks")]
        assert_drops_declared(records, int(streamer.shutdown_report()["sink_drops"]))
        assert any("maxmemory" in message for message in streamer.log_messages())  # Redis' OOM reply, shown
    finally:
        client.close()
        server.stop(kill=True)


def test_health_follows_redis_in_a_quiet_market_too(mock_server, spawn, tmp_path):
    mock_server.options.refuse_topics = ("T.*",)  # no data at all: only the sink's probe can notice Redis is back
    port = free_port()
    streamer = spawn(SINK="redis", REDIS_URL=f"redis://127.0.0.1:{port}/0", SUBSCRIPTION="T.*")
    wait_for(lambda: "degraded: redis sink" in health(streamer), timeout=15, what="/health degraded")
    server = LocalRedis(str(tmp_path / "late"), port=port).start()
    try:
        wait_for(lambda: health(streamer).strip() == "OK", timeout=15, what="/health OK once Redis is there")
        assert streamer.stop() == 0
        assert any("takes records again" in message for message in streamer.log_messages())
    finally:
        server.stop(kill=True)


def test_redis_killed_and_restarted_mid_stream_loses_nothing_uncounted(mock_server, spawn, tmp_path):
    mock_server.options.batch = 10
    workdir = str(tmp_path / "redis")
    server = LocalRedis(workdir, DURABLE).start()
    streamer = spawn(SINK="redis", REDIS_URL=server.url, SUBSCRIPTION="T.*,Q.*", REDIS_CHANNEL_CAP="50")
    try:
        wait_for(lambda: streamer.metric("polygon_redis_sent_total") >= 2000, timeout=20, what="records flowing")
        server.stop(kill=True)  # SIGKILL: what was acknowledged is in the append-only file
        wait_for(lambda: streamer.metric("polygon_redis_drops_total") > 0, timeout=20, what="counted drops")
        assert "degraded: redis sink" in streamer.get("/health")[1]
        sent_before = streamer.metric("polygon_redis_sent_total")
        server = LocalRedis(workdir, DURABLE, port=server.port).start()
        wait_for(lambda: streamer.metric("polygon_redis_sent_total") >= sent_before + 2000, timeout=30,
                 what="records after the restart")
        assert streamer.stop() == 0
        dropped = int(streamer.shutdown_report()["sink_drops"])
        records = [entry["record"] for entry in stream_records(server.url, "polygon:stocks")]
        assert_drops_declared(records, dropped)
    finally:
        server.stop(kill=True)


def test_a_slow_redis_fills_the_queue_then_drops_are_counted_and_declared(mock_server, spawn, redis_server):
    mock_server.options.batch = 10
    streamer = spawn(SINK="redis", REDIS_URL=redis_server.url, SUBSCRIPTION="T.*,Q.*", REDIS_CHANNEL_CAP="20")
    wait_for(lambda: streamer.metric("polygon_redis_sent_total") >= 1000, timeout=20, what="records flowing")
    client = redis.Redis.from_url(redis_server.url)
    client.execute_command("CLIENT", "PAUSE", "3000", "WRITE")  # Redis holds every write for 3 s: a slow server
    wait_for(lambda: streamer.metric("polygon_redis_drops_total") > 0, timeout=10, what="drops while Redis stalls")
    sent = streamer.metric("polygon_redis_sent_total")
    wait_for(lambda: streamer.metric("polygon_redis_sent_total") >= sent + 1000, timeout=20, what="writes again")
    assert streamer.stop() == 0  # drops at a bound the user chose, all counted: not a failure
    dropped = int(streamer.shutdown_report()["sink_drops"])
    records = [entry["record"] for entry in stream_records(redis_server.url, "polygon:stocks")]
    assert_drops_declared(records, dropped)
    client.close()


def test_sigterm_while_redis_is_down_reports_what_was_not_written(mock_server, spawn):
    streamer = spawn(SINK="redis", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", SUBSCRIPTION="T.*",
                     SHUTDOWN_TIMEOUT_SECS="2", REDIS_CHANNEL_CAP="100000")
    wait_for(lambda: streamer.metric("polygon_events_total", type="T") >= 200 or
             streamer.metric("polygon_queue_depth", queue="redis") >= 20, timeout=15, what="events waiting")
    assert streamer.stop() == 1
    report = streamer.shutdown_report()
    assert report["unwritten_events"] > 0
    assert "redis" in streamer.all_output()


def test_the_password_is_used_and_never_shown(mock_server, spawn, tmp_path):
    password = "s3cret-redis-pass"
    server = LocalRedis(str(tmp_path / "auth"), ("--requirepass", password)).start()
    try:
        secret = tmp_path / "redis.pw"
        secret.write_text(password + "\n")
        streamer = spawn(SINK="redis", REDIS_URL=server.url, REDIS_PASSWORD_FILE=str(secret), SUBSCRIPTION="T.*")
        wait_for(lambda: streamer.metric("polygon_redis_sent_total") >= 100, timeout=20, what="authenticated writes")
        assert streamer.stop() == 0
        # With the password in the URL and a wrong one: the error is shown, the password is not.
        wrong = spawn(SINK="redis", REDIS_URL=f"redis://:{password}x@127.0.0.1:{server.port}/0", SUBSCRIPTION="T.*")
        wait_for(lambda: wrong.metric("polygon_redis_errors_total") >= 1, timeout=20, what="an auth error")
        assert "degraded: redis sink" in wrong.get("/health")[1]
        wrong.stop()
        for output in (streamer.all_output(), wrong.all_output()):
            assert password not in output
    finally:
        server.stop(kill=True)


def test_cluster_spreads_shards_over_the_masters(mock_server, spawn, redis_cluster):
    from redis.cluster import RedisCluster

    url = redis_cluster[0].url
    streamer = spawn(SINK="redis", REDIS_URL=url, REDIS_CLUSTER="true", REDIS_STREAM="polygon:{cluster}:{symbol_shard}",
                     REDIS_SHARDS="12", SUBSCRIPTION="T.*,Q.*")
    wait_for(lambda: streamer.metric("polygon_redis_sent_total") >= 3000, timeout=30, what="3000 records")
    assert streamer.stop() == 0
    written = streamer.shutdown_report()["written"]["redis"]
    client = RedisCluster.from_url(url)
    records, nodes = [], set()
    for shard in range(12):
        key = f"polygon:stocks:{{{shard}}}"
        entries = client.xrange(key)
        if entries:
            nodes.add(client.get_node_from_key(key).name)
        shard_records = [ujson.loads(fields[b"record"]) for _id, fields in entries]
        assert all(shard_of(record["symbol"], 12) == shard for record in shard_records)
        seqs = [record["seq"] for record in shard_records]
        assert seqs == sorted(seqs)  # in order per stream
        records += shard_records
    client.close()
    assert len(nodes) == 3, nodes  # the streams live on every master
    assert sorted(record["seq"] for record in records) == list(range(1, written + 1))  # each once, none lost
    # redis-sub reads every shard's stream from the cluster's nodes.
    env = dict(os.environ, REDIS_URL=url, REDIS_CLUSTER="true", REDIS_STREAM="polygon:{cluster}:{symbol_shard}",
               REDIS_SHARDS="12", POLYGON_CLUSTER="stocks")
    done = subprocess.run([sys.executable, "-m", "polygon_streamer", "redis-sub", "--group", "audit", "--consumer",
                           "a", "--from-start", "--max-records", str(written)], env=env, cwd=ROOT,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    read = [ujson.loads(line)["seq"] for line in done.stdout.splitlines()]
    assert sorted(read) == list(range(1, written + 1))


def test_a_consumer_group_of_three_sees_every_record_once(mock_server, spawn, redis_server, tmp_path):
    env = dict(os.environ, REDIS_URL=redis_server.url, POLYGON_CLUSTER="stocks")
    readers = []
    outputs = []
    for index in range(3):
        out = open(tmp_path / f"reader{index}.ndjson", "wb")
        outputs.append(out)
        readers.append(subprocess.Popen([sys.executable, "-m", "polygon_streamer", "redis-sub", "--group", "etl",
                                         "--consumer", f"reader{index}"], env=env, cwd=ROOT, stdout=out,
                                        stderr=subprocess.PIPE))
    client = redis.Redis.from_url(redis_server.url)
    try:
        wait_for(lambda: client.exists("polygon:stocks") and len(client.xinfo_consumers("polygon:stocks", "etl")) == 3,
                 timeout=20, what="three consumers in the group")
        mock_server.options.batch = 1
        streamer = spawn(SINK="redis", REDIS_URL=redis_server.url, SUBSCRIPTION="T.*,Q.*")
        wait_for(lambda: streamer.metric("polygon_redis_sent_total") >= 3000, timeout=30, what="3000 records")
        assert streamer.stop() == 0
        total = client.xlen("polygon:stocks")

        def lines():
            return [line for index in range(3) for line in (tmp_path / f"reader{index}.ndjson").read_bytes()
                    .splitlines()]
        wait_for(lambda: len(lines()) >= total, timeout=20, what="the readers to read everything")
        wait_for(lambda: client.xpending("polygon:stocks", "etl")["pending"] == 0, what="every record acked")
    finally:
        for reader in readers:
            reader.send_signal(signal.SIGTERM)
        codes = [reader.wait(10) for reader in readers]
        for out in outputs:
            out.close()
        client.close()
    assert codes == [0, 0, 0]
    per_reader = [[ujson.loads(line)["seq"] for line in (tmp_path / f"reader{index}.ndjson").read_bytes().splitlines()]
                  for index in range(3)]
    seqs = sorted(seq for got in per_reader for seq in got)
    assert seqs == list(range(1, total + 1))  # every record once across the group
    assert all(got for got in per_reader), [len(got) for got in per_reader]  # shared, not one reader taking all


def test_redis_sub_says_clearly_when_redis_is_not_there():
    env = dict(os.environ, REDIS_URL=f"redis://:pw123456@127.0.0.1:{free_port()}/0")
    done = subprocess.run([sys.executable, "-m", "polygon_streamer", "redis-sub", "--group", "g", "--consumer", "c"],
                          env=env, cwd=ROOT, capture_output=True, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "Connection refused" in lines[0] and "pw123456" not in lines[0], lines


def test_redis_sub_outlives_a_redis_restart(redis_server):
    # Redis gone after the start is not a configuration error (exit 2 tells systemd not to restart): the reader says
    # so once and reads on when Redis is back (a restarted Redis without persistence has lost the group: rejoined).
    env = dict(os.environ, REDIS_URL=redis_server.url, POLYGON_CLUSTER="stocks")
    reader = Streamer(env, "redis-sub", ("--group", "g", "--consumer", "c"))
    client = redis.Redis.from_url(redis_server.url)
    try:
        # (reading: every stream's group joined; Redis gone while it joins them is the start's error, exit 2)
        wait_for(lambda: "waiting for records" in "".join(reader.stderr_lines), what="the reader to read")
        client.close()
        redis_server.stop(kill=True)
        wait_for(lambda: "lost Redis" in "".join(reader.stderr_lines), what="the reader to notice")
        redis_server.start()
        client = redis.Redis.from_url(redis_server.url)
        wait_for(lambda: client.exists("polygon:stocks") and client.xinfo_groups("polygon:stocks"), timeout=20,
                 what="the group again")
        client.xadd("polygon:stocks", {"record": b'{"seq":1}'})
        wait_for(lambda: reader.stdout_lines == ['{"seq":1}\n'], what="the record after the restart")
        assert reader.proc.poll() is None
    finally:
        code = reader.stop()
        client.close()
    errors = "".join(reader.stderr_lines)
    assert code == 0 and errors.count("lost Redis") == 1 and "Redis is back" in errors, errors


def test_redis_over_a_unix_socket(mock_server, spawn, tmp_path):
    # The documented recipe (REDIS_URL=unix:///run/redis/redis-server.sock): redis-py before 4.5 (Debian 12's 4.3.4,
    # which the clean-chroot build tests with) refused the connect timeout for a unix socket, and nothing was
    # written.
    socket_path = tmp_path / "redis.sock"
    server = LocalRedis(str(tmp_path / "redis"), ("--unixsocket", str(socket_path), "--unixsocketperm", "700")).start()
    try:
        streamer = spawn(SINK="redis", REDIS_URL=f"unix://{socket_path}", SUBSCRIPTION="T.*")
        wait_for(lambda: streamer.metric("polygon_redis_sent_total") >= 500, timeout=20, what="500 records via unix://")
        assert streamer.stop() == 0
        entries = stream_records(server.url, "polygon:stocks")
        assert len(entries) == streamer.shutdown_report()["written"]["redis"] >= 500
        assert "degraded" not in "".join(streamer.stderr_lines)
    finally:
        server.stop(kill=True)
