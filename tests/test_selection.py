"""The LLKD selection rule on hand-computed cases (docs/method.md), no Ray, no process group."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from llkd_ray.train.selection import STRATEGIES, Selector, normalized_entropy, selection_loss


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# Batch 1 (K = 2): T = 0.75, T[0] = 0.8, T[1] = 0.7; S = 0.575, S[0] = 0.7, S[1] = 0.45.
C1, Y1, U1 = t([0.9, 0.7, 0.6, 0.8]), torch.tensor([0, 0, 1, 1]), t([0.6, 0.8, 0.5, 0.4])


def test_first_step_sets_every_level_to_the_batch_statistic():
    selector = Selector(2, momentum=0.99)
    result = selector.select(C1, Y1, U1)
    assert float(selector.teacher_level) == pytest.approx(0.75)
    assert selector.teacher_class.tolist() == pytest.approx([0.8, 0.7])
    assert float(selector.student_level) == pytest.approx(0.575)
    assert selector.student_class.tolist() == pytest.approx([0.7, 0.45])
    # tau[k] = level * level[k] / max_j level[j]: per-class normalisation by the largest class level
    assert result.teacher_thresholds.tolist() == pytest.approx([0.75, 0.75 * 0.7 / 0.8])
    assert result.student_thresholds.tolist() == pytest.approx([0.575, 0.575 * 0.45 / 0.7])


def test_llkd_mask_weights_and_normaliser():
    result = Selector(2).select(C1, Y1, U1)
    # teacher: 0.9 >= .75, 0.7 < .75, 0.6 < .65625, 0.8 >= .65625; student: all above their bars
    assert result.mask.tolist() == [True, False, False, True]
    cu = [0.9 * 0.6, 0.8 * 0.4]
    mean = sum(cu) / 2
    assert result.weights.tolist() == pytest.approx([cu[0] / mean, 0.0, 0.0, cu[1] / mean])
    assert float(result.weights[result.mask].mean()) == pytest.approx(1.0)
    assert result.normaliser == 2.0
    assert result.selected == 2 and result.candidates == 4
    assert result.confidence_selected == pytest.approx(0.85)
    assert result.confidence_rejected == pytest.approx(0.65)


def test_ema_update_and_absent_class_keeps_its_level():
    selector = Selector(2, momentum=0.5)
    selector.select(C1, Y1, U1)
    # batch 2: only class 1 (class 0 absent): c = [0.5, 0.9], u = [0.2, 0.4]
    result = selector.select(t([0.5, 0.9]), torch.tensor([1, 1]), t([0.2, 0.4]))
    assert float(selector.teacher_level) == pytest.approx(0.5 * 0.75 + 0.5 * 0.7)
    assert selector.teacher_class.tolist() == pytest.approx([0.8, 0.7])  # class 0 untouched, class 1 0.5*.7+.5*.7
    assert float(selector.student_level) == pytest.approx(0.5 * 0.575 + 0.5 * 0.3)
    assert selector.student_class.tolist() == pytest.approx([0.7, 0.5 * 0.45 + 0.5 * 0.3])
    assert result.teacher_thresholds.tolist() == pytest.approx([0.725, 0.725 * 0.7 / 0.8])
    assert result.student_thresholds.tolist() == pytest.approx([0.4375, 0.4375 * 0.375 / 0.7])


def test_a_class_not_yet_seen_takes_the_global_level_then_its_ema_starts_there():
    selector = Selector(3, momentum=0.5)
    selector.select(t([0.8, 0.6]), torch.tensor([0, 1]), t([0.4, 0.2]))
    assert selector.teacher_class.tolist() == pytest.approx([0.8, 0.6, 0.7])
    assert selector.seen.tolist() == [True, True, False]
    # still unseen: follows the global level
    selector.select(t([0.5]), torch.tensor([0]), t([0.1]))
    assert float(selector.teacher_level) == pytest.approx(0.6)
    assert selector.teacher_class.tolist() == pytest.approx([0.65, 0.6, 0.6])
    # first seen now: EMA from the previous global level (0.6), not re-initialised
    selector.select(t([0.9]), torch.tensor([2]), t([0.5]))
    assert selector.teacher_class.tolist() == pytest.approx([0.65, 0.6, 0.5 * 0.6 + 0.5 * 0.9])
    assert selector.seen.tolist() == [True, True, True]


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("llkd", [True, False, False, True]),
        ("all", [True, True, True, True]),
        ("teacher_confidence", [True, False, False, True]),
        ("student_uncertainty", [True, True, True, True]),
    ],
)
def test_every_baseline_mask_and_unit_weights(strategy, expected):
    result = Selector(2, strategy=strategy).select(C1, Y1, U1)
    assert result.mask.tolist() == expected
    if strategy != "llkd":
        assert result.weights.tolist() == [1.0 if m else 0.0 for m in expected]
    assert result.normaliser == max(1, sum(expected))


def test_baseline_masks_on_a_batch_where_they_differ():
    c, y, u = t([0.9, 0.9, 0.5, 0.5]), torch.tensor([0, 0, 0, 0]), t([0.9, 0.1, 0.9, 0.1])
    masks = {s: Selector(2, strategy=s).select(c, y, u).mask.tolist() for s in STRATEGIES if s != "random"}
    # T = 0.7, S = 0.5 (one class present, class 1 at the global level: tau = level)
    assert masks["llkd"] == [True, False, False, False]
    assert masks["teacher_confidence"] == [True, True, False, False]
    assert masks["student_uncertainty"] == [True, False, True, False]
    assert masks["all"] == [True, True, True, True]


def test_random_is_budget_matched_to_llkd():
    torch.manual_seed(0)
    c, u = torch.rand(64), torch.rand(64)
    y = torch.randint(0, 3, (64,))
    for step in range(5):
        llkd = Selector(3, strategy="llkd", seed=7)
        rand = Selector(3, strategy="random", seed=7)
        for _ in range(step):
            llkd.select(c, y, u)
            rand.select(c, y, u)
        expected = llkd.select(c, y, u).selected
        result = rand.select(c, y, u)
        assert result.selected == int(result.mask.sum()) == expected
        assert result.weights[result.mask].tolist() == [1.0] * expected


def test_weighting_none_gives_unit_weights():
    result = Selector(2, weighting="none").select(C1, Y1, U1)
    assert result.weights.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_weights_have_mean_one_over_the_selected():
    generator = torch.Generator().manual_seed(1)
    selector = Selector(4, momentum=0.9)
    for _ in range(20):
        c, u = torch.rand(32, generator=generator), torch.rand(32, generator=generator)
        y = torch.randint(0, 4, (32,), generator=generator)
        result = selector.select(c, y, u)
        if result.selected:
            assert float(result.weights[result.mask].mean()) == pytest.approx(1.0, abs=1e-6)
        assert (result.weights[~result.mask] == 0).all()


def test_candidate_pool_capacity_keeps_the_first_selected_and_renormalises():
    result = Selector(2, strategy="all").select(C1, Y1, U1, capacity=3)
    assert result.mask.tolist() == [True, True, True, False]
    assert result.selected == 3 and result.normaliser == 3
    llkd = Selector(2).select(C1, Y1, U1, capacity=1)
    assert llkd.mask.tolist() == [True, False, False, False]
    assert llkd.weights.tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])  # mean over the kept one


def test_nothing_selected_gives_zero_weights_and_normaliser_one():
    selector = Selector(2, strategy="llkd")
    # every row has the same confidence: tauT = T; but u below the bar for all but... make u equal too
    result = selector.select(t([0.5, 0.5]), torch.tensor([0, 1]), t([0.5, 0.5]))
    assert result.selected == 2  # ties pass (>=)
    result = Selector(2, strategy="llkd").select(t([0.9, 0.1]), torch.tensor([0, 0]), t([0.1, 0.9]))
    assert result.selected == 0 and result.normaliser == 1.0
    assert result.weights.tolist() == [0.0, 0.0]
    assert math.isnan(result.confidence_selected)


def test_state_dict_round_trip():
    first = Selector(2, momentum=0.9)
    first.select(C1, Y1, U1)
    second = Selector(2, momentum=0.9)
    second.load_state_dict(first.state_dict())
    a = first.select(t([0.3, 0.95]), torch.tensor([1, 0]), t([0.9, 0.2]))
    b = second.select(t([0.3, 0.95]), torch.tensor([1, 0]), t([0.9, 0.2]))
    assert a.teacher_thresholds.tolist() == b.teacher_thresholds.tolist()
    assert a.mask.tolist() == b.mask.tolist()


def test_normalized_entropy():
    assert normalized_entropy(torch.zeros(2, 4)).tolist() == pytest.approx([1.0, 1.0])
    assert float(normalized_entropy(torch.tensor([[30.0, 0.0, 0.0]]))[0]) == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([0.8, 0.2])
    expected = float(-(p * p.log()).sum() / math.log(2))
    assert float(normalized_entropy(p.log().unsqueeze(0))[0]) == pytest.approx(expected, rel=1e-5)


def test_loss_uses_the_global_normaliser_and_world_size():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    weights = torch.tensor([1.5, 0.5, 0.0])
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    expected = float((weights * ce).sum() / 4 * 2)
    assert float(selection_loss(logits, weights, 4.0, labels=labels, world_size=2)) == pytest.approx(expected)
    # soft: cross-entropy to the teacher distribution
    q = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])
    soft = -(q * torch.log_softmax(logits, -1)).sum(-1)
    expected_soft = float((weights * soft).sum() / 2)
    assert float(selection_loss(logits, weights, 2.0, teacher_probs=q)) == pytest.approx(expected_soft)


# --------------------------------------------------------------------------- across shards, in threads


class ThreadAllReduce:
    """A SUM all-reduce between threads: each shard's tensor is replaced by the sum of all."""

    def __init__(self, world: int) -> None:
        self.world = world
        # A timeout: a shard that never arrives breaks the barrier (BrokenBarrierError) instead of hanging.
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * world

    def for_rank(self, rank: int):
        def all_reduce(tensor: torch.Tensor) -> None:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.slots)  # type: ignore[arg-type]
            self.barrier.wait()
            tensor.copy_(total)

        return all_reduce


def _run_shards(strategy: str, shards: list[tuple[torch.Tensor, ...]], steps: int, capacity=None):
    reduce = ThreadAllReduce(len(shards))
    outputs: list[list] = [[] for _ in shards]
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        try:
            run(rank)
        except BaseException as error:  # re-raised in the test's thread below
            errors.append(error)
            reduce.barrier.abort()  # the other shards stop waiting at once

    def run(rank: int) -> None:
        selector = Selector(
            3,
            strategy=strategy,
            momentum=0.9,
            seed=3,
            all_reduce=reduce.for_rank(rank),
            rank=rank,
            world_size=len(shards),
        )
        c, y, u = shards[rank]
        for step in range(steps):
            outputs[rank].append(selector.select(c * (1 - 0.05 * step), y, u, capacity=capacity))

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(len(shards))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a shard is still running after 60 s"
    if errors:
        raise errors[0]
    return outputs


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_shards_equal_one_shard_with_the_concatenated_batch(strategy):
    generator = torch.Generator().manual_seed(5)
    c, u = torch.rand(24, generator=generator), torch.rand(24, generator=generator)
    y = torch.randint(0, 3, (24,), generator=generator)
    shards = [(c[:12], y[:12], u[:12]), (c[12:], y[12:], u[12:])]
    two = _run_shards(strategy, shards, steps=3)
    one = _run_shards(strategy, [(c, y, u)], steps=3)[0]
    for step in range(3):
        a, b = two[0][step], two[1][step]
        assert torch.equal(a.teacher_thresholds, b.teacher_thresholds)
        assert torch.equal(a.teacher_thresholds, one[step].teacher_thresholds)
        assert torch.equal(a.student_thresholds, one[step].student_thresholds)
        assert torch.cat([a.mask, b.mask]).tolist() == one[step].mask.tolist()
        assert torch.allclose(torch.cat([a.weights, b.weights]), one[step].weights, atol=1e-6)
        assert a.normaliser == b.normaliser == one[step].normaliser


def test_shards_keep_at_most_their_capacity():
    generator = torch.Generator().manual_seed(2)
    c, u = torch.rand(16, generator=generator), torch.rand(16, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)
    two = _run_shards("all", [(c[:8], y[:8], u[:8]), (c[8:], y[8:], u[8:])], steps=1, capacity=2)
    assert [int(r[0].mask.sum()) for r in two] == [2, 2]
    assert two[0][0].selected == 4 and two[0][0].candidates == 16


def test_teacher_gate_is_the_teacher_half_of_the_mask_select_then_applies():
    selector = Selector(3, momentum=0.9)
    c = torch.tensor([0.9, 0.4, 0.8, 0.3, 0.7, 0.6])
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    selector.select(c, y, torch.rand(6, generator=torch.Generator().manual_seed(0)))
    c2 = torch.tensor([0.95, 0.5, 0.2, 0.85, 0.65, 0.1])
    before = selector.state_dict()
    gate = selector.teacher_gate(c2, y)
    for key, value in selector.state_dict().items():  # the preview stores nothing
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(before[key])), key
    selection = selector.select(c2, y, torch.rand(6, generator=torch.Generator().manual_seed(1)))
    assert gate.tolist() == (c2.double() >= selection.teacher_thresholds[y]).tolist()


def test_unscored_rows_take_the_mean_of_their_class_sampled_rows():
    from llkd_ray.train.selection import scoring_sample

    nan = math.nan
    u = torch.tensor([0.1, nan, 0.5, nan, 0.3, nan, nan])
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    sampled = torch.tensor([False, False, True, False, True, False, False])
    filled = Selector(3).fill_unscored(u, y, sampled)
    # class 0: its sampled row (0.5), not its gate row (0.1); class 1: 0.3; class 2 has none: the pooled 0.4
    assert filled.tolist() == pytest.approx([0.1, 0.5, 0.5, 0.3, 0.3, 0.4, 0.4])
    # nothing sampled at all: the mean of the scored rows
    assert Selector(3).fill_unscored(u, y, torch.zeros(7, dtype=torch.bool))[1] == pytest.approx(0.3)
    # the same rows are sampled whatever the order (and hence the sharding) of the batch
    ids = [f"row-{i}" for i in range(64)]
    assert scoring_sample(ids[::-1], 0.25, 3, 7).tolist() == scoring_sample(ids, 0.25, 3, 7).tolist()[::-1]
    assert 5 < int(scoring_sample(ids, 0.25, 3, 7).sum()) < 30


def test_filling_is_the_same_on_two_shards_as_on_one():
    generator = torch.Generator().manual_seed(4)
    u = torch.rand(24, generator=generator)
    y = torch.randint(0, 3, (24,), generator=generator)
    sampled = torch.rand(24, generator=generator) < 0.3
    gate = torch.rand(24, generator=generator) < 0.5
    u = torch.where(gate | sampled, u, torch.tensor(math.nan))
    reduce = ThreadAllReduce(2)
    out: list = [None, None]

    def worker(rank: int) -> None:
        part = slice(12 * rank, 12 * rank + 12)
        selector = Selector(3, all_reduce=reduce.for_rank(rank), rank=rank, world_size=2)
        out[rank] = selector.fill_unscored(u[part], y[part], sampled[part])

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert torch.allclose(torch.cat(out), Selector(3).fill_unscored(u, y, sampled))


def test_estimated_levels_select_as_often_as_the_full_rule():
    """Simulated batches (6 skewed classes): filling the unscored rows keeps the selection rate of
    scoring every row; inverse-probability weights (the first design) inflated it by about 20%."""
    from llkd_ray.train.selection import scoring_sample

    def selected_fraction(rate: float | None) -> float:
        generator = torch.Generator().manual_seed(0)
        selector, kept, seen = Selector(6, momentum=0.9), 0, 0
        for step in range(300):
            y = torch.multinomial(torch.tensor([0.3, 0.25, 0.2, 0.15, 0.07, 0.03]), 32, True, generator=generator)
            c = torch.rand(32, generator=generator) * 0.6 + 0.3
            u = torch.rand(32, generator=generator) ** 2 * (0.3 + 0.02 * y) + 0.3 * (1 - c)
            if rate is not None:
                gate = selector.teacher_gate(c, y)
                ids = [f"{step}-{i}" for i in range(32)]
                sampled = ~gate & scoring_sample(ids, rate, 0, selector.steps)
                u = selector.fill_unscored(torch.where(gate | sampled, u, torch.tensor(math.nan)), y, sampled)
            selection = selector.select(c, y, u)
            if step >= 50:
                kept, seen = kept + selection.selected, seen + 32
        return kept / seen

    full = selected_fraction(None)
    assert selected_fraction(0.25) == pytest.approx(full, rel=0.06)
    assert selected_fraction(1.0) == pytest.approx(full, abs=1e-12)


def test_annealing_drops_the_student_gate_with_unit_weights():
    # selection.anneal_fraction's end phase: llkd keeps what the teacher passes, weight 1, u unused
    annealed = Selector(2)
    annealed.annealing = True
    result = annealed.select(C1, Y1, torch.full((4,), math.nan))
    reference = Selector(2, strategy="teacher_confidence").select(C1, Y1, torch.full((4,), math.nan))
    assert result.mask.tolist() == reference.mask.tolist() == [True, False, False, True]
    assert result.weights.tolist() == [1.0, 0.0, 0.0, 1.0]
