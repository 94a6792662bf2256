"""Whether a benchmark run had the machine to itself: the CPU the rest of the machine used meanwhile.

Seconds compare only between runs that ran alone (the quiet protocol, docs/quality.md). The load
average cannot say so: it counts the run's own processes too (a local Ray, its workers and the
trainer keep a run alone above the cores of a small machine; figures in docs/quality.md), and at a
run's start it still carries the work that came just before it. So a run is marked ``loaded`` by what *other* processes
did during it: the machine's busy CPU time (``/proc/stat``) less the CPU time of the benchmark's
own process tree (the driver and every process it started: Ray's daemons and workers), as a share
of the cores over the run's wall time.
The tree is sampled every second in a thread (:class:`TreeCpuMeter`): Ray's workers end with their
run and nobody reaps them into their parent's time, so a snapshot at the end would lose them.
Above :data:`OTHERS_BAR` the run is loaded. The load averages are kept in the record too. Without
``/proc`` (not Linux) the load average decides: above the cores at the run's start or end.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llkd_ray.sessions import process_stats

#: A run is loaded when other processes used more than this share of the machine's cores during it
#: (a second benchmark run beside it takes about half; an editor or a shell, a few per mille).
OTHERS_BAR = 0.10

_PROC = Path("/proc")


def _ticks() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (user, nice, system, irq, softirq,
    steal), or None without ``/proc/stat``."""
    try:
        fields = (_PROC / "stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _ticks()


def tree_cpu_times(root: int | None = None) -> dict[tuple[int, int], float] | None:
    """CPU seconds (user + system, its own) of process ``root`` (this one by default) and each of its
    descendants, keyed by (pid, start time) so that a reused pid is another process; None without
    ``/proc``."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = defaultdict(list)
    times: dict[int, tuple[int, float]] = {}
    if not _PROC.is_dir():
        return None
    for pid, fields in process_stats():
        children[int(fields[1])].append(pid)
        times[pid] = (int(fields[19]), (int(fields[11]) + int(fields[12])) / _ticks())  # starttime; utime + stime
    if root not in times:
        return None
    tree: dict[tuple[int, int], float] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        started, cpu = times[pid]
        tree[pid, started] = cpu
        stack.extend(children.get(pid, ()))
    return tree


class TreeCpuMeter:
    """The CPU seconds this process tree spends between :meth:`start` and :meth:`stop`, sampled every
    ``interval`` seconds in a daemon thread: a process that ends between two samples loses at most
    one interval of its time (processes seen first after the start count from 0)."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._baseline: dict[tuple[int, int], float] = {}
        self._last: dict[tuple[int, int], float] = {}
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.available = False

    def _sample(self) -> None:
        tree = tree_cpu_times()
        if tree is not None:
            self._last.update(tree)

    def start(self) -> TreeCpuMeter:
        tree = tree_cpu_times()
        self.available = tree is not None
        self._baseline = dict(tree or {})
        self._last = dict(self._baseline)
        if self.available:
            self._thread = threading.Thread(target=self._run, name="tree-cpu-meter", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self._sample()

    def stop(self) -> float | None:
        """Stop sampling; the tree's CPU seconds since :meth:`start` (None without ``/proc``)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
        if not self.available:
            return None
        self._sample()
        return sum(cpu - self._baseline.get(key, 0.0) for key, cpu in self._last.items())


@dataclass
class MachineUse:
    """One run's use of the machine: started with :meth:`start`, read with :meth:`record`."""

    wall: float
    busy: float | None
    load: tuple[float, float, float]
    meter: TreeCpuMeter

    @classmethod
    def start(cls, interval: float = 1.0) -> MachineUse:
        return cls(time.monotonic(), busy_cpu_seconds(), os.getloadavg(), TreeCpuMeter(interval).start())

    def record(self, cores: int | None = None) -> dict[str, Any]:
        """:func:`load_record` of the run so far: load averages, others' CPU share, ``loaded``."""
        ours, busy, wall = self.meter.stop(), busy_cpu_seconds(), time.monotonic()
        cores = cores or os.cpu_count() or 1
        others = others_cpu_share(self.busy, busy, ours, wall - self.wall, cores)
        return load_record(self.load, os.getloadavg(), cores, others)


def others_cpu_share(
    busy_start: float | None, busy_end: float | None, ours: float | None, wall: float, cores: int
) -> float | None:
    """The share of the machine's cores that processes outside the tree used over ``wall`` seconds:
    the machine's busy CPU time less the tree's (clipped at 0: the clocks are read a moment apart)."""
    if busy_start is None or busy_end is None or ours is None or wall <= 0:
        return None
    return max(0.0, ((busy_end - busy_start) - ours) / (wall * cores))


def load_record(
    start: Sequence[float], end: Sequence[float], cores: int, others: float | None = None
) -> dict[str, Any]:
    """A run's machine record: the load averages (1, 5, 15 min) at its start and end, the CPU share
    other processes used during it, and whether it ran ``loaded`` (others above :data:`OTHERS_BAR`;
    without that measure, a 1-minute load above the cores at the start or the end). Seconds of a
    loaded run are not comparable with a quiet one's; its FLOPs and F1 are."""
    loaded = others > OTHERS_BAR if others is not None else max(start[0], end[0]) > cores
    return {
        "load_average": {"start": [round(x, 2) for x in start], "end": [round(x, 2) for x in end], "cores": cores},
        "others_cpu_share": None if others is None else round(others, 4),
        "loaded": loaded,
    }
