"""Score reuse: each pool row's last information need ``u_i`` and when it was computed.

Scoring eats LLKD's budget (64-78 % of its FLOPs at the committed settings, docs/quality.md): every
row is re-scored each time the stream brings it round, although a row the student was sure of a
pass ago is almost always still sure (InfoBatch and Selective-Backprop reuse a row's last loss the
same way). :class:`ScoreStore` keeps ``u_i`` per row id with the selector's clock (its ``steps``:
draws selected so far, identical on every worker); a candidate whose kept score is younger than
``selection.score_ttl`` passes over the pool is not scored again: its kept ``u_i`` enters the
thresholds and the mask at 0 FLOPs. Decided here:

- **Both forwards keep a score.** The scoring forward (inference mode) keeps every scored row's
  ``u_i``; the training forward of a selected row computes its logits anyway, so its ``u_i`` (from
  the same weights, with dropout on) replaces the scoring one at 0 FLOPs. A row that was reused and
  then selected is thereby re-scored for free by its training forward. Consequence, measured in
  docs/quality.md: a row the student is uncertain of stays selected, unscored, until its score ages
  out — reuse trains more and scores less, the way InfoBatch reuses the training loss. With
  dropout on, that score depends on the worker's dropout mask, as the gradients already do.
- **The store is global.** Rows need not keep their shard across passes (Ray Data's streaming
  split), so new scores are gathered over the workers once per optimizer step (the recipe's
  existing all-gather) and every worker commits the same entries at the step's end: the decision to
  reuse, and the value reused, do not depend on the sharding (the 1-worker = 2-workers property).
  Scores of a step become reusable from the next step on, also on one worker.
- ``ttl == 0`` reuses nothing: today's behaviour, bit for bit.
- Checkpointed as plain lists and tensors (ids, scores, clocks): no pickled objects.
"""

from __future__ import annotations

from typing import Any

import torch


class ScoreStore:
    """Per-row ``u_i`` with the selector clock it was computed at; reuse within ``ttl`` clock ticks."""

    def __init__(self, ttl: float = 0.0) -> None:
        self.ttl = ttl
        """Largest age (in selector steps) a kept score may have to be reused; 0 reuses nothing."""
        self.scores: dict[str, tuple[float, int]] = {}
        self.pending: list[tuple[str, float, int]] = []
        """Scores of the current step, committed at its end (after the gather over workers)."""

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def lookup(self, ids: list[str], clock: int) -> torch.Tensor:
        """The kept ``u`` of each row younger than ``ttl`` at ``clock``, NaN elsewhere (float32)."""
        out = torch.full((len(ids),), float("nan"))
        if not self.enabled:
            return out
        for position, row_id in enumerate(ids):
            kept = self.scores.get(row_id)
            if kept is not None and clock - kept[1] < self.ttl:
                out[position] = kept[0]
        return out

    def record(self, ids: list[str], needs: torch.Tensor, clock: int) -> None:
        """Keep freshly computed scores (committed at the step's end); a no-op when reuse is off."""
        if self.enabled:
            self.pending.extend(zip(ids, needs.tolist(), [clock] * len(ids), strict=True))

    def take_pending(self) -> list[tuple[str, float, int]]:
        pending, self.pending = self.pending, []
        return pending

    def commit(self, entries: list[tuple[str, float, int]]) -> None:
        """Keep ``entries`` (all workers' new scores, in the order recorded: a training forward's
        score of a row follows, and replaces, its scoring forward's)."""
        for row_id, need, clock in entries:
            self.scores[row_id] = (need, clock)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        ids = sorted(self.scores)
        return {
            "ids": ids,
            "scores": torch.tensor([self.scores[i][0] for i in ids], dtype=torch.float32),
            "clocks": torch.tensor([self.scores[i][1] for i in ids], dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scores, clocks = state["scores"].tolist(), state["clocks"].tolist()
        self.scores = {i: (s, c) for i, s, c in zip(state["ids"], scores, clocks, strict=True)}
        self.pending = []
