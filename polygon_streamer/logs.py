"""JSON log records on stderr and LOG_LEVEL directives (`warn,polygon_events=info`)."""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any, Iterable, TextIO

import ujson

TARGETS = ("polygon_events", "polygon_gaps", "polygon_stats", "polygon_config", "polygon_conn", "polygon_ndjson",
           "polygon_zmq", "polygon_redis", "polygon_kafka", "polygon_gateway", "polygon_streamer")

OFF = logging.CRITICAL + 10
TRACE = 5
_LEVELS = {"off": OFF, "error": logging.ERROR, "warn": logging.WARNING, "warning": logging.WARNING,
           "info": logging.INFO, "debug": logging.DEBUG, "trace": TRACE}
_NAMES = {logging.ERROR: "ERROR", logging.WARNING: "WARN", logging.INFO: "INFO", logging.DEBUG: "DEBUG",
          TRACE: "TRACE", logging.CRITICAL: "ERROR"}


def parse_directives(text: str) -> tuple[int, dict[str, int]]:
    """'warn,polygon_events=info' -> (default level, {target: level}). Raises ValueError with what is accepted."""
    default = logging.INFO
    per_target: dict[str, int] = {}
    expected = ("expected a level (off, error, warn, info, debug, trace) or directives like "
                "warn,polygon_events=info")
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError(expected)
    for part in parts:
        target, eq, level = part.partition("=")
        if not eq:
            target, level = "", target
        level_value = _LEVELS.get(level.strip().lower())
        if level_value is None or (eq and not target.strip()):
            raise ValueError(expected)
        if target:
            per_target[target.strip()] = level_value
        else:
            default = level_value
    return default, per_target


def iso_timestamp(epoch_seconds: float) -> str:
    whole = int(epoch_seconds)
    micros = int((epoch_seconds - whole) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


def dumps(value: Any) -> str:
    return ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False, default=str)


# A secret this long is replaced wherever it appears; a shorter one only where it stands as a token of its own (no
# letter or digit either side), as a key, a password or a URL's credentials do: a one-character key must not turn
# every such character of a log line into <redacted>.
_ANYWHERE_CHARS = 8


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """text with every secret replaced by <redacted> (give the longest first)."""
    for secret in secrets:
        if not secret or secret not in text:
            continue
        if len(secret) >= _ANYWHERE_CHARS:
            text = text.replace(secret, "<redacted>")
        else:
            text = re.sub(rf"(?<![^\W_]){re.escape(secret)}(?![^\W_])", "<redacted>", text)
    return text


class JsonFormatter(logging.Formatter):
    """{"timestamp", "level", "target", "fields": {"message", ...extra fields}} on one line, with every secret
    (the API key, credentials in the URL) replaced: a server may echo the key in a status message."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        # Longest first, so a secret that contains another is replaced whole; each also as JSON spells it.
        spellings = {spelling for secret in secrets if secret for spelling in (secret, dumps(secret)[1:-1])}
        self._secrets = sorted(spellings, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(self._format(record), self._secrets)

    def _format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"message": record.getMessage()}
        extra = getattr(record, "fields", None)
        if extra:
            fields.update(extra)
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        return dumps({"timestamp": iso_timestamp(record.created), "level": _NAMES.get(record.levelno, "INFO"),
                      "target": record.name, "fields": fields})


class TextFormatter(JsonFormatter):
    """LOG_FORMAT=text (and auto on a terminal): one readable line, `TIME LEVEL target: message key=value ...`,
    secrets redacted as in JSON."""

    def _format(self, record: logging.LogRecord) -> str:
        extra = dict(getattr(record, "fields", None) or {})
        when = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.created * 1000) % 1000:03d}"
        pairs = " ".join(f"{key}={_short(value)}" for key, value in extra.items())
        line = f"{when} {_NAMES.get(record.levelno, 'INFO'):<5} {record.name}: {record.getMessage()}"
        if pairs:
            line += f"  [{pairs}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else dumps(value)
    text = text if len(text) <= 120 else text[:117] + "..."
    return text if text and " " not in text else dumps(text)


FORMATS = ("auto", "json", "text")


def setup(directives: str, stream: TextIO | None = None, secrets: Iterable[str] = (), fmt: str = "json") -> None:
    """Configure every target from LOG_LEVEL directives; records go to stderr as JSON lines (LOG_FORMAT=json, the
    default for journald and pipes) or readable lines (text; auto: text when stderr is a terminal), secrets
    redacted either way."""
    default, per_target = parse_directives(directives)
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter(secrets) if fmt == "text" else JsonFormatter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(default)
    for name in set(TARGETS) | set(per_target):
        logging.getLogger(name).setLevel(per_target.get(name, default))


def get(target: str) -> logging.Logger:
    return logging.getLogger(target)


class RateLimitedWarning:
    """At most one warning per interval; counts what happened in between so nothing is hidden."""

    def __init__(self, logger: logging.Logger, interval_secs: float):
        self._logger = logger
        self._interval = interval_secs
        self._next = 0.0
        self._suppressed = 0

    def warn(self, message: str, **fields: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        self._next = now + self._interval
        fields["suppressed_since_last"] = self._suppressed
        self._suppressed = 0
        self._logger.warning(message, extra={"fields": fields})
