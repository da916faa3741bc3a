"""What the service is subscribed to: the desired set (SUBSCRIPTION, or SUBSCRIPTION_FILE reread on SIGHUP) and each
topic's state as the server answered (pending, active, refused), kept by the reader thread and read by /subscriptions.

The desired set is the single source of truth: every session subscribes to all of it; a change made while connected
is sent as the difference (unsubscribe the removed topics, subscribe the new ones) without reconnecting.
"""

from __future__ import annotations

import os
import stat
import threading

from . import logs, protocol

_log = logs.get("polygon_streamer")

# Topics per subscribe/unsubscribe message. Polygon documents no limit; the official Python client sends everything
# in one message and users report sets of 3,000-4,000 symbols. 500 topics keep a message near 5-10 KB, well below
# any frame or proxy limit, and a refusal (`error` does not name the topic) is pinned to at most one chunk.
CHUNK_TOPICS = 500

PENDING, ACTIVE, REFUSED = "pending", "active", "refused"
STATES = (PENDING, ACTIVE, REFUSED)


class SubscriptionFileError(ValueError):
    pass


def check_topic(topic: str) -> str | None:
    """Why a topic is not CODE.TICKER, or None."""
    code, dot, ticker = topic.partition(".")
    if ";" in topic:
        return "';' does not separate topics: separate them with commas, e.g. T.*,Q.*"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in topic):
        return "a control character in the topic"
    if not dot or not code or not ticker or not code.isalnum() or " " in topic or "," in topic:
        return "expected a topic CODE.TICKER, e.g. T.AAPL, Q.*, XT.BTC-USD"
    if "*" in ticker[:-1]:
        return "'*' is the whole ticker (T.*) or ends it (T.AA*)"
    return None


def parse_file(text: str, path: str = "SUBSCRIPTION_FILE") -> list[str]:
    """One topic a line; `#` starts a comment; blank lines are skipped; duplicates count once (first place kept)."""
    topics: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        topic = line.split("#", 1)[0].strip()
        if not topic:
            continue
        why = check_topic(topic)
        if why:
            raise SubscriptionFileError(f"{path}:{number}: {topic!r}: {why}")
        if topic not in seen:
            seen.add(topic)
            topics.append(topic)
    if not topics:
        raise SubscriptionFileError(f"{path}: no topic in it (one topic a line, e.g. T.AAPL)")
    return topics


# A subscription file larger than this is refused (100,000 long options topics are about 3 MB).
MAX_FILE_BYTES = 64 * 1024 * 1024


def read_file(path: str) -> list[str]:
    """The topics of a regular file. Anything else is refused before it is read: opening a FIFO for reading blocks
    until a writer comes (O_NONBLOCK opens it at once, and the check below refuses it), a device never ends."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SubscriptionFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise SubscriptionFileError(f"{path}: not a regular file (a FIFO, a device or a directory): "
                                        "SUBSCRIPTION_FILE must be a file")
        if info.st_size > MAX_FILE_BYTES:
            raise SubscriptionFileError(f"{path}: {info.st_size:,} bytes, more than a subscription file can be "
                                        f"({MAX_FILE_BYTES:,})")
        os.set_blocking(descriptor, True)
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SubscriptionFileError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    finally:
        os.close(descriptor)
    return parse_file(text, path)


def chunks(topics: list[str]) -> list[str]:
    return [",".join(topics[start:start + CHUNK_TOPICS]) for start in range(0, len(topics), CHUNK_TOPICS)]


class Subscriptions:
    """The desired topics and their states. The reader owns the states; set_desired() may be called from any thread
    (SIGHUP in the main thread): the reader picks the change up between frames (take_change)."""

    def __init__(self, topics: list[str], source: str):
        self.source = source
        self._lock = threading.Lock()
        self._desired: list[str] = list(topics)
        self.changed = False  # read without the lock by the reader between frames (a plain bool)
        self.states: dict[str, tuple[str, str]] = {}  # topic -> (state, the server's message)
        # The last subscribe's topics still unanswered (for an `error` status): a dict, as an ordered set (a large
        # subscription's acks each remove one).
        self._in_flight: dict[str, None] = {}
        self.version = 0  # +1 at every change of the desired set (backfill follows it: a plain int, read unlocked)
        # Topics a sink's clients asked for beyond the desired set (the gateway's, GATEWAY_UPSTREAM=union): on the
        # wire with it, never in what the other sinks get. union_version: +1 at every change of either set.
        self._extra: list[str] = []
        self.union_version = 0

    @property
    def desired(self) -> list[str]:
        with self._lock:
            return list(self._desired)

    @property
    def extra(self) -> list[str]:
        with self._lock:
            return list(self._extra)

    def set_desired(self, topics: list[str]) -> tuple[list[str], list[str]]:
        """The new desired set; returns (added, removed) against the current one."""
        with self._lock:
            old = set(self._desired)
            added = [topic for topic in topics if topic not in old]
            removed = [topic for topic in self._desired if topic not in set(topics)]
            self._desired = list(topics)
            self.changed = self.changed or bool(added or removed)
            if added or removed:
                self.version += 1
                self.union_version += 1
        return added, removed

    def set_extra(self, topics: list[str]) -> None:
        """The topics a sink's clients hold beyond the desired set (any thread): subscribed upstream with it."""
        with self._lock:
            if topics == self._extra:
                return
            self._extra = list(topics)
            self.changed = True
            self.union_version += 1

    def _wire(self) -> list[str]:
        """What the connection subscribes: the desired set, then the extra topics it lacks (under the lock)."""
        if not self._extra:
            return list(self._desired)
        desired = set(self._desired)
        return self._desired + [topic for topic in self._extra if topic not in desired]

    # -- the reader's side ----------------------------------------------------------------------------------------

    def session_started(self) -> list[str]:
        """A new session subscribes to the whole desired set: every topic pending. Returns the messages' params."""
        with self._lock:
            topics = self._wire()
            self.changed = False
        self.states = {topic: (PENDING, "") for topic in topics}
        self._in_flight = dict.fromkeys(topics)
        return chunks(topics)

    def take_change(self) -> tuple[list[str], list[str]] | None:
        """While connected: (subscribe params, unsubscribe params) to send, or None if nothing changed."""
        with self._lock:
            if not self.changed:
                return None
            self.changed = False
            desired = self._wire()
        wanted = set(desired)
        added = [topic for topic in desired if topic not in self.states]
        removed = [topic for topic in self.states if topic not in wanted]
        for topic in removed:
            del self.states[topic]
        for topic in added:
            self.states[topic] = (PENDING, "")
        self._in_flight = dict.fromkeys(added)
        return chunks(added), chunks(removed)

    def on_statuses(self, statuses: list[tuple[str, str]]) -> None:
        """The statuses of one frame (status, message): acks make topics active; an `error` (it does not name the
        topic) refuses the topics of the last subscribe still pending."""
        errors = []
        for status, message in statuses:
            if status == protocol.SUCCESS and message.startswith("subscribed to: "):
                topic = message[len("subscribed to: "):].strip()
                if topic in self.states:
                    self.states[topic] = (ACTIVE, "")
                    self._in_flight.pop(topic, None)
            elif status == protocol.ERROR:
                errors.append(message)
        if errors:
            for topic in self._in_flight:
                if self.states.get(topic, (None,))[0] == PENDING:
                    self.states[topic] = (REFUSED, errors[0])
            self._in_flight = {}

    def disconnected(self) -> None:
        for topic, (state, message) in list(self.states.items()):
            if state == ACTIVE:
                self.states[topic] = (PENDING, "")

    # -- readers (HTTP thread) ------------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        states = dict(self.states)
        desired = self.desired
        topics = {}
        for topic in desired:
            state, message = states.get(topic, (PENDING, ""))
            topics[topic] = {"state": state, **({"message": message} if message else {})}
        counts = {state: 0 for state in STATES}
        for entry in topics.values():
            counts[entry["state"]] += 1
        view = {"source": self.source, "counts": counts, "topics": topics}
        extra = [topic for topic in self.extra if topic not in topics]
        if extra:
            view["client_topics"] = {topic: {"state": states.get(topic, (PENDING, ""))[0],
                                             **({"message": states[topic][1]} if states.get(topic, ("", ""))[1]
                                                else {})} for topic in extra}
        return view

    def describe(self) -> str:
        """The desired set for a log line or a gap record: the params, or how many topics from where."""
        topics = self.desired
        return ",".join(topics) if len(topics) <= 20 else f"{len(topics)} topics ({self.source})"

    def active(self) -> int:
        return sum(1 for state, _ in list(self.states.values()) if state == ACTIVE)


class FileReloader:
    """SIGHUP's reread of SUBSCRIPTION_FILE: the reader then sends the difference on the live connection. The main
    thread handles signals and never waits on a file (a hung network mount), so the file is read on a thread of its
    own; a SIGHUP while one runs is done right after it. A bad file is logged with its line number and the running
    set is kept."""

    def __init__(self, subscriptions: Subscriptions, path: str):
        self.subscriptions = subscriptions
        self.path = path
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._again = False

    def reread(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._again = True
                return
            self._thread = threading.Thread(target=self._loop, name="subs-reload", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            self._reread()
            with self._lock:
                if not self._again:
                    return
                self._again = False

    def _reread(self) -> None:
        path = self.path
        try:
            topics = read_file(path)
        except SubscriptionFileError as exc:
            _log.error("SIGHUP: %s; keeping the %d topics subscribed now", exc, len(self.subscriptions.desired),
                       extra={"fields": {"path": path}})
            return
        added, removed = self.subscriptions.set_desired(topics)
        _log.info("SIGHUP: %s reread: %d topic(s) added, %d removed", path, len(added), len(removed),
                  extra={"fields": {"path": path, "added": added[:20], "removed": removed[:20],
                                    "topics": len(topics)}})
