"""Labeling soak under faults: ``llkd label`` on a large corpus with bad rows, undisturbed and under chaos.

    python benchmarks/label_soak.py [--rows 100000] [--bad-share 0.01] [--kill-every 30] [--seed 0]
                                    [--output runs/soak] [--skip-undisturbed] [--actor-kills N]
                                    [--block-rows 1024] [--driver-kill-at 0.5] [--drain-s 30]

1. **Corpus** (``OUTPUT/corpus.jsonl``, deterministic in ``--seed``): ``--rows`` rows with unique
   ids, texts made by joining one to three sentences of the packaged SST-2 and TREC pools, and a
   ``--bad-share`` of bad rows, the kinds in turn: empty text, whitespace only, invalid UTF-8
   bytes, a 1 MB text, a number where the text should be, a repeated id (another text), a line that
   is not JSON. Each bad row has the rejection reason it must get (:data:`EXPECTED_REASON`).
2. **Two runs** of ``llkd label`` with the offline embedding teacher of ``configs/demo.yaml`` on
   the whole machine, each in its own local Ray and process session: undisturbed, then under
   chaos: every ~``--kill-every`` s (seeded) a random teacher actor of that run is SIGKILLed, and
   once, when about ``--driver-kill-at`` of the rows are committed, the driver itself; the same
   command then resumes the job.
3. **Checks** (``OUTPUT/soak.json``, also printed): rows in, labeled, rejected by reason, ids
   missing, ids doubled, bad rows without their reason, wall time of each run and their ratio,
   kills, peak RSS of the driver and of the teacher actors with samples over time (the last 10 %
   against the middle 10 % says whether memory stayed flat), and whether both runs gave every id
   the same label.

Signals go only to processes of the sessions this script started (the driver's session holds its
local Ray). A run whose labels are complete (manifest written) is not run again on a re-invocation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llkd_ray.sessions import kill_session, session_processes

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
#: What each kind of bad row must be rejected with.
EXPECTED_REASON = {
    "empty": "empty_text",
    "whitespace": "whitespace_text",
    "invalid_utf8": "invalid_utf8",
    "huge": "text_too_long",
    "number": "non_string_text",
    "duplicate_id": "duplicate_id",
    "not_json": "invalid_json",
}
HUGE_CHARS = 1_000_000
PROGRESS_S = 30.0
SAMPLE_S = 1.0
#: What Ray names a teacher actor's process (its title) in this version.
ACTOR_MARK = "TeacherActor"


# --------------------------------------------------------------------------- the corpus


@dataclass
class CorpusSpec:
    """What the corpus holds: each row id's expected reason (None: to be labeled) and the repeats."""

    path: Path
    rows: int
    expected: dict[str, str | None] = field(default_factory=dict)
    duplicates: Counter[str] = field(default_factory=Counter)
    bad_kinds: Counter[str] = field(default_factory=Counter)


def _sentences() -> list[str]:
    from llkd_ray.corpus import builtin_path

    texts = []
    for name in ("builtin:sst2/train", "builtin:trec/train"):
        texts += [json.loads(line)["text"] for line in builtin_path(name).read_text().splitlines()]
    return texts


def build_corpus(path: Path, rows: int, bad_share: float = 0.01, seed: int = 0) -> CorpusSpec:
    """Write ``rows`` JSONL rows (ids ``r0000000``...) to ``path``, ``bad_share`` of them bad."""
    from llkd_ray.compat import compute_row_hashes

    rng = random.Random(seed)
    sentences = _sentences()
    bad_count = min(rows - 1, round(rows * bad_share)) if rows > 1 else 0
    kinds = list(EXPECTED_REASON)
    positions = sorted(rng.sample(range(1, rows), bad_count))  # row 0 is good: a repeat has an id to repeat
    bad = {position: kinds[i % len(kinds)] for i, position in enumerate(positions)}
    spec = CorpusSpec(path=path, rows=rows)
    good_ids: list[str] = []
    source = str(path.resolve())
    with path.open("wb") as out:
        for position in range(rows):
            row_id = f"r{position:07d}"
            text = " ".join(rng.choice(sentences) for _ in range(rng.randint(1, 3)))
            kind = bad.get(position)
            line = json.dumps({"id": row_id, "text": text}).encode()
            if kind:
                spec.bad_kinds[kind] += 1
            if kind == "empty":
                line = json.dumps({"id": row_id, "text": ""}).encode()
            elif kind == "whitespace":
                line = json.dumps({"id": row_id, "text": " \t\n  "}).encode()
            elif kind == "invalid_utf8":
                line = (
                    json.dumps({"id": row_id, "text": "PLACEHOLDER"}).encode().replace(b"PLACEHOLDER", b"caf\xe9 \xff")
                )
            elif kind == "huge":
                parts, size = [], 0
                while size < HUGE_CHARS:
                    parts.append(rng.choice(sentences))
                    size += len(parts[-1]) + 1
                line = json.dumps({"id": row_id, "text": " ".join(parts)[:HUGE_CHARS]}).encode()
            elif kind == "number":
                line = json.dumps({"id": row_id, "text": rng.randint(0, 10**6)}).encode()
            elif kind == "duplicate_id":
                repeated = rng.choice(good_ids)
                line = json.dumps({"id": repeated, "text": f"{text} (again)"}).encode()
                spec.duplicates[repeated] += 1
            elif kind == "not_json":
                line = b'{"id": "' + row_id.encode() + b'", "text": "cut off'
                # No id can be read: the reader names the row by a hash of file and position.
                row_id = f"{int(compute_row_hashes(source, position, 1)[0]):016x}"
            out.write(line + b"\n")
            if kind != "duplicate_id":
                spec.expected[row_id] = EXPECTED_REASON[kind] if kind else None
                if kind is None:
                    good_ids.append(row_id)
    return spec


# --------------------------------------------------------------------------- the checker


def read_output(labels: Path) -> tuple[Any, Any]:
    """(labeled rows: id, pseudo_label, confidence; rejected rows: id, reason) of a label directory."""
    import pandas as pd
    import pyarrow.parquet as pq

    def read(files: list[Path], columns: list[str]) -> Any:
        frames = [pq.read_table(f, columns=columns).to_pandas() for f in files]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

    labeled = read(sorted(labels.glob("part-*.parquet")), ["id", "pseudo_label", "confidence"])
    rejected = read(sorted((labels / "rejected").glob("part-*.parquet")), ["id", "reason"])
    return labeled, rejected


def check_output(labels: Path, spec: CorpusSpec) -> dict[str, Any]:
    """Exactly once: every id of the corpus labeled or rejected once (with its expected reason),
    each repeat of an id once in ``rejected/`` as ``duplicate_id``, nothing else."""
    labeled, rejected = read_output(labels)
    repeats = rejected[rejected["reason"] == "duplicate_id"]
    rows = Counter(labeled["id"]) + Counter(rejected.loc[rejected["reason"] != "duplicate_id", "id"])
    got = dict(zip(rejected["id"], rejected["reason"], strict=True)) | dict.fromkeys(labeled["id"])
    missing = sorted(set(spec.expected) - set(rows))
    doubled = sorted(i for i, n in rows.items() if n > 1)
    unknown = sorted(set(rows) - set(spec.expected))
    wrong = {i: got.get(i) for i, want in spec.expected.items() if i in rows and got.get(i) != want}
    repeats_got = Counter(repeats["id"])
    return {
        "rows_in": spec.rows,
        "labeled": len(labeled),
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(rejected["reason"]).items())),
        "bad_rows_by_kind": dict(sorted(spec.bad_kinds.items())),
        "ids_missing": len(missing),
        "ids_doubled": len(doubled),
        "ids_unknown": len(unknown),
        "wrong_reason": len(wrong),
        "repeats_missing": sum((spec.duplicates - repeats_got).values()),
        "repeats_extra": sum((repeats_got - spec.duplicates).values()),
        "examples": {
            "missing": missing[:5],
            "doubled": doubled[:5],
            "unknown": unknown[:5],
            "wrong": dict(list(wrong.items())[:5]),
        },
        "exactly_once": not (missing or doubled or unknown or wrong or spec.duplicates != repeats_got),
    }


def compare_labels(first: Path, second: Path) -> dict[str, Any]:
    """Whether two label directories give every id the same label (and how far confidences differ)."""
    a, _ = read_output(first)
    b, _ = read_output(second)
    merged = a.drop_duplicates("id").merge(b.drop_duplicates("id"), on="id", how="outer", suffixes=("_a", "_b"))
    differ = merged["pseudo_label_a"] != merged["pseudo_label_b"]
    gap = (merged["confidence_a"] - merged["confidence_b"]).abs().max()
    return {
        "ids_compared": len(merged),
        "labels_differ": int(differ.sum()),
        "identical": bool(not differ.any()),
        "max_confidence_gap": None if merged.empty else float(gap),
    }


# --------------------------------------------------------------------------- processes


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (psutil when installed, else ``/proc``); 0 once it is gone."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return 0
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def teacher_actors(session: int) -> list[int]:
    """The teacher actors' processes of one run (Ray titles them after the actor class)."""
    return [pid for pid in session_processes(session) if ACTOR_MARK in _cmdline(pid)]


def committed_rows(labels: Path) -> int:
    """Rows committed so far (labeled and rejected), from the parts' footers; 0 while there are none."""
    import pyarrow.parquet as pq

    from llkd_ray.label.store import OutputStore, rejected_count

    store = OutputStore(labels)
    try:
        return rejected_count(store) + sum(pq.read_metadata(store.path(n)).num_rows for n in store.parts())
    except (OSError, ValueError):  # a part renamed or rewritten while we looked: next time
        return 0


# --------------------------------------------------------------------------- one run


@dataclass
class Watch:
    """What the monitor saw during one run: RSS samples, kills, progress lines."""

    started: float = field(default_factory=time.monotonic)
    samples: list[dict[str, float]] = field(default_factory=list)
    actor_kills: int = 0
    driver_kills: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)

    def sample(self, driver: int, actors: list[int]) -> None:
        rss = [rss_bytes(pid) for pid in actors]
        self.samples.append(
            {
                "t": round(time.monotonic() - self.started, 1),
                "driver_mb": round(rss_bytes(driver) / 2**20, 1),
                "actors_mb": round(sum(rss) / 2**20, 1),
                "actor_max_mb": round(max(rss, default=0) / 2**20, 1),
            }
        )

    def memory(self) -> dict[str, Any]:
        """Peaks, and the mean of the last 10 % of the samples against the middle 10 % (flat: ~1)."""
        if not self.samples:
            return {}

        def window(lo: float, hi: float, key: str) -> float:
            samples = [s for s in self.samples if s[key] > 0]  # while the processes are there
            chosen = samples[int(lo * len(samples)) : max(int(hi * len(samples)), int(lo * len(samples)) + 1)]
            return sum(s[key] for s in chosen) / len(chosen) if chosen else 0.0

        out: dict[str, Any] = {}
        for key in ("driver_mb", "actors_mb", "actor_max_mb"):
            middle, last = window(0.45, 0.55, key), window(0.9, 1.0, key)
            out[f"peak_{key}"] = max(s[key] for s in self.samples)
            out[f"{key}_last_over_middle"] = round(last / middle, 3) if middle else None
        return out


def label_command(spec: CorpusSpec, labels: Path, block_rows: int) -> list[str]:
    """``llkd label`` on the soak corpus with the demo's offline teacher, the whole machine."""
    return [
        sys.executable, "-m", "llkd_ray.cli", "label", "--config", str(DEMO), "--input", str(spec.path.resolve()),
        "--output", str(labels), "--set", "data.id_column=id", "--set", "data.label_column=null",
        "--set", f"teacher.block_rows={block_rows}",
    ]  # fmt: skip


def _environment() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.pop("RAY_ADDRESS", None)  # a private local Ray per run, in the driver's session
    return env


def run_label(name: str, spec: CorpusSpec, out: Path, args: argparse.Namespace, chaos: bool) -> dict[str, Any]:
    """One ``llkd label`` job to its end: under chaos, actor kills every ~kill_every s and one
    driver kill at about ``driver_kill_at`` of the rows, then the same command again."""
    labels, log_path = out / name / "labels", out / name / "label.log"
    labels.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed + 1)
    watch = Watch()
    driver_killed = not chaos
    next_kill = watch.started + rng.uniform(0.5, 1.5) * args.kill_every
    last_line = watch.started
    with log_path.open("ab") as log:
        while True:
            begun = time.monotonic()
            process = subprocess.Popen(
                label_command(spec, labels, args.block_rows), cwd=ROOT, env=_environment(),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            killed_here = False
            try:
                while process.poll() is None:
                    time.sleep(SAMPLE_S)
                    actors = teacher_actors(process.pid)
                    watch.sample(process.pid, actors)
                    now = time.monotonic()
                    done = committed_rows(labels) if (not driver_killed or now - last_line >= PROGRESS_S) else 0
                    if chaos and actors and now >= next_kill and watch.actor_kills < args.actor_kills:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(rng.choice(sorted(actors)), signal.SIGKILL)
                            watch.actor_kills += 1
                        next_kill = now + rng.uniform(0.5, 1.5) * args.kill_every
                    if not driver_killed and done >= args.driver_kill_at * spec.rows:
                        os.kill(process.pid, signal.SIGKILL)
                        driver_killed = killed_here = True
                        watch.driver_kills += 1
                        print(f"[{name}] {now - watch.started:.0f} s: SIGKILL the driver at {done} rows", flush=True)
                    if now - last_line >= PROGRESS_S:
                        last = watch.samples[-1]
                        print(
                            f"[{name}] {now - watch.started:.0f} s: {done}/{spec.rows} rows committed, "
                            f"{watch.actor_kills} actor kill(s), driver {last['driver_mb']:.0f} MB, "
                            f"actors {last['actors_mb']:.0f} MB",
                            flush=True,
                        )
                        last_line = now
            finally:
                if process.poll() is None:  # this script was stopped (SIGTERM, Ctrl-C): so is its job
                    kill_session(process.pid)
            process.wait()
            left = len(session_processes(process.pid))
            deadline = time.monotonic() + args.drain_s
            while session_processes(process.pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            attempt = {"returncode": process.returncode, "wall_s": round(time.monotonic() - begun, 1)}
            attempt |= {"left_running": left, f"left_after_{args.drain_s:g}_s": len(session_processes(process.pid))}
            kill_session(process.pid)  # a killed driver's Ray: what fate-sharing did not end
            watch.attempts.append(attempt)
            if not killed_here:
                break
    manifest = json.loads((labels / "_manifest.json").read_text()) if (labels / "_manifest.json").exists() else {}
    return {
        "wall_s": round(time.monotonic() - watch.started, 1),
        "returncode": watch.attempts[-1]["returncode"],
        "attempts": watch.attempts,
        "actor_kills": watch.actor_kills,
        "driver_kills": watch.driver_kills,
        "memory": watch.memory(),
        "rss_samples": watch.samples,
        "manifest_counts": manifest.get("counts"),
    }


def complete(out: Path, name: str) -> dict[str, Any] | None:
    """The record of a run whose labels are complete (manifest and record written), else None."""
    record = out / name / "run.json"
    if (out / name / "labels" / "_manifest.json").exists() and record.exists():
        return json.loads(record.read_text())
    return None


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--bad-share", type=float, default=0.01)
    parser.add_argument("--kill-every", type=float, default=30.0, help="seconds between teacher actor kills (~)")
    parser.add_argument("--actor-kills", type=int, default=10**9, help="at most this many actor kills")
    parser.add_argument("--driver-kill-at", type=float, default=0.5, help="share of rows committed at the driver kill")
    parser.add_argument("--block-rows", type=int, default=1024, help="teacher.block_rows (rows per committed part)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--drain-s", type=float, default=30.0, help="how long a killed driver's processes get to end before the resume"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "soak")
    parser.add_argument(
        "--skip-undisturbed", action="store_true", help="only the chaos run (no time ratio, no label comparison)"
    )
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped soak stops the job it runs
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = build_corpus(out / "corpus.jsonl", args.rows, args.bad_share, args.seed)
    print(
        f"soak: {args.rows} rows ({sum(spec.bad_kinds.values())} bad: {dict(spec.bad_kinds)}) in {spec.path}",
        flush=True,
    )
    runs: dict[str, Any] = {}
    for name, chaos in (("undisturbed", False), ("chaos", True)):
        if name == "undisturbed" and args.skip_undisturbed:
            continue
        record = complete(out, name)
        if record is None:
            record = run_label(name, spec, out, args, chaos)
            (out / name / "run.json").write_text(json.dumps(record))
        else:
            print(f"[{name}] complete already: not run again", flush=True)
        record["check"] = check_output(out / name / "labels", spec)
        runs[name] = record
        print(
            f"[{name}] {record['wall_s']:.0f} s, exit {record['returncode']}: {json.dumps(record['check'])}", flush=True
        )
    report: dict[str, Any] = {
        "rows": args.rows, "bad_share": args.bad_share, "seed": args.seed, "kill_every_s": args.kill_every,
        "cpus": os.cpu_count(),
        "runs": {k: {x: v for x, v in r.items() if x != "rss_samples"} for k, r in runs.items()},
    }  # fmt: skip
    if "undisturbed" in runs:
        report["wall_ratio_chaos_over_undisturbed"] = round(runs["chaos"]["wall_s"] / runs["undisturbed"]["wall_s"], 3)
        report["labels"] = compare_labels(out / "undisturbed" / "labels", out / "chaos" / "labels")
    report["ok"] = (
        all(r["check"]["exactly_once"] and r["returncode"] == 0 for r in runs.values())
        and report.get("labels", {"identical": True})["identical"]
    )
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    (out / "rss_samples.json").write_text(json.dumps({k: r["rss_samples"] for k, r in runs.items()}))
    print(json.dumps(report, indent=2), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
