"""Polygon / Massive WebSocket facts: hosts, control messages, statuses and the per-(cluster, code) field table."""

from __future__ import annotations

from typing import NamedTuple

import ujson

CLUSTERS = ("stocks", "options", "futures", "crypto", "forex", "indices")
FEEDS = ("realtime", "delayed")

# socket.polygon.io and delayed.polygon.io are the former names of the same hosts (rebrand of 2025-10-30).
FEED_HOSTS = {"realtime": "socket.massive.com", "delayed": "delayed.massive.com"}


def feed_url(feed: str, cluster: str) -> str:
    return f"wss://{FEED_HOSTS[feed]}/{cluster}"


def auth_message(api_key: str) -> str:
    return ujson.dumps({"action": "auth", "params": api_key})


def subscribe_message(params: str) -> str:
    return ujson.dumps({"action": "subscribe", "params": params}, escape_forward_slashes=False)


def unsubscribe_message(params: str) -> str:
    return ujson.dumps({"action": "unsubscribe", "params": params}, escape_forward_slashes=False)


# Status values (protocol.md 2.4). The message text is free-form: never parse it.
CONNECTED = "connected"
AUTH_SUCCESS = "auth_success"
AUTH_FAILED = "auth_failed"
AUTH_TIMEOUT = "auth_timeout"
SUCCESS = "success"
ERROR = "error"
MAX_CONNECTIONS = "max_connections"
KNOWN_STATUSES = (CONNECTED, AUTH_SUCCESS, AUTH_FAILED, AUTH_TIMEOUT, SUCCESS, ERROR, MAX_CONNECTIONS,
                  "auth_required", "force_disconnect", "slow_consumer")
# The metric label of a code or status this version does not know: values from the network never become labels.
UNKNOWN_LABEL = "other"
# Statuses after which the server closes (or will close) the connection.
TERMINAL_STATUSES = frozenset({AUTH_FAILED, AUTH_TIMEOUT, MAX_CONNECTIONS, "force_disconnect", "slow_consumer"})


class EventShape(NamedTuple):
    """Where one (cluster, code) keeps its symbol and its time, and what the code means."""

    kind: str
    symbol_keys: tuple[str, ...]
    time_keys: tuple[str, ...]


def _shape(kind: str, symbol: str, *time_keys: str) -> EventShape:
    return EventShape(kind, (symbol,), time_keys)


OTHER = EventShape("other", ("sym", "pair", "T", "p"), ("t", "e", "s"))

_EQUITY_LIKE = {
    "T": _shape("trade", "sym", "t"),
    "Q": _shape("quote", "sym", "t"),
    "A": _shape("agg_second", "sym", "e"),
    "AM": _shape("agg_minute", "sym", "e"),
    "FMV": _shape("fmv", "sym", "t"),
    "LV": _shape("value", "sym", "t"),
}

# schema.md's table. Launchpad AM and LV are served on every market path (protocol.md 3.1), so they are known
# everywhere; indices carry A/AM but no trades or quotes.
SHAPES: dict[str, dict[str, EventShape]] = {
    "stocks": {
        **_EQUITY_LIKE,
        "LULD": _shape("luld", "T", "t"),
        "NOI": _shape("imbalance", "T", "t"),
    },
    "options": dict(_EQUITY_LIKE),
    "futures": {code: shape for code, shape in _EQUITY_LIKE.items() if code not in ("FMV",)},
    "crypto": {
        "XT": _shape("trade", "pair", "t"),
        "XQ": _shape("quote", "pair", "t"),
        "XA": _shape("agg_minute", "pair", "e"),
        "XAS": _shape("agg_second", "pair", "e"),
        "XL2": _shape("book", "pair", "t"),
        "FMV": _shape("fmv", "sym", "t"),
        "AM": _shape("agg_minute", "sym", "e"),
        "LV": _shape("value", "sym", "t"),
    },
    "forex": {
        "C": _shape("quote", "p", "t"),
        "CA": _shape("agg_minute", "pair", "e", "s"),
        "CAS": _shape("agg_second", "pair", "e", "s"),
        "FMV": _shape("fmv", "sym", "t"),
        "AM": _shape("agg_minute", "sym", "e"),
        "LV": _shape("value", "sym", "t"),
    },
    "indices": {
        "V": _shape("value", "T", "t"),
        "A": _shape("agg_second", "sym", "e"),
        "AM": _shape("agg_minute", "sym", "e"),
        "LV": _shape("value", "sym", "t"),
    },
}

KINDS = ("trade", "quote", "agg_second", "agg_minute", "luld", "imbalance", "fmv", "book", "value", "other")
