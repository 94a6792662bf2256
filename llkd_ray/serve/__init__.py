"""The serving stage: a student classifier as an HTTP API on Ray Serve, and the runtimes it runs on.

A docstring only, no imports: the modules load Ray, FastAPI or ONNX only where needed. The student
and its torch predictor live in :mod:`llkd_ray.student`, which serving imports like training does.

- ``backends`` — the runtime of the forward pass: torch (the student's ``Predictor``) or ONNX
  Runtime (:class:`OnnxPredictor`), chosen from the model directory by ``load_predictor``; its own
  module because only serving, ``llkd eval --backend`` and the export choose among runtimes.
- ``export`` — ``llkd export``: the student as a checked ONNX graph (fp32 or int8); its own module
  because it is a command of its own, run once per model, never by a replica.
- ``api`` — the HTTP contract: request models, error bodies and handlers, bearer auth, the body
  reader; its own module because it is FastAPI and pydantic only, no Ray.
- ``app`` — the Serve deployment ``Classifier`` (with ``ModelHost`` and ``Usage``), the serving
  config and ``build_app``, the ``serve run llkd_ray.serve.app:build_app`` import path.
- ``client`` — ``classify`` with the documented retry policy and ``wait_until_ready``: the client
  side, plain ``httpx``, for ``llkd serve``, the tests and the load benchmark.
- ``server`` — ``run_server`` (``llkd serve``): the port check, the ingress choice, signals and
  Serve's shutdown; its own module because it is process plumbing around the application.
"""
