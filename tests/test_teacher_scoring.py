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
