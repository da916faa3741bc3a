"""The stdout sink: each event as a structured log record (target polygon_events) on stdout, for jq and humans;
a gap record as a WARN record of target polygon_gaps, in order with the events."""

from __future__ import annotations

import logging
import sys
import time
from typing import BinaryIO

from .. import logs
from ..normalize import BACKFILL, GAP
from . import Sink, stdout_gone

PAYLOAD_START = ',"payload":'
PAYLOAD_END = ',"hostname":'
BACKFILLED = ',"backfill":true'  # between the payload and the hostname in a backfilled record


class StdoutSink(Sink):
    name = "stdout"

    @classmethod
    def from_config(cls, config) -> "StdoutSink":
        return cls()

    @staticmethod
    def queue_settings(config) -> tuple[int, bool, float]:
        # No capacity of its own: when stdout is slow the dispatcher waits, and the inbound queue (CHANNEL_CAP) is
        # where drops happen and are counted.
        return config.channel_cap, False, config.bp_warn_interval_secs

    def __init__(self, stream: BinaryIO | None = None):
        super().__init__()
        self._stream = stream
        self._enabled = False
        self._gaps_enabled = False

    def open(self) -> None:
        if self._stream is None:
            self._stream = sys.stdout.buffer
        # schema.md: written only when the polygon_events target is enabled at info.
        self._enabled = logs.get("polygon_events").isEnabledFor(logging.INFO)
        self._gaps_enabled = logs.get("polygon_gaps").isEnabledFor(logging.WARNING)

    def start_warnings(self, config) -> list[str]:
        if self._enabled:
            return []
        return [f"SINK=stdout but LOG_LEVEL {config.log_level!r} turns the polygon_events target off: no event will "
                "be printed; add polygon_events=info (e.g. LOG_LEVEL=warn,polygon_events=info)"]

    def write(self, records: list[tuple], ingest_ms: int) -> None:
        if not self._enabled and not self._gaps_enabled:
            return
        now = logs.iso_timestamp(time.time())
        head = f'{{"timestamp":"{now}","level":"INFO","target":"polygon_events","fields":'
        dumps = logs.dumps
        out = []
        for seq, code, symbol, kind, ts, line in records:
            end = line.rindex(PAYLOAD_END)
            backfilled = line.startswith(BACKFILLED, end - len(BACKFILLED))
            payload = line[line.index(PAYLOAD_START) + len(PAYLOAD_START):end - len(BACKFILLED) if backfilled else end]
            if kind in (GAP, BACKFILL) and code == kind:
                if self._gaps_enabled:
                    fields = {"message": kind, "type": code, "symbol": symbol, "ts": ts, "seq": seq,
                              "line": f"{kind} {payload}"}
                    out.append(f'{{"timestamp":"{now}","level":"WARN","target":"polygon_gaps","fields":'
                               f'{dumps(fields)}}}\n')
                continue
            if not self._enabled:
                continue
            fields = {"message": "backfilled event" if backfilled else "event",
                      "type": code, "symbol": symbol, "ts": ts, "seq": seq,
                      "line": f"{code}:{symbol} {payload}"}
            out.append(f"{head}{dumps(fields)}}}\n")
        if not out:
            return
        stream = self._stream
        assert stream is not None, "written before open()"
        try:
            stream.write("".join(out).encode("utf-8"))
            stream.flush()
        except BrokenPipeError:
            raise stdout_gone(len(records)) from None
        self.observe_written(ingest_ms, len(records))

    def close(self, deadline: float | None = None) -> None:
        if self._stream is not None:
            self._stream.flush()
