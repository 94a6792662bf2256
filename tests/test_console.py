"""The console: one progress line per ~10 % off a terminal (not one per batch), a bar on one, and
Ray's own INFO logs in ``RUN/logs/`` with its warnings still on the console."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llkd_ray.console import DATA_LOG, DRIVER_LOG, SESSION_LINK, Progress, verbose


def test_off_a_terminal_progress_prints_a_line_per_tenth_not_per_batch():
    out = io.StringIO()
    with Progress("label", 10_000, "rows", stream=out, tty=False) as progress:
        for done in range(100, 10_001, 100):  # 100 batches
            progress.update(done)
    lines = out.getvalue().splitlines()
    assert 9 <= len(lines) <= 11, lines
    assert lines[0].startswith("label:  10% 1000/10000 rows (")
    assert lines[-1].startswith("label: 100% 10000/10000 rows (") and "ETA 0:00" in lines[-1]


def test_a_jump_past_several_tenths_is_one_line_and_a_total_less_bar_waits_its_interval():
    out = io.StringIO()
    progress = Progress("train", 312, "steps", stream=out, tty=False)
    progress.update(200)  # 64 %: one line, not six
    progress.update(199)  # progress never goes back
    assert out.getvalue().count("\n") == 1 and "64%" in out.getvalue()
    untotalled = io.StringIO()
    progress = Progress("label", None, "rows", stream=untotalled, tty=False, interval_s=3600)
    for done in range(1, 50):
        progress.update(done)
    assert untotalled.getvalue() == ""


def test_on_a_terminal_it_is_one_tqdm_bar():
    out = io.StringIO()
    with Progress("label", 50, "rows", stream=out, tty=True) as progress:
        for done in range(1, 51):
            progress.update(done)
    text = out.getvalue()
    assert "label: 100%" in text and "50/50" in text
    assert text.count("\n") <= 1, "tqdm redraws one line"


def test_verbose_from_the_environment(monkeypatch):
    monkeypatch.delenv("LLKD_VERBOSE", raising=False)
    assert not verbose()
    monkeypatch.setenv("LLKD_VERBOSE", "1")
    assert verbose()


_RAY_DATA_RUN = textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path
    from llkd_ray.runtime import init_ray
    import ray, ray.data
    init_ray(num_cpus=2, log_dir=Path(sys.argv[1]))
    ray.data.range(2000, override_num_blocks=20).map_batches(lambda b: b).materialize()
    (shard,) = ray.data.range(500).streaming_split(1)  # executed in a SplitCoordinator actor, as Ray Train does
    assert sum(len(b["id"]) for b in shard.iter_batches()) == 500
    logging.getLogger("ray.data").warning("a warning from ray.data")

    @ray.remote
    def warn_as_the_placement_group_cleaner():
        from ray.train.v2._internal.execution.controller import placement_group_cleaner
        logger = logging.getLogger(placement_group_cleaner.__name__)
        logger.warning("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.")
        logger.warning("another warning from a Ray worker")

    ray.get(warn_as_the_placement_group_cleaner.remote())
    ray.shutdown()
    """
)


@pytest.mark.heavy
@pytest.mark.parametrize("verbose_flag", [False, True])
def test_ray_info_logs_go_to_the_run_directory_and_warnings_to_the_console(tmp_path, verbose_flag):
    logs = tmp_path / "logs"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "LLKD_VERBOSE": str(int(verbose_flag))}
    done = subprocess.run(
        [sys.executable, "-c", _RAY_DATA_RUN, str(logs)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    assert "a warning from ray.data" in console
    if verbose_flag:
        assert "Starting execution of Dataset" in console, "--verbose: Ray's output as before"
        assert not logs.exists()
        return
    assert "Starting execution of Dataset" not in console and "logging_progress" not in console, console
    assert "Progress bars disabled" not in console, "our bar replaces Ray Data's: no notice about it"
    assert "Starting execution of Dataset" in (logs / DATA_LOG).read_text()
    assert (logs / DRIVER_LOG).is_file()
    assert (logs / SESSION_LINK).is_dir()
    # A local Ray has no State API: the cleaner's once-a-second warning is dropped in the workers,
    # any other warning of theirs is kept (their stderr files are what Ray streams to the console).
    workers_stderr = "".join(path.read_text() for path in (logs / SESSION_LINK).glob("worker-*.err"))
    assert "another warning from a Ray worker" in workers_stderr
    assert "State API may be temporarily unavailable" not in workers_stderr
