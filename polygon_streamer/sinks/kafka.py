"""The Kafka sink (SINK=kafka): every record produced to Kafka with confluent-kafka (librdkafka), for teams whose
ETL, stream processors and services already read Kafka.

Each record is one message: value = the record line (byte for byte what the NDJSON sink writes, without its
newline), key = the symbol (a symbol's events stay in order on one partition), headers `type`, `kind`, `seq`, and the
message timestamp = ingest_ts. A gap record goes to every partition of every topic the sink writes, so the consumer
of each partition sees the hole in order with its data. Topics come from KAFKA_TOPIC (`{cluster}`, `{type}`).

Nothing is counted as delivered until librdkafka's delivery report says so; the reports are served by a thread of their
own (kafka-reports), so that they are taken as they come, whatever the sink's thread is doing. The producer cannot lose
or reorder: acks=all, enable.idempotence, and no delivery timeout (message.timeout.ms=0): a broker outage is ridden out
by librdkafka's bounded buffer, then by this sink's queue (KAFKA_CHANNEL_CAP), then by drops counted with a sink_drop
gap record, as every sink does; the reader and the other sinks never wait. /health is degraded (with the reason) while
the cluster is unreachable or takes nothing. At SIGTERM what librdkafka could not deliver by the deadline is counted and
the exit status is 1. KAFKA_CONFIG_FILE's properties (security, SASL, TLS, sizes) win over the defaults; its secrets are
redacted everywhere (config.kafka_secret).
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import ujson

from .. import logs
from ..config import Config
from ..normalize import GAP
from ..threads import ServiceThread
from . import Sink, SinkConfigError, SinkStats

_log = logs.get("polygon_kafka")

START_SECS = 3.0         # the start: the cluster's metadata within this long, or it starts anyway (degraded)
CHECK_SECS = 10.0        # config --check: within this long, or it fails
METADATA_SECS = 2.0      # a topic's partitions (for a gap record), asked on the sink's thread
METADATA_REFRESH_SECS = 60.0
STALL_SECS = 5.0         # messages waiting and no delivery report this long: /health says the cluster takes nothing
FULL_WAIT_SECS = 0.02    # librdkafka's buffer full: wait this long for room, then produce again
REPORT_POLL_SECS = 0.1   # the delivery-report thread's longest wait (it returns at once for a report)
CLOSE_MARGIN_SECS = 0.3
_TOPIC_CACHE_LIMIT = 10_000   # event codes come from the network: {type} topics bounded (a code is a short word)
# Defaults that cannot lose or reorder; KAFKA_CONFIG_FILE may set any of them (a weaker one is warned of at start).
DEFAULTS = {
    "acks": "all",
    "enable.idempotence": "true",
    "message.timeout.ms": "0",             # never give a message up: the buffer, the queue and counted drops do
    "linger.ms": "5",
    "partitioner": "murmur2_random",       # the Java client's: a symbol lands where other Kafka producers put it
    "statistics.interval.ms": "1000",      # brokers' states and in-flight counts for /health and the metrics
    "queue.buffering.max.messages": "1000000",
}
USUAL_ERRORS = ("MSG_SIZE_TOO_LARGE", "TOPIC_AUTHORIZATION_FAILED", "UNKNOWN_TOPIC_OR_PART", "_FATAL")
_SAFE = {"acks": ("all", "-1"), "enable.idempotence": ("true",)}


class KafkaSink(Sink):
    name = "kafka"

    @staticmethod
    def queue_settings(config: Config) -> tuple[int, bool, float]:
        return config.kafka_channel_cap, True, config.kafka_warn_interval_secs

    def __init__(self, config: Config):
        super().__init__()
        self._config = config
        self._where = str(config.kafka_bootstrap)
        self._template = config.kafka_topic.replace("{cluster}", config.cluster)
        self._by_type = "{type}" in self._template
        self._topics: dict[str, str] = {}          # event code -> topic
        self._partitions: dict[str, tuple[int, float]] = {}  # topic -> (partition count, monotonic time asked)
        self._producer: Any = None
        self._error_warning = logs.RateLimitedWarning(_log, config.kafka_warn_interval_secs)
        self.delivered = 0
        # by librdkafka's error name; the usual ones exported at 0 from the start (a series to alert and graph on)
        self.delivery_errors: dict[str, int] = dict.fromkeys(USUAL_ERRORS, 0)
        self.client_errors = 0                     # connection and authentication errors (error_cb)
        self.in_flight = 0                         # sent to a broker, no answer yet (librdkafka's statistics)
        self.buffer_limit = 0
        self._unwritten = 0          # not produced (the sink's thread counts)
        self._undelivered = 0        # produced, and a delivery report said it failed (the report thread counts)
        self._stopped_trying = False
        self._purged = False         # close() gave up on what was left (counted there)
        self._down_since: float | None = None      # the cluster reported unreachable (error_cb) since
        self._down_reason = ""
        self._last_report = time.monotonic()       # the last delivery report (or the moment nothing was waiting)
        self._reports: _Reports | None = None

    def destination(self) -> str | None:
        return f"{self._where} topic {self._config.kafka_topic.replace('{cluster}', self._config.cluster)}"

    # -- the producer -------------------------------------------------------------------------------------------

    def properties(self) -> dict[str, Any]:
        config = self._config
        properties: dict[str, Any] = dict(DEFAULTS)
        properties["bootstrap.servers"] = config.kafka_bootstrap
        properties["compression.type"] = config.kafka_compression
        properties["client.id"] = f"polygon-streamer-{config.cluster}"
        properties.update(config.kafka_properties)
        return properties

    def open(self) -> None:
        try:
            import confluent_kafka
        except ImportError:
            raise SinkConfigError("SINK=kafka needs the Python module confluent_kafka: apt install "
                                  "python3-confluent-kafka (or pip install confluent-kafka)") from None
        config = self._config
        self._resolve()
        properties = self.properties()
        for name, safe in _SAFE.items():
            if str(properties[name]).lower() not in safe:
                _log.warning("KAFKA_CONFIG_FILE sets %s=%s: the broker may lose or reorder records (the default is "
                             "%s)", name, properties[name], safe[0], extra={"fields": {"property": name}})
        properties.update(on_delivery=self._delivered, error_cb=self._client_error, stats_cb=self._stats,
                          logger=_LibrdkafkaLog(config))
        try:
            self._producer = confluent_kafka.Producer(properties)
        except (confluent_kafka.KafkaException, ValueError, TypeError) as exc:
            raise SinkConfigError(f"Kafka producer settings (KAFKA_CONFIG_FILE and the defaults): "
                                  f"{config.redact(_error_text(exc))}") from None
        self.buffer_limit = int(properties.get("queue.buffering.max.messages", 100_000))
        self._reach(START_SECS)
        self._reports = _Reports(self._producer)
        self._reports.start()

    def _resolve(self) -> None:
        """A bootstrap host that does not resolve at all is a configuration error (exit 2), not an outage."""
        unresolved = []
        for server in str(self._config.kafka_bootstrap).split(","):
            host = server.rsplit(":", 1)[0].strip("[]")
            try:
                socket.getaddrinfo(host, None)
            except (socket.gaierror, UnicodeError):
                unresolved.append(host)
        if len(unresolved) == len(str(self._config.kafka_bootstrap).split(",")):
            raise SinkConfigError(f"invalid KAFKA_BOOTSTRAP (--kafka-bootstrap) {self._where!r}: cannot resolve "
                                  f"{', '.join(unresolved)}")

    def _reach(self, timeout: float) -> None:
        """The cluster's metadata within timeout: the topics' partitions, or the service starts anyway (records
        wait in librdkafka's buffer) with /health degraded."""
        topic = None if self._by_type else self._template
        try:
            metadata = self._producer.list_topics(topic, timeout=timeout)
        except Exception as exc:  # KafkaException(_TRANSPORT, _TIMED_OUT...)
            self._down(f"cannot reach the cluster within {timeout:g}s ({_error_text(exc)})")
            return
        if self._down_since is not None:
            self._recovered()
        self.check_note = f"Kafka: reached {self._where} ({len(metadata.brokers)} broker(s))"
        if topic is not None:
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                self.check_note += (f"; topic {topic} does not exist yet (the cluster must create it: "
                                    "auto.create.topics.enable, or create it with the partitions you want)")
            else:
                self._partitions[topic] = (len(found.partitions), time.monotonic())
                self.check_note += f"; topic {topic}: {len(found.partitions)} partition(s)"
        _log.info("%s", self.check_note, extra={"fields": {"bootstrap": self._where}})

    check_note = ""

    def check(self) -> str | None:
        if self._down_since is not None:
            self._reach(CHECK_SECS - START_SECS)
        if self._down_since is not None:
            raise SinkConfigError(f"KAFKA_BOOTSTRAP {self._where}: {self._down_reason}")
        return self.check_note

    # -- writing ------------------------------------------------------------------------------------------------

    def _topic(self, code: str) -> str:
        topic = self._topics.get(code)
        if topic is None:
            if len(self._topics) >= _TOPIC_CACHE_LIMIT:
                self._topics.clear()
            topic = self._topics[code] = self._template.replace("{type}", _topic_word(code)) if self._by_type \
                else self._template
        return topic

    def write(self, records: list, ingest_ms: int) -> None:
        if self._stopped_trying:
            self._unwritten += len(records)
            return
        produce = self._producer.produce
        topic_of = self._topic
        for index, (seq, code, symbol, kind, _ts, line) in enumerate(records):
            headers = [("type", code.encode()), ("kind", kind.encode()), ("seq", str(seq).encode())]
            value = line.encode("utf-8")
            if kind == GAP:
                targets = [(topic, partition) for topic in self._gap_topics()
                           for partition in range(self._partition_count(topic))]
                for topic, partition in targets:
                    if not self._produce(topic, value, None, headers, ingest_ms, partition):
                        self._give_up(len(records) - index)
                        return
                continue
            try:
                produce(topic_of(code), value, symbol.encode("utf-8") if symbol else None, headers=headers,
                        timestamp=ingest_ms)
            except BufferError:
                if not self._produce(topic_of(code), value, symbol.encode("utf-8") if symbol else None, headers,
                                     ingest_ms, -1):
                    self._give_up(len(records) - index)
                    return

    def _produce(self, topic: str, value: bytes, key: bytes | None, headers: list, ingest_ms: int,
                 partition: int) -> bool:
        """produce(), waiting while librdkafka's buffer is full (the cluster away or slow: the sink's queue fills
        meanwhile and drops, counted); False once the service is stopping and the deadline is near."""
        while True:
            try:
                if partition >= 0:
                    self._producer.produce(topic, value, key, partition=partition, headers=headers,
                                           timestamp=ingest_ms)
                else:
                    self._producer.produce(topic, value, key, headers=headers, timestamp=ingest_ms)
                return True
            except BufferError:
                self.still_working()
                thread = self.thread
                deadline = thread.close_deadline if thread is not None else None
                if deadline is not None and time.monotonic() >= deadline - CLOSE_MARGIN_SECS:
                    return False
                time.sleep(FULL_WAIT_SECS)  # the report thread makes room as the cluster acknowledges

    def _give_up(self, records: int) -> None:
        self._stopped_trying = True
        self._unwritten += records
        _log.error("Kafka: %d record(s) not produced: the service is stopping and librdkafka's buffer is full "
                   "(%s does not take them); what is still queued is not produced either", records, self._where,
                   extra={"fields": {"unwritten_events": records}})

    def _gap_topics(self) -> list[str]:
        if not self._by_type:
            return [self._template]
        seen = sorted(set(self._topics.values()) - {self._topic("gap"), self._topic("backfill")})
        return seen or [self._topic("gap")]  # no data topic yet: the hole is told on its own topic

    def _partition_count(self, topic: str) -> int:
        """A topic's partitions (cached, asked again after a minute); 1 (partition 0) when the cluster cannot say."""
        known = self._partitions.get(topic)
        if known is not None and time.monotonic() - known[1] < METADATA_REFRESH_SECS:
            return known[0]
        try:
            found = self._producer.list_topics(topic, timeout=METADATA_SECS).topics.get(topic)
            if found is not None and found.error is None and found.partitions:
                self._partitions[topic] = (len(found.partitions), time.monotonic())
                return len(found.partitions)
        except Exception as exc:
            self._error_warning.warn(f"Kafka: cannot learn the partitions of {topic} ({_error_text(exc)}): a gap "
                                     "record goes to the partitions last known", topic=topic)
        return known[0] if known is not None else 1

    # -- librdkafka's callbacks (on the report thread; at close, on the sink's thread once that one stopped) -------

    def _delivered(self, error, message) -> None:
        self._last_report = time.monotonic()
        if error is None:
            self.delivered += 1
            self.write_latency.observe(time.time() - message.timestamp()[1] / 1000.0, 1)
            if self._down_since is not None:
                self._recovered()
            return
        reason = error.name()
        if self._purged and reason.startswith("_PURGE"):
            return  # what close() gave up on: counted there, once
        self.delivery_errors[reason] = self.delivery_errors.get(reason, 0) + 1
        self._undelivered += 1
        self._error_warning.warn(f"Kafka refused a record, not delivered (counted): {reason}: "
                                 f"{self._config.redact(error.str())}", topic=message.topic(),
                                 errors_total=sum(self.delivery_errors.values()))

    def _client_error(self, error) -> None:
        self.client_errors += 1
        if error.fatal():
            _log.error("Kafka producer: fatal error %s (%s): records are counted as not delivered from now on",
                       error.name(), self._config.redact(error.str()))
        self._down(f"{error.name()}: {error.str()}")

    def _stats(self, text: str) -> None:
        try:
            stats = ujson.loads(text)
            brokers = stats.get("brokers", {}).values()
            self.in_flight = sum(int(broker.get("waitresp_msg_cnt", 0)) for broker in brokers)
            up = any(broker.get("state") == "UP" and broker.get("nodeid", -1) >= 0 for broker in brokers)
        except (ValueError, AttributeError, TypeError):
            return
        if up and self._down_since is not None and not self._stalled():
            self._recovered()

    def _down(self, reason: str) -> None:
        reason = self._config.redact(reason)[:300]
        if self._down_since is None:
            self._down_since = time.monotonic()
            _log.error("Kafka %s unreachable (%s): records wait in librdkafka's buffer, then in the queue "
                       "(KAFKA_CHANNEL_CAP), then are dropped and counted", self._where, reason,
                       extra={"fields": {"bootstrap": self._where, "error": reason}})
        self._down_reason = reason

    def _recovered(self) -> None:
        assert self._down_since is not None
        _log.info("Kafka %s takes records again after %.1fs", self._where, time.monotonic() - self._down_since,
                  extra={"fields": {"bootstrap": self._where}})
        self._down_since = None

    def _stalled(self) -> float | None:
        """Seconds without a delivery report while messages wait (a broker that stopped answering), or None."""
        if self._producer is None or not len(self._producer):
            self._last_report = time.monotonic()
            return None
        waited = time.monotonic() - self._last_report
        return waited if waited >= STALL_SECS else None

    # -- the rest of the sink interface -------------------------------------------------------------------------

    def degraded(self) -> str | None:
        waiting = len(self._producer) if self._producer is not None else 0
        stalled = self._stalled()
        if self._down_since is None and stalled is None:
            return None
        if self._down_since is not None:
            why = f"unreachable for {time.monotonic() - self._down_since:.0f}s ({self._down_reason})"
        else:
            why = f"no delivery report for {stalled:.0f}s (a broker not answering)"
        return (f"kafka sink: {self._where} {why}; {waiting:,} record(s) waiting in librdkafka's buffer (of "
                f"{self.buffer_limit:,})")

    def failed_writes(self) -> int:
        return sum(self.delivery_errors.values())

    def close(self, deadline: float | None = None) -> None:
        producer = self._producer
        if producer is None:
            return
        if self._reports is not None:
            self._reports.stop()
            self._reports.join(2 * REPORT_POLL_SECS + 1.0)
        end = deadline if deadline is not None else time.monotonic() + 10.0
        left = producer.flush(max(0.0, end - time.monotonic() - CLOSE_MARGIN_SECS))
        if left:
            self._unwritten += left
            _log.error("Kafka: %d record(s) not delivered by the shutdown deadline (%s)", left, self._where,
                       extra={"fields": {"unwritten_events": left}})
            purge = getattr(producer, "purge", None)
            if purge is not None:
                self._purged = True
                purge()
                producer.poll(0)  # their failed reports: already counted above, not twice
        self._producer = None

    def unwritten(self) -> int:
        return self._unwritten + self._undelivered

    def describe_metrics(self, queue_stats: SinkStats):
        producer = self._producer
        return [
            ("polygon_kafka_delivered_total", "Messages Kafka acknowledged (delivery reports; a gap record counts "
             "once per partition)", self.delivered),
            ("polygon_kafka_delivery_errors_total", "Messages Kafka did not take, by librdkafka's error name "
             "(not retried: counted as not written)", ["reason"],
             {(reason,): count for reason, count in dict(self.delivery_errors).items()}),
            ("polygon_kafka_client_errors_total", "Kafka connection, authentication and other client errors "
             "(librdkafka retries them)", self.client_errors),
            ("polygon_kafka_buffered_messages", "Messages produced and not yet acknowledged (librdkafka's buffer)",
             len(producer) if producer is not None else 0),
            ("polygon_kafka_buffer_limit_messages", "librdkafka's buffer bound (queue.buffering.max.messages)",
             self.buffer_limit),
            ("polygon_kafka_in_flight_messages", "Messages sent to a broker and awaiting its answer",
             self.in_flight),
            ("polygon_kafka_drops_total", "Records dropped at the Kafka sink's queue (full: the cluster away past "
             "librdkafka's buffer)", queue_stats.dropped),
        ]


class _Reports(ServiceThread):
    """Serves librdkafka's delivery reports, statistics and errors as they come (the sink's callbacks)."""

    def __init__(self, producer):
        super().__init__("kafka-reports")
        self._producer = producer

    def loop(self) -> None:
        while not self.stopping.is_set():
            self._producer.poll(REPORT_POLL_SECS)


def _topic_word(code: str) -> str:
    """An event code as a topic name part (Kafka allows letters, digits, '.', '_', '-')."""
    return "".join(char if char.isalnum() or char in "._-" else "_" for char in code)[:60] or "_"


def _error_text(exc: BaseException) -> str:
    error: Any = exc.args[0] if exc.args else None
    if hasattr(error, "name") and hasattr(error, "str"):
        return f"{error.name()}: {error.str()}"
    return f"{type(exc).__name__}: {exc}"


class _LibrdkafkaLog(logging.Logger):
    """librdkafka's own log lines into polygon_kafka, secrets redacted: its warnings and errors as warnings, at most
    one per KAFKA_WARN_INTERVAL_SECS (it repeats them at each reconnect during an outage), the rest at debug."""

    def __init__(self, config: Config):
        super().__init__("librdkafka")
        self._config = config
        self._warning = logs.RateLimitedWarning(_log, config.kafka_warn_interval_secs)

    def log(self, level, msg, *args, **kwargs):
        text = self._config.redact(msg % args if args else str(msg))
        if level >= logging.WARNING:
            self._warning.warn(f"librdkafka: {text}")
        else:
            _log.debug("librdkafka: %s", text)
