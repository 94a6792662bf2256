"""Quality benchmark: LLKD against its baselines on real data, at equal compute (``llkd bench quality``).

The teacher labels the pool once; every strategy and seed then trains a student from those same
pseudo-labels with the **same compute budget** (FLOPs of candidate scoring and training, in passes
of ``all`` over the pool; ``llkd_ray/compute.py``), evaluated on the gold set at fixed fractions
of the budget: a learning curve per run. ``--steps N`` compares at equal steps instead. Output in
``OUTPUT/``:

- ``results.json`` — the settings, the teacher's accuracy and macro-F1 on the gold set, and per
  strategy and seed: the curve, the final accuracy and macro-F1, compute spent by kind, data
  usage, wall time (plus the mean ± std summary and the curves' milestones);
- ``results.md`` — macro-F1 at the full budget, the best along the curve and where, the compute
  to reach the teacher and ``all``'s best, data usage; where the compute goes; whether ``all``'s
  curve plateaued;
- ``quality.png`` — macro-F1 against compute (mean curve ± std band per strategy, the teacher a
  line) and final macro-F1 against data usage.

Work files (the sampled pool and gold set, the teacher's labels, each run's student) stay under
``OUTPUT/work/``; a run whose result is already there with the same settings is not redone, so an
interrupted benchmark resumes.

Modules, in dependency order:

- ``data`` — the inputs: built-in or custom data sets, label descriptions, the sampled pool and
  gold set written with ids (file handling only, no config of a run);
- ``settings`` — ``Variant``, ``BenchSettings`` and the pipeline config of each run: what a run is,
  shared by the runs, the tables and the command line;
- ``summary`` — mean ± std over seeds, mean curves, milestones, the plateau check: pure functions
  of the recorded runs, used by the runs' ``results.json``, the tables and the plot;
- ``plots`` — ``quality.png`` (matplotlib, imported only when drawn);
- ``labeling`` — the labeling axis (``--labeling-budgets``): a labeling run (``llkd run``'s label
  rounds and last training), its record on the whole pool's compute axis, its summary and table;
- ``tables`` — ``results.md``'s tables, and ``write_results`` for the three output files;
- ``runs`` — labelling once, training every variant and seed, resuming and reusing finished runs
  (with ``labeling``, the only modules that run the label and train stages);
- ``cli`` — the arguments of ``llkd bench quality``, ``quality_main`` and ``main``.
"""
