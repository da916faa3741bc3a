"""The Redis Streams sink (SINK=redis): every record XADDed to a stream, for consumers on other machines that read
at their own pace (consumer groups), on one Redis or a Redis Cluster.

Each entry has three fields: `record` (the schema's record line), `type` and `symbol` (to route without parsing).
The key comes from REDIS_STREAM: `{cluster}`, `{kind}` and `{symbol_shard}`, the last a Redis Cluster hash tag
`{N}` with N = crc32(symbol) % REDIS_SHARDS, stable across processes and machines.

Speed: the sink thread takes every batch already queued (coalesce_events, up to 500 records) and sends all their
XADDs in one write, then reads the replies: one round trip for many frames when Redis is the slow part. The commands
are packed here (the RESP array of XADD is short and fixed); redis-py does the connections, the replies, TLS, AUTH
and the cluster topology.

Faults: when Redis is unreachable (down at start, restarting, timing out) the thread keeps the batch and retries
with backoff; the queue fills meanwhile and drops what does not fit, counted (sink_drop gap records). After a
connection broke mid-write it reads each stream's last entry to learn which XADDs of the write were applied, so
they are not added twice (exact when this service is the stream's only writer). A reply that refuses one XADD
(WRONGTYPE...) drops that record, counted, logged and reported at shutdown (exit 1); OOM, LOADING, READONLY,
TRYAGAIN, MOVED and the like are retried (and /health says so). On SIGTERM it keeps trying until shortly before the
deadline, then reports what it could not write.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

from .. import logs
from ..config import Config, redact_url
from . import Sink, SinkConfigError, SinkStats

_log = logs.get("polygon_redis")

CONNECT_TIMEOUT_SECS = 2.0
SOCKET_TIMEOUT_SECS = 5.0          # a reply slower than this: the connection is dropped and the write retried
RETRY_INITIAL_SECS = 0.1
RETRY_MAX_SECS = 5.0
CLOSE_MARGIN_SECS = 0.3
PROBE_SECS = 1.0                   # while Redis is away and there is nothing to write: how often to look for it
COALESCE_EVENTS = 500
_KEY_CACHE_LIMIT = 200_000         # (code, symbol) -> packed command parts; symbols come from the network
# Error replies worth retrying: by prefix (redis-py keeps the prefix of those it has no class for) and by the classes
# redis-py parses some into (the prefix then gone; which ones depends on the version: 4.3.4 has no OutOfMemoryError).
_TRANSIENT = ("OOM", "LOADING", "BUSY", "READONLY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN", "NOREPLICAS")
_TRANSIENT_CLASSES = ("OutOfMemoryError", "ReadOnlyError", "TryAgainError", "MasterDownError", "ClusterDownError",
                      "BusyLoadingError")


def _transient_classes() -> tuple[type, ...]:
    import redis.exceptions

    return tuple(getattr(redis.exceptions, name) for name in _TRANSIENT_CLASSES if hasattr(redis.exceptions, name))


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def shard_of(symbol: str, shards: int) -> int:
    return zlib.crc32(symbol.encode("utf-8", "replace")) % shards


def stream_key(template: str, cluster: str, kind: str, symbol: str, shards: int) -> str:
    key = template.replace("{cluster}", cluster).replace("{kind}", kind)
    if "{symbol_shard}" in key:
        key = key.replace("{symbol_shard}", "{%d}" % shard_of(symbol, shards))
    return key


def stream_keys(config: Config, kinds: tuple[str, ...]) -> list[str]:
    """Every key the template can give for this cluster (what redis-sub reads)."""
    template = config.redis_stream
    keys: list[str] = []
    for kind in (kinds if "{kind}" in template else ("",)):
        base = template.replace("{cluster}", config.cluster).replace("{kind}", kind)
        if "{symbol_shard}" in base:
            keys.extend(base.replace("{symbol_shard}", "{%d}" % shard) for shard in range(config.redis_shards))
        else:
            keys.append(base)
    return list(dict.fromkeys(keys))


def connect(config: Config):
    """A redis-py client (Redis or RedisCluster) for REDIS_URL; raises SinkConfigError when redis-py is missing or
    the URL is unusable, and redis' own errors when the server cannot be reached (a cluster is asked for its
    topology at once)."""
    try:
        import redis
        import redis.cluster
    except ImportError:
        raise SinkConfigError("SINK=redis needs the Python module redis: apt install python3-redis "
                              "(or pip install redis)") from None
    options: dict[str, Any] = {"socket_timeout": SOCKET_TIMEOUT_SECS, "socket_connect_timeout": CONNECT_TIMEOUT_SECS}
    if config.redis_url.startswith("unix:"):
        # redis-py before 4.5 (Debian 12's 4.3.4) has no connect timeout for a unix socket, and refuses the argument;
        # a local connect does not hang on the network.
        del options["socket_connect_timeout"]
    if config.redis_password is not None:
        options["password"] = config.redis_password
    try:
        if config.redis_cluster:
            return redis.cluster.RedisCluster.from_url(config.redis_url, **options)
        return redis.Redis.from_url(config.redis_url, **options)
    except ValueError as exc:
        raise SinkConfigError(f"invalid REDIS_URL (--redis-url) {redact_url(config.redis_url)!r}: "
                              f"{config.redact(str(exc))}") from None


# What the sink knows of one XADD.
PENDING, IN_DOUBT, DONE = 0, 1, 2


def _pool_connection(pool):
    try:
        return pool.get_connection()
    except TypeError:  # redis-py before 5.3 wants a command name (5.3 deprecates passing one)
        return pool.get_connection("XADD")


class _Command:
    __slots__ = ("key", "packed", "line", "state")

    def __init__(self, key: str, packed: bytes, line: bytes):
        self.key, self.packed, self.line, self.state = key, packed, line, PENDING


class RedisSink(Sink):
    name = "redis"
    coalesce_events = COALESCE_EVENTS

    @staticmethod
    def queue_settings(config: Config) -> tuple[int, bool, float]:
        return config.redis_channel_cap, True, config.redis_warn_interval_secs

    def destination(self) -> str | None:
        return self._where

    def __init__(self, config: Config):
        super().__init__()
        self._config = config
        self._where = redact_url(config.redis_url) + (" (cluster)" if config.redis_cluster else "")
        self._client: Any = None  # redis.Redis or redis.cluster.RedisCluster, once connected
        self._connections: dict[str, tuple] = {}     # node name ("" without a cluster) -> (pool, Connection)
        self._nodes: dict[str, str] = {}             # key -> node name
        self._parts: dict[tuple[str, str], tuple[str, bytes, bytes]] = {}  # (code, symbol) -> key, head, tail
        trim = [b"MAXLEN", b"~", str(config.redis_maxlen).encode()] if config.redis_maxlen else []
        self._arity = b"*%d\r\n" % (9 + len(trim))
        self._trim = b"".join(map(_bulk, trim))
        self._error_warning = logs.RateLimitedWarning(_log, config.bp_warn_interval_secs)
        self._down_since: float | None = None
        self._down_reason: str | None = None
        self._down_what = "unreachable"
        self._transient: tuple[type, ...] = ()
        self._retry_at: float | None = None
        self._stopped_trying = False  # the service is stopping and the deadline came: count, do not send
        self._unwritten = 0
        self.sent = 0
        self.errors = 0      # connection failures and error replies
        self.refused = 0     # records a permanent error reply refused (dropped, counted)

    # -- connections --------------------------------------------------------------------------------------------

    def open(self) -> None:
        try:
            self._connect()
            _log.info("Redis: writing to %s", self._where, extra={"fields": self._fields()})
        except SinkConfigError:
            raise
        except Exception as exc:  # the service starts anyway; the first write retries
            self._failed(exc, "connect")

    def _fields(self) -> dict:
        return {"url": self._where, "stream": self._config.redis_stream, "maxlen": self._config.redis_maxlen}

    def _connect(self) -> None:
        if self._client is None:
            self._client = connect(self._config)
            self._transient = _transient_classes()
        if not self._config.redis_cluster:
            self._connection("")

    def _node(self, key: str) -> str:
        node = self._nodes.get(key)
        if node is None:
            node = self._client.get_node_from_key(key).name if self._config.redis_cluster else ""
            self._nodes[key] = node
        return node

    def _connection(self, node: str):
        entry = self._connections.get(node)
        if entry is None:
            pool = self._client.get_node(node_name=node).redis_connection.connection_pool \
                if self._config.redis_cluster else self._client.connection_pool
            connection = _pool_connection(pool)
            try:
                connection.connect()
            except Exception:
                pool.release(connection)
                raise
            entry = self._connections[node] = (pool, connection)
        return entry[1]

    def _reset(self, topology: bool = False) -> None:
        for pool, connection in self._connections.values():
            try:
                connection.disconnect()
                pool.release(connection)
            except Exception:
                pass
        self._connections.clear()
        self._nodes.clear()
        if topology and self._client is not None and self._config.redis_cluster:
            try:
                self._client.nodes_manager.initialize()
            except Exception:
                self._client = None  # rebuilt from REDIS_URL on the next try

    # -- writing ------------------------------------------------------------------------------------------------

    def write(self, records: list[tuple], ingest_ms: int) -> None:
        self.write_batches([(ingest_ms, records)])

    def write_batches(self, batches: list[tuple[int, list[tuple]]]) -> None:
        commands: list[_Command] = []
        append = commands.append
        parts = self._parts
        for _ingest_ms, records in batches:
            for _seq, code, symbol, kind, _ts, line in records:
                cached = parts.get((code, symbol))
                if cached is None:
                    cached = self._command_parts(code, symbol, kind)
                key, head, tail = cached
                data = line.encode("utf-8")
                append(_Command(key, b"%s$%d\r\n%s\r\n%s" % (head, len(data), data, tail), data))
        if not self._deliver(commands):
            return
        for ingest_ms, records in batches:
            self.observe_written(ingest_ms, len(records))

    def _command_parts(self, code: str, symbol: str, kind: str) -> tuple[str, bytes, bytes]:
        if len(self._parts) >= _KEY_CACHE_LIMIT:
            self._parts.clear()
        config = self._config
        key = stream_key(config.redis_stream, config.cluster, kind, symbol, config.redis_shards)
        head = (self._arity + _bulk(b"XADD") + _bulk(key.encode("utf-8", "replace")) + self._trim + _bulk(b"*")
                + _bulk(b"record"))
        tail = (_bulk(b"type") + _bulk(code.encode("utf-8", "replace")) + _bulk(b"symbol")
                + _bulk(symbol.encode("utf-8", "replace")))
        entry = (key, head, tail)
        self._parts[(code, symbol)] = entry
        return entry

    def _deliver(self, commands: list[_Command]) -> bool:
        """Send until every command is applied or refused for good; while Redis is unreachable, retry with backoff
        (the queue fills and drops meanwhile, counted); give up (False) only when the service stops."""
        delay = RETRY_INITIAL_SECS
        if self._stopped_trying:
            self._unwritten += len(commands)
            return False
        while True:
            transient = None
            try:
                self._connect()
                in_doubt = [command for command in commands if command.state == IN_DOUBT]
                if in_doubt:
                    self._settle(in_doubt)
                    commands = [command for command in commands if command.state != DONE]
                transient = self._send(commands)
            except Exception as exc:  # redis' ConnectionError/TimeoutError, OSError, a cluster without a node...
                self._failed(exc, "write")
            commands = [command for command in commands if command.state != DONE]
            if not commands:
                if self._down_since is not None:
                    self._recovered()
                return True
            if transient is not None:
                self._degrade(transient, "refuses writes", "write")
                self._error_warning.warn(f"Redis refused writes for now, retrying: {transient}",
                                         retrying_events=len(commands), errors_total=self.errors)
            if not self._wait(delay):
                self._stopped_trying = True
                self._unwritten += len(commands)
                _log.error("Redis: %d event(s) not written: the service is stopping and %s does not take them; "
                           "what is still queued is not sent either", len(commands), self._where,
                           extra={"fields": {"unwritten_events": len(commands)}})
                return False
            delay = min(delay * 2, RETRY_MAX_SECS)

    def _send(self, commands: list[_Command]) -> str | None:
        """One write per node, then its replies; each command ends DONE (applied, or refused for good: counted),
        PENDING (a transient error reply: the returned text) or, when the connection breaks (raised), IN_DOUBT."""
        import redis.exceptions

        by_node: dict[str, list[_Command]] = {}
        for command in commands:
            by_node.setdefault(self._node(command.key), []).append(command)
        transient = None
        for node, group in by_node.items():
            connection = self._connection(node)
            for command in group:
                command.state = IN_DOUBT
            connection.send_packed_command([b"".join(command.packed for command in group)], check_health=False)
            for command in group:
                try:
                    connection.read_response()
                except redis.exceptions.ResponseError as exc:
                    text = str(exc)
                    self.errors += 1
                    if isinstance(exc, (redis.exceptions.MovedError, redis.exceptions.AskError)):
                        transient = f"{type(exc).__name__} {text}"
                        command.state = PENDING
                        self._nodes.pop(command.key, None)
                    elif text.startswith(_TRANSIENT) or isinstance(exc, self._transient):
                        transient = text if text.startswith(_TRANSIENT) else f"{type(exc).__name__}: {text}"
                        command.state = PENDING
                    else:
                        command.state = DONE
                        self.refused += 1
                        self._unwritten += 1  # accepted and never written: the shutdown report counts it
                        self._error_warning.warn(f"Redis refused a record, dropped (counted): {text}",
                                                 stream=command.key, refused_total=self.refused)
                    continue
                command.state = DONE
                self.sent += 1
        if transient is not None and transient.startswith(("MovedError", "AskError")):
            self._reset(topology=True)
        return transient

    def _settle(self, in_doubt: list[_Command]) -> None:
        """After a broken connection: of the XADDs sent without a reply, those Redis applied are the ones up to the
        entry each stream ends with (Redis applies a connection's commands in order)."""
        by_key: dict[str, list[_Command]] = {}
        for command in in_doubt:
            by_key.setdefault(command.key, []).append(command)
        for key, group in by_key.items():
            entries = self._client.xrevrange(key, count=1)
            last = entries[0][1].get(b"record") if entries else None
            applied = 0
            for index in range(len(group) - 1, -1, -1):
                if group[index].line == last:
                    applied = index + 1
                    break
            for index, command in enumerate(group):
                command.state = DONE if index < applied else PENDING
            self.sent += applied

    def _wait(self, delay: float) -> bool:
        """Sleep before the next try; False once the service is stopping and the deadline is near."""
        self.still_working()
        thread = self.thread
        now = time.monotonic()
        if thread is None:
            time.sleep(delay)
            return True
        deadline = thread.close_deadline
        if deadline is not None:
            if now >= deadline - CLOSE_MARGIN_SECS:
                return False
            delay = min(delay, max(0.0, deadline - CLOSE_MARGIN_SECS - now))
        self._retry_at = now + delay
        if thread.stopping.wait(delay):
            return False
        return True

    def _failed(self, exc: BaseException, during: str) -> None:
        self.errors += 1
        self._reset(topology=self._config.redis_cluster)  # a cluster node that is gone: the slots may have moved
        self._degrade(f"{type(exc).__name__}: {exc}", "unreachable", during)

    def _degrade(self, reason: str, what: str, during: str) -> None:
        """Redis does not take records for now: said once in the log, and by /health while it lasts."""
        reason = self._config.redact(reason)[:300]
        if self._down_since is None:
            self._down_since = time.monotonic()
            _log.error("Redis %s %s (%s during %s): records wait in the queue (REDIS_CHANNEL_CAP), then are dropped "
                       "and counted; retrying", self._where, what, reason, during,
                       extra={"fields": dict(self._fields(), error=reason)})
        self._down_what = what
        self._down_reason = reason

    def _recovered(self) -> None:
        assert self._down_since is not None, "recovered while not down"
        down = time.monotonic() - self._down_since
        _log.info("Redis %s takes records again after %.1fs", self._where, down,
                  extra={"fields": dict(self._fields(), down_secs=round(down, 3))})
        self._down_since = None
        self._down_reason = None
        self._retry_at = None

    # -- the rest of the sink interface -------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """While Redis is away and nothing is to be written, look for it now and then, so that /health tells the
        truth in a quiet market too."""
        if self._down_since is None or self._stopped_trying or (self._retry_at is not None and now < self._retry_at):
            return
        try:
            self._connect()
            if self._config.redis_cluster:
                self._client.ping()
        except Exception as exc:
            self._failed(exc, "probe")
            self._retry_at = time.monotonic() + PROBE_SECS
            return
        self._recovered()

    def failed_writes(self) -> int:
        return self.errors

    def degraded(self) -> str | None:
        if self._down_since is None:
            return None
        retry = f"; retrying in {max(0.0, self._retry_at - time.monotonic()):.1f}s" if self._retry_at else ""
        return (f"redis sink: {self._where} {self._down_what} for {time.monotonic() - self._down_since:.0f}s "
                f"({self._down_reason}){retry}")

    def close(self, deadline: float | None = None) -> None:
        self._reset()
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None

    def unwritten(self) -> int:
        return self._unwritten

    def describe_metrics(self, queue_stats: SinkStats):
        return [
            ("polygon_redis_sent_total", "Records added to Redis streams (XADD applied)", self.sent),
            ("polygon_redis_drops_total",
             "Records dropped for Redis: queue full (Redis down or slow) or refused by a Redis error reply",
             queue_stats.dropped + self.refused),
            ("polygon_redis_errors_total", "Redis connection failures and error replies", self.errors),
        ]
