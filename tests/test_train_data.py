"""Rows arrive tokenised: the Ray Data tokenising map, ``Batch``'s ids through ``take``/``concat`` and
the one padding path give the tensors and the FLOP token counts of tokenising in the step."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch
from conftest import SST2_LABELS
from train_fixtures import TEXTS, review_batch, student_without_dropout

from llkd_ray.testing import build_tiny_llama

CONFIG = str(Path(__file__).resolve().parents[1] / "llkd_ray" / "configs" / "demo.yaml")
LONG = " ".join(["a remarkably long and winding review that keeps going"] * 8)


@pytest.fixture(scope="module")
def minilm_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_llama(tmp_path_factory.mktemp("llama"), TEXTS))


def _assert_same(ours: dict[str, torch.Tensor], reference) -> None:
    assert set(ours) == set(reference)
    for key in reference:
        assert torch.equal(ours[key], reference[key]), key


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("which", ["minilm_tokenizer", "llama_tokenizer"])
def test_padding_pre_tokenised_ids_gives_the_tokenizers_tensors(request, which, side):
    from llkd_ray.train.data import pad_token_ids, tokenize_texts

    tokenizer = request.getfixturevalue(which)
    tokenizer.padding_side = side
    texts = [*TEXTS, LONG, ""]
    for max_length in (8, 32):
        reference = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        _assert_same(pad_token_ids(tokenize_texts(tokenizer, texts, max_length), tokenizer), reference)
        fixed = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        _assert_same(pad_token_ids(tokenize_texts(tokenizer, texts, max_length), tokenizer, max_length), fixed)
    tokenizer.padding_side = "right"


def test_the_tokenising_map_feeds_batches_with_the_step_tensors(minilm_tokenizer, minilm_path):
    """The Ray Data block function, through Arrow and numpy as ``iter_batches`` hands them over."""
    from llkd_ray.train.data import Batch, tokenize_block
    from llkd_ray.train.selection import Selector
    from llkd_ray.train.step import StepContext

    batch = review_batch()
    block = pa.table(
        {
            "id": batch.ids,
            "text": batch.texts,
            "label_index": batch.labels.numpy(),
            "confidence": batch.confidence.numpy(),
            "probs": pa.array(batch.probs.tolist(), type=pa.list_(pa.float32())),
        }
    )
    tokenised = tokenize_block(block, tokenizer=minilm_path, max_length=6)
    assert tokenised.column("input_ids").type == pa.list_(pa.int32())
    arrived = Batch.from_numpy(
        {name: tokenised.column(name).to_numpy(zero_copy_only=False) for name in tokenised.column_names}
    )
    assert arrived.input_ids is not None and len(arrived.input_ids) == len(batch)
    ctx = StepContext(tokenizer=minilm_tokenizer, max_length=6, device=torch.device("cpu"), selector=Selector(2))
    reference = minilm_tokenizer(batch.texts, padding=True, truncation=True, max_length=6, return_tensors="pt")
    _assert_same(ctx.encode(arrived), reference)
    _assert_same(ctx.encode(batch), reference)  # a Batch from texts: tokenised on the way in


def test_take_and_concat_keep_the_ids(minilm_tokenizer):
    from llkd_ray.train.data import Batch

    batch = review_batch()
    ids = batch.token_ids(minilm_tokenizer, 32)
    part = batch.take(torch.tensor([5, 1]))
    assert [row.tolist() for row in part.input_ids] == [ids[5].tolist(), ids[1].tolist()]
    joined = Batch.concat([part, batch.take(torch.tensor([0]))])
    assert [row.tolist() for row in joined.input_ids] == [ids[5].tolist(), ids[1].tolist(), ids[0].tolist()]
    assert Batch.concat([part, review_batch([2])]).input_ids is None  # a mix is tokenised on first use


@pytest.mark.parametrize("strategy", ["llkd", "all"])
def test_pre_tokenised_steps_equal_text_steps(tiny_classifier_dir, strategy):
    """Same selection, loss, gradients and FLOP token counts whether the rows arrive tokenised or not."""
    from llkd_ray.train.plan import scoring_mode
    from llkd_ray.train.selection import Selector
    from llkd_ray.train.step import StepContext, train_step

    outcomes = []
    for pre_tokenised in (False, True):
        model, tokenizer = student_without_dropout(tiny_classifier_dir, SST2_LABELS)
        selector = Selector(2, strategy=strategy, momentum=0.9, seed=1)
        ctx = StepContext(tokenizer=tokenizer, max_length=32, device=torch.device("cpu"), selector=selector)
        batch = review_batch()
        if pre_tokenised:
            from llkd_ray.train.data import tokenize_texts

            batch.input_ids = tokenize_texts(tokenizer, batch.texts, 32)
        result = train_step(model, batch, ctx, capacity=4, scoring=scoring_mode(strategy))
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outcomes.append((result, grads))
    (texts, texts_grads), (ids, ids_grads) = outcomes
    assert texts.selection.mask.tolist() == ids.selection.mask.tolist()
    assert texts.loss == ids.loss
    assert (texts.compute.scoring_tokens, texts.compute.training_tokens) == (
        ids.compute.scoring_tokens,
        ids.compute.training_tokens,
    )
    assert texts.compute.training_tokens > 0
    for name in texts_grads:
        assert torch.equal(texts_grads[name], ids_grads[name]), name


@pytest.mark.heavy
def test_the_training_dataset_arrives_tokenised(ray_local, tmp_path, minilm_path, minilm_tokenizer):
    """``build_dataset`` on a labels directory: every row carries the student's truncated ids."""
    from train_fixtures import write_labels_dir

    from llkd_ray.config import load_config
    from llkd_ray.train.data import Batch, build_dataset, validate_labels_dir
    from llkd_ray.train.plan import TrainingPlan

    labels = write_labels_dir(tmp_path / "labels", [*TEXTS, LONG], SST2_LABELS)
    pool = validate_labels_dir(labels, SST2_LABELS)
    config = load_config(CONFIG, ["training.batch_size=4", "training.max_steps=3", "training.workers=1"])
    plan = TrainingPlan.build(config, pool.rows)
    assert plan.passes > 1
    dataset = build_dataset(pool, plan, seed=0, tokenizer=minilm_path, max_length=12)
    rows = [Batch.from_numpy(b) for b in dataset.iter_batches(batch_size=None, batch_format="numpy")]
    batch = Batch.concat(rows)
    assert len(batch) == plan.passes * pool.rows
    expected = minilm_tokenizer(batch.texts, truncation=True, max_length=12)["input_ids"]
    assert [row.tolist() for row in batch.input_ids] == expected


def test_compile_auto_is_cuda_only_and_the_key_is_checked():
    from llkd_ray.config import TrainingConfig
    from llkd_ray.train.recipe import _compiles

    assert TrainingConfig().compile == "auto"
    assert _compiles("auto", torch.device("cuda")) and not _compiles("auto", torch.device("cpu"))
    assert _compiles(True, torch.device("cpu")) and not _compiles(False, torch.device("cuda"))
    with pytest.raises(ValueError, match="compile"):
        TrainingConfig(compile="sometimes")


@pytest.mark.heavy
def test_a_compiled_student_padded_to_max_length_trains_like_the_eager_one(tiny_classifier_dir):
    """``training.compile``: the same selection and loss (float tolerance), the same parameter names."""
    from llkd_ray.train.selection import Selector
    from llkd_ray.train.step import StepContext, train_step

    outcomes = []
    for compiled in (False, True):
        model, tokenizer = student_without_dropout(tiny_classifier_dir, SST2_LABELS)
        names = list(model.state_dict())
        if compiled:
            model.compile()
        ctx = StepContext(
            tokenizer=tokenizer,
            max_length=32,
            device=torch.device("cpu"),
            pad_to_max_length=compiled,
            selector=Selector(2, momentum=0.9, seed=1),
        )
        result = train_step(model, review_batch(), ctx, capacity=8)
        assert list(model.state_dict()) == names
        outcomes.append(result)
    eager, compiled_result = outcomes
    assert eager.selection.mask.tolist() == compiled_result.selection.mask.tolist()
    assert compiled_result.loss == pytest.approx(eager.loss, rel=1e-4)
    assert compiled_result.compute.training_tokens == eager.compute.training_tokens  # padding is not counted


def test_bf16_autocasts_scoring_and_training_while_evaluation_and_saved_weights_stay_fp32(
    tiny_classifier_dir, tmp_path
):
    """``training.mixed_precision`` (``auto`` is bf16 on CUDA): forced to bf16 here, on CPU."""
    from safetensors.torch import load_file

    from llkd_ray.student.model import save_classifier
    from llkd_ray.student.predictor import Predictor
    from llkd_ray.train.recipe import _autocast_dtype, build_optimizer, load_student
    from llkd_ray.train.selection import Selector
    from llkd_ray.train.step import StepContext, train_step

    assert _autocast_dtype("auto", torch.device("cpu")) is None
    model, tokenizer = load_student(str(tiny_classifier_dir), SST2_LABELS, seed=0)
    ctx = StepContext(
        tokenizer=tokenizer,
        max_length=32,
        device=torch.device("cpu"),
        autocast_dtype=_autocast_dtype("bf16", torch.device("cpu")),
        selector=Selector(2, momentum=0.9, seed=1),
    )
    seen: list[tuple[bool, torch.dtype]] = []
    model.classifier.register_forward_hook(
        lambda _m, _i, out: seen.append((torch.is_inference_mode_enabled(), out.dtype))
    )
    optimizer = build_optimizer(model, 1e-3, 0.01)
    result = train_step(model, review_batch(), ctx, capacity=8)
    optimizer.step()
    assert result.compute.scored_samples == 8 and result.compute.trained_samples > 0
    assert (True, torch.bfloat16) in seen  # the scoring forward, in inference mode, autocast
    assert (False, torch.bfloat16) in seen  # the training forward, autocast
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    seen.clear()
    probs, _ = Predictor(model, tokenizer, max_length=32).probabilities(TEXTS)  # what evaluate() runs
    assert probs.dtype == torch.float32 and seen and {dtype for _, dtype in seen} == {torch.float32}
    save_classifier(model, tokenizer, tmp_path / "student", 32)
    saved = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
