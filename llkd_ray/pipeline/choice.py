"""Which unlabeled rows the teacher labels next: the rounds' rules of choice, pure (no Ray, no torch).

The rounds (:mod:`llkd_ray.pipeline.rounds`) ask the teacher about the rows the student ranks
first. With ``labeling.choose: entropy`` (the default, and the reference) the rank is the
student's normalised entropy, which is high on the rows the student has not learned *and* on the
rows no reader could decide; the teacher is unsure of the second kind too, and LLKD's teacher gate
drops them. LLKD's own rule asks for rows where the teacher is confident **and** the student is
uncertain: both halves are estimated here before the teacher is asked.

Decided here:

- **entropy**: ``u_i`` of the selection rule (:func:`llkd_ray.train.selection.normalized_entropy`),
  one forward pass a row.
- **bald**: the student's *epistemic* uncertainty, the mutual information between its prediction
  and its weights, estimated with ``labeling.dropout_passes`` K forward passes with dropout on:
  ``H(mean_k p_k) - mean_k H(p_k)``, over ``log C`` so that it lies in [0, 1] like ``u``. An
  ambiguous text gets the same flat prediction in every pass (high entropy, BALD near 0); a text
  the student has not learned gets different ones. A student without dropout scores 0 everywhere.
  K + 1 forward passes a row (the plain pass gives the predicted class and ``u``). K = 2 by
  default: every pass is paid from the student's budget (docs/labeling.md has what K costs), and
  with two passes BALD is their Jensen-Shannon divergence.
- **disagreement**: BALD over the committee of the last two rounds' students (one plain pass of
  each): the Jensen-Shannon divergence of their predictions, over ``log C``. Round 1 has one
  trained student (the one before it is the untrained initial model, whose near-uniform head
  would rank the rows the student is *sure* of first): it ranks by ``bald``. 2 passes a row.
- **llkd**: ``P(the teacher clears its bar | the text) x BALD``. The first factor is a logistic
  head on the student's pooled embedding (the mean of its last hidden states over the text's
  tokens), fitted on the rows labeled so far (:func:`fit_head`). The target of a labeled row is
  ``c_i >= tauT[y_i]`` with the teacher levels the selection rule starts from on those rows (``T``
  the mean confidence, ``T[k]`` the mean of pseudo-label class k: :meth:`Selector.teacher_gate`
  at its first step), so the head predicts LLKD's teacher gate, not a raw confidence. The
  labeled rows cost one more plain pass each (their embeddings under the current student).
- **head_entropy**: ``P(the teacher clears its bar | the text) x u``, the same head times the
  entropy LLKD's student gate reads (``u_i >= tauS``) rather than BALD, which can rank first rows
  the student is already sure of, and those the gate then drops. One plain pass a row, plus the
  labeled rows' pass for the head.
- **gated_head**: LLKD's conjunction with the student half kept a gate: the rows whose ``u``
  clears the student level its last training ended with (``tauS[k]`` of the row's predicted
  class, the last ``student_thresholds`` of that training's ``metrics.jsonl``; the teacher's
  label, which the gate indexes by, is not known yet) first, each group ranked by the head. A
  product follows whichever factor varies more, and the head's prediction spans [0, 1] where a
  half-trained student's ``u`` is small and flat: a gate keeps both halves. Without recorded
  levels every row passes. Passes as ``head_entropy``.
- **The head**: L2 logistic regression (scikit-learn, ``C = 1``) on standardised embeddings. Its
  accuracy is measured on a seeded share (``HELD_OUT``) of the labeled rows held out from a first
  fit, then it is refitted on all of them for the choice. A target of one value only gives a constant head.
- **Clip**: before choosing, the ``labeling.clip`` share of the unlabeled rows with the highest
  uncertainty (entropy, BALD or disagreement; BALD for ``llkd``) is set aside (never fewer rows
  left than the slice): the very top of an uncertainty ranking is often outliers.
- **The quota** is :func:`~llkd_ray.pipeline.rounds.choose_slice`'s, with the rule's score in
  place of the entropy: equal shares per predicted class, ties to the smaller id, so a rerun on the
  same scores chooses the same rows.
- **typical** (``labeling.first``, round 0): TypiClust's cold start. k-means (scikit-learn, seeded,
  k = the slice's size) on the L2-normalised embeddings of the initial student; a row's
  typicality is the inverse of its mean distance to the other rows of its cluster, so each
  cluster's most typical row is its medoid. Rows are ranked by their rank within their cluster
  (every medoid first), then by the cluster's size, and taken with the quota over the initial
  student's predicted class (loaded as round 0's training loads it: a checkpoint without a head
  for the task gets a fresh, seeded one, and the quota then mostly spreads the slice). The
  embeddings of the whole pool come back to the driver for k-means: fine for pools of up to a
  few hundred thousand rows.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from llkd_ray.config import Choose
from llkd_ray.pipeline.rounds import choose_slice

#: Share of the labeled rows the head's accuracy is measured on.
HELD_OUT = 0.2


# --------------------------------------------------------------------------- epistemic uncertainty


def bald(passes: np.ndarray) -> np.ndarray:
    """BALD from ``passes`` (K, N, C) probabilities: ``H(mean p) - mean H(p)`` over ``log C``, in [0, 1]."""
    p = np.asarray(passes, dtype=np.float64)
    scale = np.log(p.shape[-1])

    def entropy(q: np.ndarray) -> np.ndarray:
        return -(q * np.log(np.clip(q, 1e-30, None))).sum(axis=-1)

    return np.clip((entropy(p.mean(axis=0)) - entropy(p).mean(axis=0)) / scale, 0.0, 1.0)


def disagreement(current: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """BALD over the committee of two students, (N, C) each: their Jensen-Shannon divergence over ``log C``."""
    return bald(np.stack([current, previous]))


#: The rules that weigh a row by the teacher-confidence head's prediction.
HEAD_RULES: tuple[Choose, ...] = ("llkd", "head_entropy", "gated_head")


def epistemic_kind(choose: Choose, index: int) -> str | None:
    """The uncertainty a round ranks by besides entropy: ``bald``, ``disagreement`` or None (entropy)."""
    if choose in ("entropy", "head_entropy", "gated_head"):
        return None
    if choose == "disagreement" and index >= 2:
        return "disagreement"
    return "bald"


def scoring_passes(choose: Choose, index: int, dropout_passes: int) -> int:
    """Forward passes per unlabeled row in round ``index``'s scoring (the FLOPs rule counts each)."""
    kind = epistemic_kind(choose, index)
    return 1 if kind is None else 2 if kind == "disagreement" else 1 + dropout_passes


# --------------------------------------------------------------------------- the teacher-confidence head


@dataclass(frozen=True)
class TeacherHead:
    """``P(the teacher clears its bar)`` from a row's pooled embedding: a logistic head on standardised
    features (sent to the scoring actors as it is)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    constant: float | None = None
    """The probability of every row when the target had one value only."""

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """The probability that the teacher clears its bar, per row."""
        x = np.asarray(embeddings, dtype=np.float64)
        if self.constant is not None:
            return np.full(len(x), self.constant)
        logits = ((x - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))


def _fit(x: np.ndarray, y: np.ndarray) -> TeacherHead:
    from sklearn.linear_model import LogisticRegression

    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    if len(np.unique(y)) < 2:
        return TeacherHead(mean, scale, np.zeros(x.shape[1]), 0.0, constant=float(y.mean()) if len(y) else 0.5)
    model = LogisticRegression(C=1.0, max_iter=1000).fit((x - mean) / scale, y)
    return TeacherHead(mean, scale, model.coef_[0].astype(np.float64), float(model.intercept_[0]))


def fit_head(embeddings: np.ndarray, clears: np.ndarray, seed: int) -> tuple[TeacherHead, dict[str, float | int]]:
    """The head on every labeled row, and its record: accuracy on a seeded :data:`HELD_OUT` share held
    out from a first fit, the rows, and the share of rows that clear the bar (the majority baseline)."""
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(clears, dtype=bool).astype(int)
    order = np.random.default_rng(seed).permutation(len(y))
    held = order[: round(HELD_OUT * len(y))]
    record: dict[str, float | int] = {"rows": len(y), "held_out_rows": len(held), "clears": float(y.mean())}
    if len(held) and len(held) < len(y):
        probe = _fit(x[order[len(held) :]], y[order[len(held) :]])
        record["held_out_accuracy"] = float(((probe.predict(x[held]) >= 0.5) == y[held]).mean())
    return _fit(x, y), record


# --------------------------------------------------------------------------- the choice


def clears_student_level(uncertainty: np.ndarray, predicted: np.ndarray, levels: np.ndarray | None) -> np.ndarray:
    """Whether each row's ``u`` clears the student level of its predicted class (all, without ``levels``)."""
    u = np.asarray(uncertainty, dtype=np.float64)
    if levels is None:
        return np.ones(len(u), dtype=bool)
    return u >= np.asarray(levels, dtype=np.float64)[np.asarray(predicted, dtype=np.int64)]


def gated_score(teacher_sure: np.ndarray, clears: np.ndarray) -> np.ndarray:
    """``gated_head``'s score: the head's prediction, plus 1 where the row clears the student level,
    so that every such row ranks before every other."""
    return np.asarray(teacher_sure, dtype=np.float64) + np.asarray(clears, dtype=bool)


def clipped(
    ids: Sequence[str], uncertainty: Sequence[float], size: int, clip: float, labeled: Collection[str]
) -> set[str]:
    """The ``clip`` share of the unlabeled rows with the highest ``uncertainty`` (ties: the smaller id),
    never leaving fewer than ``size`` rows to choose from."""
    unlabeled = [i for i in range(len(ids)) if ids[i] not in labeled]
    drop = min(int(clip * len(unlabeled)), max(0, len(unlabeled) - size))
    top = sorted(unlabeled, key=lambda i: (-float(uncertainty[i]), ids[i]))[:drop]
    return {ids[i] for i in top}


def choose_scored(
    ids: Sequence[str],
    score: Sequence[float],
    uncertainty: Sequence[float],
    predicted: Sequence[int],
    size: int,
    num_classes: int,
    labeled: Collection[str] = (),
    *,
    clip: float = 0.0,
    explore: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """A later round's slice: the highest ``score`` within per-class quotas, after the ``clip`` share of
    the most uncertain rows (by ``uncertainty``) is set aside; ``explore`` as in ``choose_slice``."""
    labeled = set(labeled)
    outliers = clipped(ids, uncertainty, size, clip, labeled) if clip > 0 else set()
    return choose_slice(ids, score, predicted, size, num_classes, labeled | outliers, explore=explore, seed=seed)


def typicality_rank(embeddings: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """A score per row, higher first: minus its rank by typicality within its k-means cluster, plus its
    cluster's share of the rows (under 1: a tie-break between clusters, larger first)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import pairwise_distances

    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    k = max(1, min(clusters, len(x)))
    assignment = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x)
    score = np.zeros(len(x))
    for c in range(k):
        members = np.flatnonzero(assignment == c)
        distance = pairwise_distances(x[members]).sum(axis=1) / max(1, len(members) - 1)
        ranked = members[np.lexsort((members, distance))]  # most typical (the medoid) first, ties by position
        score[ranked] = -np.arange(len(members)) + len(members) / (len(x) + 1)
    return score


def typical_slice(
    ids: Sequence[str], embeddings: np.ndarray, predicted: Sequence[int], size: int, num_classes: int, seed: int
) -> list[str]:
    """Round 0 with ``labeling.first: typical``: the medoids of ``size`` k-means clusters, within quotas."""
    return choose_slice(ids, typicality_rank(embeddings, size, seed), predicted, size, num_classes)
