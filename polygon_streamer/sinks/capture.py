"""The capture sink (SINK=capture): every frame exactly as received, one line each, for replay and reprocessing.

    {"recv_ns":1764115200950123456,"cluster":"stocks","session":3,"frame":[...the frame, byte for byte...]}

Every message the reader receives, data and status frames alike, handshakes included, travels to it through the
dispatcher, whose parse proves most frames strict JSON (so they are parsed once); frames the full inbound queue refused
are kept too (the reader holds their batches for the next hand-over, within CAPTURE_CHANNEL_CAP). `session` counts
connections since process start: a new number is a reconnect. A frame that cannot be embedded as it is (not strict
JSON, not UTF-8, a raw line break in its whitespace) is kept as `"frame_text": "..."`, a JSON string, so every line
stays one valid JSON object. Files, rotation, gzip, SIGHUP reopen, the lossless close and the counted drops are the
NDJSON sink's (a subclass).
"""

from __future__ import annotations

import json
import re

import ujson

from ..config import Config
from ..normalize import strict_compact
from .ndjson import FileSettings, NdjsonSink

# A line as this sink writes it: the prefix is fixed, so readers (replay, reprocess) take the frame back byte for byte.
CAPTURE_LINE = re.compile(rb'\{"recv_ns":(\d+),"cluster":"([a-z]+)","session":(\d+),"(frame|frame_text)":')


def _refuse(constant: str):
    raise ValueError(f"not JSON: {constant}")


def frame_json(data: bytes) -> str | None:
    """The frame's text if it can be embedded as it is (strict JSON, valid UTF-8, on one line), else None."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if strict_compact(data):
        try:  # compact and proven strict by normalize's guard: parsing is the last check
            ujson.loads(data)
            return text
        except ValueError:
            return None
    if "\n" in text or "\r" in text:
        return None
    try:
        json.loads(text, parse_constant=_refuse)  # the strict parser for the rest (rare: statuses with spaces)
    except (ValueError, RecursionError):
        return None
    return text


class CaptureBatch(list):
    """The messages of one hand-over, in order: all completed by one socket read (so received at `recv_ns`) in one
    session. Each is its bytes, or its text once the dispatcher's parse proved it strict JSON as received."""

    __slots__ = ("recv_ns", "session")

    def __init__(self, recv_ns: int, session: int, messages=()):
        super().__init__(messages)
        self.recv_ns = recv_ns
        self.session = session


class CaptureSink(NdjsonSink):
    name = "capture"
    unit = "Frames"

    def __init__(self, config: Config):
        super().__init__(config, FileSettings("CAPTURE", config.capture_dest, False, config.ndjson_flush_every,
                                              config.ndjson_flush_interval_ms, config.capture_max_bytes,
                                              config.capture_rotate_secs, config.capture_gzip))
        self._head = f',"cluster":"{config.cluster}","session":'

    def write(self, records: CaptureBatch, ingest_ms: int) -> None:
        """records: one hand-over's messages (CaptureBatch): the text of each the dispatcher's parse proved strict
        JSON, else its bytes, checked here."""
        prefix = f'{{"recv_ns":{records.recv_ns}{self._head}{records.session},"frame'
        lines = [prefix + '":' + frame + "}" if frame.__class__ is str else self._line(prefix, frame)
                 for frame in records]
        self.write_lines(lines, len(lines), ingest_ms)

    @staticmethod
    def _line(prefix: str, frame: bytes) -> str:
        text = frame_json(frame)
        if text is not None:
            return prefix + '":' + text + "}"
        return f'{prefix}_text":{json.dumps(frame.decode("utf-8", "replace"), ensure_ascii=False)}}}'
