"""Continuous batching: one engine step at a time over every active sequence.

Requests join between steps and finished ones leave. A new prompt is prefilled in chunks (at most
`prefill_chunk` prompt tokens per step, shared by the prompts waiting for them) in the same step as
the running sequences' next tokens, so a long prompt never stalls the streams already generating.
All of a step's tokens go through the engine's batched forward (the GEMM path) together.

The KV caches of all sequences are blocks of one pool (csrc/kv_cache.h), the byte budget: a sequence
reserves the blocks for its prompt plus max_tokens when it joins and frees them when it leaves. A
request that does not fit yet waits (first come, first served); one that could never fit is refused
when submitted. With the prompt cache (prompt_cache.py), a sequence starts from the blocks of the
longest computed prefix of its prompt, whether another sequence is still running with it or has
finished, so sequences with a common prefix hold one copy of it (counted once in the budget); the
cache's own blocks are evicted, least recently used first, when a new sequence needs room.

The scheduler runs in its own thread (the native engine releases the GIL while it computes); each
sequence hands its updates to the asyncio loop of the request that submitted it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

from ..api import LanguageModel
from ..constraints import ConstraintFailed, TokenConstraint
from ..generate import GenerationState, TextStream, draw_tokens, positions_computed
from ..prompt_cache import PromptCache, block_bytes, blocks_for
from ..sampling import SamplingParams, token_logprobs
from .metrics import ServerMetrics


class Overloaded(Exception):
    """The waiting queue is full."""


class Unavailable(Exception):
    """The scheduler has stopped: the server is shutting down (or its scheduler thread failed)."""


class KVBudgetExceeded(ValueError):
    """The request alone needs more KV cache than the whole budget."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this position, most likely first


@dataclass
class Update:
    """What a request receives after a step: new text (often empty while a character or a possible
    stop string is incomplete), the new token's log probability if asked for, and on the last update
    why generation ended (or what went wrong)."""
    text: str = ""
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop" or "length"
    error: str | None = None
    error_status: int = 500  # the HTTP status of `error` for a reply not yet started


class Sequence:
    """One request inside the scheduler. The request's coroutine reads `updates()`; the scheduler
    thread writes everything else."""

    def __init__(self, prompt: list[int], state: GenerationState, text: TextStream, top_logprobs: int | None,
                 loop: asyncio.AbstractEventLoop):
        self.prompt = prompt
        self.state = state
        self.text = text
        self.top_logprobs = top_logprobs  # None: no log probabilities
        self.cache = None                 # given when the sequence joins the batch
        self.prefilled = 0                # prompt tokens already in the cache
        self.cached_tokens = 0            # of those, how many came from the prompt cache
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.sampled_once = False
        self._loop = loop
        self._updates: asyncio.Queue[Update] = asyncio.Queue()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def completion_tokens(self) -> int:
        return self.state.generated

    def cancel(self) -> None:
        """The client has gone: the scheduler drops the sequence before its next step (no-op once finished)."""
        self.cancelled = True

    async def updates(self) -> AsyncIterator[Update]:
        while True:
            update = await self._updates.get()
            yield update
            if update.finish_reason or update.error:
                return

    def send(self, update: Update) -> None:
        """From the scheduler thread to the request's event loop."""
        try:
            self._loop.call_soon_threadsafe(self._updates.put_nowait, update)
        except RuntimeError:  # the loop has closed: nobody is listening
            pass


@dataclass
class _Segment:
    """One sequence's part of a step: prompt tokens to prefill, or the last token to decode from."""
    sequence: Sequence
    tokens: list[int]
    start: int
    prefill: bool = False


class Scheduler:
    def __init__(self, model: LanguageModel, max_batch: int = 8, max_waiting: int = 64,
                 kv_budget_bytes: int | None = None, prefill_chunk: int = 64, metrics: ServerMetrics | None = None,
                 request_timeout: float | None = None, prompt_cache_bytes: int | None = None):
        """kv_budget_bytes: all KV caches together (default: max_batch sequences of the full context).
        request_timeout: seconds a request may take from its arrival; then a running one ends as if
        it had reached max_tokens, and a waiting one is refused (default: no limit but max_tokens).
        prompt_cache_bytes: the most the prompt cache keeps of the budget once its sequences have left
        (default: half the budget; 0: no prompt cache)."""
        if min(max_batch, max_waiting, prefill_chunk) < 1:
            raise ValueError("max_batch, max_waiting and prefill_chunk must be at least 1")
        if request_timeout is not None and not request_timeout > 0:
            raise ValueError("request_timeout must be positive")
        self.model = model
        self.max_batch, self.max_waiting, self.prefill_chunk = max_batch, max_waiting, prefill_chunk
        self.request_timeout = request_timeout
        self.block_bytes = block_bytes(model.engine)
        self.kv_budget = kv_budget_bytes or max_batch * blocks_for(model.n_ctx) * self.block_bytes
        self.pool = model.engine.new_block_pool(max(1, self.kv_budget // self.block_bytes))
        cache_bytes = self.kv_budget // 2 if prompt_cache_bytes is None else prompt_cache_bytes
        self.prompt_cache = PromptCache(model.engine, self.pool, cache_bytes // self.block_bytes) \
            if cache_bytes > 0 else None
        self.metrics = metrics or ServerMetrics()
        self.metrics.watch(self)
        # read anywhere; changed by the scheduler thread only, except `waiting`, which submit() appends to
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ternlm-scheduler", daemon=True)

    # ---- the request side (the event loop's thread) ----

    def submit(self, prompt: list[int], max_tokens: int, params: SamplingParams, stop: list[str],
               top_logprobs: int | None = None, constraint: TokenConstraint | None = None) -> Sequence:
        """Queues a generation (constrained to a grammar with `constraint`). Raises ValueError (bad
        parameters, ContextOverflowError), KVBudgetExceeded, Overloaded when the queue is full, or
        Unavailable once the scheduler has stopped."""
        state = GenerationState(prompt, max_tokens, params, self.model.stop_ids, self.model.n_ctx, constraint)
        needed = self._cache_bytes(state.n_positions)
        if needed > self.kv_budget:
            raise KVBudgetExceeded(f"the request needs {needed / 2**20:.1f} MiB of KV cache ({state.n_positions} "
                                   f"positions) but the server's budget is {self.kv_budget / 2**20:.1f} MiB; "
                                   f"ask for fewer tokens")
        sequence = Sequence(prompt, state, TextStream(self.model.tokenizer, stop), top_logprobs,
                            asyncio.get_running_loop())
        with self._wakeup:
            if self._stopping:
                raise Unavailable("the server is shutting down")
            # those the scheduler will let in at its next step, to free slots, are not waiting
            really_waiting = len(self.waiting) - max(0, self.max_batch - len(self.running))
            if really_waiting >= self.max_waiting:
                raise Overloaded(f"{really_waiting} requests are already waiting; try again later")
            self.waiting.append(sequence)
            self._wakeup.notify()
        return sequence

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join()

    # ---- the scheduler thread ----

    def _cache_bytes(self, positions: int) -> int:
        return blocks_for(positions) * self.block_bytes

    @property
    def kv_bytes_in_use(self) -> int:
        """Bytes of the blocks running sequences hold, a block shared by several counted once."""
        return len({b for s in list(self.running) if s.cache is not None for b in s.cache.blocks}) * self.block_bytes

    def _run(self) -> None:
        try:
            self._serve_steps()
        finally:  # stopped, or (a bug) failed: nobody may wait for this thread any more
            with self._wakeup:
                self._stopping = True
                for sequence in [*self.running, *self.waiting]:
                    sequence.send(Update(error="the server is shutting down", error_status=503))

    def _serve_steps(self) -> None:
        while True:
            with self._wakeup:
                while not (self._stopping or self.waiting or self.running):
                    self._wakeup.wait()
                if self._stopping:
                    return
                self._drop_cancelled()
                self._drop_expired()
                self._admit()
            if self.running:
                self._step()

    def _admit(self) -> None:
        """Moves waiting sequences into the batch while there are free slots and KV-cache blocks."""
        while self.waiting and len(self.running) < self.max_batch:
            sequence = self.waiting[0]
            n_positions = sequence.state.n_positions
            cache = self.model.engine.new_cache(n_positions, self.pool)
            held = self.prompt_cache.share(cache, sequence.prompt) if self.prompt_cache else 0
            needed = blocks_for(n_positions) - len(cache.blocks)
            room = self.prompt_cache.make_room(needed) if self.prompt_cache else self.pool.free_blocks >= needed
            if not room:
                break  # it waits for running sequences to finish, and so does everyone behind it
            cache.prepare(held, n_positions)  # its blocks, reserved now: the sequence never runs out
            sequence.cache, sequence.prefilled, sequence.cached_tokens = cache, held, held
            self.waiting.popleft()
            self.running.append(sequence)

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(sequence)
            self.metrics.requests.labels("cancelled").inc()
        for sequence in [s for s in self.running if s.cancelled]:
            self._leave(sequence, "cancelled")

    def _drop_expired(self) -> None:
        """Past request_timeout, a waiting request is refused and a running one ends with what it has."""
        if self.request_timeout is None:
            return
        deadline = time.perf_counter() - self.request_timeout
        for sequence in [s for s in self.waiting if s.submitted_at < deadline]:
            self.waiting.remove(sequence)
            sequence.send(Update(error=f"no free slot within the server's request timeout of "
                                       f"{self.request_timeout:g} s; try again later", error_status=503))
            self.metrics.requests.labels("timeout").inc()
        for sequence in [s for s in self.running if s.submitted_at < deadline]:
            sequence.send(Update(text=sequence.text.flush(), finish_reason="length"))
            self._leave(sequence, "timeout")

    def _leave(self, sequence: Sequence, outcome: str) -> None:
        self.running.remove(sequence)
        if self.prompt_cache and outcome != "error":  # after an error, a step may have written half a block
            computed = positions_computed(sequence.state) if sequence.prefilled == len(sequence.prompt) \
                else sequence.prefilled
            self.prompt_cache.keep(sequence.state.history[:computed], sequence.cache)
        sequence.cache = None  # frees the blocks nobody else holds
        self.metrics.requests.labels(outcome).inc()

    def _plan(self) -> list[_Segment]:
        segments, prefill_budget = [], self.prefill_chunk
        for sequence in self.running:
            remaining = len(sequence.prompt) - sequence.prefilled
            if remaining == 0:
                history = sequence.state.history
                segments.append(_Segment(sequence, history[-1:], len(history) - 1))
            elif prefill_budget > 0:
                if self.prompt_cache:  # another sequence may have computed more of this prompt since
                    held = self.prompt_cache.share(sequence.cache, sequence.prompt, sequence.prefilled)
                    sequence.cached_tokens += held - sequence.prefilled
                    sequence.prefilled = held
                    remaining = len(sequence.prompt) - held
                n = min(remaining, prefill_budget)
                prefill_budget -= n
                start = sequence.prefilled
                segments.append(_Segment(sequence, sequence.prompt[start:start + n], start, prefill=True))
        return segments

    def _step(self) -> None:
        segments = self._plan()
        generated = 0
        try:
            # A prompt chunk that does not finish its prompt samples nothing: it skips the head.
            ends = [not s.prefill or s.start + len(s.tokens) == len(s.sequence.prompt) for s in segments]
            logits = self.model.engine.forward_batch([(s.sequence.cache, s.tokens, s.start) for s in segments],
                                                     logits_for=ends)
            for segment in segments:
                if segment.prefill:
                    sequence = segment.sequence
                    sequence.prefilled += len(segment.tokens)
                    if self.prompt_cache:  # whole, computed blocks only: others may start from them
                        self.prompt_cache.keep(sequence.prompt[:sequence.prefilled], sequence.cache)
            drawing, rows = [], []
            for sequence, row in zip([s.sequence for s, samples in zip(segments, ends) if samples], logits):
                try:
                    rows.append(sequence.state.masked(row))
                    drawing.append((sequence, row))
                except ConstraintFailed as e:
                    self._fail(sequence, e)
            tokens = draw_tokens([s.state for s, _ in drawing], np.stack(rows)) if drawing else []  # one call
            for (sequence, row), token in zip(drawing, tokens):
                try:
                    generated += self._advance(sequence, row, sequence.state.accept(token))
                except ConstraintFailed as e:
                    self._fail(sequence, e)
        except Exception as e:  # whatever failed, the step's requests end with an error and the server goes on
            for sequence in {s.sequence for s in segments if s.sequence in self.running}:
                sequence.send(Update(error=f"generation failed: {e}"))
                self._leave(sequence, "error")
        self.metrics.step(len(segments), sum(len(s.tokens) for s in segments if s.prefill), generated)

    def _fail(self, sequence: Sequence, error: ConstraintFailed) -> None:
        """A constraint's grammar failed: that request ends with the error; the others go on."""
        sequence.send(Update(error=str(error)))
        self._leave(sequence, "error")

    def _advance(self, sequence: Sequence, logits: np.ndarray, token: int | None) -> int:
        """Sends the text of the sequence's next token (None: a stop token), sampled from `logits`;
        returns how many tokens it generated."""
        if not sequence.sampled_once:
            sequence.sampled_once = True
            self.metrics.time_to_first_token.observe(time.perf_counter() - sequence.submitted_at)
        update = Update()
        if token is not None:
            update.text = sequence.text.push(token)
            if sequence.top_logprobs is not None:
                update.logprob = _token_logprob(logits, token, sequence.top_logprobs)
        if sequence.text.stopped:
            update.finish_reason = "stop"
        elif sequence.state.finished:
            update.text += sequence.text.flush()
            update.finish_reason = sequence.state.finish_reason
        if update.text or update.logprob or update.finish_reason:
            sequence.send(update)
        if update.finish_reason:
            self._leave(sequence, update.finish_reason)
        return 0 if token is None else 1


def _token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    return TokenLogprob(token, *token_logprobs(logits, token, top))
