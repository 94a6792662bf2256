"""Student training on Ray Train: DDP workers, LLKD selection computed across shards, weighted loss.

Read it in this order, like a recipe:

- :mod:`~llkd_ray.train.data` — the labeling stage's output checked before anything starts, the
  Ray Dataset the workers shard and each worker's stream of candidate batches (the input side);
- :mod:`~llkd_ray.train.plan` — ``TrainingPlan``: global batch, per-worker rows and candidates,
  the step or compute budget, warm-up; computed once on the driver, so its own module;
- :mod:`~llkd_ray.train.selection` — the LLKD selection rule and weighted loss, plain torch with an
  injected all-reduce (no Ray, no process group), tested on its own;
- :mod:`~llkd_ray.train.optimizer` — the student's optimizer (``build_optimizer``); the student itself is
  loaded and saved by :mod:`llkd_ray.student.model`;
- :mod:`~llkd_ray.train.scores` — score reuse: each row's last ``u_i`` and its age (``selection.score_ttl``);
- :mod:`~llkd_ray.train.stopping` — the label-free stop (``training.stop: auto``): churn on a fixed probe;
- :mod:`~llkd_ray.train.step` — one step on one worker in plain torch (score, select, backward on
  the kept rows), the function the equivalence test runs in a gloo group without Ray;
- :mod:`~llkd_ray.train.recipe` — ``StudentTrainingRecipe``, one Ray Train worker's run (setup,
  restore, the loop, evaluations, checkpoints), with its callbacks;
- :mod:`~llkd_ray.train.checkpoint` — ``TrainState`` and the checkpoint's files, read by a restored
  worker and by the driver alike;
- :mod:`~llkd_ray.train.launch` — the driver, ``train_student``: the ``TorchTrainer``, its run and
  ``training_summary.json``.

The plain-torch modules (``selection``, ``step``, ``plan``, ``data``'s ``Batch``) import no Ray at
module level: a GPU machine without Ray imports them.
"""
