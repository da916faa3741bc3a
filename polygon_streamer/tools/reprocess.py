"""`polygon-streamer reprocess CAPTURE...`: the normal pipeline (normalize, filters, sampling, seq, gap records, the
sinks) over captured frames, with no network and no key, as fast as the sinks take it (nothing is dropped: the
queues wait, and the drain at the end waits as long as the sinks make progress). Frames go in as the reader put them
into the inbound queue: statuses are taken out, ingest_ts is the capture's receive time, and where a session ended
with a hole (the capture's `end` line) the same gap record comes before the next session's first data (or, at the end
of the capture, the `shutdown` one the live service wrote when it stopped inside the hole)."""

from __future__ import annotations

import math
import queue
import sys
import time

from .. import logs, protocol
from ..capture_format import Backfilled, BackfillSummary
from .captures import CaptureFiles, CapturedFrame, Skipped
from ..config import Config, ConfigError
from ..handover import EV_MARKER, shutdown_gap
from ..normalize import FrameError, Gap, parse_frame
from ..reader import may_hold_status
from ..service import Service

PROGRESS_SECS = 0.5
PUT_TICK_SECS = 0.1
_log = logs.get("polygon_streamer")


class Stopped(Exception):
    """SIGTERM/SIGINT while feeding."""


def first_cluster(files: CaptureFiles) -> str | None:
    for frame in files:
        return frame.cluster
    return None


def _statuses(frame: CapturedFrame) -> tuple[list[str], bool]:
    """The statuses of a frame and whether it holds anything else (what the reader forwards)."""
    if not may_hold_status(frame.data):
        return [], True
    try:
        events = parse_frame(frame.data)
    except FrameError:
        return [], True
    statuses = [str(event.get("status", "")) for event in events
                if isinstance(event, dict) and event.get("ev") == "status"]
    return statuses, len(events) > len(statuses)


def _fails_to_parse(frame: CapturedFrame) -> bool:
    """Whether the live dispatcher counted this frame as a parse error: `frame` lines hold strict JSON, so only one
    that is not an array; the other forms are parsed here (they are rare)."""
    if frame.form == "frame":
        return frame.data.lstrip()[:1] != b"["
    try:
        parse_frame(frame.data)
    except FrameError:
        return True
    return False


class Feeder:
    """Puts the capture's frames into the service's inbound queue as the reader did, with its holes."""

    def __init__(self, config: Config, service: Service):
        self.config = config
        self.service = service
        self.frames = 0
        self.events_in = 0
        self.expected_parse_errors = 0
        self.last_recv_ms = 0
        self.pending: list[Gap] = []        # holes not yet told (an `end` line said the session began one)
        self.session_ended: set[int] = set()  # sessions whose `end` line was seen
        self.subscribed: set[int] = set()
        self.data_session: int | None = None

    def put(self, item) -> None:
        """Blocking, but answering signals and a dead pipeline."""
        service = self.service
        while True:
            try:
                service.inbound.put(item, timeout=PUT_TICK_SECS)
                return
            except queue.Full:
                pass
            if service.stop_requested() or service.dead_threads():
                raise Stopped()

    def feed(self, frame: CapturedFrame) -> None:
        ingest_ms = frame.recv_ns // 1_000_000
        if frame.form == "backfill" or frame.form == "backfill_summary":
            # Delivered live where it stands in the capture: the same records again, in the same place.
            text = frame.data.decode("utf-8", "replace")
            self.put((ingest_ms, Backfilled(text) if frame.form == "backfill" else BackfillSummary(text)))
            self.last_recv_ms = ingest_ms  # at a stop: when the service stopped (a hole then ends there)
            return
        if frame.form == "end":
            end = frame.end
            assert end is not None, "an end line has its end"
            if end.reason == "restart" and end.position is not None:
                self._restarted(end, ingest_ms)
                return
            self.session_ended.add(frame.session)
            if end.gap:
                self.pending.append(Gap(end.reason, end.detail, ingest_ms, close_code=end.close_code,
                                        close_reason=end.close_reason, subscription=end.subscription))
            self.last_recv_ms = ingest_ms
            return
        self.frames += 1
        statuses, has_data = _statuses(frame)
        if protocol.AUTH_SUCCESS in statuses:
            self.subscribed.add(frame.session)  # the reader subscribes right after auth_success
        if has_data:
            if frame.session != self.data_session:
                self._session_changed(frame.session, ingest_ms)
            if _fails_to_parse(frame):
                self.expected_parse_errors += 1
            self.events_in += max(0, frame.data.count(EV_MARKER) - len(statuses))
            gaps, self.pending = self.pending, []
            for gap in gaps:
                gap.resumed_ms = ingest_ms
            self.put((ingest_ms, gaps + [frame.data]))
        self.last_recv_ms = ingest_ms

    def _restarted(self, end, ingest_ms: int) -> None:
        """The live run began after a previous one (state.py): the same restart record, numbered as live. Only at the
        start of the reprocess (a capture's first line): the records' seq then continue from the previous run's."""
        position = end.position
        if self.frames or self.pending or self.service.normalizer.seq:
            return
        self.service.normalizer.seq = position["seq"]
        gap = Gap(end.reason, end.detail, position["last_ingest_ts"] if position["last_ingest_ts"] is not None
                  else ingest_ms, subscription=end.subscription)
        gap.before = (position["last_ingest_ts"], position["last_ts"])
        self.pending.append(gap)
        self.last_recv_ms = ingest_ms

    def _session_changed(self, session: int, ingest_ms: int) -> None:
        """A capture written before `end` lines existed says nothing of why a session ended: a hole is told
        anyway when a later session that subscribed brings data."""
        previous = self.data_session
        self.data_session = session
        if previous is None or previous in self.session_ended or self.pending:
            return
        if any(earlier < session for earlier in self.subscribed):
            self.pending.append(Gap("disconnect", f"session {session} began after session {previous} (reprocessed: "
                                                  "the capture does not say why the last one ended)",
                                    self.last_recv_ms, subscription=self.config.subscription))

    def finish(self) -> None:
        """The capture ends inside a hole: as live, the hole becomes a `shutdown` record."""
        for gap in self.pending:
            self.put((self.last_recv_ms, shutdown_gap(gap)))
        self.pending = []
        if self.data_session is not None and self.data_session not in self.session_ended \
                and any(session > self.data_session for session in self.subscribed):
            self.put((self.last_recv_ms, Gap("shutdown", f"the capture ends in session {max(self.subscribed)} before "
                                                         f"data resumed after session {self.data_session}",
                                             self.last_recv_ms, subscription=self.config.subscription)))


def run(config: Config, paths: list[str], progress: bool = True) -> int:
    files = CaptureFiles(paths, config.max_frame_bytes)
    if "capture" in config.sinks:
        raise ConfigError("invalid SINK (--sink) with reprocess: capture would copy the capture; choose "
                          "ndjson, zmq or stdout")
    service = Service(config)
    for sink_queue in service.sink_queues:
        sink_queue.drop_when_full = False  # offline: wait for the sink, never drop
    for sink in service.sinks:
        # ...but not for a disk that never comes back: past SHUTDOWN_TIMEOUT_SECS of failed writes the sink gives
        # up, and the end line counts what was not written (exit 1).
        sink.stall_limit_secs = config.shutdown_timeout_secs
    service.install_signal_handlers()  # first: a SIGTERM during start() is queued, not fatal
    service.start(network=False)
    feeder = Feeder(config, service)
    started = time.monotonic()
    next_report = started + PROGRESS_SECS
    why = None
    try:
        for frame in files:
            if frame.cluster != config.cluster:
                files.skipped.append(_mixed(frame, config.cluster))
                continue
            feeder.feed(frame)
            if time.monotonic() >= next_report:
                if service.stop_requested():
                    raise Stopped()
                if progress:
                    _progress(feeder, files, started)
                next_report += PROGRESS_SECS
        feeder.finish()
    except Stopped:
        why = "a signal or a stopped thread ended the reprocess before the end of the captures"
    if progress:
        _progress(feeder, files, started, final=True)
    service.frames_fed = feeder.frames
    status = service.shutdown(why or f"reprocessed {feeder.frames} frames",
                              timeout_secs=None if why else math.inf)
    damaged = service.normalizer.parse_errors - feeder.expected_parse_errors
    if damaged > 0:
        print(f"reprocess: {damaged} captured frame(s) are not the JSON the capture recorded (damaged lines; the "
              "parse warnings above give their sizes): skipped", file=sys.stderr)
    if files.skipped:
        print(f"reprocess: {len(files.skipped)} line(s) skipped:", file=sys.stderr)
        for skipped in files.skipped[:50]:
            print(f"  {skipped}", file=sys.stderr)
        if len(files.skipped) > 50:
            print(f"  ... and {len(files.skipped) - 50} more", file=sys.stderr)
    if why is not None:
        print(f"reprocess: {why}", file=sys.stderr)
    return 1 if files.skipped or damaged > 0 or why is not None else status


def _mixed(frame: CapturedFrame, cluster: str) -> Skipped:
    path, _, line = frame.where.rpartition(":")
    return Skipped(path or "(merged input)", int(line or 0),
                   f"a frame of cluster {frame.cluster} among {cluster} frames: reprocess one cluster at a time")


def _progress(feeder: Feeder, files: CaptureFiles, started: float, final: bool = False) -> None:
    elapsed = max(1e-9, time.monotonic() - started)
    at_ms = feeder.last_recv_ms
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at_ms / 1000)) if at_ms else "-"
    sys.stderr.write(f"\rreprocess: {feeder.frames:,} frames, ~{feeder.events_in:,} events, "
                     f"{files.bytes_read / 1e6:,.1f} MB read, capture time {when}Z, "
                     f"{feeder.frames / elapsed:,.0f} frames/s" + ("\n" if final else ""))
    sys.stderr.flush()

