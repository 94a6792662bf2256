"""llkd-ray: distil an LLM teacher into a small, fast, served text classifier on Ray.

One subpackage per stage of the data flow: :mod:`llkd_ray.label` (teacher pseudo-labels, Ray
Data), :mod:`llkd_ray.train` (the student, Ray Train; the LLKD rule in plain torch:
:mod:`llkd_ray.train.selection`), :mod:`llkd_ray.serve` (the predictor, the ONNX export, Ray
Serve). Foundations they share sit at the top (``config``, ``errors``, ``artifacts``, ``models``,
``runtime``, ``console``, ``tracking``, ``compat``, ``corpus``, ``compute``, ``metrics``); ``evaluate``, ``pipeline``,
:mod:`llkd_ray.report`, :mod:`llkd_ray.quality` and ``cli`` sit above the stages.
"""

__version__ = "0.1.0"
