"""Whether a benchmark run had the machine to itself: the CPU the rest of the machine used meanwhile.

Seconds compare only between runs that ran alone (the quiet protocol, docs/quality.md). The load
average cannot say so: it counts the run's own processes too (a local Ray, its workers and the
trainer put a run alone on 2 cores at a 1-minute load of 2.2–3.4), and at a run's start it still
carries the work that came just before it. So a run is marked ``loaded`` by what *other* processes
did during it: the machine's busy CPU time (``/proc/stat``) less the CPU time of the benchmark's own
process tree (the driver, and every process it started: Ray's daemons and workers, with the time
of those that ended, which their parents reaped), as a share of the cores over the run's wall
time. Above :data:`OTHERS_BAR` the run is loaded. The load averages are kept in the record too.
Without ``/proc`` (not Linux) the load average decides, as it did before.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def tree_cpu_seconds(root: int | None = None) -> float | None:
    """CPU seconds of process ``root`` (this one by default) and all its descendants, each with the
    time of its reaped children; None without ``/proc``."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = defaultdict(list)
    times: dict[int, float] = {}
    try:
        entries = list(_PROC.iterdir())
    except OSError:
        return None
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process ended meanwhile
        # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        pid, ppid = int(entry.name), int(fields[1])
        children[ppid].append(pid)
        times[pid] = sum(int(x) for x in fields[11:15]) / _ticks()  # utime stime cutime cstime
    if root not in times:
        return None
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack.extend(children.get(pid, ()))
    return total


@dataclass(frozen=True)
class MachineSnapshot:
    """The wall clock, the machine's busy CPU time, this process tree's CPU time and the load average."""

    wall: float
    busy: float | None
    ours: float | None
    load: tuple[float, float, float]

    @classmethod
    def take(cls) -> MachineSnapshot:
        return cls(time.monotonic(), busy_cpu_seconds(), tree_cpu_seconds(), os.getloadavg())


def others_cpu_share(start: MachineSnapshot, end: MachineSnapshot, cores: int) -> float | None:
    """The share of the machine's cores that processes outside this tree used between the two
    snapshots (0 when alone; clipped at 0: the two clocks are read a moment apart)."""
    if None in (start.busy, end.busy, start.ours, end.ours) or end.wall <= start.wall:
        return None
    others = (end.busy - start.busy) - (end.ours - start.ours)  # type: ignore[operator]
    return max(0.0, others / ((end.wall - start.wall) * cores))


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


def machine_record(start: MachineSnapshot, end: MachineSnapshot, cores: int | None = None) -> dict[str, Any]:
    """:func:`load_record` of two snapshots."""
    cores = cores or os.cpu_count() or 1
    return load_record(start.load, end.load, cores, others_cpu_share(start, end, cores))
