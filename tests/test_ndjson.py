"""The NDJSON sink against real files, real rotation, real gzip and real signals to the child process."""

import gzip
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, report, valid_record, wait_for
from polygon_streamer.sinks.ndjson import rotated_name, split_path


@pytest.fixture
def start(spawn):
    def launch(dest, cluster="stocks", **settings):
        return spawn(cluster, SINK="ndjson", NDJSON_DEST=str(dest), **settings)

    return launch


def read_lines(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        text = handle.read()
    assert text == "" or text.endswith("\n"), f"{path} ends with a torn line"
    return [valid_record(line) for line in text.splitlines()]


def size_of(path):
    try:
        return path.stat().st_size
    except FileNotFoundError:  # between a size rotation's rename and the reopen
        return 0


def all_records(directory):
    records = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".tmp"):
            raise AssertionError(f"a temporary file was left behind: {name}")
        records.extend(read_lines(directory / name))
    return records


def assert_exactly_once(records, count):
    seqs = sorted(record["seq"] for record in records)
    assert seqs == list(range(1, count + 1)), "every event must be in exactly one file"


def test_every_event_lands_exactly_once_across_size_rotation_gzip_and_sighup(tmp_path, mock_server, start):
    total = 30000
    mock_server.options.rate = 10000  # a 3 s stream, so the renames below happen while it flows
    mock_server.options.batch = 50
    mock_server.options.count = total
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "stocks.ndjson"
    streamer = start(dest, NDJSON_MAX_BYTES=300_000, NDJSON_GZIP="true", NDJSON_CHANNEL_CAP="100000",
                     CHANNEL_CAP="100000")
    for round_number in range(5):
        # logrotate's create mode: rename, then HUP.
        wait_for(lambda: size_of(dest) > 0, what="a live file with data")
        dest.rename(out / f"stocks.ndjson.{round_number + 1}")
        streamer.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: dest.exists(), what="the reopened file")
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= total, timeout=60, what="all events written")
    assert streamer.metric("polygon_ndjson_rotations_total") >= 3
    assert streamer.stop() == 0
    names = os.listdir(out)
    assert any(name.endswith(".ndjson.gz") for name in names), names
    assert not any(name.endswith(".ndjson") and name != "stocks.ndjson" and ".2" in name for name in names), \
        "a rotated plain file was not compressed"
    assert_exactly_once(all_records(out), total)
    for name in names:
        if name.endswith(".gz"):
            assert os.path.getsize(out / name) > 0
            assert not os.path.exists(out / name[:-3]), "the plain file must go once its .gz is complete"


def test_time_rotation_and_flush_fire_on_a_quiet_feed(tmp_path, mock_server, start):
    mock_server.options.count = 7   # then silence
    dest = tmp_path / "quiet.ndjson"
    streamer = start(dest, NDJSON_FLUSH_EVERY=1000, NDJSON_FLUSH_INTERVAL_MS=200, NDJSON_ROTATE_SECS=1)
    wait_for(lambda: dest.exists() and len(read_lines(dest)) == 7, what="the interval flush with no new event")
    wait_for(lambda: len(os.listdir(tmp_path)) >= 2, timeout=5, what="a time rotation on a quiet feed")
    rotated = [name for name in os.listdir(tmp_path) if name != "quiet.ndjson"]
    assert rotated[0].startswith("quiet.") and rotated[0].endswith("Z.ndjson")
    assert streamer.stop() == 0
    assert_exactly_once(all_records(tmp_path), 7)


def test_split_per_type_keeps_every_kind(tmp_path, mock_server, start):
    mock_server.options.count = 600
    streamer = start(tmp_path / "stocks.ndjson", SUBSCRIPTION="T.*,Q.*,A.*,AM.*,LULD.*,NOI.*,FMV.*",
                     NDJSON_SPLIT_PER_TYPE="true")
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= 600, what="600 events written")
    assert streamer.stop() == 0
    files = sorted(os.listdir(tmp_path))
    assert files == ["stocks.agg_minute.ndjson", "stocks.agg_second.ndjson", "stocks.fmv.ndjson",
                     "stocks.imbalance.ndjson", "stocks.luld.ndjson", "stocks.quote.ndjson",
                     "stocks.trade.ndjson"]
    for name in files:
        kinds = {record["kind"] for record in read_lines(tmp_path / name)}
        assert kinds == {name.split(".")[1]}
    assert_exactly_once(all_records(tmp_path), 600)


def test_sigterm_under_load_writes_every_accepted_event(tmp_path, mock_server, start):
    mock_server.options.rate = 0
    mock_server.options.batch = 100
    dest = tmp_path / "load.ndjson"
    streamer = start(dest, NDJSON_CHANNEL_CAP="100000", CHANNEL_CAP="100000", NDJSON_FLUSH_EVERY="5000",
                     SHUTDOWN_TIMEOUT_SECS="5")
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= 20000, timeout=30, what="a loaded stream")
    signalled = time.monotonic()
    assert streamer.stop(signal.SIGTERM, timeout=5.0) == 0, "exit 0 within SHUTDOWN_TIMEOUT_SECS"
    final = streamer.shutdown_report()
    assert_exactly_once(read_lines(dest), final["events"])
    report("SIGTERM under full load", events=final["events"],
           exit_secs=round(time.monotonic() - signalled, 2), losses=0)


def test_missing_directory_is_exit_2(tmp_path, mock_server, start):
    streamer = start(tmp_path / "no" / "x")
    assert streamer.proc.wait(20) == 2
    streamer.stop()
    assert len(streamer.stderr_lines) == 1
    assert "NDJSON_DEST" in streamer.stderr_lines[0] and "does not exist" in streamer.stderr_lines[0]
    assert mock_server.stats.connections == 0


def test_unwritable_directory_is_exit_2(tmp_path, start):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        # root passes permission checks, not a read-only filesystem
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(locked)]).returncode != 0:
            pytest.skip("needs tmpfs to make a directory root cannot write")
    else:
        locked.chmod(0o555)
    try:
        streamer = start(locked / "x.ndjson")
        assert streamer.proc.wait(20) == 2
        streamer.stop()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(locked)])
    assert len(streamer.stderr_lines) == 1, streamer.stderr_lines
    assert "NDJSON_DEST" in streamer.stderr_lines[0] and "not writable" in streamer.stderr_lines[0]


@pytest.fixture
def tiny_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                                            str(mount_point)]).returncode != 0:
        pytest.skip("needs root and tmpfs to fill a real filesystem")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)])


def fill(disk, size):
    """A file taking `size` bytes of the disk (or all that is left)."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        try:
            handle.write(b"\0" * size)
        except OSError:
            pass
    return filler


def test_a_full_disk_is_survived_and_writing_resumes_when_space_returns(tiny_disk, mock_server, start):
    filler = fill(tiny_disk, 900 * 1024)
    mock_server.options.rate = 2000
    mock_server.options.count = 1500
    dest = tiny_disk / "full.ndjson"
    streamer = start(dest, NDJSON_FLUSH_EVERY=50)
    wait_for(lambda: streamer.metric("polygon_ndjson_write_errors_total") >= 1, timeout=20, what="ENOSPC")
    status, health = streamer.get("/health")
    assert status == 200, "the service keeps running"
    assert "degraded: ndjson sink: writes to" in health and "No space left on device" in health, health
    assert streamer.metric("polygon_sink_write_errors_total", sink="ndjson") >= 1  # what the alert watches
    before = streamer.metric("polygon_events_total", type="T") + streamer.metric("polygon_events_total", type="Q")
    wait_for(lambda: streamer.metric("polygon_events_total", type="T") +
             streamer.metric("polygon_events_total", type="Q") > before, what="the stream to go on")
    filler.unlink()
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= 1500, timeout=30, what="writes resuming")
    assert streamer.get("/health") == (200, "OK\n"), "no longer degraded once writes resume"
    assert streamer.stop() == 0
    assert_exactly_once(read_lines(dest), 1500)
    assert any("NDJSON write failed" in m for m in streamer.log_messages())


def test_rotated_names_sort_by_time_and_never_collide(tmp_path):
    live = str(tmp_path / "stocks.ndjson")
    first = rotated_name(live, 1795555200.123)
    assert os.path.basename(first) == "stocks.20261124T212000.123Z.ndjson"
    open(first, "w").close()
    second = rotated_name(live, 1795555200.123)
    assert os.path.basename(second) == "stocks.20261124T212000.123Z_1.ndjson"
    open(second + ".gz", "w").close()
    third = rotated_name(live, 1795555200.123)
    assert sorted([third, second, first]) == [first, second, third]
    assert os.path.basename(split_path(live, "trade")) == "stocks.trade.ndjson"
    assert os.path.basename(rotated_name(str(tmp_path / "plain"), 1795555200.0)) == "plain.20261124T212000.000Z"


# -- issue 13: disk and file faults ------------------------------------------------------------------------------

def test_sigterm_on_a_full_disk_retries_until_the_deadline_and_reports_what_was_not_written(tiny_disk, mock_server,
                                                                                             start):
    fill(tiny_disk, 900 * 1024)
    mock_server.options.rate = 5000
    mock_server.options.count = 5000
    dest = tiny_disk / "full.ndjson"
    streamer = start(dest, NDJSON_FLUSH_EVERY=50, SHUTDOWN_TIMEOUT_SECS=3, NDJSON_CHANNEL_CAP=100000)
    wait_for(lambda: streamer.metric("polygon_ndjson_write_errors_total") >= 1, timeout=20, what="ENOSPC")
    wait_for(lambda: streamer.metric("polygon_events_total", type="T") + streamer.metric("polygon_events_total",
             type="Q") >= 5000, timeout=20, what="every event accepted")
    started = time.monotonic()
    assert streamer.stop() == 1, "not everything accepted is on disk"
    assert time.monotonic() - started < 5
    final = streamer.shutdown_report()
    on_disk = len(read_lines(dest))
    assert final["unwritten_events"] == 5000 - on_disk - final["sink_drops"]
    assert final["unwritten_events"] > 0 and "ndjson: " in final["message"]


def test_a_full_disk_with_size_rotation_and_gzip_never_splits_a_line_nor_overfills_a_file(tiny_disk, mock_server,
                                                                                           start):
    filler = fill(tiny_disk, 880 * 1024)
    mock_server.options.rate = 4000
    mock_server.options.count = 6000
    dest = tiny_disk / "rot.ndjson"
    streamer = start(dest, NDJSON_FLUSH_EVERY=20, NDJSON_MAX_BYTES=150000, NDJSON_GZIP="true",
                     NDJSON_CHANNEL_CAP=100000)
    wait_for(lambda: streamer.metric("polygon_ndjson_write_errors_total") >= 3, timeout=30,
             what="ENOSPC across retries and rotations")
    filler.unlink()
    # Room for every file, plain and gzipped: the gzips that failed for lack of space are retried (30 s).
    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny_disk)], check=True)
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= 6000, timeout=60, what="writes resuming")
    wait_for(lambda: not [n for n in os.listdir(tiny_disk) if n != dest.name and not n.endswith(".gz")],
             timeout=90, what="every rotated file gzipped (failed ones retried)")
    write_errors = int(streamer.metric("polygon_ndjson_write_errors_total"))
    assert streamer.stop() == 0
    for name in os.listdir(tiny_disk):
        if name.endswith(".gz"):
            with gzip.open(tiny_disk / name, "rb") as handle:
                assert len(handle.read()) <= 150000, f"{name} is larger than NDJSON_MAX_BYTES"
    assert_exactly_once(all_records(tiny_disk), 6000)  # read_lines rejects a torn line in any file
    report("full disk + size rotation + gzip", events=6000,
           write_errors=write_errors, losses=0, torn=0)


def test_a_live_file_deleted_by_hand_is_noticed_counted_and_recreated(tmp_path, mock_server, start):
    mock_server.options.rate = 1000
    mock_server.options.count = 4000
    dest = tmp_path / "gone.ndjson"
    streamer = start(dest, NDJSON_ROTATE_SECS=1, NDJSON_FLUSH_INTERVAL_MS=50)
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= 500, what="the stream")
    dest.unlink()
    wait_for(lambda: dest.exists(), what="the path opened again")
    wait_for(lambda: streamer.metric("polygon_ndjson_written_total") >= 4000, timeout=20, what="the rest")
    assert streamer.get("/health")[0] == 200
    assert any("was deleted while open" in m for m in streamer.log_messages())
    lost = streamer.metric("polygon_ndjson_lost_events_total")
    assert streamer.stop() == 0
    kept = sorted(r["seq"] for r in all_records(tmp_path))
    assert kept == list(range(kept[0], 4001)), "after the deletion, every event is in the new file"
    assert 0 < lost <= kept[0] - 1, "only events that went into the deleted file are counted as lost"
    report("live file deleted by hand", events=4000, in_new_file=len(kept), counted_lost=int(lost))


# /proc: root gets as far as open() and is refused there; another user is refused at the directory check first.
@pytest.mark.parametrize("dest, words", [(".", "is a directory"), ("/proc/polygon.ndjson",
                                          "cannot open" if os.geteuid() == 0 else "is not writable by this user")])
def test_a_directory_or_an_unopenable_path_is_exit_2(tmp_path, start, dest, words):
    streamer = start(tmp_path if dest == "." else dest)
    assert streamer.proc.wait(20) == 2
    streamer.stop()
    assert len(streamer.stderr_lines) == 1, streamer.stderr_lines
    assert "NDJSON_DEST" in streamer.stderr_lines[0] and words in streamer.stderr_lines[0]


def _capture_of(mock_server, spawn, tmp_path, events):
    mock_server.options.rate = 0
    mock_server.options.batch = 10
    mock_server.options.count = events
    capture = tmp_path / "in.capture"
    streamer = spawn(SINK="capture", CAPTURE_DEST=str(capture), SUBSCRIPTION="T.*,Q.*")
    wait_for(lambda: streamer.metric("polygon_events_total", type="T") +
             streamer.metric("polygon_events_total", type="Q") >= events, timeout=30, what="the capture")
    assert streamer.stop() == 0
    return capture


def _stop_report(stderr: str) -> dict:
    import ujson
    lines = [ujson.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line["fields"] for line in lines if line["fields"]["message"].startswith(("stopped", "second"))][-1]


def test_reprocess_into_a_full_disk_gives_up_with_the_right_count(tiny_disk, mock_server, spawn, tmp_path):
    """An offline tool does not wait forever for a disk that never comes back: past SHUTDOWN_TIMEOUT_SECS of failed
    writes it stops, says how many events were not written (what the file lacks), and exits 1."""
    events = 20_000
    capture = _capture_of(mock_server, spawn, tmp_path, events)
    fill(tiny_disk, 1000 * 1024)
    dest = tiny_disk / "out.ndjson"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "polygon_streamer", "reprocess", "--no-progress", "--sink",
                             "ndjson", "--ndjson-dest", str(dest), "--shutdown-timeout-secs", "1", str(capture)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert took < 20, f"{took:.1f}s"
    report = _stop_report(result.stderr)
    written = len(read_lines(dest)) if dest.exists() else 0
    assert report["unwritten_events"] + report["sink_drops"] + written == report["events"] == events, \
        (report, written)
    assert "giving up" in result.stderr


def test_sigterm_while_reprocess_waits_on_a_full_disk_counts_what_the_sink_holds(tiny_disk, mock_server, spawn,
                                                                                tmp_path):
    import signal

    events = 20_000
    capture = _capture_of(mock_server, spawn, tmp_path, events)
    fill(tiny_disk, 1000 * 1024)
    counts = []
    for signals in (1, 2):  # SIGTERM: the drain's deadline, then the count; a second one: at once, with the count
        dest = tiny_disk / f"out{signals}.ndjson"
        proc = subprocess.Popen([sys.executable, "-m", "polygon_streamer", "reprocess", "--no-progress", "--sink",
                                 "ndjson", "--ndjson-dest", str(dest), "--shutdown-timeout-secs", "2",
                                 str(capture)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: dest.exists() and dest.stat().st_size > 0, timeout=20, what="the disk filling")
            started = time.monotonic()
            for _ in range(signals):
                proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=20)
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        assert proc.returncode == 1, stderr
        assert took < 6, f"{took:.1f}s"
        fields = _stop_report(stderr)
        whole_lines = dest.read_bytes().count(b"\n")
        assert fields["unwritten_events"] > 0, fields
        if signals == 1:
            written = len(read_lines(dest))  # cut back to its last whole line
            assert written + fields["unwritten_events"] + fields["sink_drops"] == fields["events"], (fields, written)
        counts.append((whole_lines, fields["unwritten_events"]))
        dest.unlink()  # the space it took, for the next pass
    report("reprocess: SIGTERM on a full disk", counts=counts)
