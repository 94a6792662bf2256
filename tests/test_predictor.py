"""The one predictor (plain torch, no Ray): the training length saved with the student and read back
by ``llkd eval``'s predictor and ``transformers.pipeline`` alike, ranking, batching, train mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SST2_LABELS
from students import LONG_TEXT, TRAINING_LENGTH, WORDS, save_student


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_classifier_dir) -> Path:
    return save_student(tiny_classifier_dir, tmp_path_factory.mktemp("run") / "train" / "student")


def test_the_training_length_is_recorded_in_the_saved_directory(student, tiny_classifier_dir):
    from transformers import AutoTokenizer

    from llkd_ray.student.model import MAX_LENGTH_FIELD
    from llkd_ray.student.predictor import Predictor

    assert json.loads((student / "config.json").read_text())[MAX_LENGTH_FIELD] == TRAINING_LENGTH
    assert AutoTokenizer.from_pretrained(student).model_max_length == TRAINING_LENGTH
    assert Predictor.load(student).max_length == TRAINING_LENGTH
    assert Predictor.load(student, max_length=32).max_length == 32  # a cap can only lower it
    assert Predictor.load(student, max_length=1000).max_length == TRAINING_LENGTH
    # the base model keeps its own limit (the tiny model's 128): the saved length is what changed
    assert Predictor.load(tiny_classifier_dir).max_length == 128


def test_a_long_text_gets_the_same_probabilities_from_eval_and_a_pipeline(student, tiny_classifier_dir, tmp_path):
    from transformers import pipeline

    from llkd_ray.evaluate import predict_labels
    from llkd_ray.student.predictor import Predictor

    predictor = Predictor.load(student)  # what `llkd eval` predicts with
    (ours,) = predictor([LONG_TEXT])
    assert ours["truncated"] is True
    classifier = pipeline("text-classification", model=str(student), device="cpu", truncation=True, top_k=None)
    assert classifier.preprocess(LONG_TEXT, truncation=True)["input_ids"].shape[-1] == TRAINING_LENGTH
    (ranked,) = classifier([LONG_TEXT])  # top_k=None: every label, most probable first
    theirs = {p["label"]: p["score"] for p in ranked}
    assert theirs == pytest.approx(ours["scores"], abs=1e-5)
    assert predict_labels(student, [LONG_TEXT]) == [ours["label"]]
    # the cut matters: the same weights saved at the tiny model's 128 tokens answer differently
    (at_128,) = Predictor.load(save_student(tiny_classifier_dir, tmp_path / "at-128", max_length=128))([LONG_TEXT])
    assert abs(at_128["scores"]["positive"] - ours["scores"]["positive"]) > 1e-3


def test_postprocess_ranks_labels_and_keeps_top_k(student):
    from llkd_ray.student.predictor import Predictor

    predictor = Predictor.load(student)
    probabilities = torch.tensor([[0.2, 0.8], [0.7, 0.3]])
    first, second = predictor.postprocess(probabilities, [False, True])
    assert (first["label"], first["truncated"]) == ("positive", False)
    assert first["score"] == pytest.approx(0.8)
    assert first["scores"] == pytest.approx({"positive": 0.8, "negative": 0.2})
    assert list(first["scores"]) == ["positive", "negative"]  # most probable first
    assert (second["label"], second["truncated"]) == ("negative", True)
    (top,) = predictor.postprocess(probabilities[:1], [False], top_k=1)
    assert top["scores"] == pytest.approx({"positive": 0.8})
    (every,) = predictor.postprocess(probabilities[:1], [False], top_k=10)
    assert set(every["scores"]) == set(SST2_LABELS)


def test_batching_by_length_keeps_the_order_and_the_numbers(student):
    from llkd_ray.student.predictor import Predictor

    predictor = Predictor.load(student, batch_size=2)
    texts = [LONG_TEXT, "short", "a film", " ".join(WORDS), "ok", LONG_TEXT[:300]]
    together, truncated = predictor.probabilities(texts)
    alone = torch.cat([predictor.probabilities([text])[0] for text in texts])
    assert torch.allclose(together, alone, atol=1e-5)
    assert truncated == [True, False, False, False, False, True]
    assert torch.allclose(together.sum(dim=-1), torch.ones(len(texts)), atol=1e-5)
    chunks = predictor._chunks([5, 1, 3, 2, 4, 6, 60])
    assert sorted(i for chunk in chunks for i in chunk) == list(range(7))
    assert all(len(chunk) <= 2 for chunk in chunks)  # batch_size caps a chunk
    assert chunks[-1] == [6]  # on CPU the 60-token text does not pad a chunk of short ones


def test_a_training_model_stays_in_training_mode(student):
    from llkd_ray.student.predictor import Predictor

    predictor = Predictor.load(student)
    predictor.model.train()
    first = predictor.probabilities(["a great film"])[0]
    assert predictor.model.training  # back to training after the call
    assert torch.allclose(first, predictor.probabilities(["a great film"])[0])  # eval mode: no dropout
