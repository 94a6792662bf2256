"""The processes of a session: what the tests and the soak benchmarks find, freeze and kill.

A test or benchmark that kills Ray starts it in a process session of its own
(``start_new_session=True``) and signals that session's processes only, read from ``/proc`` —
never a pattern over every process of the machine. ``killpg`` is not enough for Ray: the raylet
puts each worker in a process group of its own, and an orphaned worker can go on writing for a
moment after its driver and raylet are dead. Linux only (``/proc``), as the tests that use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """Every process's pid and its ``/proc/PID/stat`` fields after the command name (state, ppid,
    pgrp, session, ...; the name may hold spaces and parentheses, so it is cut at its last ')')."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended while we looked
        yield int(entry.name), stat.rsplit(")", 1)[1].split()


def session_processes(session: int) -> list[int]:
    """Live processes of a session (zombies left out), read from ``/proc``."""
    return [pid for pid, fields in process_stats() if int(fields[3]) == session and fields[0] != "Z"]


def freeze_session(session: int) -> None:
    """SIGSTOP every process of a session: it stops where it is (``kill_session`` still ends it)."""
    for pid in session_processes(session):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)


def kill_session(session: int, timeout: float = 60) -> None:
    """SIGKILL every process of a session and wait until none is left (RuntimeError past ``timeout``)."""
    deadline = time.monotonic() + timeout
    while pids := session_processes(session):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} of session {session} outlived SIGKILL for {timeout:.0f} s")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
