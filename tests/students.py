"""Students for the predictor, export and serving tests: the tiny classifier saved as training saves
it, with weights wide enough that its answers depend on the text, and a text far over its length."""

from __future__ import annotations

from pathlib import Path

import torch

TRAINING_LENGTH = 64
WORDS = (
    *("the", "film", "was", "a", "long", "slow", "and", "often", "dull"),
    *("story", "but", "its", "actors", "give", "warm", "funny", "moments", "to"),
)
#: 400 words: several hundred tokens, far over the training length (and the tiny model's 128).
LONG_TEXT = " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(400))


def save_student(source: str | Path, directory: Path, max_length: int = TRAINING_LENGTH) -> Path:
    """``source`` saved as training saves its student (:func:`~llkd_ray.student.model.save_classifier`).

    Its weights are drawn wider than a fresh initialisation's (std 0.02), whose answers hardly
    depend on the text (0.5035 either way): here tokens 65-128 of a text move its probabilities.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llkd_ray.student.model import save_classifier

    model = AutoModelForSequenceClassification.from_pretrained(source)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.2, generator=generator)
    tokenizer = AutoTokenizer.from_pretrained(source)
    save_classifier(model, tokenizer, directory, max_length)
    return directory
