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
    cached_prompt_tokens: int = 0  # of prompt_tokens, taken from the prompt cache rather than computed
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


def prefill(engine, cache, prompt: list[int], cached: int = 0) -> np.ndarray:
    """Runs the prompt after its first `cached` tokens (already in the cache); returns the logits
    [vocab] of its last position."""
    return engine.forward(cache, prompt[cached:], cached)[-1]


def decode_one_token(engine, cache, token: int, position: int) -> np.ndarray:
    return engine.forward(cache, [token], position)[-1]


class GenerationState:
    """One sequence's generation, step by step: picks each next token from the logits of the one before
    and decides when to stop. generate_tokens drives one; the server's scheduler drives many at once."""

    def __init__(self, prompt: list[int], max_tokens: int, params: SamplingParams, stop_ids: set[int], n_ctx: int):
        params.validate()
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= n_ctx:
            raise ContextOverflowError(f"the prompt has {len(prompt)} tokens but the context holds {n_ctx} "
                                       f"(prompt plus at least one generated token)")
        self.params, self.stop_ids, self.max_tokens = params, stop_ids, max_tokens
        self.history = list(prompt)
        self.rng = np.random.default_rng(params.seed)
        self.n_positions = min(n_ctx, len(prompt) + max(max_tokens, 1))  # the KV cache this generation needs
        self.generated = 0
        self.finish_reason = "" if max_tokens > 0 else "length"  # "stop" (a stop token) or "length" once finished

    @property
    def finished(self) -> bool:
        return bool(self.finish_reason)

    def next_token(self, logits: np.ndarray) -> int | None:
        """Samples from the last position's logits [vocab]: the new token, or None for a stop token."""
        token = sample(logits, self.params, self.rng, self.history)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return None
        self.history.append(token)
        self.generated += 1
        if self.generated >= self.max_tokens or len(self.history) >= self.n_positions:
            self.finish_reason = "length"
        return token


def generate_tokens(engine, prompt: list[int], max_tokens: int, params: SamplingParams, stop_ids: set[int],
                    n_ctx: int, stats: GenerationStats | None = None, prompt_cache=None) -> Iterator[int]:
    """Yields generated token ids; stops on a stop id (not yielded), max_tokens or the context end.
    With a prompt_cache (prompt_cache.py), the longest cached prefix of the prompt is not computed
    again, and the tokens computed are kept there for later prompts."""
    stats = stats if stats is not None else GenerationStats()
    state = GenerationState(prompt, max_tokens, params, stop_ids, n_ctx)
    start = time.perf_counter()
    if prompt_cache is None:
        cache, cached = engine.new_cache(state.n_positions), 0
    else:
        cache, cached = prompt_cache.start(prompt, state.n_positions)
    logits = prefill(engine, cache, prompt, cached)
    stats.prompt_tokens, stats.prompt_seconds = len(prompt), time.perf_counter() - start
    stats.cached_prompt_tokens = cached
    try:
        yield from _decode(engine, cache, state, logits, stats)
    finally:  # also when the consumer stops early: what was computed is kept
        if prompt_cache is not None:
            prompt_cache.keep(state.history[:positions_computed(state)], cache)


def positions_computed(state: GenerationState) -> int:
    """How many tokens of the history have their keys and values in the cache: all but the last
    sampled, which never ran, unless a stop token (not in the history) came after it."""
    return len(state.history) - int(state.generated > 0 and state.finish_reason != "stop")


def _decode(engine, cache, state: GenerationState, logits: np.ndarray, stats: GenerationStats) -> Iterator[int]:
    stats.finish_reason = "length"
    start = time.perf_counter()
    while not state.finished:
        token = state.next_token(logits)
        if token is None:
            stats.finish_reason = "stop"
            break
        stats.generated_tokens += 1
        stats.generation_seconds = time.perf_counter() - start
        yield token
        if not state.finished:
            logits = decode_one_token(engine, cache, token, len(state.history) - 1)
    stats.generation_seconds = time.perf_counter() - start


class TextStream:
    """Token ids in, text out, ending before the first stop string. Text that might be the start of a
    stop string is held back until it is known not to be; multi-byte characters are never split."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None):
        self.stop = [s for s in (stop or []) if s]
        self.decoder = tokenizer.decode_stream()
        self.pending = ""
        self.stopped = False  # a stop string appeared: push no more tokens

    def push(self, token: int) -> str:
        """The text now safe to show (often empty while a character or a possible stop string is incomplete)."""
        self.pending += self.decoder.step(token)
        hit = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            self.stopped = True
            text, self.pending = self.pending[:hit], ""
            return text
        hold = max((_partial_suffix(self.pending, s) for s in self.stop), default=0)
        text = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(text):]
        return text

    def flush(self) -> str:
        """What was held back, once generation has ended without a stop string."""
        text, self.pending = self.pending, ""
        return text


def stream_text(tokens: Iterator[int], tokenizer: Tokenizer, stop: list[str] | None,
                stats: GenerationStats) -> Iterator[str]:
    """Decodes a token stream into text pieces, ending before the first stop string."""
    text = TextStream(tokenizer, stop)
    for token in tokens:
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            stats.finish_reason = "stop"
            tokens.close()
            return
    rest = text.flush()
    if rest:
        yield rest


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
