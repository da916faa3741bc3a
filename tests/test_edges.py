"""What a new user meets in the first hour: help texts that agree with the README and the man page, commands that do
not collide, records that say what they are, and words that tell the truth."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time


from helpers import ROOT, Streamer, free_port, wait_for
from polygon_streamer.cli import cli
from polygon_streamer.config import NETWORK_ONLY, SETTINGS
from polygon_streamer.manpage import render

COMMANDS = sorted(cli.commands)


def run_cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "polygon_streamer", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_the_shipped_man_page_is_the_one_the_commands_render():
    shipped = (ROOT / "debian" / "polygon-streamer.1").read_text()
    assert shipped == render(), "regenerate: python -m polygon_streamer.manpage > debian/polygon-streamer.1"
    assert ".SH EXIT STATUS" in shipped
    for command in COMMANDS:
        assert f".B {command}".replace("-", "\\-") in shipped, command
    for setting in SETTINGS:
        assert f".B {setting.env}".replace("-", "\\-") in shipped, setting.env


DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_the_readme_names_every_command_and_the_reference_every_setting():
    readme = (ROOT / "README.md").read_text()
    for command in COMMANDS:
        assert f"`{command}`" in readme or f"polygon-streamer {command}" in readme, command
    reference = (ROOT / "docs" / "configuration.md").read_text()
    for setting in SETTINGS:
        assert f"`{setting.env}`" in reference, setting.env
    assert 8_000 <= len(readme.encode()) <= 12_500, "README is the short page; the reference is in docs/"


def test_every_command_the_docs_show_exists():
    # `polygon-streamer adm` is the user and its group in a chown, not a command; @ and . follow unit and file names.
    for path in DOCS + [ROOT / "polygon_streamer" / "schema.md"]:
        shown = set(re.findall(r"(?<![@/.\w-])polygon-streamer ([a-z][a-z-]*)", path.read_text())) - {"adm"}
        assert shown <= set(COMMANDS), (path.name, shown - set(COMMANDS))


def _anchors(path):
    """The anchors GitHub makes of a Markdown file's headings."""
    anchors = set()
    for heading in re.findall(r"(?m)^#+ (.+)$", path.read_text()):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_relative_link_in_the_readme_and_docs_resolves():
    checked = 0
    for path in DOCS:
        text = re.sub(r"(?s)```.*?```", "", path.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            assert resolved.exists(), f"{path.relative_to(ROOT)}: {target} does not exist"
            if anchor:
                assert anchor in _anchors(resolved), f"{path.relative_to(ROOT)}: {target}: no such heading"
            checked += 1
    assert checked >= 40


def test_top_level_help_and_package_description_name_every_sink():
    help_text = run_cli("--help").stdout
    description = (ROOT / "setup.cfg").read_text()
    for sink in ("NDJSON", "ZeroMQ", "Redis"):
        assert sink in help_text and sink in description, sink
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_setting_help_names_the_variable_and_the_real_default():
    help_text = " ".join(run_cli("run", "--help").stdout.split())
    assert "[default: stdout (ndjson with EMIT_NDJSON=true)] [env var: SINK]" in help_text
    assert "[env var: LOG_LEVEL]" in help_text and "[env var: RUST_LOG" not in help_text
    assert "polygon_events" in help_text


def test_reprocess_offers_only_what_it_uses_and_logs_no_connection_settings(tmp_path):
    help_text = run_cli("reprocess", "--help").stdout
    for field in NETWORK_ONLY:
        assert f"--{field.replace('_', '-')} " not in help_text, field
    assert "--ndjson-dest" in help_text and "--sink" in help_text
    capture = tmp_path / "c.capture"
    capture.write_bytes(b"".join(b'{"recv_ns":%d,"cluster":"stocks","session":1,"frame":[{"ev":"T","sym":"A","t":1}]}\n'
                                 % (1_700_000_000_000_000_000 + index) for index in range(7)))
    done = run_cli("reprocess", "--no-progress", "--sink", "ndjson", "--ndjson-dest", str(tmp_path / "o.ndjson"),
                   str(capture))
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    shown = next(r["fields"] for r in records if r["fields"]["message"].startswith("configuration: "))
    assert shown["message"].startswith("configuration: cluster stocks, sinks ndjson -> ")
    assert "url" not in shown and "api_key" not in shown and "metrics" not in shown["message"]
    assert shown["ndjson_dest"] == str(tmp_path / "o.ndjson") and "channel_cap" not in shown, "what differs only"
    text = run_cli("reprocess", "--no-progress", "--sink", "ndjson", "--ndjson-dest", str(tmp_path / "t.ndjson"),
                   "--log-format", "text", str(capture)).stderr
    assert " INFO  polygon_config: configuration: cluster stocks" in text and not text.startswith("{"), text
    assert records[-1]["fields"]["frames"] == 7 and "reprocessed 7 frames" in records[-2]["fields"]["message"]


def test_the_demo_takes_a_free_metrics_port_and_says_which(tmp_path):
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 9898))  # where a running service listens by default
        holder.listen()
    except OSError:
        pass  # one already does
    try:
        done = run_cli("demo", "--max-events", "3", "--rate", "100")
    finally:
        holder.close()
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stderr.splitlines() if line.startswith("demo: metrics"))
    assert re.fullmatch(r"demo: metrics, /health and /ready on http://127\.0\.0\.1:\d+", line)
    assert ":9898" not in line


def test_the_stdout_record_is_what_schema_md_says(mock_server, spawn):
    streamer = spawn(SINK="stdout", SUBSCRIPTION="T.*")
    wait_for(lambda: len(streamer.stdout_lines) >= 3, what="three stdout records")
    assert streamer.stop() == 0
    record = json.loads(streamer.stdout_lines[0])
    assert list(record) == ["timestamp", "level", "target", "fields"] and record["target"] == "polygon_events"
    assert list(record["fields"]) == ["message", "type", "symbol", "ts", "seq", "line"]
    schema = (ROOT / "polygon_streamer" / "schema.md").read_text()
    assert '"fields":{"message":"event","type":"T","symbol":"AAPL","ts":1700000000123,"seq":1,' in schema
    assert "not the whole record" in schema


def test_log_level_warn_with_the_stdout_sink_says_why_nothing_prints(mock_server, spawn):
    streamer = spawn(SINK="stdout", LOG_LEVEL="warn")
    wait_for(lambda: any("polygon_events target off" in m for m in streamer.log_messages()), what="the warning")
    assert streamer.stop() == 0
    assert streamer.stdout_lines == []
    quiet = spawn(SINK="stdout", LOG_LEVEL="warn,polygon_events=info")
    wait_for(lambda: quiet.stdout_lines, what="events with the target on")
    assert quiet.stop() == 0
    assert not any("polygon_events target off" in m for m in quiet.log_messages())


def test_zmq_sub_counts_once_a_second_after_an_idle_start():
    import zmq

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    counter = Streamer({"PATH": "/usr/bin:/bin"}, "zmq-sub", ("--endpoint", endpoint, "--count"))
    context = zmq.Context()
    publisher = context.socket(zmq.PUB)
    publisher.connect(endpoint)
    try:
        started = time.monotonic()
        # An idle start: the first report is due after one second; nothing comes for two.
        wait_for(lambda: time.monotonic() - started >= 2.0, what="two idle seconds")
        deadline = time.monotonic() + 1.5
        sent = 0
        while time.monotonic() < deadline:
            publisher.send_multipart([b"T:A", b"{}"])
            sent += 1
        assert sent > 100
        wait_for(lambda: any("/s)" in line for line in counter.stdout_lines), timeout=10, what="a count")
    finally:
        publisher.close(0)
        context.term()
        counter.stop()
    reports = [line for line in counter.stdout_lines if "/s)" in line]
    assert 1 <= len(reports) <= 3, reports
