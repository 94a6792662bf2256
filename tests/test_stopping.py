"""The label-free stop (``training.stop: auto``, ``llkd_ray/train/stopping.py``) on scripted churn, and
the learning-rate schedule's end once the stop is called (plain Python and torch, no Ray)."""

from __future__ import annotations

import pytest
import torch


def test_churn_rule_stops_after_the_window_below_the_threshold():
    from llkd_ray.train.stopping import ChurnStop

    rule = ChurnStop(threshold=0.02, window=2)
    script = [0.30, 0.10, 0.015, 0.05, 0.01, 0.019, 0.0]
    decisions = [rule.observe(c) for c in script]
    # 0.015 alone is not a window; 0.05 breaks it; 0.01 then 0.019 are two in a row below 0.02
    assert decisions == [False, False, False, False, False, True, True]


def test_a_dried_up_selection_is_quiet_too():
    from llkd_ray.train.stopping import ChurnStop

    rule = ChurnStop(threshold=0.02, window=2, selected_threshold=0.05)
    # (churn, selected fraction since the last check): the first check has no churn to compare
    script = [(None, 0.30), (0.20, 0.04), (0.30, 0.10), (0.15, 0.03), (0.01, 0.20)]
    assert [rule.observe(c, f) for c, f in script] == [False, False, False, False, True]
    assert rule.history == [False, True, False, True, True]
    never = ChurnStop(threshold=0.02, window=1)  # no selection bar (``all``: every row selected)
    assert not never.observe(0.5, 0.0) and not never.observe(None, None) and never.observe(0.0, None)


def test_probe_stopper_counts_the_selection_between_checks():
    from llkd_ray.train.stopping import ProbeStopper

    stopper = ProbeStopper(probe_rows=2, checks=4, threshold=0.0, window=2, decay=0.05, selected_threshold=0.05)
    first = stopper.observe([0, 1], [(0, 0)], progress=0.25, counts=(1000, 40))  # 4 % since the start
    second = stopper.observe([0, 1], [(0, 2)], progress=0.5, counts=(2000, 70))  # 30 of 1000: 3 %
    assert first["selected_fraction"] == pytest.approx(0.04) and "stop" not in first
    assert second["selected_fraction"] == pytest.approx(0.03) and second["stop"] and stopper.stopped_at == 0.5
    restored = ProbeStopper(2, 4, 0.0, 2, 0.05, 0.05)
    restored.load_state_dict(stopper.state_dict())
    assert restored.state_dict() == stopper.state_dict() and restored.counts == (2000, 70)


def test_probe_stopper_compares_the_same_rows_and_checks_on_schedule():
    from llkd_ray.train.stopping import ProbeStopper, churn, probe_size

    assert churn([0, 1, 1, 0], [0, 0, 1, 1]) == (2, 4)
    assert churn([], [1, 0]) == (0, 0)
    stopper = ProbeStopper(probe_rows=4, checks=4, threshold=0.3, window=1, decay=0.1)
    assert not stopper.due(0.2) and stopper.due(0.25)
    first = stopper.observe([0, 1, 1, 0], [(0, 0)], progress=0.26)  # nothing to compare yet
    assert "churn" not in first and stopper.stopped_at is None and not stopper.due(0.4)
    second = stopper.observe([0, 1, 1, 1], [(1, 4), (0, 4)], progress=0.5)  # 1 of 8 rows changed
    assert second["churn"] == pytest.approx(0.125) and second["stop"]
    assert stopper.stopped_at == 0.5 and stopper.end() == pytest.approx(0.6) and not stopper.due(0.75)
    assert probe_size(1500, 1) == 128 and probe_size(1500, 2) == 64 and probe_size(96, 1) == 12
    restored = ProbeStopper(4, 4, 0.3, 1, 0.1)
    restored.load_state_dict(stopper.state_dict())
    assert restored.state_dict() == stopper.state_dict()


def test_schedule_decays_to_zero_at_the_stop_end_and_stays_there():
    from llkd_ray.compute import ProgressSchedule

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = ProgressSchedule(warmup=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    lrs = []
    for progress in (0.05, 0.1, 0.4):
        schedule.progress = progress
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs == pytest.approx([0.5, 1.0, 2 / 3])  # warm-up, then the budgeted linear decay
    schedule.stop(at=0.4, end=0.5)
    for progress in (0.45, 0.5, 0.55):
        schedule.progress = progress
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs[3:] == pytest.approx([1 / 3, 0.0, 0.0])  # from its value at the stop to 0 at the end
    restored = ProgressSchedule(0.1)
    again = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model.parameters(), lr=1.0), restored)
    again.load_state_dict(scheduler.state_dict())
    assert restored.stop_at == 0.4 and restored.end == 0.5
