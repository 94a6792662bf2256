"""``llkd serve`` end to end: its own local Ray and Serve in a subprocess, stopped with Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from scenarios import free_port, kill_session

from llkd_ray.serve import wait_until_ready


@pytest.mark.heavy  # `llkd serve` in a subprocess: its own Ray and Serve start, then Ctrl-C
def test_llkd_serve_answers_then_shuts_down_on_ctrl_c(tiny_classifier_dir, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LLKD_API_TOKEN")}
    log = tmp_path / "serve.log"
    command = [
        sys.executable,
        "-m",
        "llkd_ray.cli",
        "serve",
        "--model",
        str(tiny_classifier_dir),
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
        wait_until_ready(url, 240)
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/healthz").status_code == 200
            response = client.post("/v1/classify", json={"texts": ["a great film", "a dull mess"]})
            assert response.status_code == 200, response.text
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
