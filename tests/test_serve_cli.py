"""``llkd serve`` end to end: its own local Ray and Serve in a subprocess, stopped with Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from scenarios import free_port

from llkd_ray.serve.client import wait_until_ready
from llkd_ray.sessions import kill_session


def _wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert process.poll() is None, f"llkd serve exited with {process.returncode}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout_s:.0f}s: {log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.mark.heavy  # `llkd serve` in a subprocess: its own Ray and Serve start, then Ctrl-C
@pytest.mark.parametrize(
    "variant",
    [
        pytest.param("torch", id="torch-python-proxy"),
        pytest.param("onnx-int8", id="onnx-int8-haproxy"),  # `llkd export`'s output behind Ray's HAProxy ingress
    ],
)
def test_llkd_serve_answers_then_shuts_down_on_ctrl_c(variant, tiny_classifier_dir, tmp_path):
    from llkd_ray.serve.server import HAPROXY_ENV

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LLKD_API_TOKEN", HAPROXY_ENV)}
    model = tiny_classifier_dir
    if variant == "onnx-int8":
        from llkd_ray.serve.export import export_onnx

        model = Path(export_onnx(tiny_classifier_dir, tmp_path / "int8", quantize="int8").output)
        env[HAPROXY_ENV] = "1"
    log = tmp_path / "serve.log"
    command = [
        sys.executable,
        "-m",
        "llkd_ray.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--set",
        "serving.num_cpus=0.5",
        "--set",
        "serving.max_texts_per_request=4",
    ]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_line(log, "); Ctrl-C stops", process, 240)  # its own readiness line: it is serving
        wait_until_ready(url, 30)
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/healthz").status_code == 200
            response = client.post("/v1/classify", json={"texts": ["a great film", "a dull mess"]})
            assert response.status_code == 200, response.text
            assert response.json()["model"]["backend"] == variant.partition("-")[0]
            predictions = response.json()["predictions"]
            assert len(predictions) == 2
            for prediction in predictions:
                assert set(prediction["scores"]) == {"negative", "positive"}
                assert sum(prediction["scores"].values()) == pytest.approx(1.0, abs=1e-5)
            for body in ({"texts": []}, {"texts": [42]}, {"texts": ["a", "b", "c", "d", "e"]}):
                bad = client.post("/v1/classify", json=body)
                assert 400 <= bad.status_code < 500, bad.text
                assert bad.json()["error"]["message"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        kill_session(process.pid)
        process.wait()
    output = log.read_text()
    assert f"at http://127.0.0.1:{port}" in output
    assert ("ingress: HAProxy" in output) == (variant == "onnx-int8"), output[-3000:]
    assert "shutting down" in output
    with pytest.raises(httpx.TransportError):  # the proxy is gone with Serve
        httpx.get(f"{url}/healthz", timeout=5)


def test_llkd_serve_rejects_a_directory_without_labels(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "llkd_ray.cli", "serve", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "id2label" in result.stderr
    assert time.monotonic() - started < 60  # fails before starting Ray
