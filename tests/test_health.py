"""/health, /ready and STATUS= in process (health.py), from states the components report: fast, and every branch.
The end-to-end tests (test_service, test_notify, test_faults) check the same texts over real HTTP and datagrams."""

from __future__ import annotations

import threading
import time

from polygon_streamer import protocol
from polygon_streamer.config import build_config
from polygon_streamer.health import Health, Pulse, ReaderState
from polygon_streamer.reader import SessionEnd

KEY = "health-test-key-1234"
CONFIG = build_config({"api_key": KEY, "ready_min_messages": "3", "sink_stuck_secs": "5"})


class SinkSays:
    """A sink as health.py asks it: its name, why it is degraded and what it tells of its clients."""

    def __init__(self, name: str, degraded: str | None = None, note: str | None = None):
        self.name = name
        self._degraded = degraded
        self._note = note

    def degraded(self) -> str | None:
        return self._degraded

    def health_note(self) -> str | None:
        return self._note


class ThreadSays:
    """A sink thread as health.py asks it: its sink and how long it has been inside one write."""

    def __init__(self, sink: SinkSays, stuck: float | None = None):
        self.sink = sink
        self._stuck = stuck

    def stuck_for(self, now: float) -> float | None:
        return self._stuck


def state(**changes) -> ReaderState:
    base = ReaderState(connected=True, subscribed_at=time.monotonic() - 10, events_since_subscribe=5, last_end=None,
                       retry_at=None, subscribe_error=None)
    return base._replace(**changes)


def health(reader: ReaderState, sinks=(), threads=(), active=1, dead=()) -> Health:
    finished = []
    for name in dead:
        thread = threading.Thread(target=lambda: None, name=name)
        thread.start()
        thread.join()
        finished.append(thread)
    return Health(CONFIG, lambda: reader, lambda: active, list(sinks), list(threads), lambda: finished)


def test_a_streaming_service_is_healthy_ready_and_says_its_rate():
    checked = health(state())
    checked.events_per_sec = 1234.4
    assert checked.health() == (True, "OK") and checked.ready() == (True, "READY")
    assert checked.status_text() == "streaming 1,234 events/s"


def test_stopping_dead_threads_and_stuck_sinks_are_unhealthy():
    stopping = health(state())
    stopping.stopping = True
    assert stopping.health() == (False, "STOPPING") and stopping.ready() == (False, "NOT READY: stopping")
    assert health(state(), dead=["sink-ndjson"]).health() == (False, "UNHEALTHY: thread(s) not running: sink-ndjson")
    stuck = health(state(), threads=[ThreadSays(SinkSays("ndjson"), stuck=7.2)])
    assert stuck.health() == (False, "UNHEALTHY: sink stuck (SINK_STUCK_SECS): ndjson (7s in one write)")
    assert stuck.status_text() == stuck.health()[1]
    assert health(state(), threads=[ThreadSays(SinkSays("ndjson"), stuck=4.0)]).health() == (True, "OK")


def test_a_refusing_server_is_said_with_its_message_redacted():
    end = SessionEnd(f"auth_failed while waiting for auth_success: key {KEY} unknown", protocol.AUTH_FAILED)
    refused = health(state(connected=False, subscribed_at=None, last_end=end, retry_at=time.monotonic() + 30))
    healthy, text = refused.health()
    assert healthy and text.startswith("OK (not ready: authentication failed (auth_failed while waiting for "
                                       "auth_success: key <redacted> unknown); retrying in ")
    ready, text = refused.ready()
    assert not ready and text.startswith("NOT READY: authentication failed") and KEY not in text
    assert refused.status_text().startswith("backoff: reconnecting in ") and KEY not in refused.status_text()


def test_readiness_steps_are_named():
    connect_error = SessionEnd("connect failed: ConnectionRefusedError: [Errno 111] Connection refused")
    assert health(state(connected=False, subscribed_at=None, last_end=connect_error)).ready() == (
        False, "NOT READY: not connected: connect failed: ConnectionRefusedError: [Errno 111] Connection refused")
    assert health(state(connected=False, subscribed_at=None)).ready() == (False, "NOT READY: not subscribed")
    assert health(state(), active=0).ready() == (
        False, "NOT READY: no topic acknowledged by the server yet (GET /subscriptions)")
    assert health(state(events_since_subscribe=1)).ready() == (
        False, "NOT READY: 1 of 3 data events since subscribe")
    assert health(state(connected=False, subscribed_at=None)).status_text() == "connecting"


def test_notes_of_a_healthy_service_reach_health_and_status():
    checked = health(state(subscribe_error="3 subscribe message(s) not taken by the server"),
                     sinks=[SinkSays("ndjson", "ndjson sink: writes to /x failing for 3s (No space left on device)"),
                            SinkSays("zmq"), SinkSays("gateway", note="gateway: 2 clients on ws://[::1]:8765/stocks")])
    healthy, text = checked.health()
    assert healthy and text == ("OK (not subscribed: 3 subscribe message(s) not taken by the server; degraded: ndjson "
                                "sink: writes to /x failing for 3s (No space left on device); gateway: 2 clients on "
                                "ws://[::1]:8765/stocks)")
    assert checked.status_text().startswith("streaming 0 events/s; not subscribed: ")
    assert checked.status_text().endswith("; gateway: 2 clients on ws://[::1]:8765/stocks")


class Notes:
    """A notifier as Pulse drives it: what it would send."""

    enabled = True
    watchdog_interval = 0.5

    def __init__(self):
        self.sent: list[tuple[str, str]] = []

    def watchdog(self):
        self.sent.append(("WATCHDOG", "1"))

    def status(self, text):
        self.sent.append(("STATUS", text))


def test_the_pulse_feeds_the_watchdog_only_while_healthy_and_sends_status_on_change():
    notes = Notes()
    events = [0]
    pulse = Pulse(health(state()), notes, lambda: events[0])
    now = time.monotonic()
    events[0] = 1000
    pulse.beat(now + 1)
    assert ("WATCHDOG", "1") in notes.sent and notes.sent[-1][0] == "STATUS" and "streaming" in notes.sent[-1][1]
    pulse.beat(now + 1.1)
    assert len(notes.sent) == 2, "no change, nothing sent before the next interval"
    notes_dead = Notes()
    Pulse(health(state(), dead=["reader"]), notes_dead, lambda: 0).beat(now)
    assert ("WATCHDOG", "1") not in notes_dead.sent and notes_dead.sent == [
        ("STATUS", "UNHEALTHY: thread(s) not running: reader")]
