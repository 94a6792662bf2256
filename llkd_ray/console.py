"""What a person reads while a stage runs: its start line, one progress bar, its result line.

Decisions:

- Ray's own INFO output (the driver's ``ray`` loggers, Ray Data's progress logs, Ray Train's
  per-report and per-checkpoint lines, Hugging Face's weight-loading bars in the workers) goes to
  files under ``RUN/logs/``; Ray's warnings and errors still reach the console. ``--verbose`` (or
  ``LLKD_VERBOSE=1``) leaves Ray as it was: today's output, nothing routed.
- Documented knobs first: ``RAY_DATA_LOGGING_CONFIG`` (Ray Data's logging, driver and workers),
  Ray Train's ``RunConfig(logging_config=...)`` (see :func:`train_logging_config`),
  ``HF_HUB_DISABLE_PROGRESS_BARS``; the driver's ``ray`` logger gets a file handler and its console
  handlers are raised to WARNING.
- A terminal gets a ``tqdm`` bar; a pipe or a file gets one line at each ~10 % (every 30 s when the
  total is unknown), never a line per batch.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import yaml

VERBOSE_ENV = "LLKD_VERBOSE"
LOG_DIR = "logs"
DRIVER_LOG = "ray-driver.log"
DATA_LOG = "ray-data.log"
SESSION_LINK = "ray-session"
_DATA_CONFIG = "ray-data-logging.yaml"
#: The driver's loggers that Ray itself configures with a console handler.
_RAY_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.serve")


def verbose() -> bool:
    """``--verbose`` or ``LLKD_VERBOSE=1``: Ray's logs on the console, as they come."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def set_verbose(flag: bool) -> None:
    if flag:
        os.environ[VERBOSE_ENV] = "1"


def prepare_ray_logs(log_dir: Path) -> Path | None:
    """Before Ray starts: route Ray Data's logs (driver and workers) to ``log_dir`` and quiet the
    workers' download/loading bars. Returns ``log_dir``, or None when verbose (nothing changes)."""
    if verbose():
        return None
    log_dir = Path(log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = log_dir / _DATA_CONFIG
    config_path.write_text(yaml.safe_dump(_data_logging_config(log_dir / DATA_LOG)))
    # Environment, so the Ray workers a local Ray starts inherit it too.
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(config_path)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "ray.data" in sys.modules:  # Ray Data configures its loggers once, at import
        from ray.data._internal.logging import configure_logging

        configure_logging()
    return log_dir


def attach_ray_logs(log_dir: Path) -> Path | None:
    """After Ray started: the driver's Ray loggers write INFO and up to ``log_dir/ray-driver.log`` and
    only WARNING and up to the console; ``log_dir/ray-session`` links Ray's session logs (the
    workers' own files). Ray Data's progress is left to the log file (no bars of its own)."""
    if verbose():
        return None
    import ray.data

    log_dir = Path(log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    driver_log = str(log_dir / DRIVER_LOG)
    handler: logging.Handler | None = None
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        for existing in logger.handlers:
            if not isinstance(existing, logging.FileHandler):
                existing.setLevel(max(existing.level, logging.WARNING))
        if any(getattr(h, "baseFilename", None) == driver_log for h in logger.handlers):
            continue
        if name == "ray" or not logger.propagate:  # children of "ray" that propagate reach its handler
            handler = handler or _file_handler(driver_log)
            logger.addHandler(handler)
            logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    # Our bar replaces Ray Data's (the DataContext travels to Ray Data's actors, e.g. the trainer's
    # SplitCoordinator); QuietProgressNotice keeps Ray Data's notice about it off the console.
    ray.data.DataContext.get_current().enable_progress_bars = False
    _link_session_logs(log_dir)
    return log_dir


def train_logging_config() -> Any:
    """Ray Train's ``RunConfig(logging_config=...)``: WARNING on the console unless verbose (its
    per-report and per-checkpoint INFO lines stay in Ray's session files, ``RUN/logs/ray-session``)."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def quiet_train_worker() -> None:
    """In a Ray Train worker: keep Ray Train's per-report line off the console, in Train's worker log.

    Ray Train 2.60 logs ``Reporting training result N: TrainingReport(...)`` from every worker at
    every report through a logger named after its source file, not under ``ray.train``, so
    ``RunConfig(logging_config=...)`` misses it. That logger stops propagating to the root's console
    handler and writes to the root's file handlers (``ray-train-app-worker-*.log``) instead.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train layout: nothing to quiet
        return
    logger = logging.getLogger(context.__file__)
    files = [h for h in logging.getLogger().handlers if not isinstance(h, logging.StreamHandler)]
    if logger.propagate and files:
        logger.propagate = False
        for handler in files:
            logger.addHandler(handler)


def quiet_ray_worker() -> None:
    """Every Ray worker's start (``runtime_env`` ``worker_process_setup_hook``, unless verbose): drop
    Ray Train's placement-group cleaner's once-a-second State API warning.

    Ray Train 2.60 starts a detached ``PlacementGroupCleaner`` that asks the State API whether the
    Train controller is alive, every second. A local Ray started here runs without the dashboard
    (which serves that API), so each check fails and warns: 177 of the demo's 230 console lines.
    The controller still removes its placement group when it ends; only the crash-time cleanup,
    which needs the State API, is unavailable on such a Ray, whatever we print.
    """
    try:
        from ray.train.v2._internal.execution.controller import placement_group_cleaner
    except ImportError:  # another Ray Train layout: nothing to quiet
        return
    logging.getLogger(placement_group_cleaner.__name__).addFilter(QuietStateApiWarning())


class QuietStateApiWarning(logging.Filter):
    """Drops the placement-group cleaner's "State API may be temporarily unavailable" warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "State API may be temporarily unavailable" not in record.getMessage()


def _file_handler(path: str) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(name)s -- %(message)s"))
    return handler


def _data_logging_config(path: Path) -> dict[str, Any]:
    """Ray Data's default logging config (its session file), plus our file, console at WARNING."""
    from ray.data._internal.logging import DEFAULT_CONFIG

    config: dict[str, Any] = {**DEFAULT_CONFIG, "handlers": dict(DEFAULT_CONFIG["handlers"])}
    config["filters"] = {**DEFAULT_CONFIG["filters"], "llkd_quiet": {"()": f"{__name__}.QuietProgressNotice"}}
    console = config["handlers"]["console"]
    config["handlers"]["console"] = {**console, "level": "WARNING", "filters": [*console["filters"], "llkd_quiet"]}
    config["handlers"]["run_file"] = {"class": "logging.FileHandler", "formatter": "ray", "filename": str(path)}
    config["loggers"] = {"ray.data": {**DEFAULT_CONFIG["loggers"]["ray.data"]}}
    config["loggers"]["ray.data"]["handlers"] = ["file", "run_file", "console"]
    return config


class QuietProgressNotice(logging.Filter):
    """Drops Ray Data's warning that its progress bars are disabled (a choice made here, on the
    driver and in each Ray Data actor); every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def _link_session_logs(log_dir: Path) -> None:
    """``RUN/logs/ray-session`` -> Ray's session log directory of a local Ray (workers' logs)."""
    try:
        from ray._private import worker

        session_logs = Path(worker._global_node.get_logs_dir_path())
    except (AttributeError, ImportError):  # a client connection or another Ray layout: no link
        return
    link = log_dir / SESSION_LINK
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(session_logs, target_is_directory=True)


class Progress:
    """One stage's progress: a ``tqdm`` bar on a terminal, else a line at each ``every`` of the total.

    ``update(done)`` takes the absolute amount done (rows, steps, percent of a budget).
    """

    def __init__(
        self,
        stage: str,
        total: float | None,
        unit: str,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        every: float = 0.1,
        interval_s: float = 30.0,
    ) -> None:
        self.stage, self.total, self.unit = stage, total, unit
        self.stream = stream or sys.stdout
        self.every, self.interval_s = every, interval_s
        self.started = time.monotonic()
        self.done: float = 0
        self._next = every
        self._last_line = self.started
        self._first: tuple[float, float] | None = None
        """When the first progress came and how much: the rate leaves out the start-up before it."""
        tty = self.stream.isatty() if tty is None else tty
        self._bar = None
        if tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=stage, unit=f" {unit}", file=self.stream, dynamic_ncols=True)

    def update(self, done: float) -> None:
        if done <= self.done:
            return
        if self._bar is not None:
            self._bar.update(done - self.done)
            self.done = done
            return
        self.done = done
        now = time.monotonic()
        self._first = self._first or (now, done)
        if self.total:
            if done / self.total + 1e-9 < self._next:
                return
            while self._next <= done / self.total + 1e-9:
                self._next += self.every
        elif now - self._last_line < self.interval_s:
            return
        self._last_line = now
        print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        """``train: 40% 125/312 steps (3.1 steps/s, ETA 1:00)``."""
        now = time.monotonic()
        rate = self.done / max(now - self.started, 1e-9)
        if self._first and now > self._first[0] and self.done > self._first[1]:
            rate = (self.done - self._first[1]) / (now - self._first[0])
        if not self.total:
            return f"{self.stage}: {self.done:g} {self.unit} ({rate:.1f} {self.unit}/s)"
        fraction = min(self.done / self.total, 1.0)
        eta = (self.total - self.done) / rate if rate > 0 else None
        return (
            f"{self.stage}: {fraction:4.0%} {self.done:g}/{self.total:g} {self.unit} "
            f"({rate:.1f} {self.unit}/s, ETA {_clock(eta)})"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"
