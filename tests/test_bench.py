"""The benchmark command works end to end and reports no loss (a smoke run, not a timed test)."""

import os
import shutil
import subprocess
import sys

import pytest
import ujson

from helpers import ROOT


def test_bench_runs_with_both_sinks_and_reports_no_loss():
    result = subprocess.run([sys.executable, "-m", "polygon_streamer", "bench", "--events", "20000", "--batch", "50",
                             "--sink", "ndjson,zmq", "--json", "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = ujson.loads(result.stdout)
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
    result = subprocess.run([sys.executable, "-m", "polygon_streamer", "bench", "--events", "5000", "--batch", "10",
                             "--sink", "ndjson,redis", "--json", "--no-progress", "--no-pinned"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = ujson.loads(result.stdout)
    assert report["ok"] is True and report["lost"] == 0
    assert report["written"] == {"ndjson": 5000, "redis": 5000}
    assert report["service_events_per_sec"] > 0
