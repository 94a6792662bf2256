"""The student: one home for its model directory and the one predictor that reads it.

Training saves the student, serving answers with it, evaluation and the labeling rounds score with
it; each of them imports it from here, so none depends on another to read a model (transformers
keeps model I/O in ``modeling_utils`` and its pipelines only use it).

- ``model`` — a model reference resolved (hub id, local directory, ``builtin:minilm``), the student
  loaded for training (``load_student``: the task's labels, a fresh head) and saved with its
  training length (``save_classifier``), the length limit read back, the device chosen;
- ``predictor`` — :class:`Predictor` in the shape of a ``transformers`` pipeline (preprocess,
  forward, postprocess) and ``inference``: texts to probabilities, truncated where training did.

Plain torch and transformers, no Ray: a GPU machine without Ray loads and scores students with it.
"""
