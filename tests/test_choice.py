"""The rounds' rules of choice (``llkd_ray/pipeline/choice.py``) and the student's scoring for them
(``llkd_ray/pipeline/scoring.py``, ``Predictor.scored_passes``): the teacher-confidence head, BALD,
disagreement, the typical first slice, the quota, the clip, the seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llkd_ray.config import load_config
from llkd_ray.errors import ConfigError
from llkd_ray.pipeline.choice import (
    bald,
    choose_scored,
    clears_student_level,
    clipped,
    disagreement,
    epistemic_kind,
    fit_head,
    gated_score,
    scoring_passes,
    typical_slice,
    typicality_rank,
)

QUICK = Path(__file__).resolve().parents[1] / "configs" / "quick.yaml"
TEXTS = [
    "a gorgeous, witty film",
    "dull and lifeless",
    "it's not bad , but not good either",
    "the best movie of the year",
    "i walked out after an hour",
    "a film",
    "a tedious , overlong mess with no ideas",
    "warm , funny and wise",
]


def test_the_rules_and_their_knobs_are_validated_with_entropy_the_default():
    config = load_config(QUICK)
    settings = config.labeling
    assert (settings.choose, settings.first, settings.clip, settings.dropout_passes) == ("entropy", "random", 0.0, 2)
    chosen = load_config(QUICK, ["labeling.choose=llkd", "labeling.first=typical", "labeling.clip=0.05"]).labeling
    assert (chosen.choose, chosen.first, chosen.clip) == ("llkd", "typical", 0.05)
    assert load_config(QUICK, ["labeling.choose=head_entropy"]).labeling.choose == "head_entropy"
    for override, key in [
        ("labeling.choose=margin", "labeling.choose"),
        ("labeling.first=medoid", "labeling.first"),
        ("labeling.clip=0.5", "labeling.clip: Input should be less than 0.5"),
        ("labeling.clip=-0.1", "labeling.clip"),
        ("labeling.dropout_passes=1", "labeling.dropout_passes"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(QUICK, [override])


def test_each_rule_counts_its_forward_passes():
    assert [scoring_passes("entropy", k, 4) for k in (1, 2)] == [1, 1]
    assert [scoring_passes("bald", k, 4) for k in (1, 2)] == [5, 5]
    assert [scoring_passes("llkd", k, 3) for k in (1, 2)] == [4, 4]
    # the head times the entropy: the plain pass only (the labeled rows' pass is counted apart)
    for rule in ("head_entropy", "gated_head"):
        assert [(epistemic_kind(rule, k), scoring_passes(rule, k, 3)) for k in (1, 2)] == [(None, 1), (None, 1)]
    # one trained student at round 1: nothing to disagree with, it ranks by BALD
    assert [epistemic_kind("disagreement", k) for k in (1, 2)] == ["bald", "disagreement"]
    assert [scoring_passes("disagreement", k, 4) for k in (1, 2)] == [5, 2]


# --------------------------------------------------------------------------- epistemic uncertainty


def test_bald_is_zero_when_the_passes_agree_and_high_when_they_contradict():
    flat = np.full((3, 2, 4), 0.25)  # an ambiguous text: flat in every pass, entropy 1
    assert bald(flat) == pytest.approx([0.0, 0.0], abs=1e-12)
    sure_but_split = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # two confident passes that disagree
    assert bald(sure_but_split) == pytest.approx([1.0])
    p = np.array([[0.7, 0.3], [0.2, 0.8]])
    assert disagreement(p, p) == pytest.approx([0.0, 0.0], abs=1e-12)
    assert (disagreement(p, p[::-1]) > 0).all()


def test_bald_on_a_student_with_dropout_off_is_zero_and_on_is_seeded(tiny_classifier_dir):
    from llkd_ray.student.predictor import Predictor

    off = Predictor.load(tiny_classifier_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    scores = off.scored_passes(TEXTS, dropout_passes=3)
    assert scores.sampled is not None and scores.sampled.shape == (3, len(TEXTS), 2)
    assert bald(scores.sampled.numpy()) == pytest.approx(np.zeros(len(TEXTS)), abs=1e-6)
    assert scores.probabilities.numpy() == pytest.approx(scores.sampled[0].numpy(), abs=1e-6)
    on = Predictor.load(tiny_classifier_dir, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    first = on.scored_passes(TEXTS, dropout_passes=3, seed=5).sampled.numpy()
    assert (bald(first) > 0).all()
    assert np.array_equal(on.scored_passes(TEXTS, dropout_passes=3, seed=5).sampled.numpy(), first)  # seeded
    assert not np.array_equal(on.scored_passes(TEXTS, dropout_passes=3, seed=6).sampled.numpy(), first)
    assert not on.model.training  # back in eval mode


def test_the_scoring_actor_gives_two_identical_students_no_disagreement(tiny_classifier_dir):
    from llkd_ray.pipeline.scoring import StudentScorer

    batch = pd.DataFrame({"id": [f"r{i}" for i in range(len(TEXTS))], "text": TEXTS})
    scorer = StudentScorer(str(tiny_classifier_dir), 32, 1, previous=str(tiny_classifier_dir))
    out = scorer(batch)
    assert out["disagreement"].to_numpy() == pytest.approx(np.zeros(len(TEXTS)), abs=1e-6)
    assert (out["passes"] == 2).all() and (out["tokens"] > 0).all() and out["parameters"].iloc[0] > 0
    embedded = StudentScorer(str(tiny_classifier_dir), 32, 1, dropout_passes=2, embed=True)(batch)
    assert (embedded["passes"] == 3).all() and "bald" in embedded
    assert np.stack(embedded["embedding"].to_numpy()).shape == (len(TEXTS), 32)  # the tiny BERT's hidden size


# --------------------------------------------------------------------------- the teacher-confidence head


def test_the_teacher_bar_is_the_selection_rules_first_step_on_the_labeled_rows():
    from llkd_ray.pipeline.scoring import teacher_clears

    confidence = np.array([0.9, 0.5, 0.6, 0.4, 0.8, 0.3])
    labels = np.array([0, 0, 0, 1, 1, 1])
    # T = 0.583; T[0] = 0.667, T[1] = 0.5; tauT = T x T[k] / max T = (0.583, 0.4375)
    assert teacher_clears(confidence, labels, 2).tolist() == [True, False, True, False, True, False]


def test_the_head_ranks_rows_in_the_order_of_the_direction_the_teachers_confidence_follows():
    from llkd_ray.pipeline.scoring import teacher_clears

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    confidence = 1 / (1 + np.exp(-3 * x[:, 2]))  # the teacher is sure along direction 2 only
    labels = rng.integers(0, 3, size=400)
    head, record = fit_head(x, teacher_clears(confidence, labels, 3), seed=0)
    assert record["rows"] == 400 and record["held_out_rows"] == 80 and record["held_out_accuracy"] > 0.85
    along = np.zeros((9, 16))
    along[:, 2] = np.linspace(-2, 2, 9)
    predicted = head.predict(along)
    assert (np.diff(predicted) > 0).all() and predicted[0] < 0.1 and predicted[-1] > 0.9
    fresh = rng.normal(size=(200, 16))
    ranks = np.argsort(np.argsort(head.predict(fresh)))
    assert np.corrcoef(ranks, np.argsort(np.argsort(fresh[:, 2])))[0, 1] > 0.9
    # every row on one side of the bar: a constant head at that rate
    constant, _ = fit_head(x[:10], np.ones(10, dtype=bool), seed=0)
    assert constant.predict(x[:3]).tolist() == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------- the choice


def test_the_score_is_taken_within_quotas_after_the_clip():
    ids = [f"r{i:02d}" for i in range(12)]
    uncertainty = np.array([0.99, 0.98, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    teacher_sure = np.array([0.9, 0.9, 0.1, 0.9, 0.1, 0.9, 0.9, 0.1, 0.9, 0.9, 0.9, 0.9])
    predicted = [0] * 6 + [1] * 6
    score = uncertainty * teacher_sure
    # the two most uncertain rows (r00, r01) are clipped as outliers; r02 and r04 the teacher will not be sure of
    chosen = choose_scored(ids, score, uncertainty, predicted, 4, 2, clip=0.2)
    assert sorted(chosen) == ["r03", "r05", "r06", "r08"]  # 2 a class
    assert chosen == sorted(chosen, key=lambda i: -score[ids.index(i)])
    assert choose_scored(ids, score, uncertainty, predicted, 4, 2, clip=0.2) == chosen  # the same rows twice
    assert choose_scored(ids, score, uncertainty, predicted, 4, 2)[:2] == ["r00", "r01"]  # no clip: the outliers
    # never clips below the slice: 10 of 12 rows labeled, 2 wanted, a 40 % clip sets none aside
    assert clipped(ids, uncertainty, 2, 0.4, set(ids[:10])) == set()
    assert clipped(ids, uncertainty, 2, 0.25, ()) == {"r00", "r01", "r02"}


def test_the_gated_head_ranks_the_rows_clearing_the_student_level_first_each_group_by_the_head(tmp_path):
    from llkd_ray.pipeline.scoring import student_levels

    uncertainty = np.array([0.9, 0.5, 0.2, 0.6, 0.1, 0.4])
    teacher_sure = np.array([0.1, 0.9, 0.99, 0.3, 0.8, 0.7])
    predicted = np.array([0, 0, 0, 1, 1, 1])
    levels = np.array([0.45, 0.5])  # tauS per class: rows 0, 1 (class 0) and 3 (class 1) clear it
    clears = clears_student_level(uncertainty, predicted, levels)
    assert clears.tolist() == [True, True, False, True, False, False]
    order = np.argsort(-gated_score(teacher_sure, clears), kind="stable").tolist()
    assert order == [1, 3, 0, 2, 4, 5]  # the head's order within each group; the product would take row 2 first
    assert clears_student_level(uncertainty, predicted, None).all()  # no recorded levels: every row passes
    # the levels the training ended with: the last step record of the metrics.jsonl beside the student
    (tmp_path / "student").mkdir()
    records = [{"step": 1, "student_thresholds": {"neg": 0.3, "pos": 0.4}}, {"step": 2, "student_thresholds":
               {"neg": 0.2, "pos": 0.25}}, {"kind": "evaluation", "macro_f1": 0.5}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(f"{json.dumps(r)}\n" for r in records))
    assert student_levels(tmp_path / "student", ["neg", "pos"]).tolist() == [0.2, 0.25]
    assert student_levels(tmp_path / "student", ["neg", "other"]) is None
    assert student_levels(tmp_path / "nowhere" / "student", ["neg", "pos"]) is None


def _blobs(seed: int = 0) -> tuple[np.ndarray, list[set[int]]]:
    rng = np.random.default_rng(seed)
    points, members = [], []
    for c, n in enumerate((12, 9, 7, 5)):
        centre = np.zeros(8)
        centre[c] = 1.0
        members.append(set(range(len(points), len(points) + n)))
        points += list(centre + 0.08 * rng.normal(size=(n, 8)))
    return np.array(points), members


def test_typical_picks_the_medoid_of_each_cluster():
    x, members = _blobs()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    medoids = set()
    for cluster in members:
        rows = sorted(cluster)
        distance = np.linalg.norm(unit[rows][:, None] - unit[rows][None], axis=-1).sum(axis=1)
        medoids.add(rows[int(np.argmin(distance))])
    ids = [f"r{i:02d}" for i in range(len(x))]
    chosen = typical_slice(ids, x, [0] * len(x), 4, 1, seed=0)
    assert {ids.index(i) for i in chosen} == medoids
    assert typical_slice(ids, x, [0] * len(x), 4, 1, seed=0) == chosen  # seeded
    # ranked: every medoid before any second row, the largest cluster's first
    rank = typicality_rank(x, 4, seed=0)
    assert int(np.argmax(rank)) in members[0] and set(np.argsort(-rank)[:4]) == medoids


def test_typical_keeps_the_quota_over_the_predicted_class():
    x, members = _blobs()
    predicted = [0 if i in members[0] else 1 for i in range(len(x))]  # the largest cluster is class 0
    ids = [f"r{i:02d}" for i in range(len(x))]
    chosen = typical_slice(ids, x, predicted, 4, 2, seed=0)
    assert sorted(predicted[ids.index(i)] for i in chosen) == [0, 0, 1, 1]


def test_a_typical_first_slice_is_scored_by_the_model_round_0_trains_from(tmp_path):
    from llkd_ray.compute import non_embedding_parameters
    from llkd_ray.pipeline.scoring import StudentScorer
    from llkd_ray.student.model import load_student
    from llkd_ray.testing import build_tiny_encoder

    bare = build_tiny_encoder(tmp_path / "bare")  # no classification head: training gives it a fresh, seeded one
    labels = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    batch = pd.DataFrame({"id": [f"r{i}" for i in range(len(TEXTS))], "text": TEXTS})
    first, again = (StudentScorer(str(bare), 32, 1, embed=True, initial=(labels, 3))(batch) for _ in range(2))
    assert first["parameters"].iloc[0] == non_embedding_parameters(load_student(str(bare), labels, 3)[0])
    assert first["predicted"].max() < len(labels) and first["uncertainty"].tolist() == again["uncertainty"].tolist()
