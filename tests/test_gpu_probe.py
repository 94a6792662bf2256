"""``benchmarks/gpu_probe.py --tiny`` on CPU: every section runs with the project's classes and writes
its fields; Ray and vLLM are never imported (the probe runs on a bare GPU machine). Speed is not
checked here: the probe's figures are for a GPU (docs/training.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_probe_runs_tiny_on_cpu_and_writes_every_field(tmp_path):
    out = tmp_path / "probe.json"
    env = os.environ | {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_probe.py"),
        "--tiny",
        "--device",
        "cpu",
        "--json",
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GPU probe on" in done.stdout
    results = json.loads(out.read_text())

    assert results["imported"] == {"ray": False, "vllm": False}
    assert results["machine"]["device"] == "cpu" and results["tiny"] is True
    assert results["matmul_tflops"] > 0
    combos = {(r["strategy"], r["precision"]) for r in results["training"]}
    assert combos == {("all", "fp32"), ("llkd", "fp32"), ("all", "bf16"), ("llkd", "bf16")}
    for row in results["training"]:
        for field in (
            "tokenise_ms",
            "score_ms",
            "train_ms",
            "selection_ms",
            "optimizer_ms",
            "step_ms",
            "today_step_ms",
        ):
            assert row[field] >= 0, field
        assert row["today_step_ms"] == row["tokenise_ms"] + row["step_ms"]
        assert row["trained_tokens_per_step"] > 0 and row["tflops"] > 0 and row["mfu"] > 0
        # `all` scores nothing; llkd scores every candidate in inference mode
        assert (row["scored_tokens_per_step"] > 0) == (row["strategy"] == "llkd")
    assert [r["texts"] for r in results["predictor"]] == [1, 32, 256]
    assert all(r["texts_per_s"] > 0 and r["tokenise_share"] > 0 for r in results["predictor"])
    hf = results["hf_teacher"]
    assert hf["prompts"] == 8 and hf["mean_prompt_tokens"] > 0
    for row in hf["batches"]:
        assert row["sorted_prompts_per_s"] > 0 and row["arrival_prompts_per_s"] > 0
        assert 0 < row["arrival_padding_efficiency"] <= row["sorted_padding_efficiency"] <= 1
    embedding = results["embedding_teacher"]
    assert [r["batch"] for r in embedding["batches"]] == [32, 256] and embedding["auto_batch"] == 32
