"""Score reuse (``selection.score_ttl``, ``llkd_ray/train/scores.py``) on a tiny BERT without dropout:
TTL 0 is today's step bit for bit; a reused score costs 0 FLOPs and, when the model did not change,
gives the mask and weights a fresh score gives; a selected row's training forward re-scores it
(plain torch, no Ray)."""

from __future__ import annotations

import pytest
import torch
from conftest import SST2_LABELS
from train_fixtures import fresh_ctx, fresh_selector, review_batch, student_without_dropout


@pytest.fixture()
def student(tiny_classifier_dir):
    """The tiny student and a step context; each step below takes ``fresh_ctx(ctx, ...)``."""
    from llkd_ray.train.step import StepContext

    model, tokenizer = student_without_dropout(tiny_classifier_dir, SST2_LABELS)
    return model, StepContext(tokenizer=tokenizer, max_length=32, device=torch.device("cpu"), selector=fresh_selector())


def _gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("scoring", ["full", "gated"])
def test_ttl_zero_is_todays_step_bit_for_bit(student, scoring):
    from llkd_ray.train.scores import ScoreStore
    from llkd_ray.train.step import train_step

    model, ctx = student
    today = train_step(model, review_batch(), fresh_ctx(ctx, sample_rate=0.5), scoring=scoring)
    today_grads = _gradients(model)
    store = ScoreStore(ttl=0)
    off = train_step(model, review_batch(), fresh_ctx(ctx, sample_rate=0.5, scores=store), scoring=scoring)
    off_grads = _gradients(model)
    assert off.selection.mask.tolist() == today.selection.mask.tolist()
    assert torch.equal(off.selection.weights, today.selection.weights)
    assert torch.equal(off.selection.student_thresholds, today.selection.student_thresholds)
    assert off.compute.scoring_tokens == today.compute.scoring_tokens and off.compute.reused_samples == 0
    assert off_grads.keys() == today_grads.keys()
    assert all(torch.equal(off_grads[k], today_grads[k]) for k in today_grads)
    assert store.take_pending() == [] and store.scores == {}


@pytest.mark.parametrize("scoring", ["full", "gated"])
def test_a_reused_score_costs_nothing_and_changes_no_mask(student, scoring):
    from llkd_ray.train.scores import ScoreStore
    from llkd_ray.train.step import train_step

    model, ctx = student
    store = ScoreStore(ttl=10)
    first = train_step(model, review_batch(), fresh_ctx(ctx, sample_rate=0.5, scores=store), scoring=scoring)
    first_grads = _gradients(model)
    pending = store.take_pending()
    assert first.compute.scored_samples > 0 and first.compute.trained_samples > 0
    assert len(pending) == first.compute.scored_samples + first.compute.trained_samples
    # The training forward re-scores each selected row (no dropout here: the same u as its scoring).
    scored = {row_id: need for row_id, need, _ in pending[: first.compute.scored_samples]}
    for row_id, need, _ in pending[first.compute.scored_samples :]:
        assert row_id in first.selected_ids and need == pytest.approx(scored[row_id], abs=1e-5)
    store.commit(pending)  # keep every score: the model has not changed
    again = train_step(model, review_batch(), fresh_ctx(ctx, sample_rate=0.5, scores=store), scoring=scoring)
    again_grads = _gradients(model)
    assert again.compute.scoring_tokens == 0 and again.compute.scored_samples == 0
    assert again.compute.reused_samples == first.compute.scored_samples
    assert again.selection.mask.tolist() == first.selection.mask.tolist()
    assert torch.equal(again.selection.weights, first.selection.weights)
    assert all(torch.equal(again_grads[k], first_grads[k]) for k in first_grads)


def test_store_keeps_the_latest_score_ages_out_and_round_trips():
    from llkd_ray.train.scores import ScoreStore

    store = ScoreStore(ttl=3)
    store.record(["a", "b", "c"], torch.tensor([0.1, 0.2, 0.3]), clock=5)  # the scoring forward
    store.record(["b"], torch.tensor([0.25]), clock=6)  # b's training forward, recorded after
    store.commit(store.take_pending())
    fresh = store.lookup(["a", "b", "c", "d"], clock=7)
    assert fresh[:3].tolist() == pytest.approx([0.1, 0.25, 0.3]) and torch.isnan(fresh[3])
    assert torch.isnan(store.lookup(["a"], clock=8)).all()  # age 3 is not younger than the TTL
    assert store.lookup(["b"], clock=8)[0].item() == pytest.approx(0.25)  # b's score is a tick younger
    restored = ScoreStore(ttl=3)
    restored.load_state_dict(store.state_dict())
    assert restored.scores == store.scores
    assert torch.isnan(ScoreStore(ttl=0).lookup(["a"], clock=0)).all()


def test_plan_turns_the_ttl_in_passes_into_selector_steps():
    from pathlib import Path

    from llkd_ray.config import load_config
    from llkd_ray.train.plan import TrainingPlan

    config = str(Path(__file__).resolve().parents[1] / "llkd_ray" / "configs" / "demo.yaml")
    base = ["training.batch_size=32", "selection.score_ttl=2", "selection.anneal_fraction=0.1"]
    plan = TrainingPlan.build(load_config(config, base), pool_rows=1600)
    assert plan.score_ttl == 2 * 1600 / 32 and plan.anneal == 0.1  # a pass is 50 draws of 32 candidates
    pooled = TrainingPlan.build(load_config(config, [*base, "selection.candidates_per_step=4"]), pool_rows=1600)
    assert pooled.score_ttl == 2 * 1600 / (32 * 4)  # M = 4: a draw is 4 batches of candidates
    filled = ["selection.candidates_per_step=4", "selection.fill_batch=true"]
    assert TrainingPlan.build(load_config(config, [*base, *filled]), pool_rows=1600).score_ttl == 100
    everything = TrainingPlan.build(load_config(config, [*base, "selection.strategy=all"]), pool_rows=1600)
    assert everything.score_ttl == 0 and everything.anneal == 0  # `all` scores nothing and has no gate
