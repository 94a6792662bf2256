"""The labeling stage: Ray Data streams the corpus through teacher actors into Parquet pseudo-labels.

One labeling run, in the order the modules take part (modelled on Ray's
``ray.llm._internal.batch``: stages that declare their columns, one module per engine backend, a
registry keyed by config):
``run.label_corpus`` -> ``teachers.check.check_teacher`` (the plan) -> ``store`` (check and
claim the directory) -> ``pool.plan_actor_pool`` -> ``stages.build_pipeline(LABEL_STAGES)``,
whose teacher stage is ``pool.teacher_stage`` (an actor pool of ``TeacherActor`` for embedding and
hf, ``teachers.vllm.VLLMTeacher.apply`` for vllm) committing each block through
``store.commit_block`` -> ``scan.scan_output`` (totals for the manifest).

- ``run`` — ``label_corpus``, ``LabelResult``, the label pass and its run record: the entry
  point, the only module that knows all the others.
- ``store`` — ``OutputStore``, the output schemas, claiming and checking the directory, and the
  exactly-once commit tasks: the directory contract in one place.
- ``scan`` — ``scan_output`` (dedupe, then totals) and ``read_labels``: the read side, which
  finished directories are read with and which never writes a new part.
- ``stages`` — ``Stage``, ``StageContext``, ``LABEL_STAGES``, ``check_stages``,
  ``build_pipeline``: the pipeline as data, checked before anything runs.
- ``pool`` — ``teacher_stage``, ``ActorPool``/``plan_actor_pool`` and ``TeacherActor``: how the
  teacher becomes one Ray Data operator sized from the cluster.
- ``cost`` — ``teacher_parameters``, ``teacher_compute`` and ``label_plan``: what labeling costs,
  counted in a run (the manifest's ``teacher_compute``) and forecast before one (``--plan``).
- ``teachers/`` — the teachers themselves (interface, prompts, three backends, registry, check);
  the plain-torch ones import without Ray.
"""
