"""Reading capture files (sinks/capture.py writes them): plain or .gz, several merged in receive-time order, every
frame given back byte for byte; what cannot be used is counted with its file and line, and the rest is used."""

from __future__ import annotations

import gzip
import heapq
import json
import zlib
from typing import Iterator, NamedTuple

from .sinks.capture import CAPTURE_LINE


class CapturedFrame(NamedTuple):
    recv_ns: int
    cluster: str
    session: int
    data: bytes          # the frame as it was received
    is_json: bool        # False: it was kept as frame_text (not JSON as received)


class Skipped(NamedTuple):
    path: str
    line: int
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.why}"


class CaptureFiles:
    """The frames of one or more capture files in receive-time order (files are merged, so rotated files and
    captures of several runs can be given in any order). `skipped` lists what was not used."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        self.skipped: list[Skipped] = []
        self.bytes_read = 0

    def __iter__(self) -> Iterator[CapturedFrame]:
        return heapq.merge(*(self._read(path) for path in self.paths), key=lambda frame: frame.recv_ns)

    def _read(self, path: str) -> Iterator[CapturedFrame]:
        number = 0
        try:
            handle = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
        except OSError as exc:
            self.skipped.append(Skipped(path, 0, f"cannot open it: {exc.strerror or exc}"))
            return
        with handle:
            try:
                for number, line in enumerate(handle, 1):
                    self.bytes_read += len(line)
                    frame = self._parse(path, number, line)
                    if frame is not None:
                        yield frame
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                self.skipped.append(Skipped(path, number + 1, f"the gzip stream ends early or is damaged ({exc}): "
                                                              "the lines before it are used"))
            except OSError as exc:
                self.skipped.append(Skipped(path, number + 1, f"read error: {exc.strerror or exc}"))

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
        if match.group(4) == b"frame":
            data, is_json = body, True
        else:
            try:
                text = json.loads(body)
            except ValueError:
                text = None
            if not isinstance(text, str):
                self.skipped.append(Skipped(path, number, "frame_text is not a JSON string"))
                return None
            data, is_json = text.encode("utf-8", "surrogatepass"), False
        if not data:
            self.skipped.append(Skipped(path, number, "an empty frame"))
            return None
        return CapturedFrame(int(match.group(1)), match.group(2).decode(), int(match.group(3)), data, is_json)
