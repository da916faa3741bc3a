"""The ops kit (polygon_streamer/ops: alert and recording rules, a Grafana dashboard): promtool checks and unit-tests
the rules, and a real Prometheus scraping the running service evaluates every recording rule and dashboard expression
and every metric the alerts use, so that no panel or rule points at a metric that does not exist."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse

import pytest

from helpers import ROOT, free_port, http_get, wait_for

OPS = ROOT / "polygon_streamer" / "ops"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
if (PROMETHEUS is None or PROMTOOL is None) and os.environ.get("CI") == "true":
    raise RuntimeError("CI must check the ops kit: prometheus/promtool missing (make test installs them in CI)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None,
                                      reason="prometheus is not installed (Debian: apt install prometheus; "
                                             "make test installs it in CI)")

PROMTOOL_TESTS = """
rule_files: [alerts.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'polygon_connected{instance="a"}'
        values: '1 1 0x10'
      - series: 'polygon_last_event_age_seconds{instance="a"}'
        values: '500x1000'
      - series: 'polygon_gaps_total{instance="a",reason="server_close"}'
        values: '0 0 1x20'
      - series: 'polygon_sink_drops_total{instance="a",sink="ndjson"}'
        values: '0x20'
      - series: 'polygon_channel_drops_total{instance="a"}'
        values: '0 0 0 5x20'
      - series: 'polygon_sequence_anomalies_total{instance="a",type="T",reason="backwards"}'
        values: '0x20'
      - series: 'polygon_queue_depth{instance="a",queue="ndjson"}'
        values: '10 1900x20'
      - series: 'polygon_queue_capacity{instance="a",queue="ndjson"}'
        values: '2048x20'
      - series: 'polygon_zmq_peers{instance="a"}'
        values: '1 0x20'
      - series: 'polygon_backfill_gaps_total{instance="a",result="complete"}'
        values: '0 1 2 3x20'
      - series: 'polygon_backfill_gaps_total{instance="a",result="shutdown"}'
        values: '0 0 0 1x20'
      - series: 'polygon_backfill_gaps_total{instance="a",result="rate_limited"}'
        values: '0 0 0 0 0 0 1x60'
      - series: 'up{job="polygon-streamer",instance="a"}'
        values: '1 1 1 0x10'
      - series: 'polygon_sink_write_errors_total{instance="a",sink="ndjson"}'
        values: '0 0 0 0 3 9 15 15x20'
      - series: 'polygon_gateway_disconnects_total{instance="a",reason="slow_consumer"}'
        values: '0 0 0 1x20'
      - series: 'polygon_kafka_delivery_errors_total{instance="a",reason="MSG_SIZE_TOO_LARGE"}'
        values: '0 0 0 2x20'
      - series: 'polygon_kafka_buffered_messages{instance="a"}'
        values: '0 0 600000x10 0x10'
      - series: 'polygon_kafka_buffer_limit_messages{instance="a"}'
        values: '1000000x30'
    alert_rule_test:
      - {eval_time: 1m, alertname: PolygonFeedDown, exp_alerts: []}
      - eval_time: 5m
        alertname: PolygonFeedDown
        exp_alerts:
          - exp_labels: {severity: critical, instance: a}
            exp_annotations: {summary: "a: not connected to the Polygon feed for 2 minutes"}
      # 1970-01-01 was a Thursday: at 00:05 UTC the feed may be quiet, at 14:10 UTC it may not.
      - {eval_time: 5m, alertname: PolygonFeedStale, exp_alerts: []}
      - eval_time: 850m
        alertname: PolygonFeedStale
        exp_alerts:
          - exp_labels: {severity: warning, instance: a}
            exp_annotations: {summary: "a: no data event for 8m 20s in market hours"}
      - eval_time: 4m
        alertname: PolygonDataGap
        exp_alerts:
          - exp_labels: {severity: warning, instance: a, reason: server_close}
            exp_annotations: {summary: "a: server_close gap in the data; backfill from REST"}
      - eval_time: 5m
        alertname: PolygonEventsDropped
        exp_alerts:
          - exp_labels: {severity: warning, instance: a}
            exp_annotations: {summary: "a: events dropped at a full queue"}
      - {eval_time: 3m, alertname: PolygonQueueFilling, exp_alerts: []}
      - eval_time: 8m
        alertname: PolygonQueueFilling
        exp_alerts:
          - exp_labels: {severity: warning, instance: a, queue: ndjson}
            exp_annotations: {summary: "a: the ndjson queue is 92.77% full"}
      - {eval_time: 5m, alertname: PolygonZmqNoPeer, exp_alerts: []}
      - eval_time: 15m
        alertname: PolygonZmqNoPeer
        exp_alerts:
          - exp_labels: {severity: warning, instance: a}
            exp_annotations: {summary: "a: no ZeroMQ peer: what is published reaches nobody"}
      - {eval_time: 10m, alertname: PolygonSequenceAnomalies, exp_alerts: []}
      # complete and shutdown are not failures; rate_limited at 6m is, for 30 minutes
      - {eval_time: 5m, alertname: PolygonBackfillIncomplete, exp_alerts: []}
      - eval_time: 10m
        alertname: PolygonBackfillIncomplete
        exp_alerts:
          - exp_labels: {severity: warning, instance: a, result: rate_limited}
            exp_annotations: {summary: "a: a gap's backfill ended rate_limited: part of the gap stays unfilled"}
      - {eval_time: 40m, alertname: PolygonBackfillIncomplete, exp_alerts: []}
      # the target stops answering at 3m: down for a minute at 4m
      - {eval_time: 3m, alertname: PolygonTargetDown, exp_alerts: []}
      - eval_time: 5m
        alertname: PolygonTargetDown
        exp_alerts:
          - exp_labels: {severity: critical, instance: a, job: polygon-streamer}
            exp_annotations:
              summary: "a: the service does not answer /metrics (stopped, crashed or unreachable)"
      - {eval_time: 5m, alertname: PolygonTargetAbsent, exp_alerts: []}
      # writes fail from 4m to 6m: the alert within a minute, and gone a minute after they resume
      - {eval_time: 3m, alertname: PolygonSinkWriteFailing, exp_alerts: []}
      - eval_time: 4m
        alertname: PolygonSinkWriteFailing
        exp_alerts:
          - exp_labels: {severity: critical, instance: a, sink: ndjson}
            exp_annotations:
              summary: "a: the ndjson sink's writes fail (a full disk?): /health says why"
      - {eval_time: 8m, alertname: PolygonSinkWriteFailing, exp_alerts: []}
      - {eval_time: 2m, alertname: PolygonGatewaySlowClients, exp_alerts: []}
      - eval_time: 5m
        alertname: PolygonGatewaySlowClients
        exp_alerts:
          - exp_labels: {severity: warning, instance: a, reason: slow_consumer}
            exp_annotations: {summary: "a: gateway clients were disconnected for reading too slowly"}
      - {eval_time: 20m, alertname: PolygonGatewaySlowClients, exp_alerts: []}
      - {eval_time: 2m, alertname: PolygonKafkaDeliveryErrors, exp_alerts: []}
      - eval_time: 4m
        alertname: PolygonKafkaDeliveryErrors
        exp_alerts:
          - exp_labels: {severity: critical, instance: a, reason: MSG_SIZE_TOO_LARGE}
            exp_annotations:
              summary: "a: Kafka did not take records (MSG_SIZE_TOO_LARGE): they are lost to Kafka"
      - {eval_time: 3m, alertname: PolygonKafkaBufferFilling, exp_alerts: []}
      - eval_time: 5m
        alertname: PolygonKafkaBufferFilling
        exp_alerts:
          - exp_labels: {severity: warning, instance: a}
            exp_annotations:
              summary: >-
                a: librdkafka's buffer is 60% full: the Kafka cluster is away or slower than the feed; past it, the
                sink's queue fills and drops
      - {eval_time: 20m, alertname: PolygonKafkaBufferFilling, exp_alerts: []}
  - interval: 1m
    input_series:
      - series: 'polygon_connected{instance="a"}'
        values: '1x10'
    alert_rule_test:
      # no polygon target scraped at all: absent for 5 minutes
      - {eval_time: 4m, alertname: PolygonTargetAbsent, exp_alerts: []}
      - eval_time: 6m
        alertname: PolygonTargetAbsent
        exp_alerts:
          - exp_labels: {severity: critical}
            exp_annotations:
              summary: "no polygon-streamer target is scraped at all (the job or its discovery lost every instance)"
"""


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((OPS / "dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


@needs_prometheus
def test_the_rules_pass_promtool_check_and_test(tmp_path):
    shutil.copy(OPS / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "tests.yml").write_text(PROMTOOL_TESTS)
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "tests.yml"]):
        done = subprocess.run([PROMTOOL, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


@needs_prometheus
def test_a_real_prometheus_finds_series_for_every_panel_and_rule(mock_server, spawn, tmp_path):
    # BACKFILL on (against the local server's REST side) so that its metrics, which the alerts use, exist.
    # A Kafka broker (tests/test_kafka.py's) so that the Kafka sink's metrics exist too.
    from polygon_streamer.tools.bench import LocalKafka

    kafka = LocalKafka(str(tmp_path / "tansu")).start()
    streamer = spawn(SINK="ndjson,zmq,gateway,kafka", NDJSON_DEST=str(tmp_path / "out.ndjson"),
                     SUBSCRIPTION="T.*,Q.*", GATEWAY_ADDR=f"127.0.0.1:{free_port()}", KAFKA_BOOTSTRAP=kafka.bootstrap,
                     ZMQ_ENDPOINT=f"tcp://127.0.0.1:{free_port()}", ZMQ_BIND="true",
                     BACKFILL="on", POLYGON_REST_URL=mock_server.start_rest())
    streamer.wait_ready()
    target = streamer.metrics_url[len("http://"):]
    shutil.copy(OPS / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: [alerts.yml]\n"
        f"scrape_configs:\n  - job_name: polygon\n    static_configs: [{{targets: ['{target}']}}]\n")
    port = free_port()
    prometheus = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(expr: str) -> list:
        status, body = http_get(f"{api}/query?query={urllib.parse.quote(expr)}")
        assert status == 200, body
        return json.loads(body)["data"]["result"]

    def up():
        try:
            return query("up") and query("up")[0]["value"][1] == "1" and len(query("polygon_connected[1m]")
                                                                              [0]["values"]) >= 5
        except (OSError, IndexError, KeyError, AssertionError):  # (503 while Prometheus starts)
            return False
    try:
        wait_for(up, timeout=60, what="Prometheus scraping the service (5 scrapes)")
        started = time.monotonic()
        for expr in dashboard_exprs():
            expr = expr.replace("$instance", ".*")
            wait_for(lambda: query(expr), timeout=max(1.0, 20 - (time.monotonic() - started)),
                     what=f"series for the panel {expr}")
        # The rules as the real Prometheus loaded them (no YAML parser needed here).
        status, body = http_get(f"{api}/rules")
        loaded = [rule for group in json.loads(body)["data"]["groups"] for rule in group["rules"]]
        assert len(loaded) == (OPS / "alerts.yml").read_text().count("- alert:") + \
            (OPS / "alerts.yml").read_text().count("- record:")
        for rule in loaded:
            if rule["type"] == "recording":
                wait_for(lambda: query(rule["name"]), timeout=20, what=f"the recording rule {rule['name']}")
            for name in set(re.findall(r"\b(polygon_[a-z_]+)", rule["query"])):
                assert query(name), f"{rule['name']}: no series for {name}"
            assert rule["health"] in ("ok", "unknown"), rule
    finally:
        prometheus.terminate()
        prometheus.wait(20)
        assert streamer.stop() == 0
        kafka.stop(kill=True)
