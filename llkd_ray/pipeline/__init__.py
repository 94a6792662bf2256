"""``llkd run``: the stages chained in one run directory, and the labeling rounds that drive them.

- ``run`` — ``run_pipeline`` and ``run_demo``: label → train → evaluate → report (→ serve), each
  stage between its markers, resumable, skipped when done with the same config; the demo's table;
- ``rounds`` — the labeling rounds' decisions, pure (no Ray, no torch): slice sizes, the random
  first slice, the uncertainty choice with per-class quotas, each round's training share, the
  rounds' records and their lines in the summary and the report;
- ``choice`` — the rules of choice, pure (no Ray, no torch): BALD, disagreement, the teacher-confidence
  head, the clip, the typical first slice; apart from ``rounds`` because they are the part a user
  switches (``labeling.choose``) and the one to measure;
- ``scoring`` — the student scores the pool for a round (one Ray Data pass of predictor actors: entropy,
  dropout passes, the previous student, the head, embeddings) and the round's rule chooses its slice;
- ``rounds_loop`` — the rounds on Ray: label a slice, train a student on what is labeled so far,
  score the unlabeled pool with it, choose the next slice; resumable round by round. Its own module
  because it drives both stages (``label`` and ``train``), which is the pipeline's business, not theirs.
"""
