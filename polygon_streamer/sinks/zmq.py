"""The ZeroMQ sink: every record as [topic, payload] for many subscribers, with every drop counted.

A plain PUB drops silently at the high-water mark (ops.md C.3). This sink uses XPUB with XPUB_NODROP and
non-blocking sends instead: a full pipe answers EAGAIN, and the message is dropped and counted here. The price is
libzmq's rule that one full subscriber refuses the message for every subscriber that matches it; size SNDHWM so a
healthy subscriber never reaches it (docs/sinks.md, "ZeroMQ").
"""

from __future__ import annotations

import re
import socket

import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import logs
from ..config import Config
from ..normalize import BACKFILL, GAP
from . import Sink, SinkConfigError, SinkStats

_log = logs.get("polygon_zmq")

LINGER_MS = 1000
# A peer is there: a subscriber connected to our bound socket, or our connect reached a bound one.
_PEER_UP = zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED
_TOPIC_CACHE_LIMIT = 200_000
_TOPIC_CACHE_BYTES = 32 * 1024 * 1024  # symbols come from the network: bounded in bytes too (as normalize's cache)


class ZmqSink(Sink):
    name = "zmq"

    @staticmethod
    def queue_settings(config: Config) -> tuple[int, bool, float]:
        return config.zmq_channel_cap, True, config.zmq_warn_interval_secs

    def destination(self) -> str | None:
        return self._config.zmq_endpoint

    def __init__(self, config: Config):
        super().__init__()
        self._config = config
        self._prefix = config.zmq_topic_prefix
        self._context: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._topics: dict[tuple[str, str], bytes] = {}
        self._topic_bytes = 0
        self._drop_warning = logs.RateLimitedWarning(_log, config.zmq_warn_interval_secs)
        self.sent = 0
        self.socket_drops = 0
        self.peers = 0  # connected peers, from the socket's monitor (read by the scrape and /health)
        self._monitor: zmq.Socket | None = None

    def open(self) -> None:
        endpoint = self._config.zmq_endpoint
        where = f"invalid ZMQ_ENDPOINT (--zmq-endpoint) {endpoint!r}"
        self._check_host(endpoint, where)
        self._context = zmq.Context()
        sock = self._context.socket(zmq.XPUB)
        try:
            # With no peer a PUB socket takes every message and drops it: count the peers, so it shows.
            self._monitor = sock.get_monitor_socket(_PEER_UP | zmq.EVENT_DISCONNECTED)
            sock.setsockopt(zmq.XPUB_NODROP, 1)
            sock.setsockopt(zmq.LINGER, LINGER_MS)
            if self._config.zmq_snd_hwm is not None:
                sock.setsockopt(zmq.SNDHWM, self._config.zmq_snd_hwm)  # before bind/connect, or it is ignored
            if self._config.zmq_bind:
                sock.bind(endpoint)
            else:
                sock.connect(endpoint)
        except zmq.ZMQError as exc:
            if self._monitor is not None:
                self._monitor.close(0)
                self._monitor = None
            sock.close(0)
            self._context.term()
            verb = "bind" if self._config.zmq_bind else "connect"
            raise SinkConfigError(f"{where}: cannot {verb}: {exc.strerror}") from None
        self._socket = sock
        _log.info("ZeroMQ %s %s", "bound to" if self._config.zmq_bind else "connecting to", endpoint,
                  extra={"fields": {"endpoint": endpoint, "bind": self._config.zmq_bind,
                                    "snd_hwm": self._config.zmq_snd_hwm}})

    @staticmethod
    def _check_host(endpoint: str, where: str) -> None:
        """libzmq resolves tcp:// hosts later and retries forever; an unknown host is a config error now."""
        match = re.fullmatch(r"tcp://(?:[^;]+;)?(\[[^\]]+\]|[^:]+):(\d+|\*)", endpoint)
        if not endpoint.startswith("tcp://"):
            return
        if not match:
            raise SinkConfigError(f"{where}: expected tcp://HOST:PORT")
        host = match.group(1).strip("[]")
        if host == "*":
            return
        try:
            socket.getaddrinfo(host, None)
        except socket.gaierror as exc:
            raise SinkConfigError(f"{where}: cannot resolve host {host!r} ({exc.strerror})") from None

    def write(self, records: list[tuple], ingest_ms: int) -> None:
        sock = self._socket
        assert sock is not None, "written before open()"
        send = sock.send
        topics = self._topics
        more = zmq.SNDMORE | zmq.NOBLOCK
        last = zmq.NOBLOCK
        dropped = 0
        for _seq, code, symbol, _kind, _ts, line in records:
            topic = topics.get((code, symbol))
            if topic is None:
                topic = self._topic(code, symbol)
            try:
                send(topic, more, copy=True)
            except zmq.Again:
                dropped += 1
                continue
            send(line.encode("utf-8"), last, copy=True)
        self.sent += len(records) - dropped
        self.observe_written(ingest_ms, len(records) - dropped)
        if dropped:
            self.socket_drops += dropped
            self._drop_warning.warn("ZeroMQ subscriber(s) at the high-water mark: dropping events",
                                    dropped_events_total=self.socket_drops, snd_hwm=self._config.zmq_snd_hwm)

    def _topic(self, code: str, symbol: str) -> bytes:
        if len(self._topics) >= _TOPIC_CACHE_LIMIT or self._topic_bytes >= _TOPIC_CACHE_BYTES:
            self._topics.clear()
            self._topic_bytes = 0
        # A gap record's topic is `gap` (schema.md), so that SUBSCRIBE "gap" gets every hole; a backfill summary's
        # is `backfill`.
        topic = f"{self._prefix}{code}".encode("utf-8") if symbol == "" and code in (GAP, BACKFILL) \
            else f"{self._prefix}{code}:{symbol}".encode("utf-8")
        self._topics[(code, symbol)] = topic
        self._topic_bytes += 3 * len(topic) + 200  # the key's strings, the topic and the entry
        return topic

    def tick(self, now: float) -> None:
        self._count_peers()
        # XPUB hands subscription messages up to us; read them so they do not pile up.
        while True:
            if self._socket is None:
                return
            try:
                message = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if message[:1] in (b"\x00", b"\x01"):
                _log.debug("subscription %s", "added" if message[:1] == b"\x01" else "removed",
                           extra={"fields": {"topic": message[1:].decode("utf-8", "replace")}})

    def _count_peers(self) -> None:
        while self._monitor is not None:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] & _PEER_UP:
                self.peers += 1
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.peers = max(0, self.peers - 1)

    def degraded(self) -> str | None:
        if self.peers == 0:
            return (f"zmq sink: no peer {'connected to' if self._config.zmq_bind else 'at'} "
                    f"{self._config.zmq_endpoint}: events published are dropped by ZeroMQ unseen")
        return None

    def close_report(self) -> str | None:
        if self.peers == 0:
            return f"zmq: no peer at the stop, {self.sent} event(s) published may have reached nobody"
        return None

    def close(self, deadline: float | None = None) -> None:
        if self._monitor is not None:
            self._count_peers()
            try:
                if self._socket is not None:
                    self._socket.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(0)
            self._monitor = None
        if self._socket is not None:
            self._socket.close(LINGER_MS)
            self._socket = None
        if self._context is not None:
            self._context.term()
            self._context = None

    def describe_metrics(self, queue_stats: SinkStats):
        return [
            ("polygon_zmq_sent_total", "Events published on the ZeroMQ socket", self.sent),
            ("polygon_zmq_drops_total",
             "Events dropped for ZeroMQ: queue full or a subscriber at the high-water mark",
             queue_stats.dropped + self.socket_drops),
            ("polygon_zmq_socket_drops_total", "Events refused by the socket at the high-water mark",
             self.socket_drops),
            ("polygon_zmq_peers", "Peers connected to the ZeroMQ socket (0: what is published reaches nobody)",
             self.peers),
        ]
