"""The REST <-> WebSocket mapping of backfill (shared/spec/rest.md): which REST kind fills which event code, the
request of one window, a REST result as the WebSocket event it stands for, and what makes an event the same event
live and over REST. Pure functions: no state, no thread."""

from __future__ import annotations

from urllib.parse import quote

import ujson

from .. import protocol

KINDS = ("trades", "quotes", "aggs")
# (cluster, code) -> the REST kind that fills it (rest.md: trades and quotes of stocks and options, crypto trades,
# bars of stocks, options, indices and crypto). Futures and forex: their REST fields are not settled (rest.md).
FILLED: dict[str, dict[str, str]] = {
    "stocks": {"T": "trades", "Q": "quotes", "A": "aggs", "AM": "aggs"},
    "options": {"T": "trades", "Q": "quotes", "A": "aggs", "AM": "aggs"},
    "indices": {"A": "aggs", "AM": "aggs"},
    "crypto": {"XT": "trades", "XA": "aggs"},
}
_KIND_OF_SHAPE = {"trade": "trades", "quote": "quotes", "agg_second": "aggs", "agg_minute": "aggs"}
BAR_MS = {"A": 1000, "AM": 60_000, "XA": 60_000}
PAGE_LIMIT = 50_000


def filled_kind(cluster: str, code: str) -> str | None:
    return FILLED.get(cluster, {}).get(code)


def wanted_kind(cluster: str, code: str) -> str | None:
    """The REST kind a code's events are, whether or not this version fills them (forex quotes: unsupported)."""
    shape = protocol.SHAPES[cluster].get(code)
    return _KIND_OF_SHAPE.get(shape.kind) if shape is not None else None


def event_symbol(cluster: str, ticker: str) -> str:
    """A topic's ticker -> the symbol its events carry (crypto topics may say X:BTC-USD, events say BTC-USD)."""
    return ticker[2:] if cluster == "crypto" and ticker.startswith("X:") else ticker


def rest_ticker(cluster: str, symbol: str, kind: str) -> str:
    """The REST API's name of a WebSocket symbol: crypto trades say X:BTC-USD (rest.md), crypto bars X:BTCUSD (the
    aggregates endpoint's form, as its documented examples and every public client spell it)."""
    if cluster != "crypto":
        return symbol
    return "X:" + (symbol.replace("-", "") if kind == "aggs" else symbol)


# Where both the WebSocket event and the REST result carry the sequence number q (rest.md: options trades and
# crypto trades have none over REST), it is the identity; elsewhere the fields below are.
BY_Q = {("stocks", "trades"), ("stocks", "quotes"), ("options", "quotes")}


def identity(kind: str, by_q: bool, event: dict) -> tuple:
    """What makes an event the same event live and over REST (rest.md): (symbol, q) where both have a q, else the
    trade's (t, p, s, x, i), the quote's prices, sizes and exchanges at t, the bar's start (the symbol is the
    window's)."""
    if by_q:
        return ("q", event.get("q"))
    if kind == "trades":
        i = event.get("i")
        return (event.get("t"), event.get("p"), event.get("s"), event.get("x"), None if i is None else str(i))
    if kind == "quotes":
        return (event.get("t"), event.get("bp"), event.get("bs"), event.get("ap"), event.get("as"),
                event.get("bx"), event.get("ax"))
    return ("bar", event.get("s"))


def hashable_identity(kind: str, by_q: bool, event: dict) -> tuple | None:
    """The event's identity, or None when a field of it cannot be one (a list or an object where the API documents a
    number): such an event is invalid over REST, and must not fail the dispatcher's dedup when it comes live."""
    key = identity(kind, by_q, event)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def strict_json(event: dict) -> str | None:
    """The event as the JSON text a sink may write (no NaN or Infinity, UTF-8 encodable), or None."""
    try:
        text = ujson.dumps(event, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False)
        if not text.isascii():
            text.encode("utf-8")
    except (OverflowError, ValueError, TypeError, UnicodeError, RecursionError):
        return None
    return text


def _copy(result: dict, event: dict, names: tuple[tuple[str, str], ...]) -> None:
    for rest_name, letter in names:
        value = result.get(rest_name)
        if value is not None:
            event[letter] = value


_TRADE = (("exchange", "x"), ("id", "i"), ("tape", "z"), ("price", "p"), ("size", "s"), ("conditions", "c"),
          ("sequence_number", "q"), ("trf_id", "trfi"))
_QUOTE = (("bid_exchange", "bx"), ("bid_price", "bp"), ("bid_size", "bs"), ("ask_exchange", "ax"),
          ("ask_price", "ap"), ("ask_size", "as"), ("conditions", "c"), ("indicators", "i"),
          ("sequence_number", "q"), ("tape", "z"))
_BAR = (("o", "o"), ("h", "h"), ("l", "l"), ("c", "c"), ("v", "v"), ("vw", "vw"), ("n", "n"))


def _ms(value) -> int | None:
    return value // 1_000_000 if type(value) is int and value >= 0 else None


def to_event(cluster: str, code: str, kind: str, symbol: str, result) -> dict | None:
    """One REST result as the WebSocket event of `code` (ns -> ms), or None when it is not what rest.md says."""
    if not isinstance(result, dict):
        return None
    event: dict = {"ev": code, ("pair" if cluster == "crypto" else "sym"): symbol}
    if kind == "aggs":
        start = result.get("t")
        if type(start) is not int or start < 0 or not isinstance(result.get("c"), (int, float)):
            return None
        _copy(result, event, _BAR)
        event["s"] = start
        event["e"] = start + BAR_MS.get(code, 60_000)
        return event
    t = _ms(result.get("sip_timestamp"))
    if t is None:
        return None
    if kind == "trades":
        if not isinstance(result.get("price"), (int, float)):
            return None
        _copy(result, event, _TRADE)
        trf = _ms(result.get("trf_timestamp"))
        if trf is not None:
            event["trft"] = trf
    else:
        if not isinstance(result.get("bid_price"), (int, float)) and not isinstance(result.get("ask_price"),
                                                                                   (int, float)):
            return None
        _copy(result, event, _QUOTE)
        conditions = event.get("c")
        if isinstance(conditions, list) and len(conditions) == 1:
            event["c"] = conditions[0]  # the WebSocket quote carries one condition code, REST a list
    event["t"] = t
    return event


def request(cluster: str, code: str, kind: str, symbol: str, from_ms: int, to_ms: int) -> tuple[str, dict]:
    """The REST path and query of one window (rest.md): ascending, the largest page."""
    ticker = quote(rest_ticker(cluster, symbol, kind), safe=":")
    if kind == "aggs":
        span = "second" if BAR_MS.get(code) == 1000 else "minute"
        return (f"/v2/aggs/ticker/{ticker}/range/1/{span}/{from_ms}/{to_ms}",
                {"sort": "asc", "adjusted": "false", "limit": PAGE_LIMIT})
    return (f"/v3/{kind}/{ticker}", {"timestamp.gte": from_ms * 1_000_000, "timestamp.lte": to_ms * 1_000_000 + 999_999,
                                     "order": "asc", "sort": "timestamp", "limit": PAGE_LIMIT})
