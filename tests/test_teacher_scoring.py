"""The hf teacher computes only what it scores, and scores exactly what the full computation gives.

The reference (``llkd_ray.testing``) is the computation the teacher used to do: the model's logits
at every position, a log-softmax over the whole vocabulary at every position, then the label tokens
read off the positions that predict them.
"""

from __future__ import annotations

import numpy as np
import pytest

from llkd_ray.config import load_config, validate_config
from llkd_ray.label.teachers.check import check_teacher
from llkd_ray.label.teachers.hf import HFTeacher
from llkd_ray.testing import reference_first_token, reference_sequence

DEMO = "configs/demo.yaml"
TEXTS = [
    "a gem",
    "a mess of a movie with no point at all, and far too long for what it has to say",
    "fine",
    "the best film of the year, by far",
]


def hf_teacher(model, scoring: str = "first_token", verbalizers: tuple[str, str] | None = None) -> HFTeacher:
    raw = load_config(DEMO, ["teacher.backend=hf", f"teacher.hf.model={model}", f"teacher.scoring={scoring}"])
    raw = raw.model_dump(mode="json")
    if verbalizers:
        for label, verbalizer in zip(raw["task"]["labels"], verbalizers, strict=True):
            label["verbalizer"] = verbalizer
    config = validate_config(raw)
    return HFTeacher(check_teacher(config.task, config.teacher))


@pytest.mark.parametrize("keeps_logits", [True, False], ids=["logits_to_keep", "sliced"])
def test_first_token_scores_equal_the_full_vocabulary_computation(tiny_llm_dir, keeps_logits):
    teacher = hf_teacher(tiny_llm_dir)
    assert teacher.keeps_logits  # the tiny Llama's forward takes logits_to_keep
    teacher.keeps_logits = keeps_logits  # the fallback for models whose forward does not
    prompts, _ = teacher.encoder.encode(TEXTS)
    np.testing.assert_allclose(teacher._first_token_scores(prompts), reference_first_token(teacher, prompts), atol=1e-5)


@pytest.mark.parametrize("keeps_logits", [True, False], ids=["logits_to_keep", "sliced"])
def test_sequence_scores_equal_the_full_vocabulary_computation(tiny_llm_dir, keeps_logits):
    # Answers of different lengths (1 and 3 tokens): the gather must right-align each one.
    teacher = hf_teacher(tiny_llm_dir, "sequence", ("negative", "positive movie review"))
    assert sorted(map(len, teacher.continuations)) == [1, 3]
    teacher.keeps_logits = keeps_logits
    prompts, _ = teacher.encoder.encode(TEXTS)
    np.testing.assert_allclose(teacher._sequence_scores(prompts), reference_sequence(teacher, prompts), atol=1e-5)
    probs = teacher.score(TEXTS).probs
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)


def test_first_token_forward_projects_only_the_last_position(tiny_llm_dir):
    teacher = hf_teacher(tiny_llm_dir)
    prompts, _ = teacher.encoder.encode(TEXTS)
    seen: list[tuple[int, ...]] = []
    hook = teacher.model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    try:
        teacher._first_token_scores(prompts)
    finally:
        hook.remove()
    assert seen == [(len(TEXTS), 1, teacher.model.config.vocab_size)]


@pytest.mark.parametrize("scoring", ["first_token", "sequence"])
def test_length_sorted_batches_give_the_arrival_order_results(tiny_llm_dir, scoring):
    """``score`` batches the prompts longest first and puts the rows back: the labels of batching
    them in arrival order (as it did before), row for row."""
    from llkd_ray.label.teachers.base import normalise_scores

    teacher = hf_teacher(tiny_llm_dir, scoring)
    teacher.batch_size = 2 * len(teacher.continuations)  # 2 prompts a batch either way
    texts = [*TEXTS, "ok", "a long, slow and thoroughly pointless film about nothing much", *TEXTS[::-1]]
    prompts, _ = teacher.encoder.encode(texts)
    assert sorted(map(len, prompts), reverse=True) != list(map(len, prompts))  # the sort reorders
    forward = teacher._first_token_scores if scoring == "first_token" else teacher._sequence_scores
    arrival = np.concatenate([forward(prompts[i : i + 2]) for i in range(0, len(prompts), 2)])
    expected, _ = normalise_scores(arrival)
    output = teacher.score(texts)
    np.testing.assert_allclose(output.probs, expected, rtol=0, atol=1e-6)
    assert output.probs.argmax(axis=1).tolist() == expected.argmax(axis=1).tolist()


def test_teacher_batch_size_auto_follows_the_device():
    from llkd_ray.config import EmbeddingTeacherConfig, HFTeacherConfig

    for section in (EmbeddingTeacherConfig(), HFTeacherConfig()):
        assert section.batch_size == "auto"
        assert section.batch_for("cpu") == section.CPU_BATCH_SIZE < section.batch_for("cuda") == section.GPU_BATCH_SIZE
        assert section.model_copy(update={"batch_size": 8}).batch_for("cuda") == 8
    assert (EmbeddingTeacherConfig().batch_for("cpu"), HFTeacherConfig().batch_for("cpu")) == (32, 16)
    with pytest.raises(ValueError, match="batch_size"):
        HFTeacherConfig(batch_size="large")
