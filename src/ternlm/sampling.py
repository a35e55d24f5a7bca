"""Choosing the next token from logits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0            # 0 means all tokens
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repeat_last_n: int = 64   # how many recent tokens the penalty looks at, as llama.cpp
    seed: int | None = None

    def validate(self) -> None:
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: np.ndarray, recent: list[int], penalty: float) -> np.ndarray:
    """Make recently seen tokens less likely: positive logits divided, negative multiplied."""
    if penalty == 1.0 or not recent:
        return logits
    logits = logits.astype(np.float64)
    seen = np.unique(np.asarray(recent, dtype=np.int64))
    values = logits[seen]
    # a penalty near 0 (or far above 1) must not turn a finite logit into an infinite one
    biggest = np.finfo(np.float64).max
    logits[seen] = np.clip(np.where(values > 0, values / penalty, values * penalty), -biggest, biggest)
    return logits


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, history: list[int]) -> int:
    """logits: float32 [vocab] for one position; history: the tokens so far (prompt + generated)."""
    recent = history[-params.repeat_last_n:] if params.repeat_last_n > 0 else []
    logits = apply_repetition_penalty(logits, recent, params.repetition_penalty)
    if params.temperature == 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64)
    logits = (logits - logits.max()) / params.temperature  # <= 0 before dividing: a tiny temperature cannot overflow
    order = np.argsort(-logits, kind="stable")
    if params.top_k > 0:
        order = order[: params.top_k]
    probs = np.exp(logits[order] - logits[order[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        order, probs = order[:keep], probs[:keep]
    if params.min_p > 0:
        keep = probs >= params.min_p * probs[0]
        order, probs = order[keep], probs[keep]
    probs /= probs.sum()
    return int(order[rng.choice(len(order), p=probs)])


def log_probabilities(logits: np.ndarray) -> np.ndarray:
    """log softmax of raw logits [vocab] in float64: the model's own distribution, before temperature
    and filters (what OpenAI's `logprobs` report)."""
    x = logits.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())
