"""Ray Serve student serving: one real Serve on 127.0.0.1 for the module, the tiny classifier.

Applications share the Serve instance under their own route prefixes: ``/`` (open, with a training
summary next to the model), ``/secured`` (bearer auth), and short-lived ones for the loading and
replica-kill tests.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import httpx
import pytest
import yaml
from students import LONG_TEXT, TRAINING_LENGTH, save_student

from llkd_ray.config import ServingConfig
from llkd_ray.errors import ConfigError, LlkdError
from llkd_ray.serve.app import (
    LOAD_GATE_ENV,
    ServeArgs,
    _application,
    build_app,
    check_model_dir,
    deployment_options,
    load_serving_config,
    read_training_summary,
)
from llkd_ray.serve.client import RetryPolicy, classify, wait_until_ready

LABELS = ["negative", "positive"]
TOKEN = "s3cret-token-for-tests"
TOKEN_ENV = "LLKD_TEST_SERVE_TOKEN"
#: Small limits for the open app, so the limit checks need small bodies.
OPEN_SERVING = {"max_texts_per_request": 8, "max_chars": 300, "batch_wait_timeout_s": 0.05}
#: Test replicas take a quarter CPU so several fit in the session's 2-CPU Ray.
TEST_CPUS = 0.25
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _sst2_texts(n: int) -> list[str]:
    path = resources.files("llkd_ray") / "builtin" / "sst2" / "test.jsonl"
    lines = path.read_text().splitlines()[:n]
    return [json.loads(line)["text"] for line in lines]


def _deploy(name: str, model_dir: Path, route: str, *, replica_env: dict[str, str] | None = None, **serving) -> None:
    """Deploy through the public builder; test-only replica settings (``replica_env``) go in the
    replicas' runtime_env through the builder's private half."""
    from ray import serve

    args = ServeArgs(model=str(model_dir), serving={"num_cpus": TEST_CPUS, **serving})
    if replica_env:
        app = _application(check_model_dir(model_dir), load_serving_config(updates=args.serving), replica_env)
    else:
        app = build_app(args)
    serve.run(app, name=name, route_prefix=route)


@pytest.fixture(scope="module")
def served_model(tmp_path_factory, tiny_classifier_dir) -> Path:
    """The tiny classifier laid out as training writes it: RUN/train/student + RUN/train/training_summary.json."""
    train = tmp_path_factory.mktemp("run") / "train"
    student = train / "student"
    shutil.copytree(tiny_classifier_dir, student)
    (train / "training_summary.json").write_text(json.dumps({"steps": 12, "strategy": "llkd"}))
    return student


@pytest.fixture(scope="module")
def onnx_int8_model(tmp_path_factory, served_model) -> Path:
    """The served student exported by ``llkd export --quantize int8``."""
    from llkd_ray.serve.export import export_onnx

    return Path(export_onnx(served_model, tmp_path_factory.mktemp("export") / "int8", quantize="int8").output)


@pytest.fixture(scope="module")
def server(ray_local, served_model, tiny_classifier_dir, onnx_int8_model, monkeypatch_module):
    """Serve on a free loopback port with the open app at /, the authenticated one at /secured and
    the int8 ONNX export of the open app's model at /onnx."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        _deploy("open", served_model, "/", **OPEN_SERVING)
        monkeypatch_module.setenv(TOKEN_ENV, TOKEN)
        _deploy("secured", tiny_classifier_dir, "/secured", auth_token_env=TOKEN_ENV)
        monkeypatch_module.delenv(TOKEN_ENV)
        _deploy("onnx", onnx_int8_model, "/onnx", **OPEN_SERVING)
        for prefix in ("", "/secured", "/onnx"):
            wait_until_ready(f"{url}{prefix}", 180)
        yield url
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as http:
        yield http


# --------------------------------------------------------------------------- endpoints


def test_healthz_ok_once_loaded(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": "student"}


def test_classify_two_texts(client):
    response = client.post("/v1/classify", json={"texts": ["a great film", "a dull mess"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["name"] == "student"
    assert body["model"]["num_labels"] == 2
    predictions = body["predictions"]
    assert len(predictions) == 2
    for prediction in predictions:
        assert set(prediction["scores"]) == set(LABELS)
        assert sum(prediction["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert prediction["label"] == max(prediction["scores"], key=prediction["scores"].get)
        assert prediction["score"] == prediction["scores"][prediction["label"]]
        assert prediction["truncated"] is False


def test_classify_single_text_and_top_k(client):
    one = client.post("/v1/classify", json={"text": "a great film"}).json()["predictions"]
    assert len(one) == 1
    top = client.post("/v1/classify", json={"texts": ["a great film"], "top_k": 1}).json()["predictions"][0]
    assert list(top["scores"]) == [one[0]["label"]]
    assert top["scores"][top["label"]] == pytest.approx(one[0]["score"], abs=1e-6)
    # top_k above the number of labels keeps every label
    every = client.post("/v1/classify", json={"text": "a great film", "top_k": 10}).json()["predictions"][0]
    assert set(every["scores"]) == set(LABELS)


def test_long_text_is_truncated_and_flagged(client):
    # 149 one-letter words: 151 tokens with [CLS]/[SEP], over the tiny model's 128, under max_chars 300
    long_text = " ".join(["x"] * 149)
    exact = " ".join(["x"] * 126)  # exactly 128 tokens: not truncated
    response = client.post("/v1/classify", json={"texts": ["short", long_text, exact]})
    assert response.status_code == 200, response.text
    assert [p["truncated"] for p in response.json()["predictions"]] == [False, True, False]


def test_a_long_text_gets_the_same_probabilities_from_serve_eval_and_a_pipeline(
    client, server, tmp_path, tiny_classifier_dir
):
    """The train/serve skew: a student saved as training saves it is cut at its training length
    by the Serve API, ``llkd eval``'s predictor and ``transformers.pipeline`` alike."""
    from ray import serve
    from transformers import pipeline

    from llkd_ray.student.predictor import Predictor

    student = save_student(tiny_classifier_dir, tmp_path / "train" / "student")
    _deploy("skew", student, "/skew")
    try:
        wait_until_ready(f"{server}/skew", 120)
        response = client.post("/skew/v1/classify", json={"texts": [LONG_TEXT]})
        assert response.status_code == 200, response.text
        body = response.json()
    finally:
        serve.delete("skew")
    assert body["model"]["max_length"] == TRAINING_LENGTH
    (served,) = body["predictions"]
    assert served["truncated"] is True
    (evaluated,) = Predictor.load(student)([LONG_TEXT])
    classifier = pipeline("text-classification", model=str(student), device="cpu", truncation=True, top_k=None)
    (ranked,) = classifier([LONG_TEXT])
    piped = {p["label"]: p["score"] for p in ranked}
    assert served["label"] == evaluated["label"]
    assert served["scores"] == pytest.approx(evaluated["scores"], abs=1e-5)
    assert served["scores"] == pytest.approx(piped, abs=1e-5)


def test_the_int8_onnx_export_serves_the_same_labels_with_the_same_api(client):
    texts = ["a great film", "a dull mess", " ".join(["x"] * 149)]  # the last over the 128-token limit
    torch_answer = client.post("/v1/classify", json={"texts": texts}).json()
    response = client.post("/onnx/v1/classify", json={"texts": texts, "top_k": 1})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] | {"backend": "onnx", "dtype": "int8", "device": "cpu"} == body["model"]
    assert body["model"]["max_length"] == torch_answer["model"]["max_length"]
    assert [p["truncated"] for p in body["predictions"]] == [False, False, True]
    assert {p["label"] for p in body["predictions"]} <= set(LABELS)
    assert all(len(p["scores"]) == 1 for p in body["predictions"])
    # validation is the same replica code: an empty text is the same 422
    bad = client.post("/onnx/v1/classify", json={"texts": [""]})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
    info = client.get("/onnx/v1/model").json()
    assert info["labels"] == LABELS and info["backend"] == "onnx" and info["num_parameters"] > 0
    assert info["training_summary"] == {"steps": 12, "strategy": "llkd"}  # copied by the export


def test_model_info(client):
    response = client.get("/v1/model")
    assert response.status_code == 200
    info = response.json()
    assert info["labels"] == LABELS
    assert info["num_labels"] == 2
    assert info["max_length"] == 128
    assert info["device"] == "cpu"
    assert info["auth"] is False
    assert info["training_summary"] == {"steps": 12, "strategy": "llkd"}
    assert info["serving"]["max_texts_per_request"] == 8
    assert info["num_parameters"] > 0


def test_unknown_route_and_method_are_json_errors(client):
    missing = client.get("/v2/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong_method = client.get("/v1/classify")
    assert wrong_method.status_code == 405
    assert "error" in wrong_method.json()


# --------------------------------------------------------------------------- validation

JSON = "application/json"
VALIDATION_CASES = [
    # (id, body, content type, status, text the error message must contain)
    ("empty-list", '{"texts": []}', JSON, 422, "texts: List should have at least 1 item"),
    ("non-string", '{"texts": [42]}', JSON, 422, "texts[0]: Input should be a valid string"),
    ("null-in-list", '{"texts": ["fine", null]}', JSON, 422, "texts[1]"),
    ("empty-string", '{"texts": [""]}', JSON, 422, "texts[0]: String should have at least 1 character"),
    ("too-many-texts", json.dumps({"texts": ["a"] * 9}), JSON, 422, "9 texts given, at most 8"),
    ("text-too-long", json.dumps({"texts": ["ok", "y" * 301]}), JSON, 422, "texts[1]: 301 characters, at most 300"),
    ("single-text-too-long", json.dumps({"text": "y" * 301}), JSON, 422, "text: 301 characters"),
    ("malformed-json", '{"texts": ["a great film"', JSON, 400, "not valid JSON"),
    ("not-utf8", b'{"texts": ["\xff\xfe"]}', JSON, 400, "not valid JSON"),
    ("empty-body", "", JSON, 400, "empty request body"),
    ("not-an-object", '["a great film"]', JSON, 422, "Input should be an object"),
    ("both-inputs", '{"text": "a", "texts": ["b"]}', JSON, 422, "exactly one of 'texts'"),
    ("no-input", "{}", JSON, 422, "exactly one of 'texts'"),
    ("texts-not-a-list", '{"texts": "a great film"}', JSON, 422, "texts: Input should be a valid array"),
    ("unknown-field", '{"texts": ["a"], "labels": ["x"]}', JSON, 422, "labels: unknown field"),
    ("top-k-zero", '{"texts": ["a"], "top_k": 0}', JSON, 422, "top_k: Input should be greater than or equal to 1"),
    ("top-k-string", '{"texts": ["a"], "top_k": "2"}', JSON, 422, "top_k: Input should be a valid integer"),
    ("form-content", "texts=a+great+film", "application/x-www-form-urlencoded", 415, "Content-Type: application/json"),
    ("text-plain", '{"texts": ["a"]}', "text/plain", 415, "Content-Type: application/json"),
]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [case[1:] for case in VALIDATION_CASES],
    ids=[case[0] for case in VALIDATION_CASES],
)
def test_bad_requests_get_4xx_naming_the_problem(client, body, content_type, status, message):
    response = client.post("/v1/classify", content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["code"]


def test_body_over_the_size_limit_is_413(client):
    # limit = max_texts_per_request * max_chars * 4 + 64 KiB = 8 * 300 * 4 + 65536
    response = client.post("/v1/classify", content=b" " * 80_000, headers={"Content-Type": JSON})
    assert response.status_code == 413
    assert "exceeds" in response.json()["error"]["message"]


# --------------------------------------------------------------------------- batching


def test_concurrent_requests_match_one_at_a_time(client, server):
    texts = _sst2_texts(60)
    requests = [texts[i : i + 1 + i % 3] for i in range(0, 60, 2)]  # 30 requests of 1-3 texts
    sequential = [client.post("/v1/classify", json={"texts": r}).json()["predictions"] for r in requests]
    before = client.get("/v1/model").json()["stats"]

    def post(batch: list[str]) -> list[dict]:
        with httpx.Client(base_url=server, timeout=60) as own:
            response = own.post("/v1/classify", json={"texts": batch})
            assert response.status_code == 200, response.text
            return response.json()["predictions"]

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        concurrent = list(pool.map(post, requests))
    after = client.get("/v1/model").json()["stats"]

    for alone, together in zip(sequential, concurrent, strict=True):
        assert [p["label"] for p in together] == [p["label"] for p in alone]
        for a, b in zip(alone, together, strict=True):
            assert b["scores"] == pytest.approx(a["scores"], abs=1e-5)
    texts_sent = sum(len(r) for r in requests)
    assert after["texts"] - before["texts"] == texts_sent
    # texts from different requests shared forward passes
    assert after["batches"] - before["batches"] < len(requests)


# --------------------------------------------------------------------------- auth


def test_auth_rejects_missing_and_wrong_tokens(client):
    missing = client.post("/secured/v1/classify", json={"texts": ["a great film"]})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert "missing bearer token" in missing.json()["error"]["message"]

    wrong = client.post(
        "/secured/v1/classify", json={"texts": ["a great film"]}, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]

    basic = client.get("/secured/v1/model", headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    # auth comes before parsing: an unauthenticated malformed body is a 401, not a 400
    assert client.post("/secured/v1/classify", content="{", headers={"Content-Type": JSON}).status_code == 401


def test_auth_accepts_the_token_and_healthz_stays_open(client):
    assert client.get("/secured/healthz").status_code == 200
    headers = {"Authorization": f"Bearer {TOKEN}"}
    response = client.post("/secured/v1/classify", json={"texts": ["a great film"]}, headers=headers)
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 1
    info = client.get("/secured/v1/model", headers=headers).json()
    assert info["auth"] is True
    assert info["training_summary"] is None


def test_no_auth_when_the_token_variable_is_unset(client):
    assert client.get("/v1/model").json()["auth"] is False
    # a token sent to an open server is ignored
    assert client.get("/v1/model", headers={"Authorization": "Bearer whatever"}).status_code == 200


# --------------------------------------------------------------------------- lifecycle


def test_healthz_is_503_until_the_model_is_loaded(client, server, tiny_classifier_dir, tmp_path):
    from ray import serve

    gate = tmp_path / "load-now"  # the replica loads its model once this file exists
    _deploy("slow", tiny_classifier_dir, "/slow", replica_env={LOAD_GATE_ENV: str(gate)})
    try:
        loading = client.get("/slow/healthz")
        assert loading.status_code == 503
        assert loading.json() == {"status": "loading"}
        assert loading.headers["retry-after"] == "1"
        assert client.get("/slow/v1/model").json()["error"]["code"] == "loading"
        # a classify request sent while loading waits for the model instead of failing
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(client.post, "/slow/v1/classify", json={"texts": ["a great film"]})
            time.sleep(0.5)  # a grace for the request to reach the replica; no assertion depends on it
            assert not pending.done()
            gate.touch()
            response = pending.result(timeout=120)
        assert response.status_code == 200
        assert client.get("/slow/healthz").status_code == 200
    finally:
        serve.delete("slow")


def _replica_actor_names(app: str) -> list[str]:
    import ray

    return [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#")
    ]


def _wait_until(condition, timeout_s: float, what: str) -> None:
    """Poll ``condition`` every 50 ms; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout_s} s")
        time.sleep(0.05)


@pytest.mark.heavy  # a replica killed and restarted by Serve
def test_killed_replica_is_replaced_and_clients_recover_with_retries(client, server, tiny_classifier_dir):
    import ray
    from ray import serve

    _deploy("victim", tiny_classifier_dir, "/victim")
    url = f"{server}/victim"
    try:
        wait_until_ready(url, 120)
        before = client.get("/victim/v1/model").json()["replica"]
        expected = classify(url, ["a great film"])["predictions"]
        results: list[object] = []
        stop = threading.Event()

        def load() -> None:  # the documented client: retries connection errors and 5xx with backoff
            while not stop.is_set():
                try:
                    results.append(classify(url, ["a great film"], attempts=10, timeout_s=60)["predictions"])
                except LlkdError as error:
                    results.append(error)

        workers = [threading.Thread(target=load) for _ in range(3)]
        for worker in workers:
            worker.start()
        _wait_until(lambda: len(results) >= 3, 60, "the clients' first answers")
        (name,) = _replica_actor_names("victim")
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        killed_at = len(results)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = client.get("/victim/v1/model")
            if info.status_code == 200 and info.json()["replica"] != before:
                break
            time.sleep(0.5)
        replaced_at = len(results)
        _wait_until(lambda: len(results) >= replaced_at + 3, 120, "answers from the new replica")
        stop.set()
        for worker in workers:
            worker.join(timeout=120)

        assert client.get("/victim/v1/model").json()["replica"] != before
        assert len(_replica_actor_names("victim")) == 1
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors[:3]
        assert len(results) > killed_at  # requests went on after the kill
        for predictions in results:
            assert predictions[0]["label"] == expected[0]["label"]
            assert predictions[0]["scores"] == pytest.approx(expected[0]["scores"], abs=1e-5)
    finally:
        serve.delete("victim")


# --------------------------------------------------------------------------- the client's retry policy


def _scripted(*answers: httpx.Response | Exception) -> httpx.Client:
    """A client whose server answers ``answers`` in turn (an exception is raised as the transport's)."""
    queue = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.Client(transport=httpx.MockTransport(handler))


def test_retry_policy_backs_off_honours_retry_after_and_stops_at_a_final_answer():
    slept: list[float] = []
    policy = RetryPolicy(sleep=slept.append)
    request = httpx.Request("POST", "http://llkd.test/v1/classify", json={"texts": ["a"]})
    client = _scripted(
        httpx.Response(503, headers={"Retry-After": "3"}),
        httpx.Response(429),
        httpx.ConnectError("refused"),
        httpx.Response(503, headers={"Retry-After": "60"}),
        httpx.Response(200, json={"predictions": []}),
    )
    assert policy.send(client, request).status_code == 200
    assert slept == [3.0, 0.2 * 2, 0.2 * 4, 5.0]  # Retry-After, doubling backoff, capped at 5 s
    slept.clear()
    assert policy.send(_scripted(httpx.Response(422, json={})), request).status_code == 422  # final: no retry
    assert slept == []
    with pytest.raises(LlkdError, match=r"after 3 attempts \(last: HTTP 500"):
        RetryPolicy(attempts=3, sleep=slept.append).send(_scripted(*[httpx.Response(500)] * 3), request)
    assert slept == [0.2, 0.4]


# --------------------------------------------------------------------------- building the app


def test_model_dir_checks(tmp_path, tiny_classifier_dir):
    assert check_model_dir(tiny_classifier_dir) == str(Path(tiny_classifier_dir).resolve())
    with pytest.raises(LlkdError, match="not found"):
        check_model_dir(tmp_path / "nope")
    with pytest.raises(LlkdError, match=r"no config\.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LlkdError, match="id2label"):
        check_model_dir(tmp_path)


def test_training_summary_from_dir_or_parent(tmp_path):
    model = tmp_path / "train" / "student"
    model.mkdir(parents=True)
    assert read_training_summary(model) is None
    (model.parent / "training_summary.json").write_text('{"where": "parent"}')
    assert read_training_summary(model) == {"where": "parent"}
    (model / "training_summary.json").write_text('{"where": "dir"}')
    assert read_training_summary(model) == {"where": "dir"}


def test_serving_config_sources():
    assert load_serving_config() == ServingConfig()
    serving = load_serving_config(overrides=["serving.port=9001", "max_batch_size=8"])
    assert (serving.port, serving.max_batch_size) == (9001, 8)
    demo = load_serving_config(REPO / "configs" / "demo.yaml", ["serving.max_replicas=3"])
    assert demo.max_replicas == 3
    with pytest.raises(ConfigError, match="only serving"):
        load_serving_config(overrides=["training.workers=1"])
    with pytest.raises(ConfigError, match=r"serving\.port"):
        load_serving_config(overrides=["serving.port=0"])
    with pytest.raises(ConfigError, match="max_replicas"):
        load_serving_config(updates={"min_replicas": 3})
    with pytest.raises(ConfigError, match="device"):
        load_serving_config(updates={"device": "cpu", "num_gpus": 1})


def test_deployment_options_from_serving():
    serving = ServingConfig(min_replicas=0, max_replicas=4, target_ongoing_requests=4, num_cpus=2)
    options = deployment_options(serving)
    assert options["autoscaling_config"] == {
        "min_replicas": 0,
        "initial_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 4.0,
    }
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert options["max_ongoing_requests"] == serving.max_ongoing_requests
    # a GPU per replica when the cluster has GPUs (device auto), never on device cpu
    assert deployment_options(ServingConfig(), cluster_gpus=8)["ray_actor_options"]["num_gpus"] == 1
    assert deployment_options(ServingConfig(device="cpu"), cluster_gpus=8)["ray_actor_options"]["num_gpus"] == 0
    assert deployment_options(ServingConfig(num_gpus=0.5), cluster_gpus=8)["ray_actor_options"]["num_gpus"] == 0.5


def test_builder_takes_serve_run_style_args(tiny_classifier_dir):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    app = call_user_app_builder_with_args_if_necessary(
        build_app, {"model": str(tiny_classifier_dir), "config": str(REPO / "configs" / "demo.yaml")}
    )
    assert type(app).__name__ == "Application"
    with pytest.raises(ConfigError, match="model"):
        build_app({"config": "x.yaml"})
    with pytest.raises(ConfigError, match="unexpected"):
        build_app({"model": str(tiny_classifier_dir), "unexpected": 1})


def test_cluster_serve_config_is_valid(tiny_classifier_dir):
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (application,) = schema.applications
    assert application.import_path == "llkd_ray.serve.app:build_app"
    args = {**application.args, "model": str(tiny_classifier_dir)}
    assert type(build_app(args)).__name__ == "Application"
