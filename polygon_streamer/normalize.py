"""Frame bytes -> normalized records (schema.md), with the include filter, quote sampling and seq. No I/O.

A record is a plain tuple, built once per event and shared by every sink:
    (seq, type, symbol, kind, ts, line)
where line is the schema.md record as one compact JSON object without a trailing newline. A gap record (schema.md,
"The gap record") has the same shape with type and kind "gap", built from a Gap notice by gap_record().
"""

from __future__ import annotations

import json
import math
import re
from typing import Iterable, Mapping, Protocol

import ujson

from . import protocol

class Watcher(Protocol):
    """What follows one explicit topic's live events for BACKFILL (backfill.jobs.Track): shown each, with its time."""

    def see(self, ts: int | None, event: dict) -> None: ...


_MS_LIMIT = 10**14  # up to 14 digits: milliseconds (13 digits until the year 2286)
_US_LIMIT = 10**17  # up to 17 digits: microseconds
_NS_LIMIT = 10**20  # up to 20 digits: nanoseconds

_IDENTITY_CACHE_LIMIT = 200_000
# The identity cache is bounded in bytes as well: a feed of huge symbols must not hold memory (frames are capped by
# MAX_FRAME_BYTES, so one entry is too). 32 MB is 200,000 entries of a long options symbol.
_IDENTITY_CACHE_BYTES = 32 * 1024 * 1024


# Codes whose `q` increases per symbol (protocol.md: stocks and options trades and quotes): checked for duplicates
# and values that go backwards, never dropped or reordered for it.
SEQUENCED = {"stocks": ("T", "Q"), "options": ("T", "Q")}
_NO_Q = -(1 << 64)

GAP = "gap"
RETIRE_MS = 30_000  # how long a topic the gateway's clients let go is still diverted (set_union)
EXTRA = "extra"  # the kind of a gateway client's event that is not a record (set_union; sinks/gateway.py)
BACKFILL = "backfill"  # the type, kind and topic of a backfill summary (backfill/)
GAP_REASONS = ("disconnect", "read_timeout", "server_close", "status", "stale", "max_connections", "inbound_drop",
               "sink_drop", "shutdown", "restart")


class Gap:
    """A hole in the data stream, told to the dispatcher in order with the frames (the reader puts it into the
    inbound queue just before the first frame after the hole) or noticed by a sink's queue. Becomes one gap record.

    reason: one of GAP_REASONS; detail: the log's sentence; interrupted_ms: when the hole began (the session's end,
    the first dropped frame); resumed_ms: the first data after it (None: data never resumed, e.g. at shutdown)."""

    __slots__ = ("reason", "detail", "interrupted_ms", "resumed_ms", "close_code", "close_reason",
                 "dropped_events", "subscription", "before")

    def __init__(self, reason: str, detail: str, interrupted_ms: int, resumed_ms: int | None = None,
                 close_code: int | None = None, close_reason: str | None = None,
                 dropped_events: int | None = None, subscription: str | None = None):
        self.reason = reason
        self.detail = detail
        self.interrupted_ms = interrupted_ms
        self.resumed_ms = resumed_ms
        self.close_code = close_code
        self.close_reason = close_reason
        self.dropped_events = dropped_events
        self.subscription = subscription
        # (last_ingest_ms, last_ts) of the data before the hole where this run saw none: a restart's, the previous
        # run's (state.py)
        self.before: tuple[int | None, int | None] | None = None

    def __repr__(self) -> str:
        return f"Gap({self.reason!r}, {self.detail!r}, dropped_events={self.dropped_events})"


def _clean_text(text: str | None) -> str | None:
    """Text for a record: valid UTF-8 whatever came from the network (a lone surrogate becomes "?")."""
    if text is None:
        return None
    return text.encode("utf-8", "replace").decode("utf-8") if not text.isascii() else text


class FrameError(ValueError):
    """The frame as a whole is unusable (not JSON, not an array)."""


def parse_frame(data: bytes | str) -> list:
    """A frame is a JSON array of event objects. ujson first; the stdlib parses what ujson refuses
    (integers beyond 64 bits on old ujson), so a frame that is valid JSON is never lost to a parser limit."""
    try:
        events = ujson.loads(data)
    except ValueError:
        try:
            events = json.loads(data)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser's stack
            raise FrameError(f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(events, list):
        raise FrameError(f"not a JSON array but {type(events).__name__}")
    return events


# Bytes that never appear unescaped in compact strict JSON outside strings, and inside strings only escaped (control
# characters) or in text that must be re-encoded to be checked (backslash escapes: lone surrogates hide there).
_NOT_COMPACT = bytes(range(0x21)) + b"\\"
# What ujson accepts and RFC 8259 forbids, so a frame holding it must not be copied as received: NaN and Infinity,
# leading zeros (01, -01, 00), a dot without digits after it (1., 1.e5, -.5) and a lone minus. The patterns start with
# a literal so that re scans at memchr speed; a match inside a string only sends its frame down the re-encoding path.
_NAN = re.compile(rb"NaN").search  # re's literal search is twice as fast as `in` for a 3-byte needle here
_DOT_WITHOUT_DIGITS = re.compile(rb"\.[,}\]eE]").search
_LONE_MINUS = re.compile(rb"-[,}\].]").search
_LEADING_ZERO = re.compile(rb"0[0-9](?<=[:,\[-]0[0-9])").search


def strict_compact(raw: bytes) -> bool:
    """A frame `[{...}]` with no whitespace, no escapes and none of the spellings ujson accepts and JSON forbids
    (so, once it parses, it is strict JSON as it stands)."""
    return raw[:2] == b"[{" and raw[-2:] == b"}]" and len(raw.translate(None, _NOT_COMPACT)) == len(raw) \
        and not (_NAN(raw) or (b"y" in raw and b"Infinity" in raw) or _DOT_WITHOUT_DIGITS(raw)
                 or _LONE_MINUS(raw) or _LEADING_ZERO(raw))


def compact_split(data: bytes | str, count: int) -> tuple[str, list[str]] | None:
    """The text of a compact frame `[{...},{...}]` and of each of its `count` events, or None when they cannot be
    told safely.

    Polygon sends compact JSON. When the frame has no whitespace and no escapes, every top-level boundary is
    exactly `},{`, so the split is right when it yields one part per parsed element; any `},{` inside a string or
    a nested object makes the count differ and the caller re-encodes instead. Taking the text as received keeps
    the payload byte for byte (number spelling, key order) and saves an encode per event. Only strict JSON is
    taken as received (see _NOT_COMPACT and the patterns after it); the rest is re-encoded, which rejects what cannot
    be JSON.
    """
    if isinstance(data, bytes):
        raw = data
    else:
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate
            return None
    if not strict_compact(raw):
        return None
    try:
        text = raw.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        return None
    parts = text[2:-2].split("},{")
    return (text, parts) if len(parts) == count else None


def time_to_ms(value) -> int | None:
    """A feed time in ms, µs or ns (told apart by magnitude) -> ms; None if it is not a usable time."""
    if type(value) is float:
        if not math.isfinite(value):
            return None
        value = int(value)
    elif type(value) is not int:
        return None
    if value < 0:
        return None
    if value < _MS_LIMIT:
        return value
    if value < _US_LIMIT:
        return value // 1_000
    if value < _NS_LIMIT:
        return value // 1_000_000
    return None


def canonical_symbol(cluster: str, text: str) -> str:
    """A ticker or symbol as compared across the ways Polygon writes it: crypto and forex pairs with or without
    their X:/C: prefix and separator (X:BTC-USD, BTC-USD, BTCUSD; EUR/USD, EUR-USD, C:EURUSD) are one; a trailing
    `*` stays."""
    if cluster not in ("crypto", "forex"):
        return text
    upper = text.upper()
    if upper.startswith(("X:", "C:")):
        upper = upper[2:]
    return upper.replace("-", "").replace("/", "")


def _json_str(text: str) -> str:
    return ujson.dumps(text, ensure_ascii=False, escape_forward_slashes=False)


class IncludeFilter:
    """NDJSON_INCLUDE: TYPE:SYMBOL patterns, TYPE a code or *, SYMBOL exact, PREFIX* or *."""

    def __init__(self, patterns: Iterable[str]):
        self._rules: dict[str, tuple[set[str], tuple[str, ...], bool]] = {}
        for pattern in patterns:
            code, _, symbol = pattern.partition(":")
            exact, prefixes, everything = self._rules.get(code, (set(), (), False))
            if symbol == "*":
                everything = True
            elif symbol.endswith("*"):
                prefixes = prefixes + (symbol[:-1],)
            else:
                exact.add(symbol)
            self._rules[code] = (exact, prefixes, everything)

    def __bool__(self) -> bool:
        return bool(self._rules)

    def covers(self, code: str, symbol_pattern: str) -> bool:
        """Whether every symbol the pattern (exact, PREFIX* or *) names matches."""
        for key in (code, "*"):
            rule = self._rules.get(key)
            if rule is None:
                continue
            exact, prefixes, everything = rule
            if everything:
                return True
            if symbol_pattern.endswith("*"):
                if any(symbol_pattern[:-1].startswith(prefix) for prefix in prefixes):
                    return True
            elif symbol_pattern in exact or (prefixes and symbol_pattern.startswith(prefixes)):
                return True
        return False

    def matches(self, code: str, symbol: str) -> bool:
        for key in (code, "*"):
            rule = self._rules.get(key)
            if rule is None:
                continue
            exact, prefixes, everything = rule
            if everything or symbol in exact or (prefixes and symbol.startswith(prefixes)):
                return True
        return False


class FrameNormalizer:
    """Turns frames into records. One instance per dispatcher thread: it holds the seq, the sampling counter
    and the counters that metrics.py exports (single writer, read at scrape time)."""

    def __init__(self, cluster: str, hostname: str, app_version: str,
                 include: Iterable[str] = (), sample_quotes: int = 1, subscription: str = ""):
        self.cluster = cluster
        self.subscription = subscription
        self._sequenced = SEQUENCED.get(cluster, ())
        self._shapes = protocol.SHAPES[cluster]
        self._include = IncludeFilter(include)
        self._sample_quotes = sample_quotes
        self._quote_counter = 0
        self._feed_json = _json_str(cluster)
        self._tail = (f',"hostname":{_json_str(hostname)},"app_version":{_json_str(app_version)},'
                      f'"schema_version":1,"seq":')
        self._backfill_tail = ',"backfill":true' + self._tail
        # (code, symbol) -> (identity JSON fragment, kind, included, the code's label in events_by_type,
        #                    [last q] for a sequenced code or None, its backfill Track or None)
        self._identities: dict[tuple[str, str], tuple] = {}
        self._identity_bytes = 0
        # The same for backfilled events, apart: no q checks (they fill a hole behind the live q), no tracks.
        self._backfill_identities: dict[tuple[str, str], tuple] = {}
        # (code, symbol) -> its Watcher: the explicit topics BACKFILL fills (watch()); each sees its live events.
        self._watchers: Mapping[tuple[str, str], Watcher] = {}
        # GATEWAY_UPSTREAM=union (set_union): the events of topics only the gateway's clients asked for are not records:
        # they go to `extra`, (records before it, code, symbol, the event's JSON as received), for the gateway alone.
        self._own: tuple[IncludeFilter, IncludeFilter] | None = None  # (the desired set, the topics diverted)
        self._union: tuple[list[str], list[str]] = ([], [])  # (desired, extra) as last told
        self._retired: dict[str, int] = {}  # a topic the clients let go -> until when (ms) it is still diverted
        self.retire_due: int | None = None  # the first of those times
        self.extra: list[tuple[int, str, str, str]] = []
        # code -> (symbol key, time key) for the inlined common case of _locate
        self._fast_keys = {code: (shape.symbol_keys[0], shape.time_keys[0]) for code, shape in self._shapes.items()}
        self.seq = 0
        self.frame_text: str | None = None  # see normalize
        self.frame_events = 0  # the elements of the last frame normalized (events, statuses, anything else)
        # Counters exported by metrics.py.
        self.events_by_type: dict[str, int] = {}
        self.bad_events: dict[str, int] = {}
        self.anomalies: dict[str, int] = {}
        self.parse_errors = 0
        self.filtered = 0
        self.sampled_out = 0
        # (code, "duplicate" | "backwards") -> count; the latest one, for the dispatcher's rate-limited log.
        self.sequence_anomalies: dict[tuple[str, str], int] = {}
        self.sequence_anomalies_total = 0
        self.last_sequence_anomaly: tuple[str, str, int, int, str] | None = None
        # The last data event before now: what a gap record says was received before the hole.
        self.last_ingest_ms: int | None = None
        self.last_ts: int | None = None
        self.gaps: dict[str, int] = {}
        self.gap_seconds = 0.0
        self.gap_records = 0  # gap records that took a seq (seq - gap_records - backfill_records: live events)
        self.backfill_records = 0  # backfilled events and backfill summaries (they take a seq too)
        self.backfill_by_type: dict[str, int] = {}
        self.last_gap_ms: int | None = None

    def _count(self, table: dict[str, int], key: str, amount: int = 1) -> None:
        table[key] = table.get(key, 0) + amount

    def _identity(self, code: str, symbol: str, backfill: bool = False) -> tuple:
        """The record's identity fragment for (code, symbol); None if it cannot be valid UTF-8 (a lone surrogate)."""
        identities = self._backfill_identities if backfill else self._identities
        if len(self._identities) >= _IDENTITY_CACHE_LIMIT or self._identity_bytes >= _IDENTITY_CACHE_BYTES:
            self._identities.clear()
            self._backfill_identities.clear()
            self._identity_bytes = 0
        kind = self._shapes.get(code, protocol.OTHER).kind
        text = (f'"type":{_json_str(code)},"kind":"{kind}","symbol":{_json_str(symbol)},'
                f'"topic":{_json_str(code + ":" + symbol)},"feed":{self._feed_json},"ts":')
        fragment: str | None = text
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                fragment = None
        included: bool | None = not self._include or self._include.matches(code, symbol)
        if self._own is not None and not backfill and self._client_only(code, symbol):
            included = None  # an event of a gateway client's topic alone: not a record (normalize)
        # Codes come from the network: the unknown ones share one label, so that they cannot grow the metrics.
        label = code if code in self._shapes else protocol.UNKNOWN_LABEL
        entry: tuple
        if backfill:
            entry = (fragment, kind, included, label, None, None)
        elif included is None:  # no q checks, no backfill track: as if the service had never seen it
            entry = (fragment, kind, None, label, None, None)
        else:
            entry = (fragment, kind, included, label, [_NO_Q] if code in self._sequenced else None,
                     self._watchers.get((code, symbol)))
        identities[(code, symbol)] = entry
        self._identity_bytes += 2 * len(code) + 2 * len(symbol) + 200  # key, fragment and the entry itself
        return entry

    def _locate(self, event: dict, code: str) -> tuple[str, int | None]:
        """The symbol and ms time of one event; oddities are counted, never fatal."""
        shape = self._shapes.get(code)
        if shape is None:
            self._count(self.anomalies, "unknown_code")
            shape = protocol.OTHER
        symbol = ""
        for key in shape.symbol_keys:
            if key in event:
                symbol = event[key]
                if type(symbol) is not str:
                    self._count(self.anomalies, "bad_symbol")
                    symbol = ""
                break
        else:
            self._count(self.anomalies, "missing_symbol")
        ts = None
        for key in shape.time_keys:
            if key in event:
                ts = time_to_ms(event[key])
                if ts is None:
                    self._count(self.anomalies, "bad_time")
                break
        return symbol, ts

    def normalize(self, data: bytes | str, ingest_ms: int, backfill: bool = False) -> tuple[list[tuple], int | None]:
        """Records of one frame, and its last event's time (ms) for the latency histogram; `frame_text` is then the
        frame's text if the parse proved it strict JSON as received (what the capture embeds), else None.
        Raises FrameError for a frame that is not a JSON array (counted in parse_errors).
        backfill: the frame holds events the REST API returned for a gap (backfill/): marked `"backfill":true`,
        counted apart, and outside the live checks (q order, the tracks, what a gap record says came before)."""
        try:
            events = parse_frame(data)
        except FrameError:
            self.parse_errors += 1
            raise
        self.frame_events = len(events)
        split = compact_split(data, len(events))
        if split is None:
            self.frame_text = texts = None
        else:
            self.frame_text, texts = split
        records: list[tuple] = []
        append = records.append
        head = f'{{"ingest_ts":{ingest_ms},'
        tail = self._backfill_tail if backfill else self._tail
        identities = self._backfill_identities if backfill else self._identities
        fast_keys = self._fast_keys
        sampling = self._sample_quotes > 1
        seq = self.seq
        by_type = self.backfill_by_type if backfill else self.events_by_type
        for event, text in zip(events, texts) if texts is not None else ((event, None) for event in events):
            try:
                code = event["ev"]
                keys = fast_keys.get(code)
            except (TypeError, KeyError, IndexError):
                self._count(self.bad_events, "not_an_event")
                continue
            if keys is not None:
                symbol = event.get(keys[0])
                ts = event.get(keys[1])
                if type(symbol) is not str or type(ts) is not int or not 0 <= ts < _MS_LIMIT:
                    symbol, ts = self._locate(event, code)
            elif code == "status":
                continue
            elif type(code) is not str:
                self._count(self.bad_events, "not_an_event")
                continue
            else:
                symbol, ts = self._locate(event, code)
            fragment, kind, included, label, last_q, track = (identities.get((code, symbol))
                                                              or self._identity(code, symbol, backfill))
            if included is None:
                self._divert(len(records), code, symbol, event, text)
                continue
            if last_q is not None:
                q = event.get("q")
                if type(q) is int:
                    if q <= last_q[0]:
                        self._sequence_anomaly(code, symbol, q, last_q[0])
                    last_q[0] = q
            if track is not None:
                track.see(ts, event)
            if fragment is None:
                self._count(self.bad_events, "invalid_unicode")
                continue
            if not included:
                self.filtered += 1
                continue
            if sampling and kind == "quote":
                self._quote_counter += 1
                if (self._quote_counter - 1) % self._sample_quotes:
                    self.sampled_out += 1
                    continue
            if text is None:
                try:
                    text = ujson.dumps(event, ensure_ascii=False, escape_forward_slashes=False,
                                       allow_nan=False)[1:-1]
                except (OverflowError, ValueError, TypeError, UnicodeError, RecursionError):
                    self._count(self.bad_events, "unencodable")  # NaN, Infinity, nested past ujson's limit
                    continue
                if not text.isascii():
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        self._count(self.bad_events, "invalid_unicode")
                        continue
            seq += 1
            append((seq, code, symbol, kind, ts,
                    f'{head}{fragment}{"null" if ts is None else ts},"payload":{{{text}}}{tail}{seq}}}'))
            by_type[label] = by_type.get(label, 0) + 1
        # The frame's last event stands for the frame in the latency histogram (feeds are time-ordered).
        newest = records[-1][4] if records else None
        if backfill:
            self.backfill_records += seq - self.seq
            self.seq = seq
            return records, None
        self.seq = seq
        if events:
            self.last_ingest_ms = ingest_ms
            if records:
                self.last_ts = newest
        return records, newest

    @property
    def events(self) -> int:
        """Data events offered to the sinks (seq also numbers the gap records)."""
        return self.seq - self.gap_records - self.backfill_records

    def _sequence_anomaly(self, code: str, symbol: str, q: int, previous: int) -> None:
        reason = "duplicate" if q == previous else "backwards"
        key = (code, reason)
        self.sequence_anomalies[key] = self.sequence_anomalies.get(key, 0) + 1
        self.sequence_anomalies_total += 1
        self.last_sequence_anomaly = (code, symbol, q, previous, reason)

    def set_union(self, desired: list[str], extra: list[str], now_ms: int) -> None:
        """GATEWAY_UPSTREAM=union: the service's own topics and those its gateway clients added. An event that only
        the added ones name is diverted to `extra` (never a record, a seq, a count or a check); with no added
        topic nothing is. A topic the clients let go stays diverted for RETIRE_MS, while the upstream's
        unsubscribe and the events already on their way cross (they would otherwise land in the other sinks).
        Symbols are compared in a canonical form (canonical_symbol), so that a topic's ticker and an event's symbol
        written differently never send the service's own data away."""
        own = set(desired)
        for topic in self._union[1]:
            if topic not in own and topic not in extra:
                self._retired[topic] = now_ms + RETIRE_MS
        for topic in (*desired, *extra):
            self._retired.pop(topic, None)
        self._union = (list(desired), list(extra))
        self._apply_union()

    def expire_retired(self, now_ms: int) -> None:
        """The retired topics whose time is up are no longer diverted (the dispatcher calls it at retire_due)."""
        self._retired = {topic: until for topic, until in self._retired.items() if until > now_ms}
        self._apply_union()

    def _apply_union(self) -> None:
        desired, extra = self._union
        diverted = [*extra, *self._retired]
        self.retire_due = min(self._retired.values(), default=None)
        if not diverted:
            self._own = None
        else:
            self._own = (IncludeFilter(f"{code}:{canonical_symbol(self.cluster, ticker)}"
                                       for code, _, ticker in (topic.partition(".") for topic in desired)),
                         IncludeFilter(f"{code}:{canonical_symbol(self.cluster, ticker)}"
                                       for code, _, ticker in (topic.partition(".") for topic in diverted)))
        self._identities.clear()  # every (code, symbol) is judged again
        self._identity_bytes = 0

    def _client_only(self, code: str, symbol: str) -> bool:
        assert self._own is not None
        own, extra = self._own
        canonical = canonical_symbol(self.cluster, symbol)
        return not own.matches(code, canonical) and extra.matches(code, canonical)

    def _divert(self, position: int, code: str, symbol: str, event: dict, text: str | None) -> None:
        if text is None:
            try:
                text = ujson.dumps(event, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False)[1:-1]
                text.encode("utf-8")
            except (OverflowError, ValueError, TypeError, UnicodeError, RecursionError):
                return  # (not strict JSON: a client gets what a record would have got, nothing)
        self.extra.append((position, code, symbol, "{" + text + "}"))

    def watch(self, watchers: Mapping[tuple[str, str], Watcher]) -> None:
        """BACKFILL's desk: the topics whose live events it follows, (code, symbol) -> the Watcher each live event of
        it is shown to; told again whenever they change (the subscription did). Only the dispatcher thread calls it."""
        self._watchers = watchers
        for key, entry in self._identities.items():
            if entry[5] is not watchers.get(key):
                self._identities[key] = entry[:5] + (watchers.get(key),)

    def summary_record(self, payload: str, ingest_ms: int) -> tuple:
        """A backfill summary record (schema.md, "The backfill record"): payload is its JSON object's text."""
        self.seq += 1
        self.backfill_records += 1
        line = (f'{{"ingest_ts":{ingest_ms},"type":"{BACKFILL}","kind":"{BACKFILL}","symbol":"","topic":"{BACKFILL}",'
                f'"feed":{self._feed_json},"ts":null,"payload":{payload}{self._tail}{self.seq}}}')
        return (self.seq, BACKFILL, "", BACKFILL, None, line)

    def new_session(self) -> None:
        """A new connection: `q` is checked within a session only (protocol.md: comparing it across reconnects is
        uncertain), so the last values are forgotten."""
        self._identities.clear()
        self._identity_bytes = 0

    def gap_record(self, gap: Gap, ingest_ms: int, seq: int | None = None, last_ingest_ms: int | None = None,
                   last_ts: int | None = None, count: bool = True) -> tuple:
        """The gap record of schema.md, counted in gaps and gap_seconds (count_gap). By default it takes the next
        seq (every sink gets it) and the last data event this normalizer saw; a sink's queue passes its own
        (sink_drop) and counts the record once it is queued."""
        if seq is None:
            self.seq += 1
            self.gap_records += 1
            seq = self.seq
            last_ingest_ms, last_ts = self.last_ingest_ms, self.last_ts
            if last_ingest_ms is None and gap.before is not None:
                last_ingest_ms, last_ts = gap.before
        began = last_ingest_ms if last_ingest_ms is not None else gap.interrupted_ms
        gap_ms = max(0, gap.resumed_ms - began) if gap.resumed_ms is not None else None
        payload = {"reason": gap.reason, "detail": _clean_text(gap.detail), "close_code": gap.close_code,
                   "close_reason": _clean_text(gap.close_reason),
                   "subscription": _clean_text(gap.subscription if gap.subscription is not None
                                               else self.subscription),
                   "last_ingest_ts": last_ingest_ms, "resumed_ingest_ts": gap.resumed_ms, "gap_ms": gap_ms,
                   "dropped_events": gap.dropped_events}
        line = (f'{{"ingest_ts":{ingest_ms},"type":"gap","kind":"gap","symbol":"","topic":"gap",'
                f'"feed":{self._feed_json},"ts":{"null" if last_ts is None else last_ts},'
                f'"payload":{ujson.dumps(payload, ensure_ascii=False, escape_forward_slashes=False)}'
                f'{self._tail}{seq}}}')
        self.last_gap_ms = gap_ms
        if count:
            self.count_gap(gap.reason, gap_ms)
        return (seq, GAP, "", GAP, last_ts, line)

    def count_gap(self, reason: str, gap_ms: int | None) -> None:
        self.gaps[reason] = self.gaps.get(reason, 0) + 1
        if gap_ms is not None:
            self.gap_seconds += gap_ms / 1000.0
