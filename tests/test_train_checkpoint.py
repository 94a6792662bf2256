"""The training state file is read with ``torch.load(weights_only=True)``: the recipe's real payload
loads, and a pickle that would run code is refused before it runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llkd_ray.compute import ComputeMeter, ProgressSchedule
from llkd_ray.train.checkpoint import STATE_FILE, CheckpointError, TrainState, read_state, state_payload, write_state
from llkd_ray.train.recipe import build_optimizer
from llkd_ray.train.selection import Selector


def _payload(final: bool) -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    optimizer = build_optimizer(model, 1e-3, 0.01)
    schedule = ProgressSchedule(0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    schedule.progress = 0.4
    scheduler.step()
    selector = Selector(2, strategy="llkd")
    state = TrainState(step=3, curve=[{"step": 3, "macro_f1": 0.5, "per_class_f1": {"a": 0.5}}], last_loss=0.7)
    compute = ComputeMeter(parameters=10)
    if final:
        return state_payload(state, compute, selector.state_dict())
    return state_payload(state, compute, selector.state_dict(), optimizer.state_dict(), scheduler.state_dict())


@pytest.mark.parametrize("final", [False, True])
def test_the_recipes_state_loads_with_weights_only(tmp_path, final):
    write_state(tmp_path, _payload(final))
    saved = read_state(tmp_path)
    assert saved["final"] is final
    assert TrainState(**saved["state"]).curve[0]["per_class_f1"] == {"a": 0.5}
    assert ComputeMeter(**saved["compute"]).parameters == 10
    Selector(2, strategy="llkd").load_state_dict(saved["selector"])
    assert ("optimizer" in saved) is not final
    if not final:
        assert saved["scheduler"]["lr_lambdas"][0]["progress"] == pytest.approx(0.4)


class _WritesAMarker:
    """Unpickling this calls ``os.makedirs(marker)``: code run by a state file from elsewhere."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_a_state_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = _payload(final=True) | {"extra": _WritesAMarker(marker)}
    torch.save(payload, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state(tmp_path)
    assert not marker.exists()
    # the same file, unpickled in full, would have run the call: the test's pickle is a real one
    torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert marker.is_dir()
