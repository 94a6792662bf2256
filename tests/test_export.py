"""``llkd export``: the ONNX graph gives torch's probabilities, int8 predicts the same labels, a bad
or missing graph is one line, and a failed accuracy check writes nothing (ONNX Runtime, no Ray)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import SST2_LABELS
from students import LONG_TEXT, TRAINING_LENGTH, WORDS, save_student

from llkd_ray.errors import LlkdError

TEXTS = [LONG_TEXT, "ok", "a film", " ".join(WORDS), "a warm and funny story", LONG_TEXT[:300], *WORDS]


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_classifier_dir) -> Path:
    train = tmp_path_factory.mktemp("run") / "train"
    (train / "student").mkdir(parents=True)
    (train / "training_summary.json").write_text(json.dumps({"strategy": "llkd", "steps": 3}))
    return save_student(tiny_classifier_dir, train / "student")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, student) -> dict[str, Path]:
    """The student exported in fp32 and in int8."""
    from llkd_ray.serve.export import export_onnx

    root = tmp_path_factory.mktemp("exports")
    return {q or "fp32": Path(export_onnx(student, root / (q or "fp32"), quantize=q).output) for q in (None, "int8")}


def test_fp32_export_gives_torch_probabilities(student, exported):
    from llkd_ray.serve.backends import OnnxPredictor, load_predictor
    from llkd_ray.student.predictor import Predictor

    onnx = load_predictor(exported["fp32"])  # chosen from the directory
    assert isinstance(onnx, OnnxPredictor)
    torch_predictor = Predictor.load(student)
    assert (onnx.labels, onnx.max_length) == (SST2_LABELS, TRAINING_LENGTH)
    expected, cut = torch_predictor.probabilities(TEXTS)
    got, onnx_cut = onnx.probabilities(TEXTS)
    assert onnx_cut == cut and cut[0]  # the same truncation, the long text cut
    assert float((got - expected).abs().max()) <= 1e-4
    assert float(expected.std(dim=0).max()) > 1e-3  # the answers depend on the text: a real comparison
    assert onnx.describe() | {"backend": "onnx", "dtype": "float32"} == onnx.describe()
    assert onnx.num_parameters == torch_predictor.num_parameters


def test_export_directory_holds_what_serving_needs(student, exported):
    directory = exported["int8"]
    names = {p.name for p in directory.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "llkd_export.json", "training_summary.json"} <= names
    assert not any(name.endswith((".safetensors", ".bin")) or "fp32" in name for name in names)
    info = json.loads((directory / "llkd_export.json").read_text())
    assert (info["format"], info["quantize"], info["weights"], info["max_length"]) == ("onnx", "int8", "int8", 64)
    assert info["source"] == str(student.resolve())
    assert (directory / "model.onnx").stat().st_size < (exported["fp32"] / "model.onnx").stat().st_size / 2


def test_int8_export_predicts_the_same_label_set(student, exported):
    from llkd_ray.serve.backends import load_predictor
    from llkd_ray.student.predictor import Predictor

    int8 = load_predictor(exported["int8"], threads=1)
    assert int8.describe()["dtype"] == "int8" and int8.labels == SST2_LABELS
    predictions = int8(TEXTS)
    assert {p["label"] for p in predictions} <= set(SST2_LABELS)
    assert all(abs(sum(p["scores"].values()) - 1) < 1e-5 for p in predictions)
    reference = Predictor.load(student).predict_indices(TEXTS)
    agree = sum(a == b for a, b in zip(reference, int8.predict_indices(TEXTS), strict=True))
    assert agree >= 0.8 * len(TEXTS)


def test_int8_answers_do_not_depend_on_batch_company(exported):
    """Dynamic int8 scales activations over a whole forward pass: the predictor runs one text per pass."""
    import torch

    from llkd_ray.serve.backends import load_predictor

    int8 = load_predictor(exported["int8"], batch_size=32)
    together = int8.probabilities(TEXTS)[0]
    alone = torch.cat([int8.probabilities([text])[0] for text in TEXTS])
    assert torch.equal(together, alone)


def test_export_gold_check_reports_both_f1s_and_a_failed_check_writes_nothing(tmp_path, student):
    from llkd_ray.serve.export import ExportError, export_onnx

    gold = ("toy", TEXTS, [SST2_LABELS[i % 2] for i in range(len(TEXTS))])
    result = export_onnx(student, tmp_path / "ok", quantize="int8", gold=gold)
    summary = result.summary()
    assert "macro-F1 torch" in summary and "onnx int8" in summary and "agree" in summary
    assert result.gold.n == len(TEXTS) and 0 <= result.gold.agreement <= 1
    assert json.loads((tmp_path / "ok" / "llkd_export.json").read_text())["gold_check"]["n"] == len(TEXTS)
    # a limit no export can meet (it would have to gain 100 points): loud, and nothing is written
    with pytest.raises(ExportError, match=r"more than --max-f1-drop -100; nothing was written"):
        export_onnx(student, tmp_path / "strict", gold=gold, max_f1_drop=-100)
    assert not (tmp_path / "strict").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ok"]  # no staging directory left behind


def test_export_refuses_unsafe_outputs(tmp_path, student, exported):
    from llkd_ray.serve.export import ExportError, export_onnx

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty: pass --overwrite"):
        export_onnx(student, occupied)
    assert (occupied / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="outside the model directory"):
        export_onnx(student, student / "onnx")
    with pytest.raises(ExportError, match="not a torch model"):
        export_onnx(exported["fp32"], tmp_path / "again")
    with pytest.raises(ExportError, match="unknown quantization"):
        export_onnx(student, tmp_path / "q4", quantize="int4")


def test_bad_or_missing_onnx_file_is_one_line(tmp_path, exported, capsys):
    from llkd_ray.cli import main
    from llkd_ray.serve.app import check_model_dir
    from llkd_ray.serve.backends import load_predictor

    broken = tmp_path / "broken"
    shutil.copytree(exported["int8"], broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph\n" * 10)
    for load in (load_predictor, check_model_dir):
        with pytest.raises(LlkdError, match="cannot load the ONNX model") as error:
            load(broken)
        assert "\n" not in str(error.value)
    assert main(["eval", "--model", str(broken), "--data", "unused.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llkd: error: cannot load the ONNX model") and err.count("\n") == 1

    (broken / "model.onnx").unlink()
    with pytest.raises(LlkdError, match="holds no model weights"):
        load_predictor(broken)
    with pytest.raises(LlkdError, match=r"no ONNX model at .*model\.onnx \(write one with `llkd export"):
        load_predictor(broken, backend="onnx")
    both = tmp_path / "both"
    shutil.copytree(exported["int8"], both)
    (both / "model.safetensors").write_bytes(b"")
    with pytest.raises(LlkdError, match=r"both torch weights and model\.onnx"):
        check_model_dir(both)


def test_llkd_export_command(tmp_path, student, capsys):
    from llkd_ray.cli import main

    out = tmp_path / "int8"
    assert main(["export", "--model", str(student), "--quantize", "int8", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"-> {out} (onnx int8" in printed and "no gold set given" in printed
    assert main(["export", "--model", str(student), "--output", str(out)]) == 2  # not empty
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--model", str(student), "--output", str(out), "--overwrite"]) == 0
    assert json.loads((out / "llkd_export.json").read_text())["quantize"] is None


def test_onnx_serving_settings():
    from llkd_ray.config import ServingConfig
    from llkd_ray.serve.app import deployment_options, load_serving_config

    with pytest.raises(LlkdError, match="backend onnx runs on CPUs"):
        load_serving_config(updates={"backend": "onnx", "device": "cuda"})
    with pytest.raises(LlkdError, match=r"serving\.backend"):
        load_serving_config(updates={"backend": "tensorrt"})
    # an ONNX replica never reserves a GPU, even on a GPU cluster
    assert deployment_options(ServingConfig(backend="onnx"), cluster_gpus=8)["ray_actor_options"]["num_gpus"] == 0
