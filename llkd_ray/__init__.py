"""llkd-ray: distil an LLM teacher into a small, fast, served text classifier on Ray.

Stages, one module or subpackage each: :mod:`llkd_ray.label` (teacher pseudo-labels), :mod:`llkd_ray.selection`
(the LLKD rule, plain torch), :mod:`llkd_ray.train` (Ray Train), :mod:`llkd_ray.serve` (Ray Serve).
"""

__version__ = "0.1.0"
