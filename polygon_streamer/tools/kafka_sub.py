"""`polygon-streamer kafka-sub --group G`: a consumer-group reader of the Kafka sink's topics, enough to check a
deployment by hand. Prints each record line (the message value) or counts them; commits a message's offset only
after its line is written to stdout, so a reader stopped at any moment resumes at the first record it has not
printed. Says on stderr where each partition it is given starts."""

from __future__ import annotations

import logging
import re
import signal
import sys
import threading
import time
from typing import Any

from ..config import Config
from ..sinks import SinkConfigError
from ..sinks.kafka import CHECK_SECS

READ_COUNT = 500
READ_SECS = 0.2


def topics_of(config: Config) -> list[str]:
    """The topic (or, with {type}, the regular expression of the topics) the sink writes."""
    template = config.kafka_topic.replace("{cluster}", config.cluster)
    if "{type}" not in template:
        return [template]
    return ["^" + re.escape(template).replace(re.escape("{type}"), "[A-Za-z0-9._-]+") + "$"]


def run(config: Config, group: str, from_start: bool, count_only: bool, max_records: int) -> int:
    try:
        import confluent_kafka
    except ImportError:
        raise SinkConfigError("kafka-sub needs the Python module confluent_kafka: apt install python3-confluent-kafka "
                              "(or pip install confluent-kafka)") from None
    errors = _Errors(config)
    properties = {"bootstrap.servers": config.kafka_bootstrap, "group.id": group, "enable.auto.commit": "false",
                  "auto.offset.reset": "earliest" if from_start else "latest",
                  "client.id": f"polygon-streamer-kafka-sub-{config.cluster}", "logger": _Quiet("librdkafka"),
                  "error_cb": errors}
    properties.update(config.kafka_properties)
    try:
        consumer = confluent_kafka.Consumer(properties)
    except (confluent_kafka.KafkaException, ValueError, TypeError) as exc:
        raise SinkConfigError(f"Kafka consumer settings: {config.redact(str(exc))}") from None
    try:
        consumer.list_topics(timeout=CHECK_SECS)
    except confluent_kafka.KafkaException as exc:
        consumer.close()
        raise SinkConfigError(f"cannot reach Kafka at {config.kafka_bootstrap} within {CHECK_SECS:g}s "
                              f"({config.redact(str(exc))})") from None
    errors.quiet = False
    topics = topics_of(config)
    start = "the earliest offset" if from_start else "the end (new records only; --from-start for all)"

    def assigned(consumer, partitions) -> None:
        try:
            committed = {(p.topic, p.partition): p.offset for p in consumer.committed(partitions, timeout=CHECK_SECS)}
        except confluent_kafka.KafkaException:
            committed = {}
        for partition in partitions:
            offset = committed.get((partition.topic, partition.partition), -1001)
            where = f"offset {offset} (committed by group {group})" if offset >= 0 else \
                f"{start} (no committed offset for group {group})"
            print(f"kafka-sub: {partition.topic} [{partition.partition}] starts at {where}", file=sys.stderr,
                  flush=True)

    consumer.subscribe(topics, on_assign=assigned)
    print(f"kafka-sub: reading {', '.join(topics)} of {config.kafka_bootstrap} in group {group}; waiting for "
          "records (Ctrl-C to stop)", file=sys.stderr, flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    received = window = 0
    next_report = time.monotonic() + 1.0
    out = sys.stdout.buffer
    try:
        while not stop.is_set() and not (max_records and received >= max_records):
            wanted = READ_COUNT if not max_records else min(READ_COUNT, max_records - received)
            messages = consumer.consume(wanted, READ_SECS)
            good: list[Any] = []  # (confluent_kafka.Message: consumed ones have a value, a partition, an offset)
            for message in messages:
                error = message.error()
                if error is None:
                    good.append(message)
                elif error.code() != confluent_kafka.KafkaError._PARTITION_EOF:
                    print(f"kafka-sub: {error.name()}: {config.redact(error.str())}", file=sys.stderr, flush=True)
            if good:
                if not count_only:
                    try:
                        out.write(b"".join(message.value() + b"\n" for message in good))
                        out.flush()
                    except BrokenPipeError:
                        break  # the reader of stdout is gone: nothing more is committed
                # Printed: their offsets (the next to read) committed, partition by partition.
                offsets: dict[tuple[str, int], int] = {}
                for message in good:
                    offsets[(message.topic(), message.partition())] = message.offset() + 1
                consumer.commit(offsets=[confluent_kafka.TopicPartition(topic, partition, offset)
                                         for (topic, partition), offset in offsets.items()], asynchronous=False)
                received += len(good)
                window += len(good)
            now = time.monotonic()
            if count_only and now >= next_report:
                print(f"{received} received ({window / (now - next_report + 1.0):.0f}/s)", flush=True)
                window = 0
                next_report = now + 1.0
    finally:
        consumer.close()
    if count_only:
        print(f"{received} received", flush=True)
    return 0


class _Quiet(logging.Logger):
    """librdkafka's own log lines are not shown (they repeat at every reconnect); its errors are (_Errors)."""

    def log(self, level, msg, *args, **kwargs):
        pass


class _Errors:
    """Client errors (the cluster unreachable, authentication) on stderr, redacted, each kind at most every 10 s."""

    def __init__(self, config: Config):
        self._config = config
        self._last: dict[str, float] = {}
        self.quiet = True  # until the cluster answered once: not reaching it at all is the one line of exit 2

    def __call__(self, error) -> None:
        now = time.monotonic()
        if self.quiet:
            return
        if now - self._last.get(error.name(), -1e9) >= 10.0:
            self._last[error.name()] = now
            print(f"kafka-sub: {error.name()}: {self._config.redact(error.str())}", file=sys.stderr, flush=True)
