"""The teacher's compute against a hand count: parameters from the config alone, tokens as read,
FLOPs by the trainer's rule; per block, in the manifest, across a resume; compute by stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llkd_ray.artifacts import MANIFEST, REJECTED_DIR
from llkd_ray.config import load_config
from llkd_ray.corpus import builtin_path
from llkd_ray.label.cost import teacher_parameters
from llkd_ray.label.run import label_corpus
from llkd_ray.label.teachers.check import check_teacher
from llkd_ray.label.teachers.prompts import render_prompt

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def sst2_texts(n: int) -> list[str]:
    lines = builtin_path("builtin:sst2/train").read_text().splitlines()[:n]
    return [json.loads(line)["text"] for line in lines]


def write_corpus(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def tiny_llama_parameters() -> int:
    """By hand, for build_tiny_llama: hidden 128, MLP 256, 2 layers, 2 heads of 64 (no biases);
    the token embeddings and the (untied) vocabulary projection are left out."""
    h, inner, layers = 128, 256, 2
    per_layer = 4 * h * h + 3 * h * inner + 2 * h  # q, k, v, o; gate, up, down; two RMSNorms
    return layers * per_layer + h  # + the final norm


def tiny_encoder_parameters() -> int:
    """By hand, for build_tiny_encoder: a 2-layer BERT, hidden 32, intermediate 64, with its pooler."""
    h, inner, layers = 32, 64, 2
    per_layer = 4 * (h * h + h) + 2 * h + (h * inner + inner) + (inner * h + h) + 2 * h
    return layers * per_layer + 2 * h + (h * h + h)  # + embedding LayerNorm, pooler


def hf_config(tiny_llm_dir, corpus: Path, *extra: str):
    return load_config(
        DEMO,
        [
            f"data.input={corpus}",
            "data.label_column=null",
            "teacher.backend=hf",
            f"teacher.hf.model={tiny_llm_dir}",
            "teacher.hf.max_model_len=128",
            "teacher.hf.batch_size=8",
            "teacher.block_rows=10",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def tiny_sentence_encoder(tmp_path_factory, minilm_path) -> Path:
    """A tiny BERT as a sentence-transformers model (mean pooling, normalised): the embedding teacher."""
    from llkd_ray.testing import build_tiny_encoder

    directory = build_tiny_encoder(tmp_path_factory.mktemp("tiny-st"))
    shutil.copy(Path(minilm_path) / "modules.json", directory / "modules.json")
    pooling = json.loads((Path(minilm_path) / "1_Pooling" / "config.json").read_text())
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling | {"word_embedding_dimension": 32}))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    return directory


# --------------------------------------------------------------------------- parameters, no weights


def test_teacher_parameters_come_from_the_config_and_match_a_hand_count(tiny_llm_dir, tiny_sentence_encoder, tmp_path):
    config = hf_config(tiny_llm_dir, write_corpus(tmp_path / "c.jsonl", ["a"]))
    plan = check_teacher(config.task, config.teacher)
    assert teacher_parameters(plan) == tiny_llama_parameters()
    embedding = load_config(DEMO, [f"teacher.embedding.model={tiny_sentence_encoder}"])
    assert teacher_parameters(check_teacher(embedding.task, embedding.teacher)) == tiny_encoder_parameters()


def test_sequence_scoring_counts_every_label_sequence(tiny_llm_dir, tmp_path):
    from llkd_ray.label.teachers.hf import HFTeacher

    texts = sst2_texts(5)
    first = hf_config(tiny_llm_dir, write_corpus(tmp_path / "c.jsonl", texts))
    sequence = hf_config(tiny_llm_dir, tmp_path / "c.jsonl", "teacher.scoring=sequence")
    teacher = HFTeacher(check_teacher(first.task, first.teacher))
    prompts = [len(ids) for ids in teacher.encoder.encode(texts)[0]]
    assert teacher.score(texts).tokens.tolist() == prompts
    plan = check_teacher(sequence.task, sequence.teacher)
    answers = sum(len(v) for v in plan.identity.verbalizers.values())
    k = len(plan.label_names)
    assert HFTeacher(plan).score(texts).tokens.tolist() == [k * p + answers for p in prompts]


# --------------------------------------------------------------------------- a labeling run


def read_parts(directory: Path, sub: str = ""):
    import pandas as pd

    files = sorted((directory / sub).glob("part-*.parquet"))
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def test_hf_labeling_flops_match_a_hand_count_and_survive_a_resume(ray_local, tmp_path, tiny_llm_dir):
    from transformers import AutoTokenizer

    texts = [*sst2_texts(30), "   "]  # one row the reader rejects: the teacher never reads it
    # A context every prompt fits (so the hand count needs no truncation).
    config = hf_config(tiny_llm_dir, write_corpus(tmp_path / "pool.jsonl", texts), "teacher.hf.max_model_len=512")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    by_text = {
        t: len(tokenizer(render_prompt(config.task, config.teacher.prompt_template, t))["input_ids"])
        for t in texts[:30]
    }
    hand_tokens = sum(by_text.values())
    hand_n = tiny_llama_parameters()

    out = tmp_path / "labels"
    result = label_corpus(config, out)
    compute = result.manifest["teacher_compute"]
    assert result.counts["truncated"] == 0
    assert compute["parameters"] == hand_n and compute["tokens"] == hand_tokens
    assert compute["flops"] == 2 * hand_n * hand_tokens and compute["complete"]
    assert compute["rows"] == 30 and compute["rows_not_counted"] == 0
    assert result.manifest["run"]["teacher_tokens"] == hand_tokens
    assert result.manifest["run"]["teacher_flops"] == 2 * hand_n * hand_tokens
    labeled = read_parts(out)
    assert dict(zip(labeled["text"], labeled["teacher_tokens"], strict=True)) == by_text  # per row
    assert read_parts(out, REJECTED_DIR)["teacher_tokens"].isna().all()
    assert "teacher compute" in result.summary() and "GFLOP" in result.summary()

    # Resume: one block lost (as if killed before its commit); the rerun labels it alone and the
    # manifest still counts every committed row once.
    lost = sorted(out.glob("part-*.parquet"))[0]
    lost_tokens = int(pq.read_table(lost)["teacher_tokens"].to_numpy().sum())
    lost.unlink()
    (out / MANIFEST).unlink()
    again = label_corpus(config, out)
    assert again.manifest["run"]["teacher_tokens"] == lost_tokens
    assert again.manifest["teacher_compute"]["tokens"] == hand_tokens
    assert again.manifest["teacher_compute"]["flops"] == 2 * hand_n * hand_tokens


def test_embedding_labeling_flops_match_a_hand_count(ray_local, tmp_path, tiny_sentence_encoder):
    from transformers import AutoTokenizer

    texts = [*sst2_texts(20), "word " * 300]  # the last is truncated to the encoder's 128 tokens
    config = load_config(
        DEMO,
        [
            f"data.input={write_corpus(tmp_path / 'pool.jsonl', texts)}",
            "data.label_column=null",
            f"teacher.embedding.model={tiny_sentence_encoder}",
            "teacher.block_rows=8",
        ],
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_sentence_encoder)
    hand_tokens = sum(min(len(ids), 128) for ids in tokenizer(texts)["input_ids"])
    result = label_corpus(config, tmp_path / "labels")
    compute = result.manifest["teacher_compute"]
    assert compute["tokens"] == hand_tokens and compute["parameters"] == tiny_encoder_parameters()
    assert compute["flops"] == 2 * tiny_encoder_parameters() * hand_tokens
    assert result.counts["truncated"] == 1


# --------------------------------------------------------------------------- compute by stage


def test_compute_by_stage_gives_shares_and_says_what_was_not_recorded():
    from llkd_ray.compute import compute_by_stage, compute_rows

    manifest = {"teacher_compute": {"flops": 6e12, "parameters": 10, "tokens": 3}}
    summary = {"compute": {"scoring_flops": 1e12, "training_flops": 3e12, "parameters": 5}}
    section = compute_by_stage(manifest, summary)
    assert section["total_flops"] == 1e13
    shares = {"teacher_labeling": 0.6, "student_scoring": 0.1, "student_training": 0.3}
    assert section["shares"] == pytest.approx(shares)
    assert compute_rows(section)[0] == ("teacher labeling", "6.00 TFLOP", "60.0%")
    old = compute_by_stage({}, summary)  # a label directory written before the teacher was counted
    assert old["flops"]["teacher_labeling"] is None and old["shares"] is None
    assert compute_rows(old)[0] == ("teacher labeling", "not recorded", "n/a")
    assert compute_rows(None)[2] == ("student training", "not recorded", "n/a")


def test_old_run_dirs_render_compute_as_not_recorded(tmp_path):
    from llkd_ray.artifacts import RunLayout, write_json
    from llkd_ray.pipeline.run import PipelineResult, format_summary
    from llkd_ray.report.page import build_report

    run = RunLayout(tmp_path / "run")
    run.root.mkdir()
    old_eval = {"gold": "g.jsonl", "gold_rows": 2, "teacher": {"accuracy": 0.5, "macro_f1": 0.5}}
    write_json(run.eval_json, old_eval)  # written before compute by stage was recorded
    write_json(run.training_summary, {"compute": {"scoring_flops": 1e9, "training_flops": 3e9}})
    page = build_report(run.root).read_text()
    assert "Compute by stage" in page and "not recorded" in page and "3.00 GFLOP" in page
    summary = format_summary(PipelineResult(run_dir=run.root, eval=old_eval))
    assert "teacher labeling" in summary and "not recorded" in summary

    # A run whose label directory counted its teacher: shares in the page.
    run.labels.mkdir(parents=True)
    write_json(run.labels / MANIFEST, {"teacher_compute": {"flops": 6e9, "parameters": 1, "tokens": 1}})
    write_json(run.eval_json, {k: v for k, v in old_eval.items() if k != "compute"})
    page = build_report(run.root).read_text()
    assert "60.0%" in page and "6.00 GFLOP" in page


# --------------------------------------------------------------------------- the plan before the bill

PLAN_SCRIPT = """
import contextlib, io, json, sys
import ray
from llkd_ray.cli import main

args = json.loads(sys.argv[1])
outputs = []
for command in (["label", "--json"], ["label", "--json", "--plan-rows", "10"], ["run", "--json"], ["label"]):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main([command[0], *args, *command[1:]]) == 0
    outputs.append(buffer.getvalue())
started = {"ray": ray.is_initialized(), "vllm": "vllm" in sys.modules}
print(json.dumps({"outputs": outputs, "started": started}))
"""


def test_plan_prints_the_right_tokens_and_flops_and_starts_no_engine(tiny_llm_dir, tmp_path):
    import os
    import subprocess
    import sys

    from transformers import AutoTokenizer

    texts = [*sst2_texts(40), "   "]  # 41 rows, one the reader rejects
    corpus = write_corpus(tmp_path / "pool.jsonl", texts)
    sets = [f"data.input={corpus}", "data.label_column=null", "teacher.backend=hf", f"teacher.hf.model={tiny_llm_dir}"]
    sets.append("teacher.hf.max_model_len=512")  # no prompt truncated: the hand count is the template's tokens
    args = ["--config", DEMO, *[item for s in sets for item in ("--set", s)], "--plan"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PLAN_SCRIPT, json.dumps(args)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["started"] == {"ray": False, "vllm": False}  # no Ray started, no engine imported
    full, sampled, run, text = result["outputs"]

    config = load_config(DEMO, sets)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    per_row = [
        len(tokenizer(render_prompt(config.task, config.teacher.prompt_template, t))["input_ids"]) for t in texts[:40]
    ]
    n = tiny_llama_parameters()
    plan = json.loads(full)
    assert plan["rows"] == 41 and plan["rows_counted"] and plan["sampled"] == 41 and plan["sample_valid"] == 40
    assert plan["exact"] and plan["tokens"] == sum(per_row) and plan["parameters"] == n
    assert plan["flops"] == 2 * n * sum(per_row)
    assert plan["gpu_hours"] == pytest.approx(plan["flops"] / (989e12 * 0.3) / 3600)
    assert json.loads(run) == plan  # llkd run --plan: the same forecast

    small = json.loads(sampled)  # ten rows sampled: the total is extrapolated, and says so
    assert small["rows"] == 41 and small["sampled"] == 10 and not small["exact"]
    assert small["mean_tokens"] == pytest.approx(sum(per_row[:10]) / 10)
    assert small["tokens"] == pytest.approx(sum(per_row[:10]) / 10 * 41)
    assert "no engine started" in text and "41 (counted)" in text and f"{sum(per_row):,}" in text
    assert "GPU-hours at 30% utilisation (MFU) of 989 TFLOP/s" in text


def test_plan_of_the_embedding_teacher_counts_the_encoder_tokens(tiny_sentence_encoder, tmp_path):
    from transformers import AutoTokenizer

    from llkd_ray.label.cost import label_plan

    texts = [*sst2_texts(12), "word " * 300]
    config = load_config(
        DEMO,
        [f"data.input={write_corpus(tmp_path / 'p.jsonl', texts)}", f"teacher.embedding.model={tiny_sentence_encoder}"],
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_sentence_encoder)
    hand = sum(min(len(ids), 128) for ids in tokenizer(texts)["input_ids"])
    plan = label_plan(config, sample_rows=100, peak_tflops=100.0, mfu=0.5)
    assert plan.exact and plan.tokens == hand and plan.flops == 2 * tiny_encoder_parameters() * hand
    assert plan.gpu_hours == pytest.approx(plan.flops / 50e12 / 3600)


def test_eval_json_compute_reads_the_run_directory(tmp_path):
    from llkd_ray.artifacts import RunLayout, write_json
    from llkd_ray.pipeline.run import compute_lines, run_compute

    layout = RunLayout(tmp_path / "run")
    for directory in (layout.labels, layout.teacher_gold):
        directory.mkdir(parents=True)
    write_json(layout.labels / MANIFEST, {"teacher_compute": {"flops": 8e12, "parameters": 7, "tokens": 11}})
    write_json(layout.teacher_gold / MANIFEST, {"teacher_compute": {"flops": 5e11}})
    summary = {"compute": {"scoring_flops": 1e12, "training_flops": 1e12, "parameters": 3}}
    compute = run_compute(layout, summary)
    assert compute["shares"]["teacher_labeling"] == pytest.approx(0.8)
    assert compute["teacher_gold_flops"] == 5e11 and compute["teacher_tokens"] == 11  # the gold set stays apart
    lines = compute_lines({"compute": compute})
    assert any("teacher labeling" in line and "8.00 TFLOP" in line and "80.0%" in line for line in lines)
    assert any("gold set" in line and "500.00 GFLOP" in line for line in lines)
