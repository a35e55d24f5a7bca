"""Generation as small verbs: prefill, decode_one_token, sample; then token and text streams.

The engine knows token ids only; text (stop strings, incremental decoding) is handled here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .constraints import TokenConstraint
from .sampling import SamplingParams, sample_batch
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
    and decides when to stop. generate_tokens drives one; the server's scheduler drives many at once.
    With a constraint (constraints.py), only tokens its grammar allows are picked, and generation
    stops once the grammar is complete."""

    def __init__(self, prompt: list[int], max_tokens: int, params: SamplingParams, stop_ids: set[int], n_ctx: int,
                 constraint: TokenConstraint | None = None):
        params.validate()
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= n_ctx:
            raise ContextOverflowError(f"the prompt has {len(prompt)} tokens but the context holds {n_ctx} "
                                       f"(prompt plus at least one generated token)")
        self.params, self.stop_ids, self.max_tokens, self.constraint = params, stop_ids, max_tokens, constraint
        self.history = list(prompt)
        self.rng = np.random.default_rng(params.seed)
        self.n_positions = min(n_ctx, len(prompt) + max(max_tokens, 1))  # the KV cache this generation needs
        self.generated = 0
        self.ended_on_stop_id = False  # the last token sampled was a stop id (and so never joined the history)
        self.finish_reason = "" if max_tokens > 0 else "length"  # "stop" (a stop token) or "length" once finished

    @property
    def finished(self) -> bool:
        return bool(self.finish_reason)

    def next_token(self, logits: np.ndarray) -> int | None:
        """Samples from the last position's logits [vocab]: the new token, or None for a stop token.
        Raises constraints.ConstraintFailed if the constraint's grammar fails."""
        return next_tokens([self], np.asarray(logits)[None])[0]

    def masked(self, logits: np.ndarray) -> np.ndarray:
        """The logits [vocab] with every token the constraint forbids at -inf (the same array when there
        is no constraint). Raises constraints.ConstraintFailed if the grammar fails."""
        return logits if self.constraint is None else self.constraint.mask(logits)

    def accept(self, token: int) -> int | None:
        """Takes the sampled token: returns it, or None for a stop token. Raises
        constraints.ConstraintFailed if the constraint's grammar fails."""
        if token in self.stop_ids:
            self.finish_reason, self.ended_on_stop_id = "stop", True
            return None
        if self.constraint is not None:
            self.constraint.advance(token)
        self.history.append(token)
        self.generated += 1
        if self.constraint is not None and self.constraint.complete:
            self.finish_reason = "stop"
        elif self.generated >= self.max_tokens or len(self.history) >= self.n_positions:
            self.finish_reason = "length"
        return token


def next_tokens(states: list[GenerationState], logits: np.ndarray) -> list[int | None]:
    """Each state's next token (None for a stop token) from its row of logits [states, vocab], drawn
    in one batched call."""
    if any(state.constraint is not None for state in states):
        logits = np.stack([state.masked(row) for state, row in zip(states, logits)])
    return [state.accept(token) for state, token in zip(states, draw_tokens(states, logits))]


def draw_tokens(states: list[GenerationState], masked_logits: np.ndarray) -> list[int]:
    """One token id per state from its row of already masked logits [states, vocab], in one call to
    the native sampler (each state's own settings and random generator); the states take them with
    accept()."""
    return sample_batch(masked_logits, [s.params for s in states], [s.rng for s in states],
                        [s.history for s in states])


def generate_tokens(engine, prompt: list[int], max_tokens: int, params: SamplingParams, stop_ids: set[int],
                    n_ctx: int, stats: GenerationStats | None = None, constraint: TokenConstraint | None = None,
                    prompt_cache=None) -> Iterator[int]:
    """Yields generated token ids; stops on a stop id (not yielded), max_tokens, the context end or
    the end of the constraint's grammar. With a prompt_cache (prompt_cache.py), the longest cached
    prefix of the prompt is not computed again, and the tokens computed are kept there for later prompts."""
    stats = stats if stats is not None else GenerationStats()
    state = GenerationState(prompt, max_tokens, params, stop_ids, n_ctx, constraint)
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
    return len(state.history) - int(state.generated > 0 and not state.ended_on_stop_id)


def _decode(engine, cache, state: GenerationState, logits: np.ndarray, stats: GenerationStats) -> Iterator[int]:
    stats.finish_reason = "length"
    start = time.perf_counter()
    while not state.finished:
        token = state.next_token(logits)
        if state.finished:
            stats.finish_reason = state.finish_reason
        if token is None:
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
