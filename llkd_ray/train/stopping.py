"""A label-free stop (``training.stop: auto``): end the run when the student has stopped changing its mind.

Production has no gold set, so the budget is a guess and a student trained on every pseudo-label
degrades past its peak (docs/quality.md). The signal here needs no label: **prediction churn** on
a fixed probe of pool rows — the fraction of probe rows whose predicted class changed since the
previous check. Decided here:

- **The probe** is the first :data:`PROBE_ROWS` pool rows the candidate stream hands the workers (each
  worker keeps its share), fixed for the run and checkpointed as texts.
- **Checks** at every ``1 / stop_checks`` of the run (budget or steps), independent of the gold-set
  evaluations; churn is summed over the workers (one all-gather), so every worker decides alike.
- **The rule** (:class:`ChurnStop`): stop once ``stop_window`` consecutive checks are *quiet*. A
  check is quiet when churn is below ``stop_churn``, or when the strategy selected less than
  ``stop_selected`` of the candidates it saw since the previous check — LLKD's own verdict that the
  pool has little left to teach this student (the eligible set, teacher-confident and
  student-uncertain, has dried up; the rest of the budget would mostly score rows it rejects). The
  second signal is free (the selector's all-reduced counts) and reads the strategy's own rule;
  churn alone never reached a bar under a learning rate that is still decaying (docs/quality.md).
  ``all`` selects every row, so only churn can stop it. The first check has no churn to compare.
- **The schedule ends properly**: when the stop is called at progress ``p``, the learning rate goes
  from its value at ``p`` linearly to 0 over the next :data:`STOP_DECAY` of the budget
  (:class:`~llkd_ray.compute.ProgressSchedule`), and the run ends there. Until the stop the run is
  the budgeted run (same schedule, the probe's FLOPs aside), so F1 at the stop compares with the
  full budget's.
- **The probe's forwards are compute**: 2·N FLOPs per probe token and check, counted in the run's
  FLOPs (``probe_tokens``) and therefore against the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Pool rows in the churn probe (split over the workers). Its cost: checks x rows x 2·N per token,
#: against a budget of passes x pool rows x 6·N; 128 rows and 8 checks are 4.6 % of the benchmark's
#: 5 passes of a 1,500-row pool (256 rows and 16 checks would be 18 %); a churn of 0.02 is 2.6 rows.
PROBE_ROWS = 128
#: Fraction of the budget over which the learning rate decays to 0 once the stop is called.
STOP_DECAY = 0.05


def probe_size(pool_rows: int, workers: int) -> int:
    """This worker's probe rows: :data:`PROBE_ROWS`, at most an eighth of the pool (a small pool's
    probe would otherwise repeat rows and cost passes of the budget per check), split over workers."""
    return max(1, min(PROBE_ROWS, pool_rows // 8) // workers)


@dataclass
class ChurnStop:
    """Stop once ``window`` consecutive checks are quiet: churn below ``threshold`` or the selected
    fraction below ``selected_threshold`` (pure, no torch)."""

    threshold: float
    window: int
    selected_threshold: float = 0.0
    history: list[bool] = field(default_factory=list)
    """Whether each check so far was quiet."""

    def observe(self, churn: float | None, selected: float | None = None) -> bool:
        """Record one check (churn None: nothing to compare; selected None: no candidates seen);
        True when the run should stop now."""
        quiet = (churn is not None and churn < self.threshold) or (
            selected is not None and selected < self.selected_threshold
        )
        self.history.append(quiet)
        recent = self.history[-self.window :]
        return len(recent) == self.window and all(recent)


def churn(previous: list[int], current: list[int]) -> tuple[int, int]:
    """Rows whose prediction changed, and rows compared (the rows predicted at both checks)."""
    compared = min(len(previous), len(current))
    return sum(a != b for a, b in zip(previous[:compared], current[:compared], strict=True)), compared


class ProbeStopper:
    """One worker's side of ``stop: auto``: its probe rows, their last predictions, the rule's state."""

    def __init__(
        self, probe_rows: int, checks: int, threshold: float, window: int, decay: float, selected_threshold: float = 0.0
    ) -> None:
        self.probe_rows, self.checks, self.decay = probe_rows, checks, decay
        self.rule = ChurnStop(threshold, window, selected_threshold)
        self.counts = (0, 0)
        """Candidates seen and rows selected (global) at the previous check."""
        self.texts: list[str] = []
        self.tokens = 0
        """Real tokens of the probe (what one check costs, at 2·N FLOPs a token)."""
        self.previous: list[int] = []
        self.next_check = 1
        self.stopped_at: float | None = None
        """Progress at which the stop was called (None: not yet)."""
        self.records: list[dict[str, Any]] = []

    def collect(self, texts: list[str], tokenizer: Any, max_length: int) -> None:
        """Keep the first rows the stream hands this worker until the probe is full."""
        room = self.probe_rows - len(self.texts)
        if room <= 0:
            return
        taken = texts[:room]
        self.texts.extend(taken)
        self.tokens += sum(len(ids) for ids in tokenizer(taken, truncation=True, max_length=max_length)["input_ids"])

    def due(self, progress: float) -> bool:
        return self.stopped_at is None and progress >= self.next_check / self.checks - 1e-9

    def observe(
        self,
        predicted: list[int],
        shares: list[tuple[int, int]],
        progress: float,
        counts: tuple[int, int] = (0, 0),
    ) -> dict[str, Any]:
        """Record a check: this worker's predictions, every worker's (changed, compared), and the
        run's (candidates seen, rows selected) so far."""
        self.previous = predicted
        self.next_check = int(progress * self.checks + 1e-9) + 1
        changed, compared = sum(s[0] for s in shares), sum(s[1] for s in shares)
        seen, selected = counts[0] - self.counts[0], counts[1] - self.counts[1]
        self.counts = (int(counts[0]), int(counts[1]))
        record: dict[str, Any] = {"kind": "stop_check", "progress": progress, "probe_rows": compared}
        if compared:
            record["churn"] = changed / compared
        if seen > 0:
            record["selected_fraction"] = selected / seen
        if self.rule.observe(record.get("churn"), record.get("selected_fraction")):
            self.stopped_at = progress
            record["stop"] = True
        self.records.append(record)
        return record

    def end(self) -> float:
        """The progress the run ends at: the budget, or the stop plus the learning rate's decay."""
        return 1.0 if self.stopped_at is None else min(1.0, self.stopped_at + self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {
            "texts": list(self.texts),
            "tokens": self.tokens,
            "previous": list(self.previous),
            "next_check": self.next_check,
            "stopped_at": self.stopped_at,
            "counts": list(self.counts),
            "history": list(self.rule.history),
            "records": list(self.records),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.texts, self.tokens, self.previous = list(state["texts"]), int(state["tokens"]), list(state["previous"])
        self.next_check, self.stopped_at = int(state["next_check"]), state["stopped_at"]
        # Checkpoints before the selection bar kept churn values: quiet meant below the churn bar.
        history = [q < self.rule.threshold if isinstance(q, float) else bool(q) for q in state["history"]]
        self.rule.history, self.records = history, list(state["records"])
        self.counts = tuple(state.get("counts", (0, 0)))


def check(
    stopper: ProbeStopper,
    predict: Callable[[list[str]], list[int]],
    progress: float,
    all_gather: Callable[[Any], list[Any]],
    counts: tuple[int, int] = (0, 0),
) -> tuple[dict[str, Any], int]:
    """One check on every worker: predict the probe, compare, decide (``counts``: the run's global
    candidates seen and rows selected). Returns the check's record and the probe tokens predicted
    over all workers (the check's compute)."""
    predicted = predict(stopper.texts)
    shares = all_gather((*churn(stopper.previous, predicted), stopper.tokens))
    record = stopper.observe(predicted, [share[:2] for share in shares], progress, counts)
    return record, sum(share[2] for share in shares)
