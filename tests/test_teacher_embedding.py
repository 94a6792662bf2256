"""The embedding teacher without sentence-transformers computes what SentenceTransformer.encode does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from llkd_ray.config import load_config
from llkd_ray.corpus import builtin_path
from llkd_ray.label.teachers.check import check_teacher
from llkd_ray.label.teachers.embedding import EmbeddingTeacher, PlainSentenceEncoder, plain_sentence_encoder_spec

DEMO = "configs/demo.yaml"


def mixed_texts() -> list[str]:
    """Short phrases, news-length texts and texts far over the model's 256 tokens (truncated)."""
    pool = [json.loads(line)["text"] for line in builtin_path("builtin:trec/train").read_text().splitlines()[:400]]
    news = [" ".join(pool[i : i + 4]) for i in range(0, 40, 4)]
    long = [" ".join(pool[i : i + 40]) for i in range(40, 200, 40)]
    return [*pool[:10], *news, *long, "a", "fine film"]


def test_plain_encoder_matches_sentence_transformers_and_flags_truncation(minilm_path):
    from sentence_transformers import SentenceTransformer

    spec = plain_sentence_encoder_spec(minilm_path)
    assert spec == {"max_seq_length": 256, "lower_case": False, "pooling": "mean", "normalize": True}
    texts = mixed_texts()
    plain, truncated = PlainSentenceEncoder(minilm_path, spec, "cpu").encode(texts, batch_size=8)
    model = SentenceTransformer(minilm_path, device="cpu")
    reference = model.encode(texts, batch_size=8, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(plain, reference, atol=1e-5)
    lengths = np.array([len(ids) for ids in model.tokenizer(texts)["input_ids"]])
    assert truncated.tolist() == (lengths > 256).tolist() and truncated.sum() == 4


def test_teacher_gives_the_same_labels_with_either_encoder(monkeypatch):
    import llkd_ray.label.teachers.embedding as embedding

    texts = mixed_texts()
    config = load_config(DEMO)
    plan = check_teacher(config.task, config.teacher)
    plain = EmbeddingTeacher(plan)
    assert plain.plain is not None and plain.model is None
    # A model the plain encoder does not reproduce is loaded by sentence-transformers itself.
    monkeypatch.setattr(embedding, "plain_sentence_encoder_spec", lambda path: None)
    reference = EmbeddingTeacher(plan)
    assert reference.plain is None and reference.model is not None
    np.testing.assert_allclose(plain.label_embeddings, reference.label_embeddings, atol=1e-5)
    ours, theirs = plain.score(texts), reference.score(texts)
    np.testing.assert_allclose(ours.probs, theirs.probs, atol=1e-4)
    assert ours.truncated.tolist() == theirs.truncated.tolist() and ours.truncated.sum() == 4


@pytest.mark.parametrize("change", ["modules", "settings"])
def test_models_the_plain_encoder_does_not_cover_fall_back(minilm_path, tmp_path, change):
    copy = tmp_path / "model"
    shutil.copytree(minilm_path, copy)
    if change == "modules":
        modules = json.loads((copy / "modules.json").read_text())
        modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
        (copy / "modules.json").write_text(json.dumps(modules))
    else:
        (copy / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "model_args": {}}))
    assert plain_sentence_encoder_spec(str(copy)) is None
