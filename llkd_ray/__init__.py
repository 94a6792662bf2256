"""llkd-ray: distil an LLM teacher into a small, fast, served text classifier on Ray.

Stages, one module each: :mod:`llkd_ray.label` (teacher pseudo-labels), :mod:`llkd_ray.train`
(Ray Train; the LLKD rule in plain torch: :mod:`llkd_ray.train.selection`), :mod:`llkd_ray.serve` (Ray Serve).
"""

__version__ = "0.1.0"
