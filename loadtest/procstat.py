"""What the runner reads about a process from ``/proc``: CPU seconds and resident memory.

CPU is ``utime + stime`` of every thread (``/proc/PID/stat``, clock ticks), RSS is ``VmRSS``.
A :class:`Sampler` thread polls a set of processes so the runner gets peaks and time series
without the measured processes doing anything.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as file:
        fields = file.read().rpartition(b")")[2].split()
    # After the command name: state is fields[0], utime fields[11], stime fields[12].
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as file:
        for line in file:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    """Direct child processes (nginx's workers, ``parkway serve --workers``)."""
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as file:
                found += [int(p) for p in file.read().split()]
    except OSError:
        pass
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


@dataclass
class Sample:
    t: float  # time.monotonic()
    cpu: float  # seconds, summed over the group
    rss: int  # bytes, summed over the group


@dataclass
class Group:
    """Processes measured together (nginx workers, Parkway workers) under one name."""

    name: str
    pids: list[int]
    samples: list[Sample] = field(default_factory=list)

    def read(self) -> Sample:
        cpu = rss = 0
        for pid in self.pids:
            try:
                cpu += cpu_seconds(pid)
                rss += rss_bytes(pid)
            except (OSError, IndexError, ValueError):
                pass  # exited between listing and reading
        return Sample(time.monotonic(), cpu, rss)

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.t <= end]


class Sampler:
    """Poll every group every ``interval`` seconds on a daemon thread until :meth:`stop`."""

    def __init__(self, groups: list[Group], interval: float = 0.1):
        self.groups = groups
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        for group in self.groups:
            group.samples.append(group.read())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            for group in self.groups:
                group.samples.append(group.read())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for group in self.groups:
                group.samples.append(group.read())
