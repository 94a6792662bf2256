"""``llkd train`` end to end on Ray Train (2 CPU workers, a tiny student), the lost-worker resume,
and the checks on the labels directory that run before any trainer starts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import SST2_LABELS
from train_fixtures import write_labels_dir

from llkd_ray.testing import build_tiny_classifier

CONFIG = str(Path(__file__).resolve().parents[1] / "llkd_ray" / "configs" / "demo.yaml")


def _rows(split: str, n: int) -> list[dict]:
    from llkd_ray.corpus import builtin_path

    lines = builtin_path(f"builtin:sst2/{split}").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, minilm_path):
    work = tmp_path_factory.mktemp("train")
    pool = _rows("train", 160)
    labels = write_labels_dir(work / "labels", [r["text"] for r in pool], SST2_LABELS, gold=[r["label"] for r in pool])
    gold = work / "gold.jsonl"
    gold.write_text("".join(json.dumps(r) + "\n" for r in _rows("test", 48)))
    student = build_tiny_classifier(work / "student-init", SST2_LABELS, minilm_path)
    return {"work": work, "labels": labels, "gold": str(gold), "student": str(student), "pool": pool}


def _overrides(workspace, *extra: str) -> list[str]:
    # ray_local has 2 CPUs: two half-CPU workers leave one for Ray Data's reader.
    base = [f"student.model={workspace['student']}", "training.cpus_per_worker=0.5", "training.batch_size=16"]
    return [item for pair in (("--set", o) for o in [*base, *extra]) for item in pair]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- before the trainer


def test_missing_labels_dir_fails_before_training(tmp_path, capsys):
    from llkd_ray.cli import main

    code = main(["train", "--config", CONFIG, "--labels", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    assert code == 2
    assert "labels directory not found" in capsys.readouterr().err
    assert not (tmp_path / "out" / "student").exists()


def test_empty_labels_dir_fails(tmp_path):
    from llkd_ray.errors import LlkdError
    from llkd_ray.train.data import validate_labels_dir

    (tmp_path / "labels").mkdir()
    with pytest.raises(LlkdError, match="empty"):
        validate_labels_dir(tmp_path / "labels", SST2_LABELS)
    # a part with the schema but no rows is empty too
    write_labels_dir(tmp_path / "zero", [], SST2_LABELS, parts=1)
    with pytest.raises(LlkdError, match="no rows"):
        validate_labels_dir(tmp_path / "zero", SST2_LABELS)


def test_label_set_differing_from_the_config_fails(tmp_path):
    from llkd_ray.errors import LlkdError
    from llkd_ray.train.data import validate_labels_dir

    write_labels_dir(tmp_path / "labels", ["a", "b", "c"], ["ABBR", "DESC"], parts=1)
    with pytest.raises(LlkdError, match=r"labeled with labels \['ABBR', 'DESC'\].*task.labels are \['negative'"):
        validate_labels_dir(tmp_path / "labels", SST2_LABELS)
    # same names, another order: the label indices would mean other classes
    write_labels_dir(tmp_path / "swapped", ["a", "b"], ["positive", "negative"], parts=1)
    with pytest.raises(LlkdError, match="labeled with labels"):
        validate_labels_dir(tmp_path / "swapped", SST2_LABELS)


def test_labels_without_the_trainer_columns_fail(tmp_path):
    import pyarrow as pa

    from llkd_ray.errors import LlkdError
    from llkd_ray.train.data import validate_labels_dir

    (tmp_path / "labels").mkdir()
    pq.write_table(pa.table({"id": ["1"], "text": ["x"]}), tmp_path / "labels" / "part-0.parquet")
    with pytest.raises(LlkdError, match="lacks column"):
        validate_labels_dir(tmp_path / "labels", SST2_LABELS)


def test_valid_labels_dir_counts_rows_from_footers(workspace):
    from llkd_ray.train.data import validate_labels_dir

    pool = validate_labels_dir(workspace["labels"], SST2_LABELS)
    assert pool.rows == 160 and len(pool.files) == 2


def test_plan_sizes():
    from llkd_ray.config import load_config
    from llkd_ray.train.plan import MAX_POOL_COPIES, TrainingPlan

    settings = ["training.batch_size=32", "training.workers=2", "training.epochs=2", "selection.candidates_per_step=4"]
    config = load_config(CONFIG, settings)
    plan = TrainingPlan.build(config, pool_rows=400)
    assert plan.steps_per_epoch == 12 and plan.total_steps == 24 and plan.warmup == 0.1
    assert plan.worker_rows == 16 and plan.worker_candidates == 64 and plan.scored
    assert plan.passes * 400 >= 24 * 32 * 4  # the candidate stream covers the budget
    capped = TrainingPlan.build(load_config(CONFIG, ["training.max_steps=5"]), pool_rows=400)
    assert capped.total_steps == 5
    # `all` has nothing to choose among: one candidate per trained row, no scoring pass
    everything = TrainingPlan.build(load_config(CONFIG, ["selection.strategy=all"]), pool_rows=400)
    assert everything.candidates_per_step == 1 and not everything.scored
    # a compute budget: the stream holds a few copies of the pool (it starts over past the last)
    budgeted = TrainingPlan.build(load_config(CONFIG, ["training.budget=2"]), pool_rows=400, pool_tokens=4000)
    assert budgeted.budget == 2 and budgeted.passes * 400 >= 3 * 2 * 400
    # ... and may draw past them (its step cap is generous): the stream then starts over
    assert budgeted.passes == MAX_POOL_COPIES and budgeted.cycles and not capped.cycles


def test_budget_and_max_steps_are_exclusive():
    from llkd_ray.config import load_config
    from llkd_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"training.budget .* give one of them"):
        load_config(CONFIG, ["training.budget=2", "training.max_steps=10"])


def test_batch_must_split_over_workers_and_accumulation():
    from llkd_ray.config import load_config
    from llkd_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        load_config(CONFIG, ["training.batch_size=32", "training.workers=2", "training.gradient_accumulation_steps=3"])


# --------------------------------------------------------------------------- on Ray Train


@pytest.mark.heavy
def test_llkd_train_two_workers_writes_a_loadable_student_metrics_and_an_mlflow_run(
    ray_local, workspace, tmp_path, capsys
):
    """``llkd train`` on 2 workers, tracked in an MLflow ``file:`` store (one Ray Train run serves
    both: each costs tens of seconds of start-up): rank 0 logs each step from inside the workers;
    the run, its params, metric histories with steps and the artifacts read back with MlflowClient."""
    import mlflow  # the tracking extra, installed with the test tools (`make test`)
    from transformers import pipeline

    from llkd_ray.cli import main

    out = workspace["work"] / "out-cli"
    store = (tmp_path / "mlruns").as_uri()
    tracked = ["tracking.backend=mlflow", f"tracking.uri={store}", "tracking.experiment=t"]
    args = [
        "train",
        "--config",
        CONFIG,
        "--labels",
        str(workspace["labels"]),
        "--output",
        str(out),
        "--workers",
        "2",
        "--max-steps",
        "6",
        "--eval",
        workspace["gold"],
    ]
    assert main(args + _overrides(workspace, *tracked)) == 0
    assert "trained llkd student: 6 steps on 2 workers" in capsys.readouterr().out

    classifier = pipeline("text-classification", model=str(out / "student"), device="cpu")
    predictions = classifier(["a wonderful film", "a boring mess"])
    assert {p["label"] for p in predictions} <= set(SST2_LABELS)
    # the student carries its training length (demo config: 64), not the base tokenizer's 128
    assert classifier.tokenizer.model_max_length == 64
    assert json.loads((out / "student" / "config.json").read_text())["llkd_max_length"] == 64

    records = _records(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for record in steps:
        assert set(record["teacher_thresholds"]) == set(SST2_LABELS) == set(record["student_thresholds"])
        assert 0.0 <= record["selected_fraction"] <= 1.0
        assert record["selected_fraction"] == pytest.approx(record["selected"] / record["candidates"])
        assert record["candidates"] == 16  # candidates_per_step 1 (the demo config): one global batch
        usage = record["data_usage"]
        assert 0.0 <= usage["pool_fraction"] <= 1.0 and usage["pool_rows"] == len(workspace["pool"])
        assert usage["pool_fraction"] == pytest.approx(usage["pool_rows_selected"] / usage["pool_rows"])
    evals = [r for r in records if r.get("kind") == "eval"]
    assert evals and evals[-1]["step"] == 6 and set(evals[-1]["per_class_f1"]) == set(SST2_LABELS)

    selected = pq.read_table(out / "selected_ids.parquet").to_pydict()
    pool_ids = set(pq.read_table(workspace["labels"], columns=["id"]).column("id").to_pylist())
    assert set(selected["id"]) <= pool_ids
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["strategy"] == "llkd" and summary["steps"] == 6 and summary["workers"] == 2
    assert summary["data_usage"]["pool_rows_selected"] == len(selected["id"])
    assert summary["data_usage"]["selected_sample_steps"] == sum(r["selected"] for r in steps)
    assert summary["final_metrics"]["n"] == 48 and summary["samples_per_s"] > 0
    assert len(summary["config_hash"]) == 16
    assert not (out / "ray").exists()  # the default Ray Train storage is removed after success

    assert main(["eval", "--model", str(out / "student"), "--data", workspace["gold"], "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 48 and set(metrics["per_class"]) == set(SST2_LABELS)

    client = mlflow.MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "train-llkd"
    assert run.data.params["selection.strategy"] == "llkd"
    assert run.data.params["training.batch_size"] == "16"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4, 5, 6]
    assert sorted(m.value for m in losses) == pytest.approx(sorted(r["loss"] for r in steps))
    thresholds = client.get_metric_history(run.info.run_id, "teacher_threshold/positive")
    assert {m.step for m in thresholds} == {1, 2, 3, 4, 5, 6}
    assert client.get_metric_history(run.info.run_id, "compute_flops")[-1].value > 0
    (final,) = [m for m in client.get_metric_history(run.info.run_id, "gold_macro_f1") if m.step == 6]
    assert final.value == pytest.approx(summary["final_metrics"]["macro_f1"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"training_summary.json", "metrics.jsonl", "student"} <= artifacts
    assert "config.json" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "student")}


@pytest.mark.heavy
def test_a_lost_worker_restores_the_latest_checkpoint_and_finishes(ray_local, workspace):
    from llkd_ray.config import load_config
    from llkd_ray.train.launch import train_student
    from llkd_ray.train.recipe import FaultInjection

    # A checkpoint counts once Ray Train's controller has taken its report (it polls about every
    # 2 s); ray.train.report blocks until the previous report was taken, so with a report every
    # step, the checkpoint of step 2 is registered by the time step 3's report returns.
    overrides = _overrides(
        workspace,
        "training.checkpoint_every=2",
        "training.report_every=1",
        "selection.candidates_per_step=2",
        "training.max_failures=1",
        "training.workers=2",
        "training.max_steps=6",
    )
    config = load_config(CONFIG, overrides[1::2])
    out = workspace["work"] / "out-resume"
    marker = workspace["work"] / "worker-lost"
    summary = train_student(
        config,
        labels=workspace["labels"],
        output=out,
        eval_data=None,
        fault_injection=FaultInjection(step=4, marker=str(marker), rank=1),
    )
    assert marker.is_file(), "the worker should have exited once"
    # lost right after step 4 (before its checkpoint): restored from step 2, not from scratch
    assert summary["attempts"] == 2 and summary["resumed_from_steps"] == [2]
    assert summary["steps"] == 6
    records = _records(out / "metrics.jsonl")
    resume = [r for r in records if r.get("kind") == "resume"]
    assert resume == [{"kind": "resume", "step": 2, "attempt": 1}]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # metrics after the checkpoint were rewound
    assert [r["attempt"] for r in steps] == [0, 0, 1, 1, 1, 1]
    assert all(r["candidates"] == 32 for r in steps)  # M = 2: two candidates per trained row
    assert (out / "student" / "config.json").is_file()


@pytest.mark.heavy
def test_one_seed_gives_one_run_on_one_worker_streamed_or_materialized(ray_local, workspace, monkeypatch):
    """The tokenising map's tasks finish in any order; the trainer asks Ray Data to keep the order
    (``preserve_order``), so one worker reads the same rows in the same order on every run (which a
    restored worker's skip, a count of batches, relies on). Eight parts make eight blocks per copy.
    The pool is small enough for the run to start its stream over: streamed lazily once, then
    materialized (what a small pool gets), the run is the same."""
    from llkd_ray.config import load_config
    from llkd_ray.train import data, launch
    from llkd_ray.train.plan import TrainingPlan

    texts = [r["text"] for r in workspace["pool"][:24]]
    labels = write_labels_dir(workspace["work"] / "labels-8-parts", texts, SST2_LABELS, parts=8, seed=3)
    overrides = _overrides(workspace, "selection.strategy=all", "training.cpus_per_worker=1", "training.workers=1")
    config = load_config(CONFIG, [*overrides[1::2], "training.max_steps=16"])
    plan = TrainingPlan.build(config, pool_rows=24)
    assert plan.cycles and plan.passes * 24 < 16 * 16  # 12 batches a stream, then it starts over
    built = []

    def build_dataset(*args, **kwargs):
        built.append(data.build_dataset(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(launch, "build_dataset", build_dataset)
    runs = []
    for attempt, limit in enumerate((0, data.MATERIALIZE_ROWS)):
        monkeypatch.setattr(data, "MATERIALIZE_ROWS", limit)
        out = workspace["work"] / f"out-order-{attempt}"
        launch.train_student(config, labels=labels, output=out, eval_data=None)
        steps = [r for r in _records(out / "metrics.jsonl") if "loss" in r]
        runs.append([(r["step_compute"]["training_tokens"], r["loss"]) for r in steps])
    assert [type(d).__name__ for d in built] == ["Dataset", "MaterializedDataset"]
    assert len(runs[0]) == 16 and len({tokens for tokens, _ in runs[0]}) > 1
    assert runs[0] == runs[1]
