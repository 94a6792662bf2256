"""Teachers without Ray: prompts, verbalizers, truncation, scoring, and the embedding teacher's accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from llkd_ray.config import load_config, validate_config
from llkd_ray.errors import ConfigError, LlkdError
from llkd_ray.label.teachers.base import normalise_scores
from llkd_ray.label.teachers.check import check_teacher
from llkd_ray.label.teachers.embedding import EmbeddingTeacher
from llkd_ray.label.teachers.hf import HFTeacher
from llkd_ray.label.teachers.prompts import PromptEncoder, load_tokenizer, render_prompt
from llkd_ray.label.teachers.vllm import finish_vllm_rows, vllm_label_logprobs

DEMO = "configs/demo.yaml"


def llm_config(model, *overrides: str, backend: str = "hf"):
    return load_config(DEMO, [f"teacher.backend={backend}", f"teacher.{backend}.model={model}", *overrides])


# --------------------------------------------------------------------------- prompts and config


def test_prompt_states_task_labels_and_text():
    config = load_config(DEMO)
    prompt = render_prompt(config.task, config.teacher.prompt_template, "a gripping, funny film")
    assert config.task.instruction in prompt
    assert "- negative: a negative, bad review" in prompt
    assert "- positive: a positive, good review" in prompt
    assert "Text: a gripping, funny film" in prompt
    assert prompt.endswith("Label:")
    # Braces in the text are data, not template fields.
    assert "{weird} text" in render_prompt(config.task, config.teacher.prompt_template, "{weird} text")


@pytest.mark.parametrize(
    ("template", "message"),
    [("no text field here", "{text}"), ("{text} {mystery}", "unknown field(s) {mystery}"), ("{text} {", "brace")],
)
def test_bad_prompt_templates_fail_at_config_time(template, message):
    raw = load_config(DEMO).model_dump(mode="json")
    raw["teacher"]["prompt_template"] = template
    with pytest.raises(ConfigError, match="prompt_template") as error:
        validate_config(raw)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("teacher.embedding.concurrency=[3,1]", "min <= max"),
        ("teacher.block_rows=0", "block_rows"),
        ("teacher.vllm.dtype=float8", "dtype"),
    ],
)
def test_bad_teacher_settings_fail_at_config_time(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [override])


def test_llm_backend_needs_a_model():
    with pytest.raises(ConfigError, match=r"teacher\.hf\.model is required"):
        load_config(DEMO, ["teacher.backend=hf"])


def test_missing_model_directory_fails_with_its_name(tmp_path):
    config = llm_config(tmp_path / "no-such-model")
    with pytest.raises(LlkdError, match="model directory not found"):
        check_teacher(config.task, config.teacher)


# --------------------------------------------------------------------------- verbalizers


def test_verbalizers_map_to_distinct_single_tokens(tiny_llm_dir):
    config = llm_config(tiny_llm_dir)
    plan = check_teacher(config.task, config.teacher)
    tokenizer = load_tokenizer(plan.model_path)
    verbalizers = plan.identity.verbalizers
    for name in ("negative", "positive"):
        assert verbalizers[name] == tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        assert len(verbalizers[name]) == 1
    assert plan.first_tokens[0] != plan.first_tokens[1]
    assert plan.identity.to_dict()["verbalizer_token_ids"] == verbalizers


def test_shared_first_token_is_rejected_unless_scored_by_sequence(tiny_llm_dir):
    # Both answers start with the token " negative"; --set does not index lists, so edit the dict.
    raw = llm_config(tiny_llm_dir).model_dump(mode="json")
    raw["task"]["labels"][0]["verbalizer"] = "negative review"
    raw["task"]["labels"][1]["verbalizer"] = "negative movie"
    config = validate_config(raw)
    with pytest.raises(ConfigError, match=r"start with the same token .*scoring: sequence"):
        check_teacher(config.task, config.teacher)

    raw["teacher"]["scoring"] = "sequence"
    plan = check_teacher(*_sections(validate_config(raw)))
    assert [len(v) for v in plan.identity.verbalizers.values()] == [2, 2]
    texts = ["a gem", "a mess"]
    out = HFTeacher(plan).score(texts)
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0)

    raw["teacher"]["backend"] = "vllm"
    raw["teacher"]["vllm"]["model"] = str(tiny_llm_dir)
    config = validate_config(raw)
    with pytest.raises(ConfigError, match="sequence"):
        check_teacher(config.task, config.teacher)


def test_chat_template_is_applied_and_answers_follow_the_assistant_turn(tiny_llm_dir, tmp_path):
    import shutil

    chat_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_llm_dir, chat_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)  # a copy: the cached one stays template-free
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tokenizer.save_pretrained(chat_dir)
    config = llm_config(chat_dir)
    plan = check_teacher(config.task, config.teacher)
    assert plan.identity.details["chat_template"] is True
    encoder = PromptEncoder(load_tokenizer(plan.model_path), config.task, config.teacher.prompt_template, 256)
    rendered = encoder.render("fine")
    assert rendered.startswith("<s>user: ") and rendered.endswith("assistant: ")
    ids, _ = encoder.encode(["fine"])
    assert ids[0].count(load_tokenizer(plan.model_path).bos_token_id) == 1  # the template's own <s> only
    teacher = HFTeacher(plan)
    out = teacher.score(["a fine film", "dull"])
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0)


# --------------------------------------------------------------------------- truncation


def test_long_texts_are_truncated_and_flagged_never_failed(tiny_llm_dir):
    config = llm_config(tiny_llm_dir, "teacher.hf.max_model_len=96")
    plan = check_teacher(config.task, config.teacher)
    tokenizer = load_tokenizer(plan.model_path)
    encoder = PromptEncoder(tokenizer, config.task, config.teacher.prompt_template, plan.max_len)
    long_text = "an utterly tedious and overlong movie " * 40
    ids, truncated = encoder.encode(["short and sweet", long_text])
    assert truncated == [False, True]
    assert len(ids[1]) <= 96 - 1
    decoded = tokenizer.decode(ids[1], skip_special_tokens=True)
    # The instruction and the answer cue survive; the text was cut.
    assert decoded.startswith(config.task.instruction)
    assert decoded.endswith("Answer with the label only.\nLabel:")
    assert "an utterly tedious" in decoded and decoded.count("overlong") < 40
    assert ids[0] == tokenizer(encoder.render("short and sweet"))["input_ids"]


def test_a_template_too_long_for_the_context_fails_early(tiny_llm_dir):
    config = llm_config(tiny_llm_dir, "teacher.hf.max_model_len=40")
    with pytest.raises(ConfigError, match="max_model_len"):
        check_teacher(config.task, config.teacher)


# --------------------------------------------------------------------------- scoring


def test_normalise_scores_is_a_softmax_and_flags_non_finite_rows():
    probs, reasons = normalise_scores(np.array([[0.0, 0.0], [np.log(3.0), 0.0], [np.nan, 1.0]]))
    np.testing.assert_allclose(probs[0], [0.5, 0.5])
    np.testing.assert_allclose(probs[1], [0.75, 0.25])
    assert np.isnan(probs[2]).all()
    assert reasons == [None, None, "teacher_non_finite"]


def test_hf_teacher_scores_are_distributions_independent_of_batching(tiny_llm_dir):
    config = llm_config(tiny_llm_dir, "teacher.hf.batch_size=3")
    teacher = HFTeacher(check_teacher(config.task, config.teacher))
    texts = ["a gem", "a mess of a movie with no point at all", "fine", "the best film of the year, by far", "meh"]
    together = teacher.score(texts)
    assert together.probs.shape == (5, 2)
    np.testing.assert_allclose(together.probs.sum(axis=1), 1.0, atol=1e-12)
    assert together.reasons == [None] * 5
    alone = np.vstack([teacher.score([t]).probs for t in texts])
    np.testing.assert_allclose(together.probs, alone, atol=1e-5)  # left padding changes nothing


def test_sequence_scoring_equals_first_token_scoring_for_one_token_answers(tiny_llm_dir):
    texts = ["a gem", "a mess", "fine enough I guess"]
    first = HFTeacher(check_teacher(*_sections(llm_config(tiny_llm_dir)))).score(texts)
    sequence = HFTeacher(check_teacher(*_sections(llm_config(tiny_llm_dir, "teacher.scoring=sequence")))).score(texts)
    np.testing.assert_allclose(first.probs, sequence.probs, atol=1e-5)


def _sections(config):
    return config.task, config.teacher


def test_vllm_rows_become_label_rows_and_errors_are_rejections():
    import pandas as pd

    row = {"logprobs": [{307: {"logprob": -1.0}, "327": {"logprob": -2.0}, 5: {"logprob": -0.1}}]}
    assert vllm_label_logprobs(row, [327, 307]) == [-2.0, -1.0]
    assert np.isnan(vllm_label_logprobs({"logprobs": None}, [1, 2])).all()
    batch = pd.DataFrame(
        {
            "id": ["a", "b"],
            "text": ["x", "y"],
            "truncated": [True, None],
            "label_logprobs": [[-2.0, -1.0], None],
            "__inference_error__": ["", "EngineError: boom"],
            "teacher_actor": ["actor-1", None],
        }
    )
    frame = finish_vllm_rows(batch, label_names=["negative", "positive"])
    expected = np.exp([-2.0, -1.0]) / np.exp([-2.0, -1.0]).sum()
    np.testing.assert_allclose(frame["probs"][0], expected)
    assert frame["reason"][0] is None and frame["reason"][1] == "teacher_error: EngineError: boom"
    assert frame["truncated"].tolist() == [True, False]
    assert frame["teacher_actor"].tolist() == ["actor-1", ""]


# --------------------------------------------------------------------------- the embedding teacher


@pytest.mark.heavy  # MiniLM over the 872 gold texts
def test_embedding_teacher_is_a_real_teacher_on_sst2_gold(minilm_path):
    """Zero-shot MiniLM on the whole SST-2 gold set: measured 0.709 accuracy, and its confidence
    is informative (the more confident half is more accurate)."""
    config = load_config(DEMO)
    gold = _gold_frame()
    plan = check_teacher(config.task, config.teacher)
    teacher = EmbeddingTeacher(plan)
    out = teacher.score(gold["text"].tolist())
    assert out.probs.shape == (len(gold), 2)
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, atol=1e-9)
    predicted = np.array(config.task.label_names)[out.probs.argmax(axis=1)]
    correct = predicted == gold["label"].to_numpy()
    accuracy = correct.mean()
    assert 0.67 <= accuracy <= 0.75, accuracy
    confidence = out.probs.max(axis=1)
    order = np.argsort(-confidence)
    half = len(order) // 2
    assert correct[order[:half]].mean() > correct[order[half:]].mean() + 0.1
    assert not out.truncated.any()
    flags = teacher.score(["word " * 400, "short"]).truncated
    assert flags.tolist() == [True, False]


def _gold_frame():
    """The SST-2 gold set read straight from the package (no Ray needed here)."""
    import json

    import pandas as pd

    from llkd_ray.corpus import builtin_path

    rows = [json.loads(line) for line in builtin_path("builtin:sst2/test").read_text().splitlines()]
    return pd.DataFrame(rows)
