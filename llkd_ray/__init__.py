"""llkd-ray: distil an LLM teacher into a small, fast, served text classifier on Ray.

One subpackage per stage of the data flow: :mod:`llkd_ray.label` (teacher pseudo-labels, Ray
Data), :mod:`llkd_ray.train` (the student's training, Ray Train; the LLKD rule in plain torch:
:mod:`llkd_ray.train.selection`), :mod:`llkd_ray.serve` (Ray Serve, the ONNX export and runtime).
Foundations they share sit at the top (``config``, ``errors``, ``artifacts``, ``runtime``,
``console``, ``tracking``, ``compat``, ``corpus``, ``jsonl``, ``compute``, ``metrics``, and
:mod:`llkd_ray.student`: the student's model directory and its predictor; ``testing`` and
``sessions`` support the tests and benchmarks); ``evaluate``, :mod:`llkd_ray.pipeline` (``llkd run``
and the labeling rounds), :mod:`llkd_ray.report`, :mod:`llkd_ray.quality` (the quality benchmark)
and ``cli`` sit above the stages.
"""

__version__ = "0.1.0"
