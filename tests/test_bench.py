"""The benchmark command works end to end and reports no loss (a smoke run, not a timed test)."""

import os
import shutil
import subprocess
import sys

import pytest
import ujson

from helpers import ROOT


def bench(*args: str) -> dict:
    """A small bench run's JSON report; it must exit 0 (nothing lost, nothing dropped)."""
    result = subprocess.run([sys.executable, "-m", "polygon_streamer", "bench", *args, "--json", "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return ujson.loads(result.stdout)


def test_bench_runs_with_both_sinks_and_reports_no_loss():
    report = bench("--events", "20000", "--batch", "50", "--sink", "ndjson,zmq")
    assert report["ok"] is True and report["lost"] == 0
    assert report["written"] == {"ndjson": 20000, "zmq": 20000}
    assert sum(report["dropped"].values()) == 0
    for key in ("transport_events_per_sec", "parse_events_per_sec", "work_events_per_sec", "service_events_per_sec",
                "official_events_per_sec", "service_pinned_events_per_sec", "service_to_official_ratio",
                "cpu_seconds_per_million", "cpu_seconds_per_million_pinned", "cpu_seconds_per_million_paced",
                "peak_rss_mb"):
        assert report[key] > 0, key
    # CPU time comes in 10 ms ticks: on a run this short only the busiest thread is sure to show.
    assert "dispatcher" in report["cpu_seconds_per_million_by_thread"]
    assert sum(report["cpu_seconds_per_million_by_thread"].values()) <= report["cpu_seconds_per_million"] + 0.05
    assert report["write_latency_p99_ms"] >= report["write_latency_p50_ms"] > 0
    # What a consumer tailing the file sees: measured, at half the rate and on a quiet feed.
    assert report["visible_latency_p99_ms"] >= report["visible_latency_p50_ms"] >= 0
    assert report["quiet_visible_latency_p99_ms"] >= report["quiet_visible_latency_p50_ms"] >= 0


@pytest.mark.skipif(shutil.which("redis-server") is None and os.environ.get("CI") != "true",
                    reason="redis-server is not installed (Debian: apt install redis-server; CI installs it)")
def test_bench_measures_the_redis_sink_beside_ndjson_and_checks_the_stream_by_seq():
    report = bench("--events", "5000", "--batch", "10", "--sink", "ndjson,redis", "--no-pinned")
    assert report["ok"] is True and report["lost"] == 0
    assert report["written"] == {"ndjson": 5000, "redis": 5000}
    assert report["service_events_per_sec"] > 0


def test_bench_gateway_rows_check_every_clients_events_against_the_file():
    report = bench("--events", "5000", "--batch", "10", "--gateway", "2", "--no-pinned")
    assert report["ok"] is True and report["lost"] == 0, report["problems"]
    assert [(row["clients"], row["spread"]) for row in report["gateway"]] == [(2, "all"), (2, "symbol")]
    for row in report["gateway"]:
        assert row["service_events_per_sec"] > 0 and row["client_events_per_sec_min"] > 0
        assert row["client_visible_latency_p99_ms"] >= row["client_visible_latency_p50_ms"] >= 0
    assert report["gateway_quiet"]["cpu_percent_with"] > 0


def test_bench_refuses_a_gateway_count_it_cannot_run():
    result = subprocess.run([sys.executable, "-m", "polygon_streamer", "bench", "--gateway", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "invalid --gateway '0'" in result.stderr
