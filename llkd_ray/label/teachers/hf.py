"""The ``hf`` backend: a ``transformers`` causal LM scoring each label's verbalizer after the prompt.

The class distribution is the next-token distribution over each label's verbalizer token,
renormalised over the K labels (one forward pass), or, with ``scoring: sequence``, the
log-probability of each label's whole verbalizer. Plain torch: importable without Ray and vLLM.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np

from llkd_ray.label.teachers.base import TeacherOutput, TeacherPlan, normalise_scores
from llkd_ray.label.teachers.prompts import ANSWER_TOKENS, PromptEncoder, forward_tokens, load_tokenizer


class HFTeacher:
    """A ``transformers`` causal LM scoring the labels' verbalizers after the prompt."""

    def __init__(self, plan: TeacherPlan, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        settings = plan.teacher.hf
        self.torch = torch
        self.device = device or ("cuda" if settings.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        self.model = AutoModelForCausalLM.from_pretrained(plan.model_path, dtype=dtype[settings.dtype])
        self.model.to(self.device).eval()
        self.tokenizer = load_tokenizer(plan.model_path)
        self.batch_size = settings.batch_for(self.device)
        self.scoring = plan.teacher.scoring
        self.continuations = [plan.identity.verbalizers[name] for name in plan.label_names]
        reserve = ANSWER_TOKENS if self.scoring == "first_token" else max(map(len, self.continuations))
        self.encoder = PromptEncoder(self.tokenizer, plan.task, plan.teacher.prompt_template, plan.max_len, reserve)
        self.first_tokens = [c[0] for c in self.continuations]
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        # Models whose forward takes logits_to_keep project only the positions scored (most causal
        # LMs in transformers 5); for the others the logits are sliced before any softmax.
        self.keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        # Each label's answer right-aligned in `longest` slots (every sequence ends with its answer).
        longest = max(map(len, self.continuations))
        targets = torch.zeros((len(self.continuations), longest), dtype=torch.long)
        valid = torch.zeros((len(self.continuations), longest), dtype=torch.float32)
        for row, cont in enumerate(self.continuations):
            targets[row, longest - len(cont) :] = torch.tensor(cont, dtype=torch.long)
            valid[row, longest - len(cont) :] = 1.0
        self.answer_targets = (targets, valid)

    def _forward(self, sequences: list[list[int]], keep: int):
        """Logits (float32) at the last ``keep`` positions only; sequences left-padded to one length.

        Scoring reads a handful of positions, so the model computes the vocabulary projection there
        only (``logits_to_keep``) and nothing takes a softmax over the vocabulary at every position.
        """
        torch = self.torch
        length = max(map(len, sequences))
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, length - len(seq) :] = 1
        # Positions count real tokens only, so a left-padded prompt is scored exactly as an unpadded one.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        inputs = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": positions.to(self.device),
        }
        if self.keeps_logits:
            inputs["logits_to_keep"] = keep
        with torch.inference_mode():  # one forward, no generation: no key/value cache to fill
            logits = self.model(**inputs, use_cache=False).logits
        return logits[:, -keep:, :].float()

    def _first_token_scores(self, prompts: list[list[int]]) -> np.ndarray:
        """Next-token log-probabilities of each label's first token, from the last position."""
        logits = self._forward(prompts, keep=1)[:, -1, :]
        logprobs = logits[:, self.first_tokens] - self.torch.logsumexp(logits, dim=-1, keepdim=True)
        return logprobs.double().cpu().numpy()

    def _sequence_scores(self, prompts: list[list[int]]) -> np.ndarray:
        """Log-probability of each label's whole answer after the prompt: one gather, K rows per prompt."""
        torch = self.torch
        k = len(self.continuations)
        sequences = [prompt + cont for prompt in prompts for cont in self.continuations]
        longest = max(map(len, self.continuations))
        # The logits at position p predict the token at p + 1: the last `longest` answer tokens are
        # predicted by the `longest` positions before the last one.
        logprobs = torch.log_softmax(self._forward(sequences, keep=longest + 1)[:, :-1, :], dim=-1)
        targets, valid = self.answer_targets
        picked = logprobs.gather(-1, targets.repeat(len(prompts), 1).unsqueeze(-1).to(logprobs.device)).squeeze(-1)
        scores = (picked * valid.repeat(len(prompts), 1).to(picked.device)).sum(dim=1)
        return scores.double().cpu().numpy().reshape(len(prompts), k)

    def score(self, texts: Sequence[str]) -> TeacherOutput:
        """The block's prompts batched longest first (a batch pads to its longest prompt, so sorting
        pads least; docs/labeling.md), the scores put back in row order."""
        texts = list(texts)
        prompts, truncated = self.encoder.encode(texts)
        k = len(self.continuations)
        scores = np.zeros((len(texts), k))
        step = self.batch_size if self.scoring == "first_token" else max(1, self.batch_size // k)
        order = np.argsort([-len(p) for p in prompts], kind="stable")
        for start in range(0, len(prompts), step):
            rows = order[start : start + step]
            chunk = [prompts[i] for i in rows]
            if self.scoring == "first_token":
                scores[rows] = self._first_token_scores(chunk)
            else:
                scores[rows] = self._sequence_scores(chunk)
        probs, reasons = normalise_scores(scores)
        tokens = forward_tokens([len(p) for p in prompts], self.continuations, self.scoring)
        return TeacherOutput(probs, np.asarray(truncated, dtype=bool), reasons, tokens)
