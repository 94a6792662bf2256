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
from pathlib import Path


def session_processes(session: int) -> list[int]:
    """Live processes of a session (zombies left out), read from ``/proc``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, _pgrp, sid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
        except OSError:
            continue  # ended while we looked
        if int(sid) == session and state != "Z":
            found.append(int(entry.name))
    return found


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
