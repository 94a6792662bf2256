"""Compute accounting against a hand count, the progress schedule, and the cheap selection paths:
the selected-only backward (scored in inference mode) and micro-batched steps give the gradient of
the weighted full-batch loss, on a tiny BERT without dropout (plain torch, no Ray)."""

from __future__ import annotations

import pytest
import torch
from conftest import SST2_LABELS
from train_fixtures import TEXTS, fresh_ctx, fresh_selector, review_batch, student_without_dropout


@pytest.fixture()
def student(tiny_classifier_dir):
    """The tiny student, its tokenizer and a step context; each step below takes ``fresh_ctx(ctx)``."""
    from llkd_ray.train.step import StepContext

    model, tokenizer = student_without_dropout(tiny_classifier_dir, SST2_LABELS)
    ctx = StepContext(tokenizer=tokenizer, max_length=32, device=torch.device("cpu"), selector=fresh_selector())
    return model, tokenizer, ctx


def _gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_non_embedding_parameters_match_a_hand_count(student):
    from llkd_ray.compute import non_embedding_parameters

    model, _, _ = student
    h, inner, layers, k = 32, 64, 2, 2  # the tiny BERT of conftest
    per_layer = 4 * (h * h + h) + 2 * h + (h * inner + inner) + (inner * h + h) + 2 * h
    expected = layers * per_layer + 2 * h + (h * h + h) + (h * k + k)  # + embedding LayerNorm, pooler, head
    assert non_embedding_parameters(model) == expected


def test_step_compute_matches_tokens_times_parameters(student):
    from llkd_ray.compute import ComputeMeter, non_embedding_parameters
    from llkd_ray.train.step import train_step

    model, tokenizer, ctx = student
    batch = review_batch()
    real_tokens = [len(ids) for ids in tokenizer(TEXTS, truncation=True, max_length=32)["input_ids"]]
    result = train_step(model, batch, fresh_ctx(ctx), capacity=len(batch))
    kept = result.selection.mask.nonzero().squeeze(1).tolist()
    assert kept, "the scenario should select something"
    assert result.compute.scoring_tokens == sum(real_tokens)  # every candidate scored, padding excluded
    assert result.compute.training_tokens == sum(real_tokens[i] for i in kept)  # only the kept trained
    assert result.compute.scored_samples == 8 and result.compute.trained_samples == len(kept)

    meter = ComputeMeter(parameters=non_embedding_parameters(model))
    meter.add(result.compute)
    n = meter.parameters
    assert meter.scoring_flops == 2 * n * sum(real_tokens)
    assert meter.training_flops == 6 * n * sum(real_tokens[i] for i in kept)
    assert meter.record(unit_flops=meter.flops)["all_passes"] == pytest.approx(1.0)

    # `all` scores nothing: it trains every row once, 6N per token
    everything = train_step(model, batch, fresh_ctx(ctx, "all"), scoring="train")
    assert everything.compute.scoring_tokens == 0 and everything.compute.training_tokens == sum(real_tokens)


def test_selected_only_backward_equals_the_weighted_full_batch_backward(student):
    from llkd_ray.train.selection import normalized_entropy, selection_loss
    from llkd_ray.train.step import train_step

    model, _, ctx = student
    batch = review_batch()

    # the paper's M = 1 step as it was: one training forward over the whole batch, weight 0 off the mask
    reference_selector = fresh_selector()
    logits = model(**ctx.encode(batch)).logits
    selection = reference_selector.select(batch.confidence, batch.labels, normalized_entropy(logits))
    selection_loss(logits, selection.weights, selection.normaliser, labels=batch.labels).backward()
    full = _gradients(model)

    result = train_step(model, batch, fresh_ctx(ctx))  # inference-mode scoring, kept rows only
    cheap = _gradients(model)
    assert result.selection.mask.tolist() == selection.mask.tolist()
    assert 0 < result.compute.trained_samples < len(batch)
    assert full.keys() == cheap.keys()
    for name in full:
        assert torch.allclose(full[name], cheap[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("strategy", ["llkd", "all"])
def test_micro_batches_give_the_one_batch_gradient(student, strategy):
    from llkd_ray.train.plan import scoring_mode
    from llkd_ray.train.step import train_step

    model, _, ctx = student
    scoring = scoring_mode(strategy)
    one = train_step(model, review_batch(), fresh_ctx(ctx, strategy, sample_rate=0.5), scoring=scoring)
    whole = _gradients(model)
    four = train_step(
        model, review_batch(), fresh_ctx(ctx, strategy, sample_rate=0.5, micro_batches=4), scoring=scoring
    )
    split = _gradients(model)
    # one selection per optimizer step, whatever the accumulation: the same mask and normaliser
    assert one.selection.mask.tolist() == four.selection.mask.tolist()
    assert one.selection.normaliser == four.selection.normaliser
    assert one.loss == pytest.approx(four.loss, abs=1e-6)
    for name in whole:
        assert torch.allclose(whole[name], split[name], atol=1e-6, rtol=1e-4), name


def test_gated_scoring_scores_the_teacher_gate_and_a_sample(student):
    from llkd_ray.train.step import train_step

    model, tokenizer, ctx = student
    batch = review_batch()
    real_tokens = [len(ids) for ids in tokenizer(TEXTS, truncation=True, max_length=32)["input_ids"]]
    full = train_step(model, batch, fresh_ctx(ctx), scoring="full")
    _gradients(model)
    # rate 1: every row outside the gate is sampled with weight 1 — exactly the full rule
    exact = train_step(model, batch, fresh_ctx(ctx, sample_rate=1.0), scoring="gated")
    _gradients(model)
    assert exact.selection.mask.tolist() == full.selection.mask.tolist()
    assert torch.equal(exact.selection.student_thresholds, full.selection.student_thresholds)

    gate = fresh_selector().teacher_gate(batch.confidence, batch.labels)
    assert 0 < int(gate.sum()) < len(batch), "the scenario should gate some rows out"
    cheap = train_step(model, batch, fresh_ctx(ctx, sample_rate=1e-9), scoring="gated")  # gate only
    _gradients(model)
    assert cheap.compute.scored_samples == int(gate.sum())
    assert cheap.compute.scoring_tokens == sum(t for t, g in zip(real_tokens, gate.tolist(), strict=True) if g)
    assert torch.equal(cheap.selection.teacher_thresholds, full.selection.teacher_thresholds)
    assert not (cheap.selection.mask & ~gate).any()  # nothing outside the gate is ever kept

    # teacher_confidence's mask reads the teacher only: it scores nothing
    tc = train_step(model, batch, fresh_ctx(ctx, "teacher_confidence"), scoring="none")
    reference = train_step(model, batch, fresh_ctx(ctx, "teacher_confidence"), scoring="full")
    assert tc.compute.scoring_tokens == 0 and tc.compute.scored_samples == 0
    assert tc.selection.mask.tolist() == reference.selection.mask.tolist() == gate.tolist()


def test_progress_schedule_warms_up_then_decays_to_zero():
    from llkd_ray.compute import ProgressSchedule

    schedule = ProgressSchedule(warmup=0.1)
    values = []
    for progress in (0.0, 0.05, 0.1, 0.55, 1.0, 1.3):
        schedule.progress = progress
        values.append(schedule(0))
    assert values == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0, 0.0])
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    schedule.progress = 0.55
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    # the progress travels with the scheduler's state (a restored run resumes its schedule)
    restored = ProgressSchedule(warmup=0.1)
    torch.optim.lr_scheduler.LambdaLR(optimizer, restored).load_state_dict(scheduler.state_dict())
    assert restored.progress == 0.55


def test_fill_step_draws_until_the_kept_rows_fill_a_batch(student):
    from llkd_ray.train.step import fill_step, train_step

    model, _, ctx = student
    draws = []

    def draw():
        draws.append(1)
        return review_batch()

    # one draw, capped at one: the same selection and gradient as the fixed-M step
    one = fill_step(model, draw, fresh_ctx(ctx), capacity=8, target=8, max_draws=1)
    filled = _gradients(model)
    fixed = train_step(model, review_batch(), fresh_ctx(ctx), capacity=8)
    assert one.selection.mask.tolist() == fixed.selection.mask.tolist()
    for name, grad in _gradients(model).items():
        assert torch.allclose(grad, filled[name], atol=1e-6, rtol=1e-4), name

    # a target of a full batch the first draw does not reach: more draws, up to the cap
    draws.clear()
    result = fill_step(model, draw, fresh_ctx(ctx), capacity=8, target=8, max_draws=3)
    _gradients(model)
    assert len(draws) == 3 and result.selection.candidates == 24 and result.compute.scored_samples == 24
    assert result.selection.selected == result.compute.trained_samples <= 8
    assert result.selection.normaliser == max(1, result.selection.selected)
    assert len(result.selected_ids) == result.selection.selected

    # a target the first draw reaches: it stops there
    draws.clear()
    early = fill_step(model, draw, fresh_ctx(ctx), capacity=8, target=1, max_draws=3)
    assert len(draws) == 1 and early.selection.selected >= 1
