"""`ternlm serve`'s prompt cache on a random model with BitNet b1.58 2B4T's exact shapes: the time to
first token (TTFT) of a request whose long prefix is cached, and the KV memory of concurrent streams
that share a system prompt.

    python bench/serve_prompt_cache.py -t 2 --prefix 1000 --system 500 --streams 8

Two measurements, the server in this process (a thread, as in serve_load.py) and the clients in a
child process:

1. Cached prefix. Each round sends a request of a fresh random PREFIX-token prefix plus a few tokens
   of its own (nothing cached: the uncached TTFT), then the same prefix with other tokens of its own
   (the prefix's whole blocks come from the cache: the cached TTFT). Both generate one token; the
   round's ratio is cached / uncached, measured back to back so that the host's load hits both alike.
   The median round is reported (target: at most 10 %).
2. Shared system prompt. One request computes a SYSTEM-token system prompt (as on a server that has
   served it before); then STREAMS streaming requests start at once, each the system prompt plus its
   own user tokens, generating N tokens. /metrics' ternlm_kv_cache_bytes is read every 50 ms while
   they run; its peak is compared with one copy of the system prompt's whole blocks plus each
   stream's own blocks (the bound), and with STREAMS private copies (no sharing).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import httpx
import numpy as np

from serve_load import GREEDY, one_stream

OWN_TOKENS = 16  # each request's tokens after the shared part


async def ttft(url: str, model_id: str, prompt: str) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        return (await one_stream(client, model_id, prompt, 1, GREEDY)).ttft


def cached_round(url: str, model_id: str, prefix: str, own: tuple[str, str]) -> tuple[float, float]:
    """(uncached TTFT, cached TTFT) of the prefix followed by each of two different tails."""
    return asyncio.run(ttft(url, model_id, f"{prefix} {own[0]}")), asyncio.run(ttft(url, model_id, f"{prefix} {own[1]}"))


def kv_bytes_in_use(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("ternlm_kv_cache_bytes "):
            return float(line.split()[1])
    raise ValueError("/metrics has no ternlm_kv_cache_bytes")


async def shared_streams(url: str, model_id: str, prompts: list[str], max_tokens: int) -> float:
    """Runs the streams at once; returns the peak of ternlm_kv_cache_bytes meanwhile."""
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        peak = 0.0
        streams = asyncio.gather(*(one_stream(client, model_id, p, max_tokens, GREEDY) for p in prompts))
        while not streams.done():
            peak = max(peak, kv_bytes_in_use((await client.get("/metrics")).text))
            await asyncio.sleep(0.05)
        await streams
        return peak


def run_shared(url: str, model_id: str, system: str, prompts: list[str], max_tokens: int) -> float:
    asyncio.run(ttft(url, model_id, system))  # the system prompt, computed once before
    return asyncio.run(shared_streams(url, model_id, prompts, max_tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-t", "--threads", type=int, default=None, help="engine threads (default: all cores)")
    parser.add_argument("--prefix", type=int, default=1000, help="cached prefix tokens (default 1000)")
    parser.add_argument("--system", type=int, default=500, help="shared system prompt tokens (default 500)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams sharing it (default 8)")
    parser.add_argument("-n", "--n-gen", type=int, default=16, help="tokens each stream generates (default 16)")
    parser.add_argument("-r", "--repeat", type=int, default=3, help="rounds of measurement 1 (default 3)")
    parser.add_argument("--shape", default="2b4t", choices=("2b4t", "tiny"), help="synthetic shape (default 2b4t)")
    args = parser.parse_args()

    from ternlm import _core
    from ternlm.api import load_checkpoint
    from ternlm.bench import cpu_model
    from ternlm.prompt_cache import KV_BLOCK, blocks_for
    from ternlm.server import ServerOptions, create_app, serving_in_thread
    from ternlm.weights.synthetic import SyntheticCheckpoint

    print(f"building the synthetic {args.shape} model ...", flush=True)
    model = load_checkpoint(SyntheticCheckpoint(args.shape), threads=args.threads)
    model.stop_ids = set()
    model_id = f"synthetic-{args.shape}"
    app = create_app(model, model_id, ServerOptions(max_batch=args.streams, max_waiting=args.streams))
    scheduler = app.state.served.scheduler
    rng = np.random.default_rng(0)

    def words(n: int) -> str:  # the synthetic tokenizer's words: one token each
        return " ".join(f"w{i}" for i in rng.integers(0, model.config.vocab_size, size=n))

    clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    with clients, serving_in_thread(app) as url:
        clients.submit(cached_round, url, model_id, words(8), (words(4), words(4))).result()  # warm-up
        rounds = []
        for round_ in range(1, args.repeat + 1):
            uncached, cached = clients.submit(cached_round, url, model_id, words(args.prefix - 1),
                                              (words(OWN_TOKENS), words(OWN_TOKENS))).result()
            rounds.append((uncached, cached))
            print(f"round {round_}: TTFT uncached {uncached:.2f} s, cached {cached:.3f} s "
                  f"({cached / uncached:.1%})", flush=True)
        system = words(args.system - 1)
        prompts = [f"{system} {words(OWN_TOKENS)}" for _ in range(args.streams)]
        peak = clients.submit(run_shared, url, model_id, system, prompts, args.n_gen).result()

    positions = args.system + OWN_TOKENS + args.n_gen  # BOS included in the system prompt's count
    shared_blocks = args.system // KV_BLOCK  # only whole blocks are shared
    bound = (shared_blocks + args.streams * (blocks_for(positions) - shared_blocks)) * scheduler.block_bytes
    private = args.streams * blocks_for(positions) * scheduler.block_bytes
    ratios = sorted(c / u for u, c in rounds)
    print(f"\n{time.strftime('%Y-%m-%d')} | CPU: {cpu_model()} | kernels: {_core.kernel_name()} | "
          f"threads: {model.threads} | synthetic {args.shape} | KV block {KV_BLOCK} positions, "
          f"{scheduler.block_bytes / 2**20:.2f} MiB\n")
    print(f"cached prefix of {args.prefix} tokens (+{OWN_TOKENS} own): TTFT uncached median "
          f"{statistics.median(u for u, _ in rounds):.2f} s, cached {statistics.median(c for _, c in rounds):.3f} s; "
          f"cached/uncached median of {args.repeat} rounds {ratios[(len(ratios) - 1) // 2]:.1%} "
          f"(each round: {', '.join(f'{r:.1%}' for r in ratios)}) — target <= 10 %")
    print(f"{args.streams} streams sharing a {args.system}-token system prompt (+{OWN_TOKENS} own, {args.n_gen} "
          f"generated): peak KV in use {peak / 2**20:.1f} MiB; bound (1 x the prompt + own tokens) "
          f"{bound / 2**20:.1f} MiB; {args.streams} private copies {private / 2**20:.1f} MiB — "
          f"{'within' if peak <= bound else 'OVER'} the bound")


if __name__ == "__main__":
    main()
