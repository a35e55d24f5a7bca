"""Generation as small verbs: prefill, decode_one_token, sample; then token and text streams.

The engine knows token ids only; text (stop strings, incremental decoding) is handled here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .sampling import SamplingParams, sample
from .tokenizer import Tokenizer


class ContextOverflowError(ValueError):
    """The prompt does not fit in the model's context."""


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (a stop token or string) or "length"

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0


def prefill(engine, cache, prompt: list[int]) -> np.ndarray:
    """Runs the whole prompt; returns the logits [vocab] of its last position."""
    return engine.forward(cache, prompt, 0)[-1]


def decode_one_token(engine, cache, token: int, position: int) -> np.ndarray:
    return engine.forward(cache, [token], position)[-1]


def generate_tokens(engine, prompt: list[int], max_tokens: int, params: SamplingParams, stop_ids: set[int],
                    n_ctx: int, stats: GenerationStats | None = None) -> Iterator[int]:
    """Yields generated token ids; stops on a stop id (not yielded), max_tokens or the context end."""
    stats = stats if stats is not None else GenerationStats()
    params.validate()
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) >= n_ctx:
        raise ContextOverflowError(f"the prompt has {len(prompt)} tokens but the context holds {n_ctx} "
                                   f"(prompt plus at least one generated token)")
    rng = np.random.default_rng(params.seed)
    history = list(prompt)
    cache = engine.new_cache(min(n_ctx, len(prompt) + max(max_tokens, 1)))
    start = time.perf_counter()
    logits = prefill(engine, cache, prompt)
    stats.prompt_tokens, stats.prompt_seconds = len(prompt), time.perf_counter() - start
    stats.finish_reason = "length"
    start = time.perf_counter()
    for _ in range(max_tokens):
        token = sample(logits, params, rng, history)
        if token in stop_ids:
            stats.finish_reason = "stop"
            break
        history.append(token)
        stats.generated_tokens += 1
        stats.generation_seconds = time.perf_counter() - start
        yield token
        if len(history) >= cache.n_ctx:
            break
        logits = decode_one_token(engine, cache, token, len(history) - 1)
    stats.generation_seconds = time.perf_counter() - start


def stream_text(tokens: Iterator[int], tokenizer: Tokenizer, stop: list[str] | None,
                stats: GenerationStats) -> Iterator[str]:
    """Decodes a token stream into text pieces, ending before the first stop string.

    Text that might be the start of a stop string is held back until it is known not to be.
    """
    stop = [s for s in (stop or []) if s]
    decoder = tokenizer.decode_stream()
    pending = ""
    for token in tokens:
        pending += decoder.step(token)
        hit = min((i for i in (pending.find(s) for s in stop) if i >= 0), default=-1)
        if hit >= 0:
            if pending[:hit]:
                yield pending[:hit]
            stats.finish_reason = "stop"
            tokens.close()
            return
        hold = max((_partial_suffix(pending, s) for s in stop), default=0)
        if len(pending) > hold:
            yield pending[: len(pending) - hold]
            pending = pending[len(pending) - hold:]
    if pending:
        yield pending


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
