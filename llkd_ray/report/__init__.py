"""The run report: ``llkd report RUN`` writes ``RUN/report/index.html`` and its PNG plots.

It reads what the stages left in the run directory (the layout of :class:`llkd_ray.artifacts.RunLayout`):

- ``train/metrics.jsonl`` — per-step loss, selected fraction, per-class teacher and student
  thresholds, cumulative data usage; gold-set evaluations during training;
- ``train/selected_ids.parquet`` — ids of the pool rows the student trained on at least once;
- ``labels/`` — the teacher's pseudo-labels and confidences (and hidden gold labels when the pool
  had them);
- ``eval.json`` — teacher and student metrics and confusion matrices on the gold set;
- ``_stages/*.json`` — wall time per stage.

Every plot is drawn only from data that is there; a missing input gives a note in the page, not
a failure. Plots use matplotlib's Agg backend (no display needed). The page is static HTML with
no scripts and no external resources.

Modules, in dependency order:

- ``run_data`` — ``RunData`` and ``load_run``: reading a run directory, apart from drawing it, so
  the plots and the page share one loader;
- ``plots`` — one function per PNG and ``PLOTS`` (file, title, caption, function in page order):
  the matplotlib code, the bulk of the report;
- ``page`` — ``build_report``: the HTML page, its summary tables and style, around the plots.
"""
