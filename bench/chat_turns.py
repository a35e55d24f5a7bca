"""Time to first token per turn of a conversation, with and without the prompt cache, on a random
model with BitNet b1.58 2B4T's exact shapes.

    python bench/chat_turns.py -t 2 --turns 10 --user 100 --answer 64

Each turn appends a user message of U random tokens to the conversation so far and generates A
tokens (greedy, no stop token); the answer joins the conversation. With the cache, the turn computes
only its new tokens; without it (the same model, its prompt cache set aside), the whole conversation
again. Both run on the same conversation, turn by turn in the same process, so the machine's load
affects them alike. TTFT is from the call to the first generated token.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ternlm.api import load_checkpoint
from ternlm.weights.synthetic import SyntheticCheckpoint


def first_token(model, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """(seconds to the first token, the generated tokens)."""
    start = time.perf_counter()
    tokens = model.stream_tokens(prompt, max_tokens=max_tokens)
    generated = [next(tokens)]
    ttft = time.perf_counter() - start
    generated += list(tokens)
    return ttft, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--user", type=int, default=100, help="tokens per user message")
    parser.add_argument("--answer", type=int, default=64, help="tokens per answer")
    parser.add_argument("--shape", default="2b4t")
    args = parser.parse_args()

    model = load_checkpoint(SyntheticCheckpoint(args.shape), threads=args.threads)
    model.stop_ids = set()
    cache = model.prompt_cache
    rng = np.random.default_rng(0)
    conversation: list[int] = [0]
    print("turn  prompt  cached   TTFT cached s  TTFT uncached s  cached/turn-1")
    first_cached = None
    for turn in range(1, args.turns + 1):
        conversation += [int(t) for t in rng.integers(2, model.config.vocab_size, args.user)]
        model.prompt_cache = None
        uncached, _ = first_token(model, conversation, 1)
        model.prompt_cache = cache
        cached, answer = first_token(model, conversation, args.answer)
        reused = model.last_stats.cached_prompt_tokens
        first_cached = first_cached or cached
        print(f"{turn:4d}  {len(conversation):6d}  {reused:6d}  {cached:13.2f}  {uncached:15.2f}  "
              f"{cached / first_cached:12.2f}x", flush=True)
        conversation += answer


if __name__ == "__main__":
    main()
