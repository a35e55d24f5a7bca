"""The sampler's cost: one draw from 128,256 float32 logits (LLaMA-3's vocabulary, 2B4T's) per
filter combination, through `ternlm.sampling.sample` (the native sampler plus its Python call).

    python bench/sampling_speed.py [-n 2000] [--vocab 128256]

Three kinds of logits, because top-p's cost depends on how many tokens its nucleus holds:
peaked: N(0, 1) logits with 20 tokens 11 above the rest, which then hold 98 % of the probability at
    temperature 0.8, as a trained model's next token mostly looks: the nucleus holds a few tokens;
wide: N(0, 2.5^2) logits with 20 tokens 10 above the rest, which hold about a quarter of it: the
    nucleus holds thousands;
flat: N(0, 1) logits, as a random model's (the synthetic 2B4T's): the nucleus holds most of the
    vocabulary.
Every combination runs with and without a repetition penalty (1.1 on 64 recent ids); the
combinations alternate draw by draw, so a slow spell of a shared host hits them all. Reported: the
median wall time of a draw, and the median CPU time of this thread (what a busy host does not inflate
as much).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

COMBINATIONS = {
    "temperature 0.8": dict(temperature=0.8),
    "top-k 40": dict(temperature=0.8, top_k=40),
    "top-p 0.95": dict(temperature=0.8, top_p=0.95),
    "min-p 0.05": dict(temperature=0.8, min_p=0.05),
    "top-k 40, top-p 0.95, min-p 0.05": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    "greedy": dict(temperature=0.0),
}


KINDS = {"peaked": (1.0, 11.0), "wide": (2.5, 10.0), "flat": (1.0, 0.0)}  # (spread, lift of 20 tokens)


def logits_of(kind: str, vocab: int, rng: np.random.Generator) -> np.ndarray:
    spread, lift = KINDS[kind]
    logits = rng.standard_normal(vocab) * spread
    logits[rng.choice(vocab, 20, replace=False)] += lift
    return logits.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--draws", type=int, default=2000, help="draws per combination (default 2000)")
    parser.add_argument("--vocab", type=int, default=128_256, help="vocabulary size (default 128256)")
    args = parser.parse_args()

    from ternlm import _core
    from ternlm.bench import cpu_model
    from ternlm.sampling import SamplingParams, sample

    rng = np.random.default_rng(0)
    history = rng.integers(0, args.vocab, 64).tolist()
    logits = {kind: logits_of(kind, args.vocab, rng) for kind in KINDS}
    runs = [(name, penalty, kind) for name in COMBINATIONS for penalty in (1.0, 1.1) for kind in logits]
    params = {(name, penalty): SamplingParams(**COMBINATIONS[name], repetition_penalty=penalty)
              for name, penalty, _ in runs}
    wall: dict[tuple, list[float]] = {run: [] for run in runs}
    cpu: dict[tuple, list[float]] = {run: [] for run in runs}
    for _ in range(args.draws):
        for name, penalty, kind in runs:
            start_wall, start_cpu = time.perf_counter(), time.thread_time()
            sample(logits[kind], params[name, penalty], rng, history)
            cpu[name, penalty, kind].append(time.thread_time() - start_cpu)
            wall[name, penalty, kind].append(time.perf_counter() - start_wall)

    def ms(times: list[float]) -> str:
        return f"{statistics.median(times) * 1e3:.3f}"

    print(f"\n{time.strftime('%Y-%m-%d')} | CPU: {cpu_model()} | kernels: {_core.kernel_name()} | vocabulary "
          f"{args.vocab} | median of {args.draws} draws, ms (wall / CPU)\n")
    print("| filters | repetition penalty | " + " | ".join(f"{kind} logits" for kind in KINDS) + " |")
    print("|---|---|" + "---|" * len(KINDS))
    for name in COMBINATIONS:
        for penalty in (1.0, 1.1):
            cells = [f"{ms(wall[name, penalty, kind])} / {ms(cpu[name, penalty, kind])}" for kind in logits]
            print(f"| {name} | {'1.1 on 64 ids' if penalty != 1 else 'none'} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
