"""Across-shards equivalence with a real process group: 2 gloo workers with local batches b1, b2
against 1 worker with b1 + b2 — the same thresholds, masks, weights, and parameters after the step.

Both sides run ``llkd_ray.train.step.train_step`` (the function the Ray Train workers run), the
2-worker side under DistributedDataParallel, on a tiny random BERT without dropout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SST2_LABELS
from train_fixtures import review_batch

from llkd_ray.testing import build_tiny_classifier

#: Three spawned interpreters (torch, transformers and a gloo process group each): slow to start.
pytestmark = pytest.mark.heavy

#: (strategy, loss, weighting, candidates M): each scenario is one optimizer step from the same start.
SCENARIOS = [
    ("llkd", "hard", "confidence_uncertainty", 1),
    ("all", "soft", "none", 1),
    ("random", "hard", "none", 1),
    ("llkd", "hard", "confidence_uncertainty", 2),
]


def run_worker(rank: int, world: int, model_dir: str, store: str, out: str) -> None:
    """One optimizer step per scenario on this worker's rows; results to ``out``."""
    import torch.distributed as dist

    from llkd_ray.train.plan import scoring_mode
    from llkd_ray.train.recipe import build_optimizer, load_student
    from llkd_ray.train.selection import Selector
    from llkd_ray.train.step import StepContext, train_step

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows = list(range(8)) if world == 1 else list(range(rank * 4, rank * 4 + 4))
    results = []
    for strategy, loss, weighting, m in SCENARIOS:
        model, tokenizer = load_student(model_dir, SST2_LABELS, seed=0)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = build_optimizer(model, learning_rate=1e-3, weight_decay=0.01)
        selector = Selector(
            2,
            strategy=strategy,
            weighting=weighting,
            momentum=0.9,
            seed=1,
            all_reduce=dist.all_reduce if world > 1 else None,
            rank=rank,
            world_size=world,
        )
        # gated scoring with a sample of the rows outside the gate: the sample is keyed by row id
        ctx = StepContext(
            tokenizer=tokenizer,
            max_length=32,
            device=torch.device("cpu"),
            world_size=world,
            soft_loss=loss == "soft",
            selector=selector,
            sample_rate=0.5,
        )
        capacity = None if m == 1 else len(rows) // m
        candidates = review_batch(rows)
        if m > 1:
            # M candidates per kept row: this worker draws its rows twice over (second copy less confident)
            twice = review_batch(rows + rows)
            twice.confidence[len(rows) :] *= 0.5
            candidates = twice
            capacity = len(rows)
        scoring = scoring_mode(strategy)
        result = train_step(model, candidates, ctx, capacity=capacity, scoring=scoring)
        optimizer.step()
        module = model.module if world > 1 else model
        results.append(
            {
                "teacher_thresholds": result.selection.teacher_thresholds.tolist(),
                "student_thresholds": result.selection.student_thresholds.tolist(),
                "mask": result.selection.mask.tolist(),
                "weights": result.selection.weights.tolist(),
                "normaliser": result.selection.normaliser,
                "loss": result.loss,
                "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
            }
        )
    torch.save(results, out)
    if world > 1:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, minilm_path):
    import torch.multiprocessing as mp

    work = tmp_path_factory.mktemp("equivalence")
    model_dir = str(build_tiny_classifier(work / "tiny", SST2_LABELS, minilm_path))
    context = mp.get_context("spawn")
    processes = [
        context.Process(target=run_worker, args=(r, 2, model_dir, str(work / "store"), str(work / f"two-{r}.pt")))
        for r in range(2)
    ]
    processes.append(context.Process(target=run_worker, args=(0, 1, model_dir, "", str(work / "one.pt"))))
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
        assert process.exitcode == 0, f"worker exited with {process.exitcode}"
    load = lambda name: torch.load(work / name, weights_only=False)  # noqa: E731
    return load("two-0.pt"), load("two-1.pt"), load("one.pt"), model_dir


@pytest.mark.parametrize("index", range(len(SCENARIOS)), ids=["-".join(map(str, s)) for s in SCENARIOS])
def test_two_workers_equal_one_worker_with_both_batches(runs, index):
    two_a, two_b, one = (r[index] for r in runs[:3])
    for key in ("teacher_thresholds", "student_thresholds"):
        assert two_a[key] == two_b[key]
        assert two_a[key] == pytest.approx(one[key], abs=1e-12)
    assert two_a["normaliser"] == two_b["normaliser"] == one["normaliser"]
    m = SCENARIOS[index][3]
    if m == 1:
        assert two_a["mask"] + two_b["mask"] == one["mask"]
        assert two_a["weights"] + two_b["weights"] == pytest.approx(one["weights"], abs=1e-6)
    else:
        # candidates: each worker's rows twice; the 1-worker batch is b1 + b2 twice over, reordered
        order = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]
        assert two_a["mask"] + two_b["mask"] == [one["mask"][i] for i in order]
    assert sum(two_a["mask"]) + sum(two_b["mask"]) > 0, "the scenario should select something"
    assert two_a["loss"] + two_b["loss"] == pytest.approx(one["loss"], abs=1e-5)
    for name, value in one["params"].items():
        assert torch.equal(two_a["params"][name], two_b["params"][name]), name
        assert torch.allclose(two_a["params"][name], value, atol=1e-5, rtol=0), (
            name,
            float((two_a["params"][name] - value).abs().max()),
        )


def test_the_step_moves_the_parameters(runs):
    from safetensors.torch import load_file

    start = load_file(str(Path(runs[3]) / "model.safetensors"))
    moved = runs[2][0]["params"]
    changed = [k for k in start if k in moved and not torch.equal(start[k], moved[k])]
    assert "classifier.weight" in changed and len(changed) > 10
