"""Whether a benchmark run had the machine to itself (llkd_ray/quality/quiet.py): real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llkd_ray.quality.quiet import MachineUse, TreeCpuMeter, busy_cpu_seconds, load_record, others_cpu_share

pytestmark = pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads /proc")

#: A child that burns this much CPU time, then writes a file and exits.
BURN = "import sys, time\nwhile time.process_time() < 0.5: pass\nopen(sys.argv[1], 'w').close()\n"


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_the_cpu_of_this_process_tree_keeps_children_that_ended(tmp_path: Path) -> None:
    # Ray's workers end with their run and are not reaped into a parent's time: sampled while alive
    meter = TreeCpuMeter(interval=0.05).start()
    subprocess.run([sys.executable, "-c", BURN, str(tmp_path / "done")], check=True)
    assert meter.stop() >= 0.4


def test_an_outside_process_is_someone_elses_cpu_not_ours(tmp_path: Path) -> None:
    done = tmp_path / "done"
    busy, meter, wall = busy_cpu_seconds(), TreeCpuMeter(interval=0.05).start(), time.monotonic()
    use = MachineUse.start(interval=0.05)
    # double fork: the burner is re-parented away from this tree, as another user's job would be
    launcher = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', {BURN!r}, {str(done)!r}], start_new_session=True)\n"
    )
    subprocess.run([sys.executable, "-c", launcher], check=True)
    _wait_for(done)
    ours, others = meter.stop(), busy_cpu_seconds() - busy
    wall = time.monotonic() - wall
    assert others - ours >= 0.45 and ours < 0.45
    cores = os.cpu_count() or 1
    record = use.record()
    assert record["others_cpu_share"] >= 0.4 / (wall * cores)
    assert record["loaded"] == (record["others_cpu_share"] > 0.10)


def test_the_mark_follows_the_others_share_not_the_runs_own_load() -> None:
    own_load = (2.5, 2.7, 2.6)  # a run alone on 2 cores: Ray, its workers and the trainer
    assert not load_record(own_load, own_load, 2, others=0.02)["loaded"]
    assert load_record((0.1, 0.1, 0.1), (0.4, 0.2, 0.1), 2, others=0.45)["loaded"]
    assert load_record(own_load, own_load, 2)["loaded"]  # without /proc: the load average decides
    # 18 s busy over 10 s on 2 cores, 16 of them ours: others used 2 of 20 core-seconds
    assert others_cpu_share(100.0, 118.0, 16.0, 10.0, 2) == pytest.approx(0.1)
    assert others_cpu_share(None, 118.0, 16.0, 10.0, 2) is None
