"""The one shape every service thread has: a name, a stop flag, and a crash wrapper that logs and marks it dead."""

from __future__ import annotations

import threading

from . import logs

_log = logs.get("polygon_streamer")


class ServiceThread(threading.Thread):
    """Subclasses implement loop(); it must check self.stopping at least once per tick."""

    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self.stopping = threading.Event()
        self.crashed: BaseException | None = None

    def loop(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        try:
            self.loop()
        except BaseException as exc:
            self.crashed = exc
            _log.error("thread %s crashed: %s", self.name, exc, exc_info=True,
                       extra={"fields": {"thread": self.name}})

    def stop(self) -> None:
        self.stopping.set()
