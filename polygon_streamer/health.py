"""What the service says about itself: /health, /ready, systemd's STATUS= and WATCHDOG=1, from the components' own
state (as fail2ban's components report their status): the reader's state (Reader.state()), each sink thread's time
inside one write (SinkThread.stuck_for()), each sink's degraded(), the threads alive. Every text that leaves the
process here has its secrets redacted: a server's message quoted in it may echo the API key.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, NamedTuple, Protocol

from . import protocol

STATUS_SECS = 2.0  # how often STATUS= may change


class Ended(Protocol):
    """What health reads of why a session ended (reader.SessionEnd, which imports this module)."""

    status: str | None
    reason: str


class ReaderState(NamedTuple):
    """The reader's state as the HTTP and main threads read it (a snapshot: Reader.state())."""

    connected: bool
    subscribed_at: float | None  # monotonic time of the last subscribe, None before it
    events_since_subscribe: int  # counted up to READY_MIN_MESSAGES
    last_end: Ended | None  # why the last session ended
    retry_at: float | None  # when the next attempt is due
    subscribe_error: str | None  # why a subscription could not be sent, while that lasts


class Health:
    def __init__(self, config, reader_state: Callable[[], ReaderState], active_topics: Callable[[], int],
                 sinks: list, sink_threads: list, threads: Callable[[], list[threading.Thread]]):
        self._config = config
        self._reader_state = reader_state
        self._active_topics = active_topics
        self._sinks = sinks
        self._sink_threads = sink_threads
        self._threads = threads
        self.stopping = False  # the drain has begun
        self.events_per_sec = 0.0  # over the last pulse (STATUS=)

    def dead_threads(self) -> list[str]:
        return [thread.name for thread in self._threads() if thread.ident is not None and not thread.is_alive()]

    def stuck_sinks(self) -> list[str]:
        """Sinks inside one write for longer than SINK_STUCK_SECS, with how long."""
        now = time.monotonic()
        return [f"{thread.sink.name} ({stuck:.0f}s in one write)" for thread in self._sink_threads
                if (stuck := thread.stuck_for(now)) is not None and stuck > self._config.sink_stuck_secs]

    def health(self) -> tuple[bool, str]:
        """(healthy, the text of /health)."""
        healthy, text = self._health()
        return healthy, self._config.redact(text)

    def _health(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "STOPPING"
        dead = self.dead_threads()
        if dead:
            return False, "UNHEALTHY: thread(s) not running: " + ", ".join(dead)
        stuck = self.stuck_sinks()
        if stuck:
            return False, "UNHEALTHY: sink stuck (SINK_STUCK_SECS): " + ", ".join(stuck)
        notes = self._notes(self._reader_state())
        return True, f"OK ({'; '.join(notes)})" if notes else "OK"

    def _notes(self, reader: ReaderState) -> list[str]:
        """What a healthy service says about itself: the server refusing it, a subscription not sent, sinks that
        cannot deliver for now."""
        notes = [f"not ready: {refused}"] if (refused := self._refused(reader)) else []
        if reader.subscribe_error is not None:
            notes.append(f"not subscribed: {reader.subscribe_error}")
        notes += [f"degraded: {why}" for why in (sink.degraded() for sink in self._sinks) if why]
        return notes + [note for note in (sink.health_note() for sink in self._sinks) if note]

    @staticmethod
    def _refused(reader: ReaderState) -> str | None:
        """Why the server will not stream to us, while that lasts (the process itself is healthy: a restart would
        not help)."""
        end = reader.last_end
        if reader.connected or end is None or end.status not in (protocol.AUTH_FAILED, protocol.MAX_CONNECTIONS):
            return None
        what = "authentication failed" if end.status == protocol.AUTH_FAILED else \
            "max_connections: another connection uses this key and cluster"
        return f"{what} ({end.reason}){_retrying(reader)}"

    def ready(self) -> tuple[bool, str]:
        """(ready, the text of /ready)."""
        ready, text = self._ready()
        return ready, self._config.redact(text)

    def _ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "NOT READY: stopping"
        reader = self._reader_state()
        if not reader.connected or reader.subscribed_at is None:
            refused = self._refused(reader)
            if refused:
                return False, f"NOT READY: {refused}"
            if not reader.connected and reader.last_end is not None:
                return False, f"NOT READY: not connected: {reader.last_end.reason}{_retrying(reader)}"
            return False, "NOT READY: not subscribed"
        if not self._active_topics():
            return False, "NOT READY: no topic acknowledged by the server yet (GET /subscriptions)"
        minimum = self._config.ready_min_messages
        if reader.events_since_subscribe < minimum:
            return False, f"NOT READY: {reader.events_since_subscribe} of {minimum} data events since subscribe"
        waited_ms = (time.monotonic() - reader.subscribed_at) * 1000
        if waited_ms < self._config.ready_delay_ms:
            return False, f"NOT READY: {waited_ms:.0f} of {self._config.ready_delay_ms} ms since subscribe"
        return True, "READY"

    def status_text(self) -> str:
        """One line for systemd's STATUS= (`systemctl status`): connecting, backoff, streaming N events/s, and
        why it is degraded."""
        healthy, text = self.health()
        if not healthy:
            return text
        reader = self._reader_state()
        now = time.monotonic()
        if reader.connected and reader.subscribed_at is not None:
            state = f"streaming {self.events_per_sec:,.0f} events/s"
        elif reader.retry_at is not None and reader.retry_at > now and reader.last_end is not None:
            state = f"backoff: reconnecting in {reader.retry_at - now:.0f}s after: {reader.last_end.reason}"
        else:
            state = "connecting"
        return self._config.redact("; ".join([state] + self._notes(reader)))


def _retrying(reader: ReaderState) -> str:
    return f"; retrying in {max(0.0, reader.retry_at - time.monotonic()):.0f}s" if reader.retry_at is not None else ""


class Pulse:
    """The main loop's beat for systemd: STATUS= when it changes (at most every STATUS_SECS), and WATCHDOG=1 every
    half WatchdogSec while every thread is alive and no sink is stuck; a service that stops feeding it is restarted."""

    def __init__(self, health: Health, notifier, events: Callable[[], int]):
        self.health = health
        self.notifier = notifier
        self.events = events
        self.next_status = 0.0
        self.next_watchdog = 0.0
        self.last_status = ""
        self.last_events = events()
        self.last_at = time.monotonic()

    def beat(self, now: float) -> None:
        notifier = self.notifier
        if not notifier.enabled:
            return
        health = self.health
        if notifier.watchdog_interval and now >= self.next_watchdog:
            self.next_watchdog = now + notifier.watchdog_interval
            if not health.dead_threads() and not health.stuck_sinks():
                notifier.watchdog()
        if now >= self.next_status:
            events = self.events()
            health.events_per_sec = (events - self.last_events) / max(1e-9, now - self.last_at)
            self.last_events, self.last_at = events, now
            self.next_status = now + STATUS_SECS
            status = health.status_text()
            if status != self.last_status:
                notifier.status(status)
                self.last_status = status


def running_instance(addr: tuple[str, int]) -> str | None:
    """Whether a polygon-streamer answers on addr (its /subscriptions, which nothing else serves): its /health text,
    or None."""
    import http.client

    host = "127.0.0.1" if addr[0] in ("0.0.0.0", "") else "::1" if addr[0] == "::" else addr[0]
    try:
        connection = http.client.HTTPConnection(host, addr[1], timeout=1.0)
        try:
            connection.request("GET", "/subscriptions")
            answer = connection.getresponse()
            body = answer.read(1_000_000)
            if answer.status != 200 or b'"counts"' not in body or b'"topics"' not in body:
                return None
            connection.request("GET", "/health")
            health = connection.getresponse()
            return health.read(1000).decode("utf-8", "replace").strip() or "no /health text"
        finally:
            connection.close()
    except (OSError, http.client.HTTPException):
        return None
