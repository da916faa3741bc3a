"""systemd's notify protocol without a dependency: one datagram per message to $NOTIFY_SOCKET (a path, or an abstract
name written `@name`), as sd_notify(3) sends it. READY=1 once the sinks are open and the metrics port bound,
STATUS= for `systemctl status`, RELOADING=1 / READY=1 around SIGHUP, STOPPING=1 when draining, and WATCHDOG=1 from
the main thread while every thread is alive and no sink is stuck (the service decides; this only sends).

Read once at start-up (cli hands the environment over), never raises and never blocks: the socket is non-blocking, so a
receiver whose queue is full (a stalled systemd, a test's socket nobody reads) costs a lost datagram, counted and logged
once, never the main thread (which applies SIGHUP and SIGTERM)."""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping

from . import logs

_log = logs.get("polygon_streamer")


class Notifier:
    def __init__(self, address: str | None = None, watchdog_usec: int | None = None):
        self.address = address
        # systemd expects a ping at least every WATCHDOG_USEC; sd_watchdog_enabled(3) advises half of it.
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        self.sent = 0
        self.errors = 0
        self._logged = False
        self._socket: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "Notifier":
        address = environ.get("NOTIFY_SOCKET") or None
        watchdog_usec = None
        pid = environ.get("WATCHDOG_PID")
        if environ.get("WATCHDOG_USEC", "").isdigit() and (not pid or pid == str(os.getpid())):
            watchdog_usec = int(environ["WATCHDOG_USEC"]) or None
        return cls(address, watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX,
                                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._socket.sendto("\n".join(fields).encode("utf-8", "replace"), target)
        except OSError as exc:
            self.errors += 1
            if not self._logged:
                self._logged = True
                _log.warning("NOTIFY_SOCKET %s refused a message (%s); later failures are counted "
                             "(polygon_notify_errors_total), not logged", self.address, exc.strerror or exc,
                             extra={"fields": {"notify_socket": self.address}})
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                  "STATUS=reloading (SIGHUP): reopening files")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
