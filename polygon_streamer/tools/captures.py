"""Reading capture files (capture_format.py has the format): plain or .gz, several merged in receive-time order, every
message given back byte for byte; what cannot be used is counted with its file and line, and the rest is used. A
line is read with a bound (a frame over MAX_FRAME_BYTES is skipped as the live service refuses it, without holding
it in memory)."""

from __future__ import annotations

import base64
import binascii
import gzip
import heapq
import json
import zlib
from typing import Iterator, NamedTuple

from ..capture_format import CAPTURE_LINE, SessionEnd

# Reading a line that is too long: the rest of it is skipped in pieces of this size.
_SKIP_CHUNK = 1 << 20
# A line's text beyond its frame: the prefix and the closing brace, with room for long numbers.
_LINE_OVERHEAD = 200


class CapturedFrame(NamedTuple):
    recv_ns: int
    cluster: str
    session: int
    data: bytes              # the message as it was received (for an end: b"")
    form: str                # "frame" (strict JSON as received), "frame_text" (UTF-8, not that), "frame_b64" (not
                             # UTF-8: a binary frame), "end" (how the session ended: `end`), "backfill" (events
                             # the REST API filled a gap with), "backfill_summary" (that gap's summary payload)
    end: SessionEnd | None = None
    where: str = ""          # file:line, for what a reader reports about this frame

    @property
    def is_json(self) -> bool:
        return self.form == "frame"


class Skipped(NamedTuple):
    path: str
    line: int
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.why}" if self.line else f"{self.path}: {self.why}"


class CaptureFiles:
    """The messages of one or more capture files in receive-time order (files are merged, so rotated files and
    captures of several runs can be given in any order). `skipped` lists what was not used."""

    def __init__(self, paths: list[str], max_frame_bytes: int = 16 * 1024 * 1024):
        self.paths = list(paths)
        self.max_frame_bytes = max_frame_bytes
        self.skipped: list[Skipped] = []
        self.bytes_read = 0
        self.lines = 0

    def __iter__(self) -> Iterator[CapturedFrame]:
        return heapq.merge(*(self._read(path) for path in self.paths), key=lambda frame: frame.recv_ns)

    def unreadable(self) -> list[str]:
        """For each path that cannot be opened, why (checked before anything starts: a usage error)."""
        problems = []
        for path in self.paths:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                problems.append(f"cannot open {path}: {exc.strerror or exc}")
        return problems

    def _read(self, path: str) -> Iterator[CapturedFrame]:
        number = 0
        try:
            handle = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
        except OSError as exc:
            self.skipped.append(Skipped(path, 0, f"cannot open it: {exc.strerror or exc}"))
            return
        # A frame_b64 line is 4/3 of its frame, a frame_text line up to 6 times (\u0000 for each control byte).
        limit = 6 * self.max_frame_bytes + _LINE_OVERHEAD
        with handle:
            try:
                while True:
                    line = handle.readline(limit)
                    if not line:
                        break
                    number += 1
                    self.lines += 1
                    self.bytes_read += len(line)
                    if len(line) == limit and not line.endswith(b"\n"):
                        size = len(line) + self._skip_rest(handle)
                        self.skipped.append(Skipped(path, number, f"a line of {size:,} bytes: its frame exceeds "
                                                                  f"MAX_FRAME_BYTES ({self.max_frame_bytes})"))
                        continue
                    frame = self._parse(path, number, line)
                    if frame is not None:
                        yield frame
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                self.skipped.append(Skipped(path, number + 1, f"the gzip stream ends early or is damaged ({exc}): "
                                                              "the lines before it are used"))
            except OSError as exc:
                self.skipped.append(Skipped(path, number + 1, f"read error: {exc.strerror or exc}"))
        if number == 0 and not any(skipped.path == path for skipped in self.skipped):
            self.skipped.append(Skipped(path, 0, "empty: no capture record in it"))

    def _skip_rest(self, handle) -> int:
        skipped = 0
        while True:
            piece = handle.readline(_SKIP_CHUNK)
            skipped += len(piece)
            self.bytes_read += len(piece)
            if not piece or piece.endswith(b"\n"):
                return skipped

    def _parse(self, path: str, number: int, line: bytes) -> CapturedFrame | None:
        if not line.endswith(b"\n"):
            self.skipped.append(Skipped(path, number, "a torn last line (no newline): the writer was cut off"))
            return None
        line = line[:-1]
        match = CAPTURE_LINE.match(line)
        if match is None or not line.endswith(b"}"):
            self.skipped.append(Skipped(path, number, "not a capture record"))
            return None
        body = line[match.end():-1]
        form = match.group(4).decode()
        end = None
        if form == "frame":
            data = body
        elif form == "backfill":
            data = body  # strict JSON written by the service: the dispatcher's parse checks it as any frame
        elif form == "backfill_summary":
            try:
                summary = json.loads(body)
            except (ValueError, RecursionError):
                summary = None
            if not isinstance(summary, dict):
                self.skipped.append(Skipped(path, number, "backfill_summary is not a JSON object"))
                return None
            data = body
        elif form == "end":
            end = SessionEnd.from_json(body)
            if end is None:
                self.skipped.append(Skipped(path, number, "end is not a session's end"))
                return None
            data = b""
        else:
            try:
                text = json.loads(body)
            except (ValueError, RecursionError):
                text = None
            if not isinstance(text, str):
                self.skipped.append(Skipped(path, number, f"{form} is not a JSON string"))
                return None
            if form == "frame_text":
                data = text.encode("utf-8", "surrogatepass")
            else:
                try:
                    data = base64.b64decode(text, validate=True)
                except (binascii.Error, ValueError):
                    self.skipped.append(Skipped(path, number, "frame_b64 is not base64"))
                    return None
        if len(data) > self.max_frame_bytes:
            self.skipped.append(Skipped(path, number, f"a frame of {len(data):,} bytes exceeds MAX_FRAME_BYTES "
                                                      f"({self.max_frame_bytes})"))
            return None
        return CapturedFrame(int(match.group(1)), match.group(2).decode(), int(match.group(3)), data, form, end,
                             f"{path}:{number}")
