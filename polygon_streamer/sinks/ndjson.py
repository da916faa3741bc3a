"""The NDJSON sink: one schema.md record a line, to stdout or files that ETL can trust.

Files are written only from the sink thread, in whole-line chunks (a flush never splits a line between two files).
Rotation renames the live file to a name that sorts by time and never collides; gzip runs on its own thread
(`.gz.tmp`, rename when complete, then the plain file is removed), so a crash mid-gzip leaves the plain file.
SIGHUP closes and reopens the path, which is what logrotate's create mode needs.
Disk errors (ENOSPC, EIO) are counted and retried; what could not be written stays buffered (bounded: past the
bound the thread stops taking batches, so the queue fills and drops are counted there) and goes out when the disk
is back.
"""

from __future__ import annotations

import errno
import gzip
from typing import NamedTuple
import operator
import os
import queue
import shutil
import sys
import time

from .. import logs, protocol
from ..config import Config
from ..normalize import BACKFILL, GAP
from ..threads import ServiceThread
from . import Sink, SinkClosed, SinkConfigError, SinkStats, stdout_gone

_log = logs.get("polygon_ndjson")

LINE = operator.itemgetter(5)
RETRY_SECS = 1.0
GZIP_RETRY_SECS = 30.0
MAX_BUFFERED_BYTES = 64 * 1024 * 1024
# On SIGTERM a failing disk is retried this often until shortly before the deadline, so the report comes in time.
CLOSE_RETRY_SECS = 0.2
CLOSE_MARGIN_SECS = 0.3


def rotated_name(path: str, when: float, taken=os.path.exists) -> str:
    """`dir/stocks.ndjson` -> `dir/stocks.20261124T093632.123Z.ndjson`; `_1`, `_2`, ... if taken (sorts after)."""
    directory, base = os.path.split(path)
    stem, dot, ext = base.rpartition(".")
    if not dot or not stem:
        stem, ext = base, ""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(when)) + f".{int(when * 1000) % 1000:03d}Z"
    suffix = f".{ext}" if ext else ""
    candidate = os.path.join(directory, f"{stem}.{stamp}{suffix}")
    counter = 0
    while taken(candidate) or taken(candidate + ".gz"):
        counter += 1
        candidate = os.path.join(directory, f"{stem}.{stamp}_{counter}{suffix}")
    return candidate


def split_path(path: str, kind: str) -> str:
    """`dir/stocks.ndjson` -> `dir/stocks.trade.ndjson`."""
    directory, base = os.path.split(path)
    stem, dot, ext = base.rpartition(".")
    if not dot or not stem:
        return os.path.join(directory, f"{base}.{kind}")
    return os.path.join(directory, f"{stem}.{kind}.{ext}")


class Compressor(ServiceThread):
    """Gzips rotated files off the writer's thread. A failed gzip keeps the plain file and is tried again every
    GZIP_RETRY_SECS; on stop, the job under way finishes and the rest wait for the next start (_queue_leftovers)."""

    def __init__(self, sink_name: str = "ndjson") -> None:
        super().__init__(f"{sink_name}-gzip")
        self.jobs: queue.Queue = queue.Queue()
        self._retries: list[tuple[float, str]] = []
        self.compressed = 0
        self.errors = 0

    def loop(self) -> None:
        while not self.stopping.is_set():
            now = time.monotonic()
            due = [path for when, path in self._retries if when <= now]
            self._retries = [(when, path) for when, path in self._retries if when > now]
            for path in due:
                self.compress(path)
            try:
                path = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            self.compress(path)

    def compress(self, path: str) -> None:
        target = path + ".gz"
        temporary = target + ".tmp"
        try:
            with open(path, "rb") as source, open(temporary, "wb") as raw:
                with gzip.GzipFile(filename=os.path.basename(path), mode="wb", fileobj=raw, mtime=0) as packed:
                    shutil.copyfileobj(source, packed, 1024 * 1024)
                raw.flush()
                os.fsync(raw.fileno())
            shutil.copymode(path, temporary)
            os.rename(temporary, target)
            os.unlink(path)
            self.compressed += 1
        except OSError as exc:
            self.errors += 1
            try:
                os.unlink(temporary)
            except OSError:
                pass
            if os.path.exists(path):
                self._retries.append((time.monotonic() + GZIP_RETRY_SECS, path))
            _log.error("gzip of %s failed, the plain file is kept and gzip is retried in %gs: %s", path,
                       GZIP_RETRY_SECS, exc, extra={"fields": {"path": path, "gzip_errors_total": self.errors}})


class _Output:
    """One destination file: its handle, its size, when it was opened, and what is buffered for it."""

    def __init__(self, path: str | None):
        self.path = path
        self.fd: int | None = None
        self.size = 0
        self.opened_at = 0.0
        self.lines: list[str] = []
        self.events = 0
        self.carry = b""            # encoded lines a failed write left behind (written first next time)
        self.carry_events = 0       # the lines in carry (a partly written line counts as not written)
        self.mid_line = False       # the file ends inside a line (a short write): finish it before any rotation
        self.written_since_check = 0  # events written since the file was last seen linked (see _check_linked)
        self.first_buffered_at = 0.0
        self.arrivals: list[tuple[int, int]] = []  # (ingest_ms, events) of what is buffered, for write latency

    def open_fd(self) -> int:
        """The descriptor, for an output that is open (a closed one fails as a write to a closed file would)."""
        if self.fd is None:
            raise OSError(errno.EBADF, "not open", self.path)
        return self.fd

    def file_path(self) -> str:
        """The path, for an output that is a file (not stdout)."""
        if self.path is None:
            raise OSError(errno.EINVAL, "stdout has no path")
        return self.path

    @property
    def buffered(self) -> bool:
        return bool(self.lines or self.carry)


class FileSettings(NamedTuple):
    """What one file sink writes where: the NDJSON sink's settings, or the capture sink's (sinks/capture.py)."""

    setting: str            # the settings' prefix, for errors: NDJSON -> NDJSON_DEST (--ndjson-dest)
    dest: str
    split_per_type: bool
    flush_every: int
    flush_interval_ms: int
    max_bytes: int | None
    rotate_secs: float | None
    gzip: bool

    @classmethod
    def ndjson(cls, config: Config) -> "FileSettings":
        return cls("NDJSON", config.ndjson_dest, config.ndjson_split_per_type, config.ndjson_flush_every,
                   config.ndjson_flush_interval_ms, config.ndjson_max_bytes, config.ndjson_rotate_secs,
                   config.ndjson_gzip)


class NdjsonSink(Sink):
    name = "ndjson"

    @staticmethod
    def queue_settings(config: Config) -> tuple[int, bool, float]:
        return config.ndjson_channel_cap, True, config.ndjson_warn_interval_secs

    def destination(self) -> str | None:
        return self._files.dest

    def files(self) -> list[str]:
        return [] if self._to_stdout else [self._files.dest]

    def __init__(self, config: Config, files: FileSettings | None = None):
        super().__init__()
        self._config = config
        self._files = files = files or FileSettings.ndjson(config)
        self._log = logs.get(f"polygon_{self.name}")
        self._to_stdout = files.dest == "stdout"
        self._outputs: dict[str, _Output] = {}
        self._flush_every = files.flush_every
        self._flush_interval = files.flush_interval_ms / 1000.0
        self._max_bytes = files.max_bytes
        self._rotate_secs = files.rotate_secs
        self._compressor = Compressor(self.name) if files.gzip and not self._to_stdout else None
        self._retry_at = 0.0
        self._error_warning = logs.RateLimitedWarning(self._log, 5.0)
        self.written = 0
        self.bytes = 0
        self.rotations = 0
        self.write_errors = 0
        self.lost = 0
        # While writes fail: since when and why (/health and STATUS= say so: a full disk is not invisible).
        self._failing_since: float | None = None
        self._failing_why = ""

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def open(self) -> None:
        if self._to_stdout:
            output = _Output(None)
            output.fd = sys.stdout.fileno()
            self._outputs[""] = output
            return
        path = self._files.dest
        directory = os.path.dirname(os.path.abspath(path))
        where = f"invalid {self._files.setting}_DEST (--{self._files.setting.lower()}-dest) {path!r}"
        if os.path.isdir(path):
            raise SinkConfigError(f"{where}: it is a directory; give a file path such as "
                                  f"{path.rstrip('/')}/feed.ndjson")
        if not os.path.isdir(directory):
            raise SinkConfigError(f"{where}: directory {directory} does not exist; create it or fix the path")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise SinkConfigError(f"{where}: directory {directory} is not writable by this user "
                                  f"(uid {os.geteuid()}); fix its owner or mode")
        paths = [split_path(path, kind) for kind in protocol.KINDS + (GAP, BACKFILL)] if self._files.split_per_type \
            else [path]
        for candidate in paths:
            if os.path.exists(candidate) and not os.access(candidate, os.W_OK):
                raise SinkConfigError(f"{where}: {candidate} exists and is not writable by this user")
        if not self._files.split_per_type:
            output = _Output(path)
            try:
                self._open_file(output)
            except OSError as exc:
                raise SinkConfigError(f"{where}: cannot open it for appending ({exc.strerror or exc})") from None
            self._outputs[""] = output
        if self._compressor:
            self._compressor.start()
            self._queue_leftovers(self._compressor, paths)

    def _queue_leftovers(self, compressor: Compressor, paths: list[str]) -> None:
        """Rotated files a crash left uncompressed are compressed now."""
        for path in paths:
            directory, base = os.path.split(path)
            stem = base.rpartition(".")[0] or base
            try:
                names = os.listdir(directory or ".")
            except OSError:
                return
            for name in sorted(names):
                if name.startswith(stem + ".") and name != base and not name.endswith((".gz", ".tmp")) \
                        and rotated_stamp(name[len(stem) + 1:]):
                    compressor.jobs.put(os.path.join(directory, name))

    def close(self, deadline: float | None = None) -> None:
        """Flush everything; while the disk refuses, retry until shortly before the deadline. What is still not
        written then is reported by unwritten() (the service exits 1 with that count)."""
        while True:
            for output in self._outputs.values():
                self._flush(output, final=True)
            # (the service may bring the deadline forward meanwhile: a signal during an offline tool's drain)
            current = self.thread.close_deadline if self.thread is not None else None
            deadline = current if current is not None else deadline
            retry_until = (deadline - CLOSE_MARGIN_SECS) if deadline is not None else 0.0
            if not any(output.buffered for output in self._outputs.values()) or time.monotonic() >= retry_until \
                    or self._stalled():
                break
            time.sleep(CLOSE_RETRY_SECS)
        for output in self._outputs.values():
            if output.path is not None and output.fd is not None:
                if output.mid_line:
                    self._drop_torn_tail(output)
                try:
                    os.fsync(output.fd)
                except OSError as exc:
                    self.write_errors += 1
                    self._log.error("fsync of %s failed at close: %s; recently written lines may not be on disk",
                               output.path, exc.strerror or exc, extra={"fields": {"path": output.path}})
                os.close(output.fd)
                output.fd = None
        if self._compressor:
            self._compressor.stop()
            self._compressor.join(max(0.0, (deadline or time.monotonic() + 30) - time.monotonic()))

    def _drop_torn_tail(self, output: _Output) -> None:
        """At exit with the disk still full, the file may end inside a line: cut it back to its last whole line,
        so that it stays valid line by line (the cut event is among those reported unwritten)."""
        try:
            with open(output.file_path(), "rb") as handle:
                end = handle.seek(0, os.SEEK_END)
                position = end
                while position > 0:
                    start = max(0, position - 65536)
                    handle.seek(start)
                    newline = handle.read(position - start).rfind(b"\n")
                    if newline >= 0:
                        position = start + newline + 1
                        break
                    position = start
            os.ftruncate(output.open_fd(), position)
            self._log.warning("%s ended inside a line the disk refused; cut back to its last whole line", output.path,
                         extra={"fields": {"path": output.path, "bytes_cut": end - position}})
        except OSError as exc:
            self._log.error("could not cut the torn end of %s: %s", output.path, exc.strerror or exc,
                       extra={"fields": {"path": output.path}})

    def unwritten(self) -> int:
        return sum(output.events + output.carry_events for output in self._outputs.values())

    def failed_writes(self) -> int:
        return self.write_errors

    def degraded(self) -> str | None:
        since = self._failing_since
        if since is None:
            return None
        return (f"{self.name} sink: writes to {self._files.dest} failing for {time.monotonic() - since:.0f}s "
                f"({self._failing_why}); {self._buffered_bytes():,} bytes buffered, retried every {RETRY_SECS:g}s")

    def _failing(self, exc: OSError) -> None:
        self.write_errors += 1
        self._failing_why = exc.strerror or str(exc)
        if self._failing_since is None:
            self._failing_since = time.monotonic()

    # -- writing ------------------------------------------------------------------------------------------------

    def _output_for(self, kind: str) -> _Output:
        output = self._outputs.get(kind)
        if output is None:
            output = _Output(split_path(self._files.dest, kind))
            self._outputs[kind] = output
        return output

    def write(self, records: list, ingest_ms: int) -> None:
        if self._files.split_per_type:
            now = time.monotonic()
            touched: dict[str, int] = {}
            for record in records:
                kinds = [record[3]]
                if record[3] == GAP or record[3] == BACKFILL:
                    # A hole is in every kind's stream: each file that has data tells it where it happened (and
                    # what backfill brought back).
                    kinds = [kind for kind in self._outputs if kind != GAP and kind != BACKFILL] or [record[3]]
                for kind in kinds:
                    output = self._output_for(kind)
                    if not output.buffered:
                        output.first_buffered_at = now
                    output.lines.append(record[5])
                    output.events += 1
                    touched[kind] = touched.get(kind, 0) + 1
            outputs = []
            for kind, events in touched.items():
                output = self._outputs[kind]
                output.arrivals.append((ingest_ms, events))
                outputs.append(output)
        else:
            self.write_lines(map(LINE, records), len(records), ingest_ms)
            return
        for output in outputs:
            if output.events + output.carry_events >= self._flush_every:
                self._flush(output)
        self._give_up_if_stalled()
        self._hold_while_failing()

    def write_lines(self, lines, count: int, ingest_ms: int) -> None:
        """`count` lines, ready, for the one file (not split per type): write's common case, and the capture's."""
        output = self._outputs[""]
        if not output.buffered:
            output.first_buffered_at = time.monotonic()
        output.lines.extend(lines)
        output.events += count
        output.arrivals.append((ingest_ms, count))
        if output.events + output.carry_events >= self._flush_every:
            self._flush(output)
        self._give_up_if_stalled()
        self._hold_while_failing()

    def _hold_while_failing(self) -> None:
        """While the disk refuses writes and too much is buffered, stop taking batches: the queue fills and its
        drops are counted, instead of memory growing without bound. Not past the start of a stop (close() retries
        until the deadline and counts what stays unwritten), nor past an offline tool's stall limit."""
        thread = self.thread
        while self._retry_at and self._buffered_bytes() > MAX_BUFFERED_BYTES:
            self._give_up_if_stalled()
            if thread is not None and (thread.close_deadline is not None or thread.stopping.is_set()):
                return
            self.still_working()
            time.sleep(max(0.0, min(0.2, self._retry_at - time.monotonic())))
            if time.monotonic() >= self._retry_at:
                for output in self._outputs.values():
                    self._flush(output)

    def _stalled(self) -> bool:
        """Writes have failed for the offline tool's stall limit (Sink.stall_limit_secs)."""
        since = self._failing_since
        return self.stall_limit_secs is not None and since is not None \
            and time.monotonic() - since >= self.stall_limit_secs

    def _give_up_if_stalled(self) -> None:
        if self._stalled():
            raise SinkClosed(f"writes to {self._files.dest} failed for {self.stall_limit_secs:g}s "
                             f"({self._failing_why}): giving up", 0)

    def _buffered_bytes(self) -> int:
        return sum(len(o.carry) + sum(len(line) + 1 for line in o.lines) for o in self._outputs.values())

    def idle(self) -> None:
        for output in self._outputs.values():
            if output.buffered:
                self._flush(output)

    def tick(self, now: float) -> None:
        for output in list(self._outputs.values()):
            if output.path is not None and output.fd is not None:
                self._check_linked(output)
            if output.buffered and now - output.first_buffered_at >= self._flush_interval:
                self._flush(output)
            if self._rotate_secs and output.path is not None and output.fd is not None \
                    and now - output.opened_at >= self._rotate_secs:
                self._flush(output)
                if output.size > 0 and not output.buffered:
                    try:
                        self._rotate(output)
                    except OSError as exc:
                        self.write_errors += 1
                        output.opened_at = now
                        self._error_warning.warn(
                            f"{self._files.setting} time rotation failed, will retry: {exc.strerror or exc}",
                            path=output.path, write_errors_total=self.write_errors)
                else:
                    output.opened_at = now

    def _check_linked(self, output: _Output) -> None:
        """A live file deleted by hand (or with its directory) takes every later write into an inode nobody can
        read. Seen here at most a tick later: the events written to it since the last check are counted as lost,
        and the path is opened anew (if the directory is gone too, writes fail, are retried and stay buffered)."""
        try:
            linked = os.fstat(output.open_fd()).st_nlink > 0
        except OSError:
            linked = False
        if linked:
            output.written_since_check = 0
            return
        lost = output.written_since_check
        self.lost += lost
        output.written_since_check = 0
        self._log.error("%s was deleted while open: %d event(s) written to it since the last check are lost; "
                   "opening the path again", output.path, lost,
                   extra={"fields": {"path": output.path, "lost_events": lost, "lost_events_total": self.lost}})
        os.close(output.open_fd())
        output.fd = None
        output.mid_line = False
        try:
            self._open_file(output)
        except OSError as exc:
            self._failing(exc)
            self._retry_at = time.monotonic() + RETRY_SECS
            self._error_warning.warn(f"{self._files.setting} reopen failed, will retry: {exc.strerror or exc}",
                                     path=output.path, write_errors_total=self.write_errors)

    def _flush(self, output: _Output, final: bool = False) -> None:
        if not output.buffered:
            return
        now = time.monotonic()
        if self._retry_at and now < self._retry_at and not final:
            return
        if output.lines:
            text = "\n".join(output.lines) + "\n"
            output.carry += text.encode("utf-8")
            output.carry_events += output.events
            output.lines = []
            output.events = 0
        try:
            if output.fd is None:
                self._open_file(output)
            self._write_carry(output)
        except OSError as exc:
            if exc.errno == errno.EPIPE and self._to_stdout:
                # Nothing will ever read these: they are not written (the thread reports them) and not retried.
                unwritten = output.carry_events
                output.carry, output.carry_events, output.arrivals = b"", 0, []
                raise stdout_gone(unwritten) from None
            before = output.carry_events
            output.carry_events = output.carry.count(b"\n")
            self.written += before - output.carry_events
            output.written_since_check += before - output.carry_events
            self._failing(exc)
            self._retry_at = now + RETRY_SECS
            self._error_warning.warn(f"{self._files.setting} write failed, will retry: {exc.strerror or exc}",
                                     path=output.path or "stdout", errno=errno.errorcode.get(exc.errno or 0, exc.errno),
                                     buffered_bytes=self._buffered_bytes(), write_errors_total=self.write_errors)
            return
        if self._retry_at:
            self._log.info(f"{self._files.setting} writes resumed", extra={"fields": {"path": output.path or "stdout"}})
            self._retry_at = 0.0
            self._failing_since = None
        self.written += output.carry_events
        output.written_since_check += output.carry_events
        output.carry_events = 0
        for arrived_ms, events in output.arrivals:
            self.observe_written(arrived_ms, events)
        output.arrivals = []

    def _write_carry(self, output: _Output) -> None:
        """Write output.carry, whole lines per file: with NDJSON_MAX_BYTES a file is rotated before the line that
        would take it past the limit (a single longer line gets a file of its own), never inside a line, even after
        a short write. What is written leaves carry as it goes, so a failure keeps exactly the rest."""
        data = output.carry
        view = memoryview(data)
        done = 0
        limit = self._max_bytes if output.path is not None else None
        try:
            while done < len(data):
                end = len(data)
                if output.mid_line:  # first the rest of the line a short write began, in the same file
                    end = data.find(b"\n", done) + 1 or len(data)
                elif limit and output.size + (end - done) > limit:
                    end = data.rfind(b"\n", done, done + max(0, limit - output.size)) + 1
                    if end <= done:
                        if output.size > 0:
                            self._rotate(output)
                            continue
                        end = data.find(b"\n", done) + 1 or len(data)
                written = os.write(output.open_fd(), view[done:end])
                done += written
                output.size += written
                self.bytes += written
                output.mid_line = written > 0 and data[done - 1] != 0x0A
        finally:
            view.release()
            if done:
                output.carry = data[done:]

    # -- files --------------------------------------------------------------------------------------------------

    def _open_file(self, output: _Output) -> None:
        output.fd = os.open(output.file_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        output.mid_line = False
        output.size = os.fstat(output.fd).st_size
        output.opened_at = time.monotonic()
        if output.size and not self._ends_with_newline(output.file_path()):
            # A crash (SIGKILL, power loss) can leave a torn last line: end it, so that it stays one bad line a
            # reader can skip instead of gluing itself to the first line written now.
            os.write(output.fd, b"\n")
            output.size += 1
            self._log.warning("%s ended with a torn line (an earlier crash); terminated it", output.path,
                         extra={"fields": {"path": output.path}})

    @staticmethod
    def _ends_with_newline(path: str) -> bool:
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"

    def _rotate(self, output: _Output) -> None:
        path = output.file_path()
        target = rotated_name(path, time.time())
        os.rename(path, target)  # first: if it fails, the live file stays open and nothing changed
        os.close(output.open_fd())
        output.fd = None
        self.rotations += 1
        self._log.info("rotated %s to %s", output.path, target,
                  extra={"fields": {"path": output.path, "rotated": target}})
        self._open_file(output)
        if self._compressor:
            self._compressor.jobs.put(target)

    def reopen(self) -> None:
        if self._to_stdout:
            return
        for output in self._outputs.values():
            self._flush(output, final=True)
            if output.mid_line:
                # The disk refused the rest of a line: it must end in this file, so this one reopens later.
                self.write_errors += 1
                self._log.error("reopen of %s deferred: the disk refused the end of a line; send SIGHUP again once "
                           "writes resume", output.path, extra={"fields": {"path": output.path}})
                continue
            if output.fd is not None:
                os.close(output.fd)
                output.fd = None
            try:
                self._open_file(output)
            except OSError as exc:
                self.write_errors += 1
                self._log.error("reopen of %s failed, will retry on the next write: %s", output.path, exc)
        self._log.info(f"reopened {self._files.setting} file(s) after SIGHUP",
                  extra={"fields": {"paths": [o.path for o in self._outputs.values()]}})

    # What one line is, for the metrics' help texts.
    unit = "Records (events and gap records)"

    def describe_metrics(self, queue_stats: SinkStats):
        name, unit = self.name, self.unit
        return [
            (f"polygon_{name}_written_total", f"{unit} written to {name} files (or stdout): handed to the OS, "
                                              "no longer in the sink's buffer", self.written),
            (f"polygon_{name}_bytes_total", f"Bytes written by the {name} sink", self.bytes),
            (f"polygon_{name}_rotations_total", f"{name} files rotated (size or time)", self.rotations),
            (f"polygon_{name}_write_errors_total", f"Failed {name} writes or reopens (retried)", self.write_errors),
            (f"polygon_{name}_drops_total", f"{unit} dropped because the {name} queue was full",
             queue_stats.dropped),
            (f"polygon_{name}_lost_events_total", f"{unit} written to a live file that was then deleted while open",
             self.lost),
            (f"polygon_{name}_gzipped_total", "Rotated files gzipped",
             self._compressor.compressed if self._compressor else 0),
            (f"polygon_{name}_gzip_errors_total", "Failed gzips of rotated files (the plain file is kept, retried)",
             self._compressor.errors if self._compressor else 0),
        ]


def rotated_stamp(rest: str) -> bool:
    """Does `rest` (what follows `stem.`) start with a rotation stamp such as 20261124T093632.123Z?"""
    return len(rest) >= 20 and rest[:8].isdigit() and rest[8] == "T" and rest[9:15].isdigit() \
        and rest[15] == "." and rest[16:19].isdigit() and rest[19] == "Z"
