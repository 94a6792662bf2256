"""Checking a teacher before any data is read: :func:`check_teacher` -> :class:`TeacherPlan`.

The model path, the tokenizer, and that the verbalizers have distinct first tokens are all
checked here, with a clear message. Above the registry (it asks a backend whether it is a
prompted LLM), so no backend imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

from llkd_ray.artifacts import stable_hash
from llkd_ray.config import TaskConfig, TeacherConfig
from llkd_ray.errors import ConfigError
from llkd_ray.label.teachers.base import TeacherIdentity, TeacherPlan
from llkd_ray.label.teachers.prompts import PromptEncoder, answer_continuations, check_first_tokens, load_tokenizer
from llkd_ray.label.teachers.registry import backend_spec
from llkd_ray.student.model import resolve_model_path


def prompt_hash(task: TaskConfig, teacher: TeacherConfig) -> str:
    """Identity of what an LLM teacher is asked: template, instruction, labels, answers, scoring."""
    payload = {
        "template": teacher.prompt_template,
        "instruction": task.instruction,
        "task": task.name,
        "labels": [[label.name, label.description, label.answer] for label in task.labels],
        "scoring": teacher.scoring,
    }
    if not backend_spec(teacher.backend).llm:
        payload = {
            "descriptions": [[label.name, label.description] for label in task.labels],
            "temperature": teacher.embedding.temperature,
        }
    return stable_hash(payload)


def _model_max_len(model_path: str, configured: int) -> int:
    """The configured context, capped by the model's own position limit when it has one."""
    config_file = Path(model_path) / "config.json"
    if config_file.is_file():
        limit = json.loads(config_file.read_text()).get("max_position_embeddings")
        if isinstance(limit, int) and limit > 0:
            return min(configured, limit)
    return configured


def check_teacher(task: TaskConfig, teacher: TeacherConfig) -> TeacherPlan:
    """Check everything about the teacher that can be checked without data; fail with a clear message.

    Resolves the model path (a missing local directory fails here), loads the tokenizer of an LLM
    teacher and maps every label to its verbalizer tokens.
    """
    backend = teacher.backend
    spec = backend_spec(backend)
    settings = getattr(teacher, backend)
    if spec.llm and teacher.scoring == "sequence" and not spec.sequence_scoring:
        raise ConfigError(
            f"teacher.scoring: sequence needs one request per label, which the {backend} backend does not do; "
            "use verbalizers with distinct first tokens (scoring: first_token) or the hf backend"
        )
    model_path = resolve_model_path(settings.model)
    phash = prompt_hash(task, teacher)
    if not spec.llm:
        identity = TeacherIdentity(
            backend=backend,
            model=settings.model,
            model_path=model_path,
            prompt_hash=phash,
            details={"temperature": teacher.embedding.temperature},
        )
        return TeacherPlan(task=task, teacher=teacher, model_path=model_path, identity=identity)

    tokenizer = load_tokenizer(model_path)
    max_len = _model_max_len(model_path, settings.max_model_len)
    encoder = PromptEncoder(tokenizer, task, teacher.prompt_template, max_len)
    continuations = answer_continuations(encoder)
    if teacher.scoring == "first_token":
        check_first_tokens(task, continuations, tokenizer, settings.model)
    else:  # the whole answers follow the prompt: check that they fit too
        PromptEncoder(tokenizer, task, teacher.prompt_template, max_len, max(map(len, continuations)))
    identity = TeacherIdentity(
        backend=backend,
        model=settings.model,
        model_path=model_path,
        prompt_hash=phash,
        scoring=teacher.scoring,
        verbalizers={label.name: c for label, c in zip(task.labels, continuations, strict=True)},
        details={"max_model_len": max_len, "chat_template": encoder.chat},
    )
    return TeacherPlan(
        task=task,
        teacher=teacher,
        model_path=model_path,
        identity=identity,
        max_len=max_len,
        first_tokens=[c[0] for c in continuations],
    )
