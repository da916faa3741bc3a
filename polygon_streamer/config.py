"""Every setting declared once: its variable, flag, parser, default and help; built into one frozen Config."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from . import protocol


class ConfigError(ValueError):
    """A setting that does not parse or is out of range; the message is one line for the operator."""


# ---------------------------------------------------------------------------------------------------------------
# Parsers: raw string -> typed value, or ValueError with the "expected ..." part of the message.


def _int(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    expected = f"expected an integer >= {minimum}" if maximum is None else \
        f"expected an integer from {minimum} to {maximum}"

    def parse(raw: str) -> int:
        try:
            value = int(raw.strip().replace("_", ""))
        except ValueError:
            raise ValueError(expected) from None
        if value < minimum or maximum is not None and value > maximum:
            raise ValueError(expected)
        return value

    return parse


def _seconds(minimum: float, inclusive: bool) -> Callable[[str], float]:
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"

    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"expected a number of seconds {bound}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number of seconds {bound}")
        if value < minimum or (not inclusive and value == minimum):
            raise ValueError(f"expected a number of seconds {bound}")
        return value

    return parse


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("expected true or false (also 1/0, yes/no, on/off)")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        word = raw.strip().lower()
        if word not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return word

    return parse


def _text(raw: str) -> str:
    return raw


def _nonempty(raw: str) -> str:
    if not raw.strip():
        raise ValueError("expected a non-empty value")
    return raw.strip()


def _sinks(raw: str) -> tuple[str, ...]:
    names = [part.strip().lower() for part in raw.split(",") if part.strip()]
    accepted = ", ".join(SINK_NAMES)
    if not names:
        raise ValueError(f"expected one or more of {accepted}, comma separated")
    for name in names:
        if name not in SINK_NAMES:
            raise ValueError(f"expected one or more of {accepted}, comma separated")
    if len(set(names)) != len(names):
        raise ValueError("expected each sink at most once")
    return tuple(names)


def _subscription(raw: str) -> str:
    from .subscriptions import check_topic

    params = raw.strip()
    topics = [topic.strip() for topic in params.split(",")]
    for topic in topics:
        why = check_topic(topic)
        if why:
            if why.startswith("expected"):
                why = "expected comma separated topics CODE.TICKER, e.g. T.*,Q.AAPL"
            raise ValueError(f"{why} ({topic!r})" if len(topics) > 1 else why)
    return ",".join(topics)


def _addr(raw: str) -> tuple[str, int]:
    text = raw.strip()
    expected = "expected host:port, e.g. 127.0.0.1:9898 or [::1]:9898"
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)", text)
    if not match:
        raise ValueError(expected)
    host = match.group(1) or match.group(3) or ""
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ValueError(expected + " (port 0-65535)")
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(expected) from None
    elif host and not re.fullmatch(r"[A-Za-z0-9.-]+", host):
        raise ValueError(expected)
    if not host:
        raise ValueError("an empty host would listen on every interface: write 0.0.0.0:PORT (or [::]:PORT) to mean "
                         "that, 127.0.0.1:PORT for this host only")
    return host, port


def _ws_url(raw: str) -> str:
    url = raw.strip()
    if not re.fullmatch(r"wss?://[^/\s]+(/\S*)?", url):
        raise ValueError("expected a ws:// or wss:// URL, e.g. ws://127.0.0.1:8765/stocks")
    return url


def url_secrets(url: str) -> list[str]:
    """What in a URL may be a credential: user info and every query value (`?apiKey=...`)."""
    try:
        parts = urlsplit(url)
        secrets = [parts.username, parts.password] + [value for _, value in parse_qsl(parts.query)]
    except ValueError:
        return []
    return [secret for secret in secrets if secret]


def redact_url(url: str) -> str:
    """The URL with user info and query values replaced, for logs, errors and `config`."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        netloc = f"<redacted>@{host}" if "@" in parts.netloc else host
        query = "&".join(f"{key}=<redacted>" for key, _ in parse_qsl(parts.query, keep_blank_values=True))
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "<redacted>"


def _zmq_endpoint(raw: str) -> str:
    endpoint = raw.strip()
    if not re.fullmatch(r"(tcp|ipc|inproc|pgm|epgm|ws|wss)://\S+", endpoint):
        raise ValueError("expected a ZeroMQ endpoint such as tcp://127.0.0.1:5556 or ipc:///run/polygon.sock")
    return endpoint


def _redis_url(raw: str) -> str:
    url = raw.strip()
    if not re.fullmatch(r"(redis|rediss)://\S*|unix://\S+", url):
        raise ValueError("expected redis://[:PASSWORD@]HOST:PORT[/DB], rediss://... (TLS) or unix:///PATH/redis.sock")
    return url


REDIS_STREAM_FIELDS = ("cluster", "kind", "symbol_shard")


def _redis_stream(raw: str) -> str:
    template = raw.strip()
    names = re.findall(r"\{([A-Za-z_]+)\}", template)
    unknown = [name for name in names if name not in REDIS_STREAM_FIELDS]
    if not template or unknown:
        raise ValueError("expected a key template using {cluster}, {kind} and {symbol_shard}, e.g. "
                         "polygon:{cluster} or polygon:{cluster}:{symbol_shard}")
    return template


KAFKA_TOPIC_FIELDS = ("cluster", "type")


def _kafka_bootstrap(raw: str) -> str:
    servers = [part.strip() for part in raw.split(",") if part.strip()]
    if not servers or not all(re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}", server)
                              and 0 < int(server.rsplit(":", 1)[1]) < 65536 for server in servers):
        raise ValueError("expected HOST:PORT of one or more Kafka brokers, comma separated, e.g. "
                         "kafka1.example.com:9092,kafka2.example.com:9092")
    return ",".join(servers)


def _kafka_topic(raw: str) -> str:
    template = raw.strip()
    names = re.findall(r"\{([A-Za-z_]+)\}", template)
    rest = re.sub(r"\{(cluster|type)\}", "", template)
    if not template or any(name not in KAFKA_TOPIC_FIELDS for name in names) or not re.fullmatch(
            r"[A-Za-z0-9._-]*", rest) or len(template) > 200:
        raise ValueError("expected a topic name template of letters, digits, '.', '_' and '-' using {cluster} and "
                         "{type}, e.g. polygon.{cluster} or polygon.{cluster}.{type}")
    return template


def _include(raw: str) -> tuple[str, ...]:
    patterns = tuple(part.strip() for part in raw.split(",") if part.strip())
    for pattern in patterns:
        code, colon, symbol = pattern.partition(":")
        if not colon or not code or not symbol or ("*" in code and code != "*") or "*" in symbol[:-1]:
            raise ValueError("expected comma separated TYPE:SYMBOL patterns (TYPE a code or *, "
                             "SYMBOL exact, PREFIX* or *), e.g. T:AAPL,Q:MSFT*,AM:*")
    return patterns


BACKFILL_KINDS = ("trades", "quotes", "aggs")


def _backfill(raw: str) -> tuple[str, ...]:
    words = [part.strip().lower() for part in raw.split(",") if part.strip()]
    expected = "expected off, on, or a comma list of trades, quotes, aggs"
    if words in (["off"], ["false"], ["0"], ["no"]):
        return ()
    if words in (["on"], ["true"], ["1"], ["yes"]):
        return BACKFILL_KINDS
    if not words or any(word not in BACKFILL_KINDS for word in words):
        raise ValueError(expected)
    return tuple(kind for kind in BACKFILL_KINDS if kind in words)


def _rest_url(raw: str) -> str:
    url = raw.strip().rstrip("/")
    if not re.fullmatch(r"https?://[^/\s?#]+", url):
        raise ValueError("expected the REST API's base URL, http(s)://HOST[:PORT], e.g. https://api.massive.com")
    return url


def _rps(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("expected requests per second > 0, e.g. 10 (0.08 is 5 a minute)") from None
    if not 0 < value <= 1000 or value != value:
        raise ValueError("expected requests per second > 0 and <= 1000, e.g. 10 (0.08 is 5 a minute)")
    return value


def _cpu_affinity(raw: str):
    from .affinity import parse

    return parse(raw)


def _log_level(raw: str) -> str:
    from .logs import parse_directives

    parse_directives(raw)
    return raw.strip()


# ---------------------------------------------------------------------------------------------------------------
# The declarations.

from .sinks import SINK_NAMES  # noqa: E402  (the sink table is the one home of the names)


@dataclass(frozen=True)
class Setting:
    field: str
    env: str
    default: str | None
    parse: Callable[[str], Any]
    help: str
    secret: bool = False
    shown: Callable[[str], str] = str  # how a bad value appears in the error
    default_text: str | None = None  # the default as --help and the docs say it, where `default` is not it
    doc: str = ""  # the reference's meaning (docs/configuration.md, example.env), where `help` is too short
    fallback_env: str | None = None  # also read from this variable when `env` is unset (RUST_LOG, STATE_DIRECTORY)
    same_as: str | None = None  # unset: the value of this other setting (a sink's own setting, once shared)

    @property
    def shown_default(self) -> str:
        """The default as --help, the reference and the man page say it ("unset" where there is none)."""
        return self.default_text or (self.default if self.default not in (None, "") else "unset")

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("api_key", "POLYGON_API_KEY", None, _nonempty, "API key (prefer POLYGON_API_KEY_FILE)", secret=True,
            default_text="none (required)",
            doc="the API key; never logged, never in metrics or errors"),
    Setting("api_key_file", "POLYGON_API_KEY_FILE", None, _nonempty,
            "read the API key from this file; wins over POLYGON_API_KEY",
            doc="read the key from this file (systemd `LoadCredential=`, a 0600 file); wins over `POLYGON_API_KEY`"),
    Setting("cluster", "POLYGON_CLUSTER", "futures", _choice(*protocol.CLUSTERS),
            "market cluster: labels every record; when unset, taken from POLYGON_WS_URL's path if it names one",
            doc="the market cluster, `stocks`, `options`, `futures`, `crypto`, `forex` or `indices`: it labels every "
                "record; when unset it is taken from `POLYGON_WS_URL`'s path if that names one (both set and "
                "different: exit 2)"),
    Setting("feed", "POLYGON_FEED", "realtime", _choice(*protocol.FEEDS), "realtime or delayed host"),
    Setting("ws_url", "POLYGON_WS_URL", None, _ws_url, "full WebSocket URL (overrides cluster and feed host)",
            shown=redact_url,
            default_text="derived from POLYGON_CLUSTER and POLYGON_FEED",
            doc="the full WebSocket URL instead of the cluster's host (`POLYGON_FEED`), e.g. "
                "`ws://127.0.0.1:8765/stocks` for the local server"),
    Setting("subscription", "SUBSCRIPTION", "T.*", _subscription, "subscribe params, e.g. T.*,Q.AAPL",
            doc="subscribe params as written: `T.*`, `Q.AAPL,T.AAPL`, `XT.*`"),
    Setting("subscription_file", "SUBSCRIPTION_FILE", None, _nonempty,
            "a file of topics, one a line (# comments), used instead of SUBSCRIPTION and reread on SIGHUP",
            doc="a file of topics, one a line (`#` comments), used instead of `SUBSCRIPTION`; reread on SIGHUP "
                "(docs/subscriptions.md)"),
    Setting("channel_cap", "CHANNEL_CAP", "1024", _int(1),
            "inbound queue capacity in hand-overs (the frames one socket read completed, up to 4 KiB together)",
            doc="inbound queue capacity, in **hand-overs**: the frames (WebSocket messages, 1 to many events each) "
                "that one socket read completed, up to 4 KiB of them together; a larger frame is a hand-over of its "
                "own. A stocks event is about 110 bytes, so at 1 event a frame a hand-over is up to about 30 frames, "
                "at 10 up to 3, at 30 or more one frame"),
    Setting("backoff_initial_secs", "BACKOFF_INITIAL_SECS", "1", _seconds(0, False), "first reconnect delay"),
    Setting("backoff_max_secs", "BACKOFF_MAX_SECS", "60", _seconds(0, False), "reconnect delay ceiling",
            doc="delay ceiling; delays double with jitter, reset after 10 s of healthy streaming; `max_connections` "
                "and `auth_failed` wait the ceiling at once"),
    Setting("read_timeout_secs", "READ_TIMEOUT_SECS", "60", _seconds(0, False),
            "reconnect after this long without a frame",
            doc="no data message for this long (pings and pongs do not count): reconnect (also bounds each handshake "
                "step; connect+upgrade is capped at 10 s in total)"),
    Setting("stale_after_secs", "STALE_AFTER_SECS", "0", _seconds(0, True),
            "reconnect after this long without a data event while subscribed (statuses do not count); 0: off",
            doc="no data event for this long while subscribed, even though statuses and pongs still flow: end the "
                "session like a read timeout (a `stale` gap, `polygon_stale_timeouts_total`). Off by default because "
                "markets close; docs/operations.md has the alert to use instead"),
    Setting("max_frame_bytes", "MAX_FRAME_BYTES", "16777216", _int(1024),
            "largest WebSocket message accepted, in bytes; a larger one ends the session (counted)",
            doc="largest WebSocket message accepted (a fragmented one counts whole): a larger one is refused before "
                "it is buffered, the session ends with close code 1009 and reconnects, counted in "
                "`polygon_oversize_frames_total`. Polygon does not document a limit; the official clients stop at 1 "
                "MiB (Python) and 1,000,000 bytes (Go) and nobody reports hitting it, so 16 MiB leaves room for "
                "bursts while bounding memory"),
    Setting("heartbeat_interval_secs", "HEARTBEAT_INTERVAL_SECS", "30", _seconds(0, True),
            "WebSocket ping interval; 0 disables",
            doc="WebSocket ping interval, `0` disables"),
    Setting("metrics_addr", "METRICS_ADDR", "127.0.0.1:9898", _addr, "host:port for /metrics, /health, /ready",
            doc="`host:port` (`[::1]:9898` for IPv6) of `/metrics`, `/health`, `/ready`: one per instance (a second "
                "instance on the same port exits 2). `demo` takes a free port and prints it unless this is set; "
                "`reprocess` serves none"),
    Setting("stats_interval_secs", "STATS_INTERVAL_SECS", "60", _seconds(0, True),
            "polygon_stats log interval; 0 disables",
            doc="a `polygon_stats` log line every N s, `0` disables"),
    Setting("bp_warn_interval_secs", "BP_WARN_INTERVAL_SECS", "5", _seconds(0, True),
            "at most one inbound backpressure warning per interval",
            doc="at most one inbound backpressure warning per N s"),
    Setting("sink", "SINK", None, _sinks, "stdout, ndjson, zmq, capture, redis, gateway, kafka or a comma list; "
            "stdout prints each event as a log record of the polygon_events target, so LOG_LEVEL must keep that "
            "target at info",
            default_text="stdout (ndjson with EMIT_NDJSON=true)",
            doc="`stdout`, `ndjson`, `zmq`, `capture`, `redis`, `gateway`, `kafka` or a comma list; each sink has its "
                "own queue and thread"),
    Setting("emit_ndjson", "EMIT_NDJSON", "false", _bool, "legacy: SINK=ndjson when SINK is unset",
            doc="legacy: `SINK=ndjson` when `SINK` is unset"),
    Setting("ndjson_dest", "NDJSON_DEST", "stdout", _nonempty, "stdout or a file path",
            doc="`stdout` or a file path"),
    Setting("ndjson_channel_cap", "NDJSON_CHANNEL_CAP", "2048", _int(1),
            "NDJSON queue capacity in batches (the events of one hand-over)",
            doc="NDJSON queue capacity in batches (the events of one hand-over); full: drop, counted"),
    Setting("ndjson_warn_interval_secs", "NDJSON_WARN_INTERVAL_SECS", "5", _seconds(0, True),
            "NDJSON backpressure warning interval"),
    Setting("ndjson_flush_every", "NDJSON_FLUSH_EVERY", "100", _int(1), "flush after N events",
            doc="flush after N buffered events"),
    Setting("ndjson_flush_interval_ms", "NDJSON_FLUSH_INTERVAL_MS", "1000", _int(1),
            "flush at least this often while data is buffered",
            doc="flush at least this often while data is buffered, also on a quiet feed"),
    Setting("ndjson_max_bytes", "NDJSON_MAX_BYTES", None, _int(1), "rotate at this size (unset: off)",
            doc="rotate before the file would pass this size"),
    Setting("ndjson_rotate_secs", "NDJSON_ROTATE_SECS", None, _seconds(0, False), "rotate every N s (unset: off)",
            doc="rotate every N s, also on a quiet feed (an empty file is not rotated)"),
    Setting("ndjson_gzip", "NDJSON_GZIP", "false", _bool, "gzip rotated files",
            doc="gzip rotated files on a separate thread"),
    Setting("ndjson_no_reopen", "NDJSON_NO_REOPEN", "false", _bool, "ignore SIGHUP instead of reopening"),
    Setting("ndjson_include", "NDJSON_INCLUDE", "", _include, "TYPE:SYMBOL patterns to keep (every sink)",
            doc="`TYPE:SYMBOL` patterns (TYPE a code or `*`; SYMBOL exact, `PREFIX*` or `*`), every sink"),
    Setting("ndjson_sample_quotes", "NDJSON_SAMPLE_QUOTES", "1", _int(1), "keep 1 quote in N (every sink)",
            doc="keep 1 quote in N (every quote kind, across symbols), every sink"),
    Setting("ndjson_split_per_type", "NDJSON_SPLIT_PER_TYPE", "false", _bool, "one file per event kind",
            doc="one file per kind: `stocks.ndjson` -> `stocks.trade.ndjson`, `stocks.quote.ndjson`, ..."),
    Setting("zmq_endpoint", "ZMQ_ENDPOINT", "tcp://127.0.0.1:5556", _zmq_endpoint, "ZeroMQ PUB endpoint"),
    Setting("zmq_bind", "ZMQ_BIND", "false", _bool, "bind instead of connect"),
    Setting("zmq_channel_cap", "ZMQ_CHANNEL_CAP", "4096", _int(1),
            "ZeroMQ queue capacity in batches (the events of one hand-over)",
            doc="ZeroMQ queue capacity in batches (the events of one hand-over); full: drop, counted"),
    Setting("zmq_warn_interval_secs", "ZMQ_WARN_INTERVAL_SECS", "5", _seconds(0, True),
            "ZeroMQ backpressure warning interval"),
    Setting("zmq_snd_hwm", "ZMQ_SND_HWM", None, _int(0), "ZeroMQ SNDHWM in messages (unset: libzmq default)"),
    Setting("zmq_topic_prefix", "ZMQ_TOPIC_PREFIX", "", _text, "prepended to every topic frame"),
    Setting("capture_dest", "CAPTURE_DEST", None, _nonempty,
            "SINK=capture: the file that records every frame as received (required with capture)",
            doc="with `SINK=...,capture`: the file that records every frame as received (docs/capture-replay.md); "
                "required with capture"),
    Setting("capture_warn_interval_secs", "CAPTURE_WARN_INTERVAL_SECS", None, _seconds(0, True),
            "at most one capture drop warning per interval", same_as="ndjson_warn_interval_secs",
            default_text="NDJSON_WARN_INTERVAL_SECS's"),
    Setting("capture_flush_every", "CAPTURE_FLUSH_EVERY", None, _int(1), "flush the capture after N frames",
            same_as="ndjson_flush_every", default_text="NDJSON_FLUSH_EVERY's"),
    Setting("capture_flush_interval_ms", "CAPTURE_FLUSH_INTERVAL_MS", None, _int(1),
            "flush the capture at least this often while frames are buffered", same_as="ndjson_flush_interval_ms",
            default_text="NDJSON_FLUSH_INTERVAL_MS's"),
    Setting("capture_channel_cap", "CAPTURE_CHANNEL_CAP", "8192", _int(1),
            "the capture's backlog in batches (the messages of one hand-over): its queue, and what the reader holds "
            "for it while the inbound queue is full; beyond: drop, counted",
            doc="the capture's backlog in batches (the messages of one hand-over): its queue, and what the reader "
                "holds for it while the inbound queue is full; beyond: drop, counted (nothing waits)"),
    Setting("capture_max_bytes", "CAPTURE_MAX_BYTES", None, _int(1), "rotate the capture at this size (unset: off)",
            doc="rotate the capture before it would pass this size (as `NDJSON_MAX_BYTES`)"),
    Setting("capture_rotate_secs", "CAPTURE_ROTATE_SECS", None, _seconds(0, False),
            "rotate the capture every N s (unset: off)",
            doc="rotate the capture every N s (as `NDJSON_ROTATE_SECS`)"),
    Setting("capture_gzip", "CAPTURE_GZIP", "false", _bool, "gzip rotated capture files"),
    Setting("redis_url", "REDIS_URL", "redis://127.0.0.1:6379/0", _redis_url,
            "SINK=redis: redis://, rediss:// (TLS) or unix:// URL; a password in it is never logged", shown=redact_url,
            doc="with `SINK=...,redis`: `redis://[:PASSWORD@]HOST:PORT/DB`, `rediss://` (TLS) or `unix:///PATH.sock`; "
                "never logged with its password"),
    Setting("redis_password_file", "REDIS_PASSWORD_FILE", None, _nonempty,
            "read the Redis password from this file; wins over one in REDIS_URL",
            doc="read the Redis password from this file (wins over one in the URL)"),
    Setting("redis_stream", "REDIS_STREAM", "polygon:{cluster}", _redis_stream,
            "stream key template: {cluster}, {kind}, {symbol_shard} (a hash tag {N}, REDIS_SHARDS of them)",
            doc="stream key template: `{cluster}`, `{kind}`, `{symbol_shard}` (docs/sinks.md)"),
    Setting("redis_shards", "REDIS_SHARDS", "16", _int(1), "how many {symbol_shard} values symbols spread over",
            doc="how many `{symbol_shard}` values the symbols spread over"),
    Setting("redis_maxlen", "REDIS_MAXLEN", "1000000", _int(0),
            "trim each stream to about this many entries (XADD MAXLEN ~); 0: never trim",
            doc="trim each stream to about this many entries (`XADD MAXLEN ~`); `0` never trims"),
    Setting("redis_warn_interval_secs", "REDIS_WARN_INTERVAL_SECS", None, _seconds(0, True),
            "at most one Redis drop warning per interval", same_as="bp_warn_interval_secs",
            default_text="BP_WARN_INTERVAL_SECS's"),
    Setting("redis_channel_cap", "REDIS_CHANNEL_CAP", "4096", _int(1),
            "Redis queue capacity in batches (the events of one hand-over); full (Redis down or slow): drop, counted",
            doc="Redis queue capacity in batches (the events of one hand-over); while Redis is down or slow records "
                "wait here, then drop, counted"),
    Setting("redis_cluster", "REDIS_CLUSTER", "false", _bool, "REDIS_URL names a node of a Redis Cluster",
            doc="`REDIS_URL` names a node of a Redis Cluster"),
    Setting("kafka_bootstrap", "KAFKA_BOOTSTRAP", None, _kafka_bootstrap,
            "SINK=kafka: HOST:PORT of the Kafka brokers, comma separated (required with the sink)",
            doc="with `SINK=...,kafka` (required): `HOST:PORT` of one or more brokers, comma separated "
                "(librdkafka's bootstrap.servers)"),
    Setting("kafka_topic", "KAFKA_TOPIC", "polygon.{cluster}", _kafka_topic,
            "topic template: {cluster}, {type} (a topic per event code)",
            doc="topic name template: `{cluster}`, and `{type}` for a topic per event code (`polygon.stocks.T`); the "
                "topics must exist or the cluster create them (docs/sinks.md)"),
    Setting("kafka_config_file", "KAFKA_CONFIG_FILE", None, _nonempty,
            "librdkafka properties for your cluster (security.protocol, sasl.*, ssl.*): KEY=VALUE a line",
            doc="librdkafka properties for your cluster, `KEY=VALUE` a line, `#` comments: `security.protocol`, "
                "`sasl.*`, `ssl.*`, buffer sizes; they win over the sink's defaults. A password or secret in it "
                "never appears in logs, errors or metrics"),
    Setting("kafka_compression", "KAFKA_COMPRESSION", "lz4", _choice("none", "gzip", "snappy", "lz4", "zstd"),
            "compression of the produced batches"),
    Setting("kafka_channel_cap", "KAFKA_CHANNEL_CAP", "4096", _int(1),
            "Kafka queue capacity in batches; full (brokers away past librdkafka's buffer): drop, counted",
            doc="Kafka queue capacity in batches (the events of one hand-over): while the brokers are away records "
                "fill librdkafka's buffer, then wait here, then drop, counted (a `sink_drop` gap record)"),
    Setting("kafka_warn_interval_secs", "KAFKA_WARN_INTERVAL_SECS", None, _seconds(0, True),
            "at most one Kafka drop warning per interval", same_as="bp_warn_interval_secs",
            default_text="BP_WARN_INTERVAL_SECS's"),
    Setting("gateway_addr", "GATEWAY_ADDR", "127.0.0.1:8765", _addr,
            "SINK=gateway: host:port where Polygon clients connect (ws://HOST:PORT/CLUSTER)",
            doc="with `SINK=...,gateway`: where unchanged Polygon clients connect, `ws://HOST:PORT/CLUSTER` "
                "(`wss://` with TLS); an address that is not loopback needs `GATEWAY_KEYS_FILE`"),
    Setting("gateway_keys_file", "GATEWAY_KEYS_FILE", None, _nonempty,
            "the gateway's keys: NAME KEY (or KEY) a line; reread on SIGHUP (unset: POLYGON_API_KEY)",
            doc="the keys clients may authenticate with, `NAME KEY` (or a bare `KEY`) a line, `#` comments; a "
                "client is known by its NAME, never its key; reread on SIGHUP (a removed key's clients are closed); "
                "unset: the service's own `POLYGON_API_KEY`, named `default`"),
    Setting("gateway_upstream", "GATEWAY_UPSTREAM", "union", _choice("union", "fixed"),
            "a client topic the service's subscription lacks: union (added upstream while held) or fixed (refused)",
            doc="a topic a client subscribes that `SUBSCRIPTION` does not cover: `union` adds it to the upstream "
                "subscription (one subscribe message, no reconnect) while a client holds it, the other sinks never "
                "seeing its events; `fixed` refuses it with an `error` status"),
    Setting("gateway_linger_secs", "GATEWAY_LINGER_SECS", "10", _seconds(0, True),
            "how long a topic added for clients stays upstream after the last client let it go",
            doc="how long a topic added for clients stays subscribed upstream after the last client let it go (a "
                "client that reconnects does not churn the upstream subscription)"),
    Setting("gateway_client_queue", "GATEWAY_CLIENT_QUEUE", "1024", _int(1),
            "messages queued per gateway client; full: GATEWAY_SLOW_CLIENT",
            doc="messages queued for one client (one a hand-over: up to a few thousand events); when it is full, "
                "`GATEWAY_SLOW_CLIENT` says what happens"),
    Setting("gateway_send_interval_ms", "GATEWAY_SEND_INTERVAL_MS", "5", _int(0, 1000),
            "the least time between two writes to one gateway client: what comes sooner waits (0: at once)",
            doc="the least time between two writes to a client's socket: messages that come sooner wait, at most this "
                "long, and go with those after them in one write (many clients on a busy feed cost a write per "
                "interval, not per hand-over; a lone message goes at once); `0`: every hand-over at once"),
    Setting("gateway_slow_client", "GATEWAY_SLOW_CLIENT", "disconnect", _choice("disconnect", "drop"),
            "a client whose queue is full: disconnect (slow_consumer, close 1008) or drop (counted, a gap status)",
            doc="a client whose queue is full: `disconnect` (the `slow_consumer` status and close 1008, as Polygon "
                "does) or `drop` (counted, then one `gap` status when it catches up)"),
    Setting("gateway_max_clients", "GATEWAY_MAX_CLIENTS", "256", _int(1),
            "gateway clients served at once; more are closed at accept, counted"),
    Setting("gateway_channel_cap", "GATEWAY_CHANNEL_CAP", "4096", _int(1),
            "gateway queue capacity in batches; full: drop, counted (no client slows the service)"),
    Setting("gateway_tls_cert", "GATEWAY_TLS_CERT", None, _nonempty,
            "PEM certificate chain: the gateway speaks wss:// (with GATEWAY_TLS_KEY)"),
    Setting("gateway_tls_key", "GATEWAY_TLS_KEY", None, _nonempty, "PEM private key of GATEWAY_TLS_CERT"),
    Setting("ready_min_messages", "READY_MIN_MESSAGES", "1", _int(0), "data events after subscribe before READY",
            doc="data events needed after subscribe before `/ready` is 200"),
    Setting("ready_delay_ms", "READY_DELAY_MS", "0", _int(0), "and at least this long after subscribe"),
    Setting("log_level", "LOG_LEVEL", "info", _log_level, fallback_env="RUST_LOG", help=
            "level or directives, e.g. warn,polygon_events=info (read from RUST_LOG when LOG_LEVEL is unset); "
            "SINK=stdout prints events at info on the polygon_events target: a plain warn turns it off",
            doc="a level (`off error warn info debug trace`) or directives `warn,polygon_events=info`; `RUST_LOG` if "
                "unset"),
    Setting("log_format", "LOG_FORMAT", "auto", _choice("auto", "json", "text"),
            "json (one record a line: journald, pipes), text (one readable line) or auto (text when stderr is a "
            "terminal); the stdout sink's records keep their format",
            doc="`json` (one JSON record a line, for journald, pipes and log shippers), `text` (one readable line a "
                "record) or `auto` (text when stderr is a terminal, else JSON). The stdout sink's records are data and "
                "keep their JSON form"),
    Setting("shutdown_timeout_secs", "SHUTDOWN_TIMEOUT_SECS", "10", _seconds(0, False),
            "drain and flush deadline on SIGTERM/SIGINT",
            doc="SIGTERM/SIGINT: drain and flush within this time"),
    Setting("sink_stuck_secs", "SINK_STUCK_SECS", "30", _seconds(0, False),
            "a sink write that has not returned for this long (a FIFO nobody reads, a hung mount) is stuck: /health "
            "answers 503 and the systemd watchdog is no longer fed, so systemd restarts the service",
            doc="a sink write that has not returned for this long (a FIFO nobody reads, a hung mount) is stuck: "
                "`/health` answers 503 and the systemd watchdog is no longer fed, so systemd restarts the service"),
    Setting("backfill", "BACKFILL", "off", _backfill,
            "fill gaps from the REST API: off, on, or a list of trades, quotes, aggs (explicit tickers only)",
            doc="fill gaps from the REST API: `off`, `on`, or a list of `trades`, `quotes`, `aggs` "
                "(docs/gaps-and-backfill.md)"),
    Setting("rest_url", "POLYGON_REST_URL", "https://api.massive.com", _rest_url,
            "REST API base URL for backfill (the same API key)",
            doc="the REST API's base URL for backfill; the same API key, sent only in the `Authorization` header"),
    Setting("backfill_max_rps", "BACKFILL_MAX_RPS", "10", _rps, "backfill REST requests per second at most",
            doc="backfill requests per second at most (the free plan allows 5 a minute: `0.08`)"),
    Setting("backfill_max_secs", "BACKFILL_MAX_SECS", "900", _seconds(0, False),
            "how far back a gap is filled; older parts are reported too_old",
            doc="how far back a gap is filled; older parts are reported `too_old`"),
    Setting("state_dir", "STATE_DIR", None, _nonempty,
            "keep the stream position here between runs: a restart is then a gap record and seq goes on (default: "
            "systemd's $STATE_DIRECTORY)", fallback_env="STATE_DIRECTORY", default_text="$STATE_DIRECTORY, else unset",
            doc="where the stream position (last `ingest_ts`, last `seq`, whether the stop was clean) lives between "
                "runs: the next run starts with one gap record of reason `restart` and `seq` goes on (docs/"
                "gaps-and-backfill.md). Under systemd the unit's `$STATE_DIRECTORY`; unset: no restart records"),
    Setting("cpu_affinity", "CPU_AFFINITY", "auto", _cpu_affinity,
            "auto (one CPU: the idlest allowed), off, or CPUs such as 2 or 0,2-3 for the Python threads",
            doc="CPUs for the Python threads: `auto` confines them to one CPU of the allowed set (the idlest at "
                "start; among equally idle ones, spread by cluster from the highest down, so one instance per cluster "
                "lands on different CPUs), `off` leaves them to the kernel, or a list such as `2` or `0,2-3`. Only "
                "one thread runs Python at a time: on one CPU the GIL changes hands without crossing cores "
                "(docs/performance.md). libzmq's and the gzip thread keep every allowed CPU"),
)

SETTINGS_BY_FIELD = {setting.field: setting for setting in SETTINGS}

# Settings of the connection and the running service's surroundings: meaningless to an offline tool (reprocess),
# which neither offers nor logs them.
NETWORK_ONLY = ("api_key", "api_key_file", "cluster", "feed", "ws_url", "subscription", "subscription_file",
                "backoff_initial_secs", "backoff_max_secs", "read_timeout_secs", "stale_after_secs",
                "heartbeat_interval_secs", "metrics_addr", "stats_interval_secs", "ready_min_messages",
                "ready_delay_ms", "capture_dest", "capture_channel_cap", "capture_max_bytes", "capture_rotate_secs",
                "capture_warn_interval_secs", "capture_flush_every", "capture_flush_interval_ms",
                "capture_gzip", "backfill", "rest_url", "backfill_max_rps", "backfill_max_secs", "state_dir")


@dataclass(frozen=True)
class Config:
    """The effective configuration, built once at start and passed down; nothing reads os.environ later."""

    api_key: str = dataclasses.field(repr=False)
    cluster: str
    feed: str
    url: str
    subscription: str
    channel_cap: int
    backoff_initial_secs: float
    backoff_max_secs: float
    read_timeout_secs: float
    max_frame_bytes: int
    heartbeat_interval_secs: float
    metrics_addr: tuple[str, int]
    stats_interval_secs: float
    bp_warn_interval_secs: float
    sinks: tuple[str, ...]
    ndjson_dest: str
    ndjson_channel_cap: int
    ndjson_warn_interval_secs: float
    ndjson_flush_every: int
    ndjson_flush_interval_ms: int
    ndjson_max_bytes: int | None
    ndjson_rotate_secs: float | None
    ndjson_gzip: bool
    ndjson_no_reopen: bool
    ndjson_include: tuple[str, ...]
    ndjson_sample_quotes: int
    ndjson_split_per_type: bool
    zmq_endpoint: str
    zmq_bind: bool
    zmq_channel_cap: int
    zmq_warn_interval_secs: float
    zmq_snd_hwm: int | None
    zmq_topic_prefix: str
    ready_min_messages: int
    ready_delay_ms: int
    log_level: str
    log_format: str
    shutdown_timeout_secs: float
    cpu_affinity: str | tuple[int, ...] = "auto"
    stale_after_secs: float = 0.0
    capture_dest: str | None = None
    capture_channel_cap: int = 8192
    capture_max_bytes: int | None = None
    capture_rotate_secs: float | None = None
    capture_gzip: bool = False
    capture_warn_interval_secs: float = 5.0
    capture_flush_every: int = 100
    capture_flush_interval_ms: int = 1000
    redis_warn_interval_secs: float = 5.0
    subscription_file: str | None = None
    api_key_file: str | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password_file: str | None = None
    redis_password: str | None = dataclasses.field(default=None, repr=False)
    redis_stream: str = "polygon:{cluster}"
    redis_shards: int = 16
    redis_maxlen: int = 1_000_000
    redis_channel_cap: int = 4096
    redis_cluster: bool = False
    sink_stuck_secs: float = 30.0
    backfill: tuple[str, ...] = ()
    rest_url: str = "https://api.massive.com"
    backfill_max_rps: float = 10.0
    backfill_max_secs: float = 900.0
    state_dir: str | None = None
    kafka_bootstrap: str | None = None
    kafka_topic: str = "polygon.{cluster}"
    kafka_config_file: str | None = None
    kafka_properties: tuple[tuple[str, str], ...] = dataclasses.field(default=(), repr=False)
    kafka_compression: str = "lz4"
    kafka_channel_cap: int = 4096
    kafka_warn_interval_secs: float = 5.0
    gateway_addr: tuple[str, int] = ("127.0.0.1", 8765)
    gateway_keys_file: str | None = None
    gateway_upstream: str = "union"
    gateway_linger_secs: float = 10.0
    gateway_client_queue: int = 1024
    gateway_send_interval_ms: int = 5
    gateway_slow_client: str = "disconnect"
    gateway_max_clients: int = 256
    gateway_channel_cap: int = 4096
    gateway_tls_cert: str | None = None
    gateway_tls_key: str | None = None

    def redacted(self, offline: bool = False) -> dict[str, Any]:
        """The configuration as plain JSON-able values, the key replaced by a marker; offline: without the
        settings an offline tool does not use (NETWORK_ONLY; the cluster stays: it is the capture's)."""
        out: dict[str, Any] = {}
        hidden = {"url", "redis_password", *NETWORK_ONLY} - {"cluster"} if offline else ()
        for item in dataclasses.fields(self):
            if item.name in hidden:
                continue
            value = getattr(self, item.name)
            if item.name == "kafka_properties":
                value = {key: "<redacted>" if kafka_secret(key) else item_value for key, item_value in value}
            elif item.name in ("api_key", "redis_password"):
                value = "<redacted>" if value else "<unset>"
            elif item.name in ("url", "redis_url", "rest_url"):
                value = redact_url(value)
            elif item.name in ("metrics_addr", "gateway_addr"):
                value = format_addr(value)
            elif isinstance(value, tuple):
                value = ",".join(map(str, value))
            out[item.name] = value
        return out

    def redact(self, text: str) -> str:
        """text with every secret replaced (for an error that may quote a URL or a server's message)."""
        from .logs import redact_text

        return redact_text(text, sorted(self.secrets(), key=len, reverse=True))

    def secrets(self) -> list[str]:
        """Every value that must never reach a log line: the key and any credential in the URL."""
        return [secret for secret in [self.api_key, *url_secrets(self.url), self.redis_password,
                                      *url_secrets(self.redis_url), *url_secrets(self.rest_url),
                                      *(value for key, value in self.kafka_properties if kafka_secret(key))]
                if secret]


def format_addr(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(setting: Setting) -> str:
    return f"{setting.env} ({setting.flag})"


def parse_setting(setting: Setting, raw: str) -> Any:
    try:
        return setting.parse(raw)
    except ValueError as exc:
        shown = "<redacted>" if setting.secret else setting.shown(raw)
        raise ConfigError(f"invalid {_describe(setting)} {shown!r}: {exc}") from None


def build_config(raw: Mapping[str, str | None], *, require_key: bool = True,
                 defaults: Mapping[str, str] | None = None) -> Config:
    """raw maps each setting's field to its string from the command line or environment (None: unset)."""
    overrides = dict(defaults or {})
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        text = raw.get(setting.field)
        if text is None:
            text = overrides.get(setting.field, setting.default)
        values[setting.field] = None if text is None else parse_setting(setting, text)
    for setting in SETTINGS:
        if setting.same_as is not None and values[setting.field] is None:
            values[setting.field] = values[setting.same_as]

    api_key = values["api_key"]
    if values["api_key_file"] is not None:
        api_key = _read_key_file(values["api_key_file"])
    if require_key and not api_key:
        raise ConfigError("missing POLYGON_API_KEY (--api-key) or POLYGON_API_KEY_FILE: the API key is required")

    if values["backoff_max_secs"] < values["backoff_initial_secs"]:
        raise ConfigError(
            "invalid BACKOFF_MAX_SECS (--backoff-max-secs) "
            f"{raw.get('backoff_max_secs') or values['backoff_max_secs']!r}"
            f": expected a number of seconds >= BACKOFF_INITIAL_SECS ({values['backoff_initial_secs']:g})")

    sinks = values["sink"]
    if sinks is None:
        sinks = ("ndjson",) if values["emit_ndjson"] else ("stdout",)
    if "stdout" in sinks and "ndjson" in sinks and values["ndjson_dest"] == "stdout":
        raise ConfigError("invalid SINK (--sink) 'stdout,ndjson' with NDJSON_DEST=stdout: both would write to "
                          "stdout; set NDJSON_DEST to a file path or drop one sink")
    if "capture" in sinks and not values["capture_dest"]:
        raise ConfigError("missing CAPTURE_DEST (--capture-dest) with SINK=capture: give the capture file's path")
    if values["capture_dest"] in ("stdout", "-"):
        raise ConfigError(f"invalid CAPTURE_DEST (--capture-dest) {values['capture_dest']!r}: expected a file path")
    if values["ndjson_split_per_type"] and values["ndjson_dest"] == "stdout":
        raise ConfigError("invalid NDJSON_SPLIT_PER_TYPE (--ndjson-split-per-type) 'true' with NDJSON_DEST=stdout: "
                          "splitting needs a file path in NDJSON_DEST")

    if values["subscription_file"] is not None:
        from .subscriptions import SubscriptionFileError, read_file

        try:
            values["subscription"] = ",".join(read_file(values["subscription_file"]))
        except SubscriptionFileError as exc:
            raise ConfigError(f"invalid SUBSCRIPTION_FILE (--subscription-file) {exc}") from None

    if values["redis_password_file"] is not None:
        values["redis_password"] = _read_secret_file(values["redis_password_file"],
                                                     "REDIS_PASSWORD_FILE (--redis-password-file)")

    if "kafka" in sinks and values["kafka_bootstrap"] is None:
        raise ConfigError("missing KAFKA_BOOTSTRAP (--kafka-bootstrap) with SINK=kafka: give HOST:PORT of your "
                          "Kafka brokers")
    if values["kafka_config_file"] is not None:
        values["kafka_properties"] = read_kafka_properties(values["kafka_config_file"])

    values["cluster"] = _cluster(raw, overrides, values)
    url = values["ws_url"] or protocol.feed_url(values["feed"], values["cluster"])
    fields = {f.name for f in dataclasses.fields(Config)}
    kwargs = {name: value for name, value in values.items() if name in fields}
    kwargs.update(api_key=api_key or "", url=url, sinks=tuple(sinks))
    return Config(**kwargs)


# Variables of the service's own families: one that is not a setting is a misspelling (POLYGON_CLUSTR) that would
# otherwise be ignored in silence, the service running on a default.
OUR_PREFIXES = ("POLYGON_", "NDJSON_", "ZMQ_", "REDIS_", "CAPTURE_", "BACKFILL_", "BACKOFF_", "READY_", "GATEWAY_",
                "KAFKA_")
# Read by the service but not settings of config.py: systemd's protocol, the fallbacks.
OTHER_VARIABLES = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "RUST_LOG", "STATE_DIRECTORY"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per variable that looks like a setting and is none: ours by its prefix, or a near miss of a name
    (SINKS for SINK); the closest setting named."""
    import difflib

    names = [setting.env for setting in SETTINGS]
    known = set(names) | OTHER_VARIABLES
    lines = []
    for variable in sorted(environ):
        if variable in known:
            continue
        close = difflib.get_close_matches(variable, names, n=1, cutoff=0.75)
        if variable.startswith(OUR_PREFIXES) or (close and difflib.SequenceMatcher(
                None, variable, close[0]).ratio() >= 0.85):
            hint = f"; did you mean {close[0]}?" if close else ""
            lines.append(f"{variable} is not a setting of polygon-streamer and is ignored{hint} "
                         "(polygon-streamer config --help lists them)")
    return lines


def read_env_file(path: str) -> dict[str, str]:
    """An environment file as systemd reads EnvironmentFile=: KEY=VALUE lines, `#` and `;` comments, blank lines,
    values optionally in single or double quotes (a backslash escapes within double quotes), `export ` ignored."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"invalid --env-file {path!r}: cannot read it ({getattr(exc, 'strerror', None) or exc})") \
            from None
    variables: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        name, equals, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"invalid --env-file {path!r}: line {number} is not NAME=VALUE")
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r'\\(.)', r"\1", value[1:-1])
        variables[name] = value
    return variables


def build_default_config() -> Config:
    """Every setting at its default (what the start-up line compares with)."""
    return build_config({}, require_key=False)


def url_cluster(url: str) -> str | None:
    """The cluster a WebSocket URL's path names (wss://socket.massive.com/stocks -> stocks), or None."""
    try:
        first = urlsplit(url).path.strip("/").split("/")[0]
    except ValueError:
        return None
    return first if first in protocol.CLUSTERS else None


def _cluster(raw: Mapping[str, str | None], overrides: Mapping[str, str], values: dict) -> str:
    """POLYGON_CLUSTER labels every record: taken from POLYGON_WS_URL's path when unset there; both set and
    different is an error (every record would carry the wrong feed)."""
    from_url = url_cluster(values["ws_url"]) if values["ws_url"] else None
    given = raw.get("cluster") is not None or "cluster" in overrides
    if from_url is None:
        return values["cluster"]
    if not given:
        return from_url
    if values["cluster"] != from_url:
        raise ConfigError(f"invalid POLYGON_CLUSTER (--cluster) {values['cluster']!r} with POLYGON_WS_URL "
                          f"(--ws-url) {redact_url(values['ws_url'])!r}: the URL is the {from_url} cluster's; "
                          f"set POLYGON_CLUSTER={from_url} or leave it unset")
    return values["cluster"]


def _read_key_file(path: str) -> str:
    return _read_secret_file(path, "POLYGON_API_KEY_FILE (--api-key-file)")


def kafka_secret(name: str) -> bool:
    """Whether a librdkafka property holds a credential (its value is redacted everywhere)."""
    return bool(re.search(r"password|secret|jaas|\.pem$|token|oauthbearer\.config|\.key$", name))


def read_kafka_properties(path: str) -> tuple[tuple[str, str], ...]:
    """KAFKA_CONFIG_FILE: librdkafka properties, KEY=VALUE a line (Java properties style, `#` and `!` comments).
    Errors name the line, never a value."""
    what = "KAFKA_CONFIG_FILE (--kafka-config-file)"
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"invalid {what} {path!r}: cannot read it ({getattr(exc, 'strerror', None) or exc})") \
            from None
    properties: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        name, equals, value = line.partition("=")
        name = name.strip()
        if not equals or not re.fullmatch(r"[a-z][a-z0-9._-]*", name):
            raise ConfigError(f"invalid {what} {path!r}: line {number} is not a librdkafka property KEY=VALUE")
        properties[name] = value.strip()
    return tuple(properties.items())


def _read_secret_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            secret = handle.read().strip()
    except OSError as exc:
        raise ConfigError(f"invalid {what} {path!r}: cannot read it ({exc.strerror or exc})") from None
    if not secret:
        raise ConfigError(f"invalid {what} {path!r}: the file is empty")
    return secret

