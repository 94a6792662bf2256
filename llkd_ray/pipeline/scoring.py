"""The student scores the pool for the rounds, and the round's rule chooses its slice (on Ray).

One Ray Data pass over the corpus (the committed ids dropped, or kept: the labeled rows' pass that
fits the teacher-confidence head) with an autoscaled pool of predictor actors
(``labeling.scoring_*``). Per row an actor returns the student's normalised entropy and predicted
class, the real tokens and the forward passes it ran, and what the round's rule asks for
(:mod:`llkd_ray.pipeline.choice`): BALD over MC-dropout passes, the previous student's
disagreement, the teacher-confidence head's prediction, the pooled embedding. Every forward pass
counts as student scoring, ``2·N`` FLOPs per real token.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from llkd_ray.compute import forward_flops
from llkd_ray.config import PipelineConfig
from llkd_ray.pipeline.choice import (
    HEAD_RULES,
    TeacherHead,
    choose_scored,
    clears_student_level,
    disagreement,
    epistemic_kind,
    fit_head,
    gated_score,
    typical_slice,
)
from llkd_ray.pipeline.choice import bald as bald_of


class StudentScorer:
    """The scoring pass's Ray Data actor class: one predictor (and the previous student's, for
    ``disagreement``), ``threads`` torch threads."""

    def __init__(
        self,
        model_dir: str,
        max_length: int,
        threads: int,
        dropout_passes: int = 0,
        embed: bool = False,
        previous: str | None = None,
        head: TeacherHead | None = None,
        seed: int = 0,
        initial: tuple[list[str], int] | None = None,
    ) -> None:
        """``initial``: the task's labels and ``training.seed`` — load ``model_dir`` as round 0's training
        does (a fresh head for these labels where it has none, seeded), so a typical first slice is
        scored, and counted, by the model the rounds start from."""
        import torch

        from llkd_ray.compute import non_embedding_parameters
        from llkd_ray.student.model import load_student, resolve_device, resolve_model_path
        from llkd_ray.student.predictor import Predictor

        torch.set_num_threads(threads)
        if initial is None:
            self.predictor = Predictor.load(model_dir, max_length=max_length, batch_size=64)
        else:
            model, tokenizer = load_student(resolve_model_path(model_dir), *initial)
            model = model.to(resolve_device("auto")).eval()
            self.predictor = Predictor(model, tokenizer, max_length=max_length, batch_size=64)
        self.previous = None if previous is None else Predictor.load(previous, max_length=max_length, batch_size=64)
        self.dropout_passes, self.embed, self.head, self.seed = dropout_passes, embed, head, seed
        self.parameters = non_embedding_parameters(self.predictor.model)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        from llkd_ray.train.selection import normalized_entropy

        texts = batch["text"].tolist()
        scores = self.predictor.scored_passes(
            texts, dropout_passes=self.dropout_passes, embed=self.embed or self.head is not None, seed=self.seed
        )
        probabilities = scores.probabilities
        # softmax(log p) = p: the entropy of the predictor's probabilities, by the selection rule's function.
        out: dict[str, Any] = {
            "id": batch["id"].astype(str),
            "uncertainty": normalized_entropy(torch.log(probabilities.clamp_min(1e-30))).numpy(),
            "predicted": probabilities.argmax(dim=-1).numpy(),
            "tokens": scores.tokens,
            "passes": 1 + self.dropout_passes + (self.previous is not None),
            "parameters": self.parameters,
        }
        if scores.sampled is not None:
            out["bald"] = bald_of(scores.sampled.numpy())
        if self.previous is not None:
            out["disagreement"] = disagreement(probabilities.numpy(), self.previous.probabilities(texts)[0].numpy())
        if self.head is not None and scores.embeddings is not None:
            out["teacher_sure"] = self.head.predict(scores.embeddings.numpy())
        if self.embed and scores.embeddings is not None:
            out["embedding"] = list(scores.embeddings.numpy())
        return pd.DataFrame(out)


def score_pool(
    config: PipelineConfig, student: Path | str, labeled: pa.Array, *, only: str = "unlabeled", **scorer: Any
) -> pd.DataFrame:
    """One row per usable pool row not in ``labeled`` (``only="labeled"``: in it): ``id``,
    ``uncertainty``, ``predicted``, ``tokens``, ``passes``, and what ``scorer`` (the keyword arguments
    of :class:`StudentScorer`) asks for."""
    import ray.data

    from llkd_ray.corpus import read_corpus, read_order
    from llkd_ray.label.store import drop_committed, keep_ids

    settings = config.labeling
    low, high = (
        (settings.scoring_concurrency,) * 2
        if isinstance(settings.scoring_concurrency, int)
        else settings.scoring_concurrency
    )
    with read_order(config.data):
        rows = read_corpus(config.data).rows.select_columns(["id", "text"])
        if only == "labeled":
            rows = rows.map_batches(keep_ids, batch_format="pyarrow", batch_size=None, fn_kwargs={"ids": labeled})
        else:
            unlabeled = {"committed": labeled}
            rows = rows.map_batches(drop_committed, batch_format="pyarrow", batch_size=None, fn_kwargs=unlabeled)
        scored = rows.map_batches(
            StudentScorer,
            fn_constructor_kwargs={
                "model_dir": str(student),
                "max_length": config.student.max_length,
                "threads": max(1, int(settings.scoring_num_cpus)),
                **scorer,
            },
            batch_size=settings.scoring_batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
            num_cpus=settings.scoring_num_cpus,
            num_gpus=settings.scoring_num_gpus or None,
        )
        frames = list(scored.iter_batches(batch_format="pandas", batch_size=None))
    columns = ["id", "uncertainty", "predicted", "tokens", "passes"]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return frame.drop_duplicates("id", keep="first").reset_index(drop=True)


def teacher_clears(confidence: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Whether each labeled row clears the teacher's bar ``c_i >= tauT[y_i]``, with the levels the
    selection rule starts from on these rows (:meth:`~llkd_ray.train.selection.Selector.teacher_gate`)."""
    import torch

    from llkd_ray.train.selection import Selector

    if not len(confidence):
        return np.zeros(0, dtype=bool)
    gate = Selector(num_classes).teacher_gate(
        torch.tensor(np.asarray(confidence, dtype=np.float64)), torch.tensor(np.asarray(labels, dtype=np.int64))
    )
    return gate.numpy()


def _by_class(predicted: pd.Series, names: list[str]) -> dict[str, int]:
    counts = Counter(int(p) for p in predicted)
    return {name: counts.get(i, 0) for i, name in enumerate(names)}


def _flops(frame: pd.DataFrame, parameters: int | None) -> tuple[int, float | None]:
    tokens = int((frame["tokens"] * frame["passes"]).sum()) if len(frame) else 0
    return tokens, forward_flops(parameters, tokens) if parameters else None


def student_levels(student: Path, names: list[str]) -> np.ndarray | None:
    """The student levels ``tauS[k]`` the training of ``student`` ended with (the last step record of
    the ``metrics.jsonl`` beside it), in ``names``' order; None where none was recorded."""
    from llkd_ray.artifacts import read_jsonl

    steps = [
        r["student_thresholds"] for r in read_jsonl(Path(student).parent / "metrics.jsonl") if "student_thresholds" in r
    ]
    if not steps or any(steps[-1].get(name) is None for name in names):
        return None
    return np.array([float(steps[-1][name]) for name in names])


def fitted_head(
    config: PipelineConfig, student: Path, labels_dir: Path, labeled: pa.Array, seed: int
) -> tuple[TeacherHead, dict[str, Any], pd.DataFrame]:
    """The teacher-confidence head on the labeled rows' embeddings under ``student`` (one pass over
    them), its record, and that pass's scores (for its FLOPs)."""
    from llkd_ray.artifacts import read_label_table

    names = config.task.label_names
    scores = score_pool(config, student, labeled, only="labeled", embed=True)
    labels = read_label_table(labels_dir, ["id", "pseudo_label", "confidence"]).to_pandas().set_index("id")
    labels = labels.loc[labels.index.intersection(scores["id"])]
    clears = pd.Series(
        teacher_clears(labels["confidence"].to_numpy(), labels["pseudo_label"].map(names.index).to_numpy(), len(names)),
        index=labels.index,
    )
    scores = scores[scores["id"].isin(clears.index)].reset_index(drop=True)
    head, record = fit_head(np.stack(scores["embedding"].to_numpy()), clears.loc[scores["id"]].to_numpy(), seed)
    return head, record, scores.drop(columns=["embedding"])


def choose_round(
    config: PipelineConfig,
    labels_dir: Path,
    index: int,
    size: int,
    student: Path,
    previous: Path | None,
    labeled: pa.Array,
    parameters: int | None,
) -> tuple[list[str], pd.DataFrame, dict[str, Any]]:
    """A round's slice by ``labeling.choose`` (and ``first: typical`` for round 0, scored by
    ``student``, the initial model there): the ids, the chosen rows' scores, and the scoring record."""
    settings, names = config.labeling, config.task.label_names
    seed = config.training.seed + index
    typical = index == 0
    kind = None if typical else epistemic_kind(settings.choose, index)
    scorer: dict[str, Any] = {"seed": seed}
    head, head_record, head_scores = None, None, None
    gated, levels = not typical and settings.choose == "gated_head", None
    if typical:
        scorer |= {"embed": True, "initial": (names, config.training.seed)}
    elif kind == "disagreement":
        scorer["previous"] = str(previous)
    elif kind == "bald":
        scorer["dropout_passes"] = settings.dropout_passes
    if not typical and settings.choose in HEAD_RULES:
        head, head_record, head_scores = fitted_head(config, student, labels_dir, labeled, seed)
        scorer["head"] = head
    scores = score_pool(config, student, labeled, **scorer)
    ids, predicted = scores["id"].tolist(), scores["predicted"].to_numpy()
    if typical:
        embeddings = np.stack(scores.pop("embedding").to_numpy()) if len(scores) else np.zeros((0, 1))
        chosen = typical_slice(ids, embeddings, predicted, size, len(names), seed)
    else:
        uncertainty = scores[kind].to_numpy() if kind else scores["uncertainty"].to_numpy()
        if gated:
            levels = student_levels(student, names)
            scores["clears_student"] = clears_student_level(uncertainty, predicted, levels)
            score = gated_score(scores["teacher_sure"].to_numpy(), scores["clears_student"].to_numpy())
        else:
            score = uncertainty * scores["teacher_sure"].to_numpy() if head is not None else uncertainty
        scores["score"] = score
        chosen = choose_scored(
            ids, score, uncertainty, predicted, size, len(names), set(labeled.to_pylist()),
            clip=settings.clip, explore=settings.explore, seed=seed,
        )  # fmt: skip
    picked = scores.set_index("id").loc[chosen]
    if parameters is None and len(scores):  # round 0: no training record yet; the actors counted them
        parameters = int(scores["parameters"].iloc[0])
    tokens, flops = _flops(scores, parameters)
    record: dict[str, Any] = {
        "rows": len(scores),
        "tokens": tokens,
        "parameters": parameters,
        "flops": flops,
        "student": str(student),
        "rule": "typical" if typical else settings.choose,
        "passes_per_row": int(scores["passes"].iloc[0]) if len(scores) else 0,
        "pool_by_predicted_class": _by_class(scores["predicted"], names),
        "slice_by_predicted_class": _by_class(picked["predicted"], names),
        "mean_uncertainty_pool": float(scores["uncertainty"].mean()) if len(scores) else None,
        "mean_uncertainty_slice": float(picked["uncertainty"].mean()) if len(picked) else None,
    }
    if not typical and settings.clip:
        record["clipped_rows"] = min(int(settings.clip * len(scores)), max(0, len(scores) - size))
    if kind:
        record[f"mean_{kind}_pool"] = float(scores[kind].mean()) if len(scores) else None
        record[f"mean_{kind}_slice"] = float(picked[kind].mean()) if len(picked) else None
        if previous is not None and kind == "disagreement":
            record["previous_student"] = str(previous)
    if head_record is not None and head_scores is not None:
        head_tokens, head_flops = _flops(head_scores, parameters)
        record["head"] = head_record | {"tokens": head_tokens, "flops": head_flops}
        record["tokens"] += head_tokens
        record["flops"] = None if flops is None or head_flops is None else flops + head_flops
        record["mean_teacher_sure_pool"] = float(scores["teacher_sure"].mean()) if len(scores) else None
        record["mean_teacher_sure_slice"] = float(picked["teacher_sure"].mean()) if len(picked) else None
    if gated:  # the levels, and the share of the pool and of the slice that cleared them
        record |= {
            "student_levels": None if levels is None else dict(zip(names, levels.tolist(), strict=True)),
            "clears_student_pool": float(scores["clears_student"].mean()) if len(scores) else None,
            "clears_student_slice": float(picked["clears_student"].mean()) if len(picked) else None,
        }
    return chosen, picked.reset_index(), record
