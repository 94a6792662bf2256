"""Metrics (scikit-learn) on hand-computed cases, predictions from a model directory, ``llkd eval``."""

from __future__ import annotations

import json

import pytest
from conftest import SST2_LABELS


def test_classification_metrics_hand_computed():
    from llkd_ray.metrics import classification_metrics

    truth = ["a", "a", "a", "b", "b", "c"]
    predicted = ["a", "a", "b", "b", "a", "a"]
    metrics = classification_metrics(truth, predicted, ["a", "b", "c"])
    assert metrics["n"] == 6 and metrics["accuracy"] == pytest.approx(3 / 6)
    # a: p 2/4 r 2/3 f1 4/7; b: p 1/2 r 1/2 f1 1/2; c: 0 (never predicted)
    assert metrics["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7, "support": 3})
    assert metrics["per_class"]["b"]["f1"] == pytest.approx(0.5)
    assert metrics["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert metrics["macro_f1"] == pytest.approx((4 / 7 + 0.5 + 0) / 3)
    assert metrics["confusion"] == {"labels": ["a", "b", "c"], "matrix": [[2, 1, 0], [1, 1, 0], [1, 0, 0]]}
    json.dumps(metrics)  # plain JSON


def test_classification_metrics_rejects_mismatched_lengths():
    from llkd_ray.metrics import classification_metrics

    with pytest.raises(ValueError, match="2 gold labels but 1"):
        classification_metrics(["a", "b"], ["a"], ["a", "b"])


def test_format_metrics_is_a_readable_table():
    from llkd_ray.metrics import classification_metrics, format_metrics

    text = format_metrics(classification_metrics(["x", "y", "y"], ["x", "y", "x"], ["x", "y"]))
    assert "accuracy 0.6667" in text and "macro-F1 0.6667" in text
    assert "confusion (rows: gold, columns: predicted)" in text
    assert text.splitlines()[3].split()[0] == "x"


def test_predict_labels_from_a_directory_returns_label_names(tiny_classifier_dir):
    from llkd_ray.evaluate import predict_labels
    from llkd_ray.student.predictor import Predictor

    texts = ["short", "a much longer text about a film that goes on and on", "ok"]
    labels = predict_labels(tiny_classifier_dir, texts)
    assert len(labels) == 3 and set(labels) <= set(SST2_LABELS)
    # the same with a loaded model, batches of one (sorting by length must not reorder the output)
    loaded = Predictor.load(tiny_classifier_dir)
    assert predict_labels(loaded.model, texts, tokenizer=loaded.tokenizer, batch_size=1) == labels


def test_llkd_eval_json_and_table(ray_local, tiny_classifier_dir, tmp_path, capsys):
    from llkd_ray.cli import main

    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps({"text": f"review {i}", "label": SST2_LABELS[i % 2]}) + "\n" for i in range(10)))
    assert main(["eval", "--model", str(tiny_classifier_dir), "--data", str(gold), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 10 and metrics["labels"] == SST2_LABELS
    assert sum(map(sum, metrics["confusion"]["matrix"])) == 10
    assert main(["eval", "--model", str(tiny_classifier_dir), "--data", str(gold)]) == 0
    assert "precision  recall" in capsys.readouterr().out


def test_llkd_eval_unknown_gold_label_is_a_user_error(ray_local, tiny_classifier_dir, tmp_path, capsys):
    from llkd_ray.cli import main

    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"text": "fine", "label": "neutral"}) + "\n")
    assert main(["eval", "--model", str(tiny_classifier_dir), "--data", str(gold)]) == 2
    assert "unknown label 'neutral'" in capsys.readouterr().err
