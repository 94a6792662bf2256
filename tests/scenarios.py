"""Cluster scenarios the heavy tests run in a subprocess of their own.

The test session holds a local Ray (the ``ray_local`` fixture); a real head started with
``ray start`` or a ``ray.cluster_utils.Cluster`` must not share a process with it. Each scenario
prints one JSON line starting with ``RESULT `` for the test to read, and exits non-zero on failure.

    python tests/scenarios.py job-submission --output DIR [--set KEY=VALUE ...]
    python tests/scenarios.py multinode --output DIR [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from llkd_ray.sessions import kill_session

ROOT = Path(__file__).resolve().parent.parent
QUICK = "configs/quick.yaml"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}


#: What the scenarios' quick pipelines read: a 200-row pool and the gold set's first 200 rows (the
#: teacher labels the gold set too: all 872 rows of it cost more than the pool), as overrides.
SCENARIO_ROWS = 200


def small_data(directory: Path) -> list[str]:
    """Overrides for a scenario's quick pipeline: a smaller pool and a smaller gold set (written to
    ``directory``); the stages, actors and nodes are the same, with less to label and predict."""
    from llkd_ray.corpus import builtin_path

    gold = directory / "gold.jsonl"
    lines = builtin_path("builtin:sst2/test").read_text().splitlines()[:SCENARIO_ROWS]
    gold.write_text("".join(line + "\n" for line in lines))
    return [f"data.limit={SCENARIO_ROWS}", f"data.gold={gold}"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def result(payload: dict) -> None:
    print("RESULT " + json.dumps(payload, default=str), flush=True)


def run_scenario(name: str, output: Path, *overrides: str, timeout: float = 660) -> dict:
    """Run a scenario in a fresh interpreter and process group (for the tests).

    Returns its RESULT payload plus ``_log`` (the tail of its output; the whole of it is in
    ``OUTPUT.log``) and ``_returncode``. On timeout the whole group is killed (a ``Cluster``'s
    processes with it) and an AssertionError carries the log's tail.
    """
    command = [sys.executable, str(Path(__file__).resolve()), name, "--output", str(output)]
    for override in overrides:
        command += ["--set", override]
    log_path = output.with_name(output.name + ".log")
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(process.pid)
            process.wait()
    text = log_path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise AssertionError(
            f"scenario {name} printed no result (exit {process.returncode}; log {log_path})\n{text[-6000:]}"
        )
    outcome = json.loads(lines[-1].removeprefix("RESULT "))
    outcome["_log"] = text[-6000:]
    outcome["_returncode"] = process.returncode
    return outcome


# --------------------------------------------------------------------------- a real local head


class LocalHead:
    """``ray start --head --block`` on 127.0.0.1 in its own process group, token auth on."""

    def __init__(self, temp_dir: Path, token: str, num_cpus: int = 2) -> None:
        self.port = free_port()
        self.dashboard_port = free_port()
        self.token = token
        bin_dir = Path(sys.executable).parent
        # The job's `python` and `ray` are this interpreter's: the head's PATH starts with its bin dir.
        self.env = {
            **os.environ,
            **OFFLINE_ENV,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            # SIGTERM tears the head down at once (no 30 s drain: nothing is served from it).
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.env.pop("RAY_ADDRESS", None)
        command = [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={self.port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            # Every other listening port free too: another Ray on this machine may hold the defaults.
            *(
                f"--{name}={free_port()}"
                for name in (
                    "ray-client-server-port",
                    "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port",
                    "runtime-env-agent-port",
                    "metrics-export-port",
                    "node-manager-port",
                    "object-manager-port",
                )
            ),
        ]
        self.log = open(temp_dir.parent / "head.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}; see {self.log.name}")
            try:
                request = urllib.request.Request(
                    f"{self.dashboard}/api/version", headers={"Authorization": f"Bearer {self.token}"}
                )
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise TimeoutError(f"the head's dashboard did not answer within {timeout:.0f} s")

    def unauthenticated_status(self) -> int:
        """HTTP status of a job-API request that carries no token (token auth must refuse it)."""
        try:
            with urllib.request.urlopen(f"{self.dashboard}/api/jobs/", timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def stop(self) -> int:
        """SIGTERM the head's process group, then SIGKILL whatever of its session is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        kill_session(self.process.pid)
        self.process.wait(timeout=30)
        self.log.close()
        return self.process.returncode


def submit_when_ready(client, timeout: float = 90, **job) -> str:
    """Submit a job, retrying while the head's job agent is still starting (HTTP 500 "No available agent")."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def stage_times(run_dir: Path) -> dict[str, float]:
    times = {}
    for marker in sorted((run_dir / "_stages").glob("*.json")):
        times[marker.stem] = round(json.loads(marker.read_text()).get("wall_s") or -1, 1)
    return times


def job_submission(output: Path, overrides: list[str], timeout: float) -> int:
    """Start a head, submit jobs/pipeline.py with the quick config through the SDK, wait, stop the head."""
    temp_dir = Path(tempfile.mkdtemp(prefix="llkdh", dir="/tmp")) / "ray"  # short: Unix socket paths are limited
    temp_dir.mkdir()
    head = LocalHead(temp_dir, token=secrets.token_hex(16))
    status = "NOT_SUBMITTED"
    logs = ""
    try:
        head.wait_ready()
        unauthenticated = head.unauthenticated_status()
        # The client authenticates the way a user's shell does: RAY_AUTH_MODE=token plus the token.
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = head.token
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(head.dashboard)
        entrypoint = " ".join(
            [
                "python",
                "jobs/pipeline.py",
                "--config",
                QUICK,
                "--output",
                str(output),
                *[f"--set {o}" for o in overrides],
            ]
        )
        job_id = submit_when_ready(
            client,
            entrypoint=entrypoint,
            runtime_env={
                "working_dir": str(ROOT),
                "excludes": [".git", ".venv", ".ci-venv", "runs", "**/__pycache__", ".pytest_cache", "*.egg-info"],
                "env_vars": OFFLINE_ENV,
            },
        )
        deadline = time.monotonic() + timeout
        terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        while time.monotonic() < deadline:
            status = client.get_job_status(job_id)
            if status in terminal:
                break
            time.sleep(2)
        else:
            client.stop_job(job_id)
        status = str(getattr(status, "value", status))
        logs = client.get_job_logs(job_id)
    finally:
        head_rc = head.stop()
    print(logs[-6000:], flush=True)
    result(
        {
            "status": status,
            "unauthenticated_status": unauthenticated if status != "NOT_SUBMITTED" else None,
            "head_returncode": head_rc,
            "head_alive": head.process.poll() is None,
            "entrypoint": entrypoint,
            "stage_s": stage_times(output) if output.is_dir() else {},
        }
    )
    return 0 if status == "SUCCEEDED" else 1


# --------------------------------------------------------------------------- head + 2 worker nodes


def multinode(output: Path, overrides: list[str]) -> int:
    """The quick pipeline on a head and 2 worker nodes, then the label stage alone on one node.

    Every node offers 1 CPU, so 2 labeling actors (1 CPU each) and 2 training workers (1 CPU each)
    cannot share a node; Ray Data also schedules its actors with SPREAD.
    """
    import ray
    from ray._private.state import actors as actor_table  # straight from the GCS: no dashboard needed
    from ray.cluster_utils import Cluster

    from llkd_ray.artifacts import read_label_rows
    from llkd_ray.config import load_config
    from llkd_ray.label.run import label_corpus
    from llkd_ray.pipeline.run import run_pipeline

    os.environ.update(OFFLINE_ENV)
    # Spread: 2 teacher actors and 2 training workers of 1 CPU each on nodes of 1 CPU. The labels do
    # not depend on these settings (nor on the labeling config hash): the single-node run below uses
    # the plain quick config, one teacher actor on a 2-CPU local Ray.
    spread = [*overrides, "teacher.embedding.concurrency=2", "training.workers=2", "training.cpus_per_worker=1"]
    config = load_config(ROOT / QUICK, spread)
    single_config = load_config(ROOT / QUICK, overrides)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        started = time.perf_counter()
        run_pipeline(config, output / "multi")
        multi_s = time.perf_counter() - started
        placement: dict[str, list[str]] = {}
        for actor in actor_table().values():
            placement.setdefault(actor["ActorClassName"], []).append(actor["Address"]["NodeID"])
    finally:
        ray.shutdown()
        cluster.shutdown()

    ray.init(address="local", num_cpus=2, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        label_corpus(single_config, output=output / "single" / "labels")
    finally:
        ray.shutdown()

    columns = ["id", "pseudo_label"]
    multi = read_label_rows(output / "multi" / "labels", columns)
    single = read_label_rows(output / "single" / "labels", columns)
    result(
        {
            "nodes": len(nodes),
            "multi_rows": len(multi),
            "single_rows": len(single),
            "same_ids": sorted(multi["id"]) == sorted(single["id"]),
            "duplicate_ids": int(multi["id"].duplicated().sum()),
            "same_labels": dict(zip(multi["id"], multi["pseudo_label"], strict=True))
            == dict(zip(single["id"], single["pseudo_label"], strict=True)),
            "placement": {name: sorted(set(ids)) for name, ids in placement.items()},
            "multi_s": multi_s,
            "stage_s": stage_times(output / "multi"),
        }
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["job-submission", "multinode"])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--timeout", type=float, default=540, help="job-submission: seconds to wait for the job")
    args = parser.parse_args()
    if args.scenario == "job-submission":
        return job_submission(args.output, args.overrides, args.timeout)
    return multinode(args.output, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
