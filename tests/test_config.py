"""Configuration: every bad value is one line naming the variable, exit 2, before any connection."""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, TEST_KEY, free_port
from polygon_streamer.config import OUR_PREFIXES, SETTINGS, ConfigError, build_config

CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in {s.env for s in SETTINGS} | {"RUST_LOG"}
             and not k.startswith(OUR_PREFIXES)}


def run_cli(*args, env=None, timeout=30):
    full_env = dict(CLEAN_ENV, **(env or {}))
    return subprocess.run([sys.executable, "-m", "polygon_streamer", *args], env=full_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("variable, value, expected", [
    ("CHANNEL_CAP", "abc", "expected an integer >= 1"),
    ("CHANNEL_CAP", "0", "expected an integer >= 1"),
    ("POLYGON_CLUSTER", "bonds", "expected one of stocks, options, futures, crypto, forex, indices"),
    ("SINK", "nats", "expected one or more of stdout, ndjson, zmq"),
    ("METRICS_ADDR", "nohost", "expected host:port"),
    ("READ_TIMEOUT_SECS", "-1", "expected a number of seconds > 0"),
    ("NDJSON_GZIP", "maybe", "expected true or false"),
    ("LOG_LEVEL", "loud", "expected a level"),
    ("NDJSON_INCLUDE", "AAPL", "expected comma separated TYPE:SYMBOL patterns"),
    ("SUBSCRIPTION", "T-AAPL", "expected comma separated topics CODE.TICKER"),
    ("POLYGON_WS_URL", "http://x", "expected a ws:// or wss:// URL"),
    ("ZMQ_ENDPOINT", "nohost:1", "expected a ZeroMQ endpoint"),
    ("REDIS_URL", "http://127.0.0.1:6379", "expected redis://"),
    ("REDIS_STREAM", "polygon:{market}", "expected a key template using {cluster}, {kind} and {symbol_shard}"),
    ("REDIS_SHARDS", "0", "expected an integer >= 1"),
    ("REDIS_PASSWORD_FILE", "/nonexistent/redis.pw", "cannot read it"),
    ("KAFKA_BOOTSTRAP", "kafka1", "expected HOST:PORT of one or more Kafka brokers"),
    ("KAFKA_TOPIC", "polygon/{cluster}", "expected a topic name template"),
    ("KAFKA_TOPIC", "polygon.{market}", "expected a topic name template"),
    ("KAFKA_COMPRESSION", "brotli", "expected one of none, gzip, snappy, lz4, zstd"),
    ("KAFKA_CONFIG_FILE", "/nonexistent/kafka.properties", "cannot read it"),
    ("GATEWAY_SEND_INTERVAL_MS", "5000", "expected an integer from 0 to 1000"),
    ("METRICS_ADDR", ":9898", "an empty host would listen on every interface"),
    ("SUBSCRIPTION", "T.*;Q.*", "';' does not separate topics"),
    ("SUBSCRIPTION", "T.AA\x01PL", "a control character"),
    ("SUBSCRIPTION", "T.A*B", "'*' is the whole ticker"),
])
def test_bad_value_exits_2_with_one_line_naming_the_variable(variable, value, expected):
    # the variable last, so that it also overrides POLYGON_WS_URL when that is the one under test
    result = run_cli("run", env={"POLYGON_API_KEY": TEST_KEY, "POLYGON_WS_URL": "ws://127.0.0.1:9/stocks",
                                 variable: value})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] and repr(value) in lines[0] and expected in lines[0]
    assert result.stdout == ""


def test_flag_beats_variable_and_both_are_named_in_errors():
    result = run_cli("config", "--json", "--channel-cap", "7", env={"CHANNEL_CAP": "9"})
    assert result.returncode == 0 and '"channel_cap":7' in result.stdout
    result = run_cli("run", "--channel-cap", "x", env={"POLYGON_API_KEY": TEST_KEY})
    assert result.returncode == 2 and "CHANNEL_CAP (--channel-cap) 'x'" in result.stderr


def test_missing_key_is_a_config_error():
    result = run_cli("run")
    assert result.returncode == 2
    assert "POLYGON_API_KEY" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_key_file_wins_and_the_key_is_never_printed(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("file-key-123456\n")
    key_file.chmod(0o600)
    result = run_cli("config", "--json", env={"POLYGON_API_KEY": TEST_KEY, "POLYGON_API_KEY_FILE": str(key_file)})
    assert result.returncode == 0
    assert TEST_KEY not in result.stdout + result.stderr and "file-key-123456" not in result.stdout
    assert '"api_key":"<redacted>"' in result.stdout
    config = build_config({"api_key": TEST_KEY, "api_key_file": str(key_file)})
    assert config.api_key == "file-key-123456" and TEST_KEY not in repr(config) and "file-key" not in repr(config)
    missing = run_cli("run", env={"POLYGON_API_KEY_FILE": str(tmp_path / "absent")})
    assert missing.returncode == 2 and "POLYGON_API_KEY_FILE" in missing.stderr


def test_defaults_are_the_seeds_and_urls_follow_feed_and_cluster():
    config = build_config({"api_key": "k"})
    assert (config.cluster, config.subscription, config.channel_cap, config.sinks) == ("futures", "T.*", 1024,
                                                                                         ("stdout",))
    assert config.url == "wss://socket.massive.com/futures"
    assert config.metrics_addr == ("127.0.0.1", 9898)
    assert build_config({"api_key": "k", "feed": "delayed", "cluster": "stocks"}).url == \
        "wss://delayed.massive.com/stocks"
    assert build_config({"api_key": "k", "ws_url": "ws://127.0.0.1:1/x"}).url == "ws://127.0.0.1:1/x"
    assert build_config({"api_key": "k", "emit_ndjson": "true"}).sinks == ("ndjson",)
    assert build_config({"api_key": "k", "emit_ndjson": "true", "sink": "zmq"}).sinks == ("zmq",)
    assert build_config({"api_key": "k", "metrics_addr": "[::1]:9"}).metrics_addr == ("::1", 9)


def test_rust_log_is_the_fallback_for_log_level():
    result = run_cli("config", "--json", env={"RUST_LOG": "warn,polygon_events=info"})
    assert '"log_level":"warn,polygon_events=info"' in result.stdout
    result = run_cli("config", "--json", env={"RUST_LOG": "warn", "LOG_LEVEL": "debug"})
    assert '"log_level":"debug"' in result.stdout


def test_cross_checks():
    with pytest.raises(ConfigError, match="BACKOFF_MAX_SECS"):
        build_config({"api_key": "k", "backoff_initial_secs": "5", "backoff_max_secs": "1"})
    with pytest.raises(ConfigError, match="NDJSON_DEST"):
        build_config({"api_key": "k", "sink": "stdout,ndjson"})
    with pytest.raises(ConfigError, match="each sink at most once"):
        build_config({"api_key": "k", "sink": "zmq,zmq"})


def test_metrics_port_in_use_is_exit_2(mock_server):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("run", env={"POLYGON_API_KEY": TEST_KEY, "POLYGON_WS_URL": mock_server.url("stocks"),
                                     "METRICS_ADDR": f"127.0.0.1:{port}"})
    assert result.returncode == 2
    assert f"METRICS_ADDR (--metrics-addr) '127.0.0.1:{port}'" in result.stderr
    assert mock_server.stats.connections == 0, "a config error must stop the service before it connects"


@pytest.mark.parametrize("command", [
    ["mock-server", "--port", "{port}"],
    ["zmq-sub", "--endpoint", "tcp://127.0.0.1:{port}"],
    ["demo", "--max-events", "1", "--metrics-addr", "127.0.0.1:{port}"],
])
def test_every_command_that_binds_a_busy_port_says_in_use_in_one_line_and_exits_2(command):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(*[part.format(port=port) for part in command])
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith('{"timestamp"')]
    assert len(errors) == 1 and errors[0].startswith("polygon-streamer: invalid ") and "in use" in errors[0], \
        result.stderr
    assert "Traceback" not in result.stderr


def test_the_demo_help_shows_the_defaults_it_uses_and_each_cluster_streams_its_own_codes():
    help_text = " ".join(run_cli("demo", "--help").stdout.split())
    assert "market cluster: labels every record" in help_text and "[default: stocks]" in help_text
    assert "XT.*,XQ.* (crypto)" in help_text and "[default: T.*]" not in help_text
    for cluster, codes in (("crypto", {"XT", "XQ"}), ("forex", {"C"}), ("indices", {"V"}), ("options", {"T", "Q"})):
        result = run_cli("demo", "--max-events", "4", "--rate", "200", "--metrics-addr", "127.0.0.1:0",
                         env={"POLYGON_CLUSTER": cluster}, timeout=30)
        assert result.returncode == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(lines) == 4 and {line["fields"]["type"] for line in lines} == codes, (cluster, lines)


def test_the_reference_the_env_file_and_help_are_rendered_from_the_declarations():
    """docs/configuration.md and example.env are what configdoc renders from config.py (regenerate with
    `python -m polygon_streamer.tools.configdoc`), and `run --help` shows every setting's help, default and variable."""
    from click.testing import CliRunner

    from polygon_streamer.tools import configdoc
    from polygon_streamer.cli import cli

    assert configdoc.ungrouped() == [], "every setting in exactly one section of the reference"
    for relative, render in configdoc.TARGETS.items():
        stale = f"{relative} is stale: python -m polygon_streamer.tools.configdoc"
        assert (ROOT / relative).read_text() == render(), stale
    env_text = (ROOT / "etc" / "polygon-streamer" / "example.env").read_text()
    reference = (ROOT / "docs" / "configuration.md").read_text()
    help_text = " ".join(CliRunner().invoke(cli, ["run", "--help"], terminal_width=10_000).output.split())
    for setting in SETTINGS:
        assert f"{setting.env}=" in env_text and f"| `{setting.env}` | `{setting.flag}` |" in reference, setting.env
        assert f"{setting.flag} " in help_text and f"[env var: {setting.env}]" in help_text, setting.env
        assert " ".join(setting.help.split()) in help_text, setting.env


def test_cpu_affinity_accepts_auto_off_and_cpu_lists_and_rejects_the_rest():
    from polygon_streamer.affinity import parse

    assert parse("auto") == "auto" and parse(" OFF ") == "off"
    assert parse("2") == (2,) and parse("0,2-3") == (0, 2, 3)
    for bad in ("", "x", "3-1", "1,,2", "-1", "1-"):
        with pytest.raises(ValueError):
            parse(bad)
    with pytest.raises(ConfigError, match="CPU_AFFINITY"):
        build_config({"cpu_affinity": "fast"}, require_key=False)


def test_the_redis_sink_says_clearly_when_the_redis_module_is_missing(tmp_path):
    # A real import failure: a `redis` package that cannot be imported shadows any installed one.
    shim = tmp_path / "shim" / "redis"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named redis')\n")
    result = run_cli("run", env={"POLYGON_API_KEY": TEST_KEY, "POLYGON_WS_URL": "ws://127.0.0.1:9/stocks",
                                 "SINK": "redis", "METRICS_ADDR": "127.0.0.1:0",
                                 "PYTHONPATH": str(tmp_path / "shim")})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "apt install python3-redis" in lines[0], lines


def test_the_cluster_comes_from_the_url_when_unset_and_a_disagreement_is_refused():
    from polygon_streamer.config import ConfigError, build_config
    import pytest as _pytest

    assert build_config({"ws_url": "ws://127.0.0.1:8765/stocks"}, require_key=False).cluster == "stocks"
    assert build_config({"ws_url": "wss://socket.massive.com/crypto?x=1"}, require_key=False).cluster == "crypto"
    assert build_config({"ws_url": "ws://127.0.0.1:8765/"}, require_key=False).cluster == "futures"
    assert build_config({"ws_url": "ws://h/stocks", "cluster": "stocks"}, require_key=False).cluster == "stocks"
    with _pytest.raises(ConfigError) as refused:
        build_config({"ws_url": "ws://h/stocks", "cluster": "futures"}, require_key=False)
    assert "POLYGON_CLUSTER" in str(refused.value) and "stocks" in str(refused.value) \
        and "futures" in str(refused.value)


def test_records_carry_the_cluster_of_the_url(mock_server, tmp_path):
    import subprocess
    import sys

    from helpers import ROOT, Streamer, base_env, free_port, wait_for

    out = tmp_path / "out.ndjson"
    env = base_env(mock_server.url("stocks"), free_port(), SINK="ndjson", NDJSON_DEST=str(out))
    del env["POLYGON_CLUSTER"]
    streamer = Streamer(env)
    wait_for(lambda: out.exists() and out.read_text().count("\n") >= 3, what="records")
    assert streamer.stop() == 0
    assert '"feed":"stocks"' in out.read_text().splitlines()[0]
    env["POLYGON_CLUSTER"] = "futures"
    done = subprocess.run([sys.executable, "-m", "polygon_streamer", "run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=20)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "stocks" in done.stderr


def test_config_check_refuses_what_run_refuses_with_the_same_line(tmp_path):
    import socket

    key = {"POLYGON_API_KEY": TEST_KEY}
    cases = [({}, "missing POLYGON_API_KEY"),
             (dict(key, SINK="ndjson", NDJSON_DEST=str(tmp_path / "nope" / "x.ndjson")), "does not exist")]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases.append((dict(key, METRICS_ADDR=f"127.0.0.1:{busy.getsockname()[1]}"), "cannot listen there"))
        for env, words in cases:
            checked = run_cli("config", "--check", env=env)
            started = run_cli("run", env=dict(env, POLYGON_WS_URL="ws://127.0.0.1:9/stocks"))
            assert checked.returncode == started.returncode == 2, (checked.stderr, started.stderr)
            assert words in checked.stderr and checked.stderr == started.stderr
    dest = tmp_path / "out.ndjson"
    checked = run_cli("config", "--check", env=dict(key, SINK="ndjson", NDJSON_DEST=str(dest),
                                                    METRICS_ADDR="127.0.0.1:0"))
    assert checked.returncode == 0 and "OK" in checked.stderr
    assert not dest.exists(), "the check leaves no file behind (a root-owned one would lock the service user out)"
    # Plain `config` is for people: one aligned VARIABLE VALUE line per setting, the key redacted.
    lines = run_cli("config", env=key).stdout.splitlines()
    assert lines[0].split() == ["POLYGON_API_KEY", "<redacted>"]
    assert len({line.index(line.split()[1]) for line in lines if len(line.split()) == 2}) == 1


def test_a_misspelled_variable_fails_the_check_and_is_warned_by_run(tmp_path, mock_server, spawn):
    env = {"POLYGON_API_KEY": TEST_KEY, "SINK": "ndjson", "NDJSON_DESTINATION": str(tmp_path / "x.ndjson"),
           "POLYGON_CLUSTR": "stocks", "METRICS_ADDR": "127.0.0.1:0"}
    checked = run_cli("config", "--check", env=env)
    assert checked.returncode == 2, checked.stderr
    lines = checked.stderr.strip().splitlines()
    assert len(lines) == 1 and "POLYGON_CLUSTR is not a setting" in lines[0] and "did you mean POLYGON_CLUSTER" in \
        lines[0] and "NDJSON_DESTINATION" in lines[0] and "did you mean NDJSON_DEST" in lines[0], lines
    assert run_cli("config", "--check", env=dict(env, SINKS="stdout", NDJSON_DESTINATION="", POLYGON_CLUSTR="",
                                                 )).returncode == 2
    streamer = spawn(POLYGON_CLUSTR="stocks")
    streamer.wait_ready()
    assert any("POLYGON_CLUSTR is not a setting" in message for message in streamer.log_messages())
    assert streamer.stop() == 0


def test_config_check_reads_an_instance_env_file_and_passes_beside_the_running_instance(tmp_path, mock_server,
                                                                                       spawn):
    dest = tmp_path / "stocks.ndjson"
    env_file = tmp_path / "stocks.env"
    port = free_port()
    env_file.write_text(f"# an instance's file\nPOLYGON_API_KEY='{TEST_KEY}'\nSINK=ndjson\n"
                        f"export NDJSON_DEST=\"{dest}\"\n"
                        f"METRICS_ADDR=127.0.0.1:{port}\n\nNDJSON_GZIP=yes\n")
    checked = run_cli("config", "--env-file", str(env_file), "--check", "--json")
    assert checked.returncode == 0, checked.stderr
    assert '"ndjson_gzip":true' in checked.stdout and str(dest) in checked.stdout
    # The instance runs on that port: the check still passes, and says why it did not bind it.
    streamer = spawn(SINK="ndjson", NDJSON_DEST=str(dest), METRICS_ADDR=f"127.0.0.1:{port}")
    streamer.wait_ready()
    checked = run_cli("config", "--env-file", str(env_file), "--check")
    assert checked.returncode == 0, checked.stderr
    assert f"METRICS_ADDR 127.0.0.1:{port} is in use by a running polygon-streamer (OK" in checked.stderr
    assert TEST_KEY not in checked.stdout + checked.stderr
    assert streamer.stop() == 0
    # A misspelling in the file fails the check; a flag still beats the file.
    env_file.write_text(env_file.read_text() + "NDJSON_GZIPP=true\n")
    assert run_cli("config", "--env-file", str(env_file), "--check").returncode == 2
    shown = run_cli("config", "--env-file", str(env_file), "--json", "--ndjson-gzip", "false")
    assert '"ndjson_gzip":false' in shown.stdout


def test_a_true_false_setting_may_be_a_bare_flag():
    assert '"ndjson_gzip":true' in run_cli("config", "--json", "--ndjson-gzip").stdout
    assert '"ndjson_gzip":false' in run_cli("config", "--json", "--ndjson-gzip", "off").stdout
    assert '"zmq_bind":true' in run_cli("config", "--json", "--zmq-bind", "--channel-cap", "5").stdout


def test_each_sink_has_settings_of_its_own_and_the_table_builds_it(tmp_path):
    from polygon_streamer.sinks import SINK_NAMES, SINKS, build_sinks, sink_class

    shared = build_config({"ndjson_flush_every": "7", "ndjson_warn_interval_secs": "3", "bp_warn_interval_secs": "9"},
                          require_key=False)
    assert (shared.capture_flush_every, shared.capture_warn_interval_secs, shared.redis_warn_interval_secs) == \
        (7, 3.0, 9.0), "unset, a sink's own setting keeps the value it used to share"
    own = build_config({"ndjson_flush_every": "7", "capture_flush_every": "2", "redis_warn_interval_secs": "1"},
                       require_key=False)
    assert (own.capture_flush_every, own.ndjson_flush_every, own.redis_warn_interval_secs) == (2, 7, 1.0)
    assert SINK_NAMES == tuple(SINKS) and all(sink_class(name).name == name for name in ("stdout", "ndjson",
                                                                                           "capture"))
    config = build_config({"sink": "ndjson,capture,stdout", "ndjson_dest": str(tmp_path / "o.ndjson"),
                           "capture_dest": str(tmp_path / "c.capture"), "capture_channel_cap": "11",
                           "ndjson_channel_cap": "13", "channel_cap": "17"}, require_key=False)
    built = build_sinks(config)
    assert [(sink.name, sink.takes, q.name, q.capacity, q.drop_when_full) for sink, q in built] == [
        ("ndjson", "records", "ndjson", 13, True), ("capture", "wire", "capture", 11, True),
        ("stdout", "records", "stdout", 17, False)]
