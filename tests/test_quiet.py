"""Whether a benchmark run had the machine to itself (llkd_ray/quality/quiet.py): real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llkd_ray.quality.quiet import MachineSnapshot, load_record, machine_record, others_cpu_share, tree_cpu_seconds

pytestmark = pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads /proc")

#: A child that burns this much CPU time, then writes a file and exits.
BURN = "import sys, time\nwhile time.process_time() < 0.5: pass\nopen(sys.argv[1], 'w').close()\n"


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_the_cpu_of_this_process_tree_counts_its_reaped_children(tmp_path: Path) -> None:
    before = tree_cpu_seconds()
    subprocess.run([sys.executable, "-c", BURN, str(tmp_path / "done")], check=True)  # a child, reaped
    after = tree_cpu_seconds()
    assert before is not None and after is not None and after - before >= 0.45


def test_an_outside_process_is_someone_elses_cpu_not_ours(tmp_path: Path) -> None:
    done = tmp_path / "done"
    start = MachineSnapshot.take()
    # double fork: the burner is re-parented away from this tree, as another user's job would be
    launcher = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', {BURN!r}, {str(done)!r}], start_new_session=True)\n"
    )
    subprocess.run([sys.executable, "-c", launcher], check=True)
    _wait_for(done)
    end = MachineSnapshot.take()
    ours, busy = end.ours - start.ours, end.busy - start.busy
    assert busy - ours >= 0.45 and ours < busy
    cores = os.cpu_count() or 1
    share = others_cpu_share(start, end, cores)
    assert share == pytest.approx((busy - ours) / ((end.wall - start.wall) * cores), rel=1e-6)
    assert machine_record(start, end)["others_cpu_share"] == pytest.approx(share, abs=1e-4)


def test_the_mark_follows_the_others_share_not_the_runs_own_load() -> None:
    own_load = (2.5, 2.7, 2.6)  # a run alone on 2 cores: Ray, its workers and the trainer
    assert not load_record(own_load, own_load, 2, others=0.02)["loaded"]
    assert load_record((0.1, 0.1, 0.1), (0.4, 0.2, 0.1), 2, others=0.45)["loaded"]
    assert load_record(own_load, own_load, 2)["loaded"]  # without /proc: the load average decides
    a = MachineSnapshot(wall=0.0, busy=100.0, ours=10.0, load=(0, 0, 0))
    b = MachineSnapshot(wall=10.0, busy=118.0, ours=26.0, load=(0, 0, 0))  # 18 s busy, 16 of them ours
    assert others_cpu_share(a, b, 2) == pytest.approx(2.0 / 20.0)
    assert others_cpu_share(a, MachineSnapshot(10.0, None, 26.0, (0, 0, 0)), 2) is None
