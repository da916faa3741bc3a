"""CPU_AFFINITY: which CPUs the service's Python threads may run on.

Only one thread runs Python at a time (the GIL). When the reader, the dispatcher and the sinks are spread over
several cores, every hand-over of the GIL crosses cores: the thread that wants it waits for the holder's switch
interval and for a wake-up on another core, and the cost grows with the number of cores and their distance. Kept on
one CPU, the hand-overs happen where the threads already are. `auto` (the default) confines them to one CPU of the
allowed set (what systemd's CPUAffinity= or taskset leave us): the idlest at start, and among CPUs about as idle,
one chosen by cluster from the highest down (CPU 0 takes most interrupts and housekeeping), so that one instance
per cluster on a host lands on different CPUs. libzmq's I/O threads and the gzip thread, created before this runs,
keep every allowed CPU: they do their work outside the GIL.
"""

from __future__ import annotations

import os
import time

from . import protocol

SAMPLE_SECS = 0.1
# CPUs whose idle share is within this of the idlest one count as equally idle.
IDLE_TOLERANCE = 0.05


def parse(raw: str) -> str | tuple[int, ...]:
    """`auto`, `off`, or CPU numbers and ranges (`1`, `0,2`, `2-5`); ValueError with what is accepted."""
    expected = "expected auto, off, or CPU numbers and ranges such as 1 or 0,2-3"
    word = raw.strip().lower()
    if word in ("auto", "off"):
        return word
    cpus: set[int] = set()
    for part in word.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(expected)
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(expected)
        cpus.update(range(low, high + 1))
    return tuple(sorted(cpus))


def _idle_jiffies() -> dict[int, int]:
    idle: dict[int, int] = {}
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                idle[int(name[3:])] = int(fields[3]) + int(fields[4])  # idle + iowait
    return idle


def idlest(allowed: list[int], cluster: str) -> int:
    """One CPU of `allowed`: the idlest over SAMPLE_SECS, spread by cluster among those about as idle."""
    try:
        before = _idle_jiffies()
        started = time.monotonic()
        time.sleep(SAMPLE_SECS)
        after = _idle_jiffies()
        ticks = (time.monotonic() - started) * os.sysconf("SC_CLK_TCK")
        share = {cpu: (after.get(cpu, 0) - before.get(cpu, 0)) / ticks for cpu in allowed}
    except (OSError, ValueError):
        share = {cpu: 1.0 for cpu in allowed}
    best = max(share.values())
    candidates = sorted((cpu for cpu in allowed if share[cpu] >= best - IDLE_TOLERANCE), reverse=True)
    return candidates[protocol.CLUSTERS.index(cluster) % len(candidates)]


def choose(setting: str | tuple[int, ...], cluster: str) -> set[int] | None:
    """The CPUs to confine the service's threads to, or None to leave them as they are."""
    if setting == "off" or not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if setting == "auto":
        return {idlest(allowed, cluster)} if len(allowed) > 1 else None
    if isinstance(setting, str):
        raise ValueError(f"CPU_AFFINITY is off, auto or a list of CPUs, not {setting!r}")
    chosen = set(setting) & set(allowed)
    if not chosen:
        raise ValueError(f"none of CPUs {','.join(map(str, setting))} is allowed (allowed: "
                         f"{','.join(map(str, allowed))})")
    return chosen


def confine_calling_thread(cpus: set[int]) -> None:
    """Threads started afterwards by this thread inherit the set."""
    os.sched_setaffinity(0, cpus)
