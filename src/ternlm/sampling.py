"""Choosing the next token from logits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _core


INT32_MAX = 2**31 - 1


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

    def native(self):
        """These settings for the C++ sampler (its top_k is an int32: any k past the vocabulary keeps
        every token, so a larger one is the same as the largest)."""
        return _core.SamplingSettings(self.temperature, min(self.top_k, INT32_MAX), self.top_p, self.min_p,
                                      self.repetition_penalty)

    def recent(self, history: list[int]) -> list[int]:
        """The ids the repetition penalty applies to."""
        if self.repetition_penalty == 1.0 or self.repeat_last_n <= 0:
            return []
        return history[-self.repeat_last_n:]


def sample_batch(logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator],
                 histories: list[list[int]]) -> list[int]:
    """The next token of each row of logits [rows, vocab], row i with params[i], its own random
    generator rngs[i] (one uniform number per draw, so a seeded row draws the same tokens whatever
    else is in the batch) and its tokens so far histories[i]. One native call, the GIL released.
    -inf logits (masked tokens) are never drawn."""
    if not len(params) == len(rngs) == len(histories) == len(logits):
        raise ValueError("sample_batch needs one params, generator and history per row of logits")
    recent = [p.recent(h) for p, h in zip(params, histories)]
    tokens = _core.sample_tokens(np.ascontiguousarray(logits, dtype=np.float32), [p.native() for p in params],
                                 np.array([i for ids in recent for i in ids], dtype=np.int32),
                                 [len(ids) for ids in recent], np.array([rng.random() for rng in rngs]))
    return tokens.tolist()


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, history: list[int]) -> int:
    """logits: float32 [vocab] for one position; history: the tokens so far (prompt + generated)."""
    return sample_batch(np.asarray(logits)[None], [params], [rng], [history])[0]


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log probability of `token` under the raw logits [vocab] (the model's own distribution,
    before penalty, temperature and filters: what OpenAI's `logprobs` report), and the `top` most
    likely (id, log probability) pairs, most likely first. float32; the top ones by partial selection."""
    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - logits.max()
    log_total = np.float32(np.log(np.exp(shifted).sum(dtype=np.float64)))
    best = np.argpartition(-shifted, top - 1)[:top] if 0 < top < len(shifted) else np.arange(min(top, len(shifted)))
    best = best[np.lexsort((best, -shifted[best]))]  # most likely first, ties by id
    return float(shifted[token] - log_total), [(int(i), float(shifted[i] - log_total)) for i in best]
