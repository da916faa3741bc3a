"""The stream position between runs (STATE_DIR; under systemd the unit's $STATE_DIRECTORY): the last data's ingest
time and event time, the last `seq`, and whether the run stopped cleanly. The next run of the instance starts with
one `restart` gap record (the hole between the runs, healed by BACKFILL like any other) and goes on numbering from
there, so a restart, a crash or an upgrade is a record in the data, not a silent drop of `seq` back to 1.

One JSON file per cluster, replaced atomically (written beside it, then renamed) by the main thread once a second while
something changed, and fsync'ed at a clean stop. With BACKFILL it also keeps each explicit topic's last event time and
the identities of its events at that time, so that a restart's window starts exactly where each topic stopped (after
a clean stop nothing is fetched twice). A crash loses at most the last save's interval of
position: so that no `seq` is ever given twice, the file reserves SEQ_RESERVE numbers ahead of the last one, and a
run after an unclean stop continues after the reservation (a jump in `seq` that its restart record explains).

A missing or damaged file is one log line and a fresh start; a file that cannot be written is logged once and
counted (polygon_state_write_errors_total), never a reason to stop the data.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import logs
from .normalize import Gap

if TYPE_CHECKING:
    from .backfill import Desk
    from .handover import Handover
    from .normalize import FrameNormalizer

SEQ_RESERVE = 10_000_000  # at 400,000 events/s, 25 s of numbers; renewed when half is used
SAVE_SECS = 1.0
FORMAT = 1
MAX_FILE_BYTES = 64 * 1024 * 1024  # the tracks of a large subscription included

_log = logs.get("polygon_streamer")


@dataclass
class Position:
    last_ingest_ms: int | None  # the last data received (ms)
    last_ts: int | None  # that data's event time (ms)
    seq: int  # the last seq given
    reserved: int  # no seq up to this one may be given by a later run (== seq after a clean stop)
    clean: bool  # the run stopped cleanly (every accepted event written)
    saved_ms: int  # when this was written
    tracks: dict  # BACKFILL: "CODE SYMBOL" -> [last event time, identities of the events at it] (backfill.Desk)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "last_ingest_ts": self.last_ingest_ms, "last_ts": self.last_ts,
                           "seq": self.seq, "reserved": self.reserved, "clean": self.clean,
                           "saved_ts": self.saved_ms, "tracks": self.tracks}, separators=(",", ":"),
                          allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Position":
        """Raises ValueError naming what is wrong."""
        value = json.loads(text)
        if not isinstance(value, dict) or value.get("format") != FORMAT:
            raise ValueError(f"not a position file of format {FORMAT}")

        def number(key: str) -> int:
            item = value.get(key)
            if type(item) is not int or item < 0:
                raise ValueError(f"{key} is not a whole number >= 0")
            return item

        def number_or_none(key: str) -> int | None:
            return None if value.get(key) is None else number(key)

        seq, reserved = number("seq"), number("reserved")
        if reserved < seq or type(value.get("clean")) is not bool:
            raise ValueError("reserved is below seq, or clean is not true/false")
        tracks = value.get("tracks") or {}
        if not isinstance(tracks, dict):
            raise ValueError("tracks is not an object")
        return cls(number_or_none("last_ingest_ts"), number_or_none("last_ts"), seq, reserved, value["clean"],
                   number("saved_ts"), tracks)

    def next_seq(self) -> int:
        """The last seq the next run continues after: exact after a clean stop, past the reservation otherwise."""
        return self.seq if self.clean else self.reserved

    def restart_gap(self, subscription: str, now_ms: int) -> Gap:
        """The hole between the previous run and this one (told before this run's first data); it began at the
        previous run's last data (at this start if that run had none)."""
        when = logs.iso_timestamp(self.saved_ms / 1000)
        if self.clean:
            detail = f"restart: the previous run stopped cleanly at {when} after seq {self.seq}"
        else:
            detail = (f"restart: the previous run did not stop cleanly (a crash, a kill or a power loss); last known "
                      f"position at {when}, seq {self.seq}; seq continues after {self.reserved}")
        gap = Gap("restart", detail, self.last_ingest_ms if self.last_ingest_ms is not None else now_ms,
                  subscription=subscription)
        gap.before = (self.last_ingest_ms, self.last_ts)
        return gap


class PositionFile:
    """The position of one instance (by cluster) in a state directory. Used by the main thread only."""

    def __init__(self, directory: str, cluster: str):
        self.path = os.path.join(directory, f"{cluster}.position.json")
        self.errors = 0
        self._logged = False
        self._next_save = 0.0
        self._saved: tuple | None = None
        self.reserved = 0

    def load(self) -> Position | None:
        """The previous run's position, or None (a fresh start: said in one line)."""
        try:
            with open(self.path, "rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            _log.info("no stream position in %s: a fresh start (seq from 1, no restart record)", self.path,
                      extra={"fields": {"path": self.path}})
            return None
        except OSError as exc:
            _log.warning("cannot read the stream position %s (%s): a fresh start (seq from 1, no restart record)",
                         self.path, exc.strerror or exc, extra={"fields": {"path": self.path}})
            return None
        try:
            if len(data) > MAX_FILE_BYTES:
                raise ValueError(f"more than {MAX_FILE_BYTES} bytes")
            position = Position.from_json(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            _log.warning("the stream position %s is damaged (%s): a fresh start (seq from 1, no restart record)",
                         self.path, exc, extra={"fields": {"path": self.path}})
            return None
        self.reserved = position.next_seq()
        return position

    def save(self, last_ingest_ms: int | None, last_ts: int | None, seq: int, clean: bool = False,
             now: float | None = None, tracks: dict | None = None) -> None:
        """Write the position if it changed (at most every SAVE_SECS unless clean: the stop's save always goes)."""
        now = time.monotonic() if now is None else now
        if not clean and now < self._next_save:
            return
        self._next_save = now + SAVE_SECS
        reserved = seq if clean else self.reserved
        if not clean and seq > self.reserved - SEQ_RESERVE // 2:
            reserved = seq + SEQ_RESERVE
        tracks = tracks or {}
        state = (last_ingest_ms, last_ts, seq, reserved, clean, id(tracks))
        if state == self._saved:
            return
        position = Position(last_ingest_ms, last_ts, seq, reserved, clean, time.time_ns() // 1_000_000, tracks)
        temporary = f"{self.path}.tmp"
        try:
            with open(temporary, "w", encoding="ascii") as handle:
                handle.write(position.to_json())
                if clean:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except (OSError, ValueError) as exc:  # (ValueError: a track's identity that is not strict JSON)
            self.errors += 1
            if not self._logged:
                self._logged = True
                why = getattr(exc, "strerror", None) or exc
                _log.error("cannot write the stream position %s (%s): a restart will not be marked; later failures "
                           "are counted (polygon_state_write_errors_total)", self.path, why,
                           extra={"fields": {"path": self.path}})
            return
        self._saved = state
        self.reserved = reserved


class PositionKeeper:
    """This run's side of the stream position: the previous run's restored before any record (seq goes on, its last
    data begins a `restart` hole told before this run's first data, the desk's tracks start where each topic
    stopped), and this run's saved by the main thread (the previous run's last data while this one has none)."""

    def __init__(self, file: PositionFile, normalizer: FrameNormalizer, handover: Handover, desk: Desk | None):
        self.file = file
        self._normalizer = normalizer
        self._handover = handover
        self._desk = desk
        self._previous_data: tuple[int | None, int | None] = (None, None)

    def restore(self, subscription: str) -> None:
        """Before the reader and the dispatcher start; subscription: the topics, as the restart record tells them."""
        normalizer = self._normalizer
        previous = self.file.load()
        if previous is not None:
            now_ns = time.time_ns()
            normalizer.seq = previous.next_seq()
            gap = previous.restart_gap(subscription, now_ns // 1_000_000)
            self._handover.restarted(gap, normalizer.seq, now_ns)
            self._previous_data = gap.before or (None, None)
            if self._desk is not None:
                self._desk.restore(previous.tracks)
            _log.info("%s; seq goes on from %d", gap.detail, normalizer.seq,
                      extra={"fields": {"path": self.file.path, "seq": normalizer.seq, "clean": previous.clean,
                                        "last_ingest_ts": previous.last_ingest_ms}})
        self.save(force=True)

    def save(self, clean: bool = False, force: bool = False) -> None:
        """The position as of now: at most every SAVE_SECS unless forced; clean at a stop that wrote everything."""
        normalizer = self._normalizer
        last_ingest_ms, last_ts = normalizer.last_ingest_ms, normalizer.last_ts
        if last_ingest_ms is None:
            last_ingest_ms, last_ts = self._previous_data
        desk = self._desk
        self.file.save(last_ingest_ms, last_ts, normalizer.seq, clean, now=0.0 if force else None,
                       tracks=desk.positions if desk is not None else None)
