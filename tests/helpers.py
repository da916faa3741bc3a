"""Shared test plumbing: free ports, polling with deadlines, and the real service as a child process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import fastjsonschema
import jsonschema
import ujson
from prometheus_client.parser import text_string_to_metric_families

# Every test talks to 127.0.0.1 only. A proxy in the environment must not be asked for loopback: dh_auto_test sets
# http_proxy to a dead 127.0.0.1:9 to keep package builds off the network, and urllib and websocket-client (in the
# service's child processes too, which inherit this) honour it unless no_proxy says otherwise.
for _name in ("no_proxy", "NO_PROXY"):
    os.environ[_name] = ",".join(filter(None, [os.environ.get(_name), "127.0.0.1", "localhost", "::1"]))

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TEST_KEY = "test-key-9f8e7d6c5b4a"


def strict_json(line: str):
    """Python's parser without its extensions (NaN, Infinity), on the UTF-8 bytes a sink writes."""
    def refuse(constant):
        raise ValueError(f"non-standard constant {constant}")
    return json.loads(line.encode("utf-8").decode("utf-8"), parse_constant=refuse)


RECORD_SCHEMA = json.loads((ROOT / "polygon_streamer" / "schema.json").read_text())
# The reference validator, and the same schema compiled to Python (about 15 times faster: the suite checks over a
# million records, and jsonschema's interpreter was most of its slowest tests' time). The schema uses only keywords
# both read alike; test_normalize holds the two to the same verdicts on every record shape and their mutations.
REFERENCE_VALIDATOR = jsonschema.Draft202012Validator(RECORD_SCHEMA)
_record_validator = fastjsonschema.compile(RECORD_SCHEMA)
RECORD_KEYS = RECORD_SCHEMA["$defs"]["event"]["required"]
# A backfilled event has one more key, between payload and hostname.
BACKFILLED_KEYS = RECORD_KEYS[:RECORD_KEYS.index("payload") + 1] + ["backfill"] + RECORD_KEYS[
    RECORD_KEYS.index("payload") + 1:]


def valid_record(line: str) -> dict:
    """A line a sink wrote: strict JSON, valid against the shipped JSON Schema, keys in the documented order."""
    record = strict_json(line)
    try:
        _record_validator(record)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise jsonschema.ValidationError(f"{exc.message}: {line[:300]}") from None
    assert list(record) == (BACKFILLED_KEYS if "backfill" in record else RECORD_KEYS), list(record)
    return record


def records_in(path, writing: bool = False) -> list[dict]:
    """The records of an NDJSON file, each checked by valid_record. writing: the service is still writing it, so a
    last line without its newline is not a record yet (the sink writes whole lines, but a reader can see a large
    write(2) half done, even inside a UTF-8 character); otherwise the file must end with a newline."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if writing:
        data = data[:data.rfind(b"\n") + 1]
    else:
        assert not data or data.endswith(b"\n"), f"{path} ends with a torn line"
    return [valid_record(line) for line in data.decode("utf-8").splitlines()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(case: str, **numbers) -> None:
    """One line per fault case, shown by `pytest -rP`: the numbers docs/dev/testing.md's fault table quotes."""
    print(f"{case}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll until predicate() is truthy; fail with `what` after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample, keyed by (name, sorted label items), parsed with prometheus_client's own parser."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def base_env(url: str, metrics_port: int, **settings) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("POLYGON_", "NDJSON_", "ZMQ_", "READY_", "REDIS_", "CAPTURE_", "BACKFILL_",
                                  "BACKOFF_", "GATEWAY_", "KAFKA_")) and key not in (
               "SINK", "SUBSCRIPTION", "LOG_LEVEL", "RUST_LOG", "CHANNEL_CAP", "EMIT_NDJSON")}
    env.update({
        "POLYGON_API_KEY": TEST_KEY,
        "POLYGON_WS_URL": url,
        "POLYGON_CLUSTER": url.rstrip("/").rsplit("/", 1)[-1],
        "METRICS_ADDR": f"127.0.0.1:{metrics_port}",
        "BACKOFF_INITIAL_SECS": "0.05",
        "BACKOFF_MAX_SECS": "0.5",
        "STATS_INTERVAL_SECS": "0",
        "PYTHONUNBUFFERED": "1",
    })
    env.update({key: str(value) for key, value in settings.items()})
    return env


class Streamer:
    """`polygon-streamer run` (or another command) as a child process; stdout and stderr collected by threads."""

    def __init__(self, env: dict[str, str], command: str = "run", args: tuple[str, ...] = ()):
        self.metrics_url = f"http://{env.get('METRICS_ADDR', '127.0.0.1:9898')}"
        self.proc = subprocess.Popen([sys.executable, "-m", "polygon_streamer", command, *args], env=env,
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._threads = [threading.Thread(target=self._collect, args=(self.proc.stdout, self.stdout_lines),
                                          daemon=True),
                         threading.Thread(target=self._collect, args=(self.proc.stderr, self.stderr_lines),
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _collect(stream, into: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            into.append(raw.decode("utf-8", "replace"))

    def logs(self) -> list[dict]:
        out = []
        for line in list(self.stderr_lines):
            try:
                out.append(ujson.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out

    def log_messages(self) -> list[str]:
        return [record.get("fields", {}).get("message", record.get("raw", "")) for record in self.logs()]

    def shutdown_report(self) -> dict:
        """The fields of the last "stopped..." record: what the service accepted, dropped and wrote."""
        return [r for r in self.logs() if r.get("fields", {}).get("message", "").startswith("stopped")][-1]["fields"]

    def events(self) -> list[dict]:
        return [ujson.loads(line) for line in list(self.stdout_lines)]

    def metrics(self) -> dict[tuple[str, tuple], float]:
        status, text = http_get(self.metrics_url + "/metrics")
        assert status == 200, text
        return parse_metrics(text)

    def metric(self, name: str, **labels) -> float:
        try:
            return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)
        except OSError:
            return 0.0

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.metrics_url + path)

    def wait_ready(self, timeout: float = 10.0) -> None:
        def ready():
            try:
                return self.get("/ready")[0] == 200
            except OSError:
                return False
        wait_for(ready, timeout, what="/ready 200")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"the service did not exit within {timeout}s of signal {signum}")
        for thread in self._threads:
            thread.join(5)
        return code

    def all_output(self) -> str:
        return "".join(self.stdout_lines) + "".join(self.stderr_lines)


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has used (user + system), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
