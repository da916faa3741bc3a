"""The one shape every service thread has: a name, a stop flag, and a crash wrapper that logs and marks it dead."""

from __future__ import annotations

import threading

from . import logs

_log = logs.get("polygon_streamer")

# Linux keeps 15 bytes of a thread's name (what top -H, ps -L and /proc/PID/task/TID/comm show).
OS_NAME_BYTES = 15


def os_thread_name(name: str) -> str:
    """The name the OS shows for a service thread: the same as in the logs and the docs (each fits 15 bytes; the
    process is polygon-streamer)."""
    return name[:OS_NAME_BYTES]


def set_os_thread_name(name: str) -> None:
    """Name the calling thread for the OS as well (Python 3.11 names threads for Python only), so that per-thread
    CPU in top -H or /proc tells the reader from the dispatcher from a sink. Best effort: not Linux, no change."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write(os_thread_name(name))
    except OSError:
        pass


class ServiceThread(threading.Thread):
    """Subclasses implement loop(); it must check self.stopping at least once per tick."""

    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self.stopping = threading.Event()
        self.crashed: BaseException | None = None

    def loop(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        set_os_thread_name(self.name)
        try:
            self.loop()
        except BaseException as exc:
            self.crashed = exc
            _log.error("thread %s crashed: %s", self.name, exc, exc_info=True,
                       extra={"fields": {"thread": self.name}})

    def stop(self) -> None:
        self.stopping.set()
