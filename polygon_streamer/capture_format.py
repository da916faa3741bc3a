"""The capture format (schema.md, "The capture record"), shared by what writes it (the reader's hand-over, the capture
sink) and what reads it (captures.py: replay, reprocess). Data types and pure functions only, no I/O.

Every message as received, one line each, byte-exact, in one of three forms:

    {"recv_ns":...,"cluster":"stocks","session":3,"frame":[...the frame's JSON text, byte for byte...]}
    {"recv_ns":...,"cluster":"stocks","session":3,"frame_text":"...the frame as a JSON string..."}
    {"recv_ns":...,"cluster":"stocks","session":3,"frame_b64":"...the frame's bytes in base64..."}

`frame` when the text is strict JSON as it stands (on one line), `frame_text` when it is UTF-8 but not that (not JSON,
or JSON with what strict JSON forbids: raw control characters, `01`, `1.`, NaN, a BOM, line breaks), `frame_b64` when
it is not valid UTF-8 (a binary frame with any bytes). When a session ends, one more line says how:

    {"recv_ns":...,"cluster":"stocks","session":3,"end":{"reason":"server_close","detail":"...","close_code":1011,
     "close_reason":"...","gap":true,"subscription":"T.*,Q.*"}}

`reason` is the gap record's word, `gap` whether the live service began a gap there (reprocess then writes the same
gap record), and replay ends its client's connection the same way (the close code where there was one).

With BACKFILL, what was delivered from the REST API for a gap is kept too, where the live service delivered it
(`session` is then the last session's), so that reprocess delivers the same records; replay skips these lines:

    {"recv_ns":...,"cluster":"stocks","session":3,"backfill":[...the backfilled events, as WebSocket events...]}
    {"recv_ns":...,"cluster":"stocks","session":3,"backfill_summary":{...the summary record's payload...}}
"""

from __future__ import annotations

import base64
import json
import re

import ujson

from .normalize import strict_compact

# A line as the capture sink writes it: the prefix is fixed, so readers take the frame back byte for byte.
CAPTURE_LINE = re.compile(rb'\{"recv_ns":(\d+),"cluster":"([a-z]+)","session":(\d+),'
                          rb'"(frame|frame_text|frame_b64|end|backfill|backfill_summary)":')


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


def frame_field(data: bytes) -> str:
    """The line's field after the prefix `"frame`: `":<json>` as it is, `_text":"<string>"`, or `_b64":"<base64>"`."""
    text = frame_json(data)
    if text is not None:
        return '":' + text
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError:
        return '_b64":"' + base64.b64encode(data).decode("ascii") + '"'
    return '_text":' + json.dumps(decoded, ensure_ascii=False)


class CaptureNote:
    """A capture line that is not a received frame: it writes its own field (`field()`, after the line's prefix)."""

    __slots__ = ()

    def field(self) -> str:
        raise NotImplementedError


class _JsonNote(CaptureNote):
    """A note that is JSON text the service wrote (strict), kept under its line's key."""

    __slots__ = ("text",)
    KEY = ""

    def __init__(self, text: str):
        self.text = text

    def field(self) -> str:
        return f'"{self.KEY}":' + self.text


class Backfilled(_JsonNote):
    """Events the REST API returned for a gap, as WebSocket events (backfill/), after deduplication: the dispatcher
    normalizes them as records marked "backfill": true, and the capture keeps them as a `backfill` line so that
    reprocess delivers the same records."""

    __slots__ = ()
    KEY = "backfill"


class BackfillSummary(_JsonNote):
    """The summary of one gap's backfill (the payload of the record of kind "backfill"), as its capture line."""

    __slots__ = ()
    KEY = "backfill_summary"


class SessionEnd(CaptureNote):
    """How a session ended, as the capture's `end` line records it (a message of a CaptureBatch, after the session's
    last frame)."""

    __slots__ = ("reason", "detail", "close_code", "close_reason", "gap", "subscription", "position")

    def __init__(self, reason: str, detail: str, close_code: int | None = None, close_reason: str | None = None,
                 gap: bool = False, subscription: str | None = None, position: dict | None = None):
        self.reason = reason
        self.detail = detail
        self.close_code = close_code
        self.close_reason = close_reason
        self.gap = gap
        self.subscription = subscription
        # A `restart` (session 0, the capture's first line): the previous run's last_ingest_ts, last_ts and seq.
        self.position = position

    def field(self) -> str:
        """The line's field after the prefix: `"end":{...}` (ASCII JSON: whatever the server's reason held)."""
        value: dict[str, object] = {"reason": self.reason, "detail": self.detail, "close_code": self.close_code,
                 "close_reason": self.close_reason, "gap": self.gap, "subscription": self.subscription}
        if self.position is not None:
            value["position"] = self.position
        return '"end":' + json.dumps(value, separators=(",", ":"))

    @classmethod
    def from_json(cls, body: bytes) -> "SessionEnd | None":
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(value, dict) or not isinstance(value.get("reason"), str):
            return None

        def text(key):
            return value[key] if isinstance(value.get(key), str) else None

        code = value.get("close_code")
        position = value.get("position")
        if not (isinstance(position, dict) and type(position.get("seq")) is int and position["seq"] >= 0
                and all(position.get(key) is None or type(position.get(key)) is int
                        for key in ("last_ingest_ts", "last_ts"))):
            position = None
        return cls(value["reason"], text("detail") or "", code if type(code) is int else None, text("close_reason"),
                   value.get("gap") is True, text("subscription"), position)


class CaptureBatch(list):
    """The messages of one hand-over, in order: all completed by one socket read (so received at `recv_ns`) in one
    session. Each is its bytes, or its text once the dispatcher's parse proved it strict JSON as received; a session's
    last batch may end with its SessionEnd."""

    __slots__ = ("recv_ns", "session")

    def __init__(self, recv_ns: int, session: int, messages=()):
        super().__init__(messages)
        self.recv_ns = recv_ns
        self.session = session

    def frames(self) -> int:
        """Its messages that are frames (not a SessionEnd)."""
        return sum(1 for message in self if not isinstance(message, CaptureNote))
