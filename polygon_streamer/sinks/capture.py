"""The capture sink (SINK=capture): every message exactly as received, one line each, for replay and reprocessing
(the format: capture_format.py).

Every message the reader receives, data and status frames alike, handshakes included, travels to it through the
dispatcher, whose parse proves most frames strict JSON (so they are parsed once); frames the full inbound queue refused
are kept too (the reader holds their batches for the next hand-over, within CAPTURE_CHANNEL_CAP), and so is how each
session ended. Files, rotation, gzip, SIGHUP reopen, the lossless close and the counted drops are the NDJSON sink's (a
subclass).
"""

from __future__ import annotations

from ..capture_format import CaptureBatch, CaptureNote, frame_field
from ..config import Config
from . import SinkConfigError
from .ndjson import FileSettings, NdjsonSink


class CaptureSink(NdjsonSink):
    name = "capture"
    unit = "Frames"
    takes = "wire"

    @staticmethod
    def queue_settings(config: Config) -> tuple[int, bool, float]:
        # It never waits: a full queue drops, counted (the wire must not slow the data).
        return config.capture_channel_cap, True, config.capture_warn_interval_secs

    def __init__(self, config: Config):
        if config.capture_dest is None:
            raise SinkConfigError("the capture sink needs CAPTURE_DEST (--capture-dest)")
        super().__init__(config, FileSettings("CAPTURE", config.capture_dest, False, config.capture_flush_every,
                                              config.capture_flush_interval_ms, config.capture_max_bytes,
                                              config.capture_rotate_secs, config.capture_gzip))
        self._head = f',"cluster":"{config.cluster}","session":'

    def write(self, records: list, ingest_ms: int) -> None:
        """records: one hand-over's messages (CaptureBatch): the text of each the dispatcher's parse proved strict
        JSON, else its bytes, checked here; a session's end."""
        assert isinstance(records, CaptureBatch), "the capture sink takes the wire"
        head = f'{{"recv_ns":{records.recv_ns}{self._head}{records.session},'
        prefix = head + '"frame'
        lines = [prefix + '":' + frame + "}" if frame.__class__ is str else
                 head + frame.field() + "}" if isinstance(frame, CaptureNote) else prefix + frame_field(frame) + "}"
                 for frame in records]
        self.write_lines(lines, len(lines), ingest_ms)
