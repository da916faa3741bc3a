"""`polygon-streamer reprocess CAPTURE...`: the normal pipeline (normalize, filters, sampling, seq, gap records, the
sinks) over captured frames, with no network and no key, as fast as the sinks take it (nothing is dropped: the
queues wait). Frames go in as the reader would have put them into the inbound queue: statuses are taken out, a new
session's first data is preceded by a gap record, ingest_ts is the capture's receive time."""

from __future__ import annotations

import sys
import time

from . import logs, protocol
from .captures import CaptureFiles, CapturedFrame, Skipped
from .config import Config, ConfigError
from .normalize import FrameError, Gap, parse_frame
from .reader import may_hold_status
from .service import Service

PROGRESS_SECS = 0.5
_log = logs.get("polygon_streamer")


def first_cluster(files: CaptureFiles) -> str | None:
    for frame in files:
        return frame.cluster
    return None


def _statuses(frame: CapturedFrame) -> tuple[list[str], bool]:
    """The statuses of a frame and whether it holds anything else (what the reader forwards)."""
    if not frame.is_json or not may_hold_status(frame.data):
        return [], True
    try:
        events = parse_frame(frame.data)
    except FrameError:
        return [], True
    statuses = [str(event.get("status", "")) for event in events
                if isinstance(event, dict) and event.get("ev") == "status"]
    return statuses, len(events) > len(statuses)


def run(config: Config, paths: list[str], progress: bool = True) -> int:
    files = CaptureFiles(paths)
    if "capture" in config.sinks:
        raise ConfigError("invalid SINK (--sink) with reprocess: capture would copy the capture; choose "
                          "ndjson, zmq or stdout")
    service = Service(config)
    for sink_queue in service.sink_queues:
        sink_queue.drop_when_full = False  # offline: wait for the sink, never drop
    service.start(network=False)
    frames = events_in = 0
    started = time.monotonic()
    next_report = started + PROGRESS_SECS
    subscribed_sessions: set[int] = set()
    data_session: int | None = None
    last_recv_ms = 0
    put = service.inbound.put
    for frame in files:
        if frame.cluster != config.cluster:
            files.skipped.append(_mixed(frame, config.cluster))
            continue
        frames += 1
        ingest_ms = frame.recv_ns // 1_000_000
        statuses, has_data = _statuses(frame)
        if protocol.AUTH_SUCCESS in statuses:
            subscribed_sessions.add(frame.session)  # the reader subscribes right after auth_success
        if has_data:
            if frame.session != data_session:
                if any(session < frame.session for session in subscribed_sessions):
                    put((ingest_ms, Gap("disconnect", f"session {frame.session} began after session {data_session}"
                                        " (reprocessed: the capture does not say why the last one ended)",
                                        last_recv_ms, ingest_ms, subscription=config.subscription)))
                data_session = frame.session
            events_in += frame.data.count(b'"ev"') - len(statuses)
            put((ingest_ms, [frame.data]))
        last_recv_ms = ingest_ms
        if progress and time.monotonic() >= next_report:
            _progress(frames, events_in, ingest_ms, files.bytes_read, started)
            next_report += PROGRESS_SECS
    if any(session > (data_session or 0) for session in subscribed_sessions) and data_session is not None:
        # As live: the capture ends inside a hole (a later session subscribed and no data came before the stop).
        put((last_recv_ms, Gap("shutdown", f"the capture ends in session {max(subscribed_sessions)} before data "
                                           f"resumed after session {data_session}", last_recv_ms,
                               subscription=config.subscription)))
    if progress:
        _progress(frames, events_in, last_recv_ms, files.bytes_read, started, final=True)
    status = service.shutdown(f"reprocessed {frames} frames")
    if files.skipped:
        print(f"reprocess: {len(files.skipped)} line(s) skipped:", file=sys.stderr)
        for skipped in files.skipped[:50]:
            print(f"  {skipped}", file=sys.stderr)
        if len(files.skipped) > 50:
            print(f"  ... and {len(files.skipped) - 50} more", file=sys.stderr)
        return 1
    return status


def _mixed(frame: CapturedFrame, cluster: str) -> Skipped:
    return Skipped("(merged input)", 0, f"a frame of cluster {frame.cluster} among {cluster} frames: "
                                        "reprocess one cluster at a time")


def _progress(frames: int, events: int, at_ms: int, read: int, started: float, final: bool = False) -> None:
    elapsed = max(1e-9, time.monotonic() - started)
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at_ms / 1000)) if at_ms else "-"
    sys.stderr.write(f"\rreprocess: {frames:,} frames, ~{events:,} events, {read / 1e6:,.1f} MB read, "
                     f"capture time {when}Z, {frames / elapsed:,.0f} frames/s" + ("\n" if final else ""))
    sys.stderr.flush()
