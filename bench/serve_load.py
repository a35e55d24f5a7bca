"""Load on `ternlm serve`: aggregate generated tokens/s and time to first token (TTFT) with 1, 4, 8
and 16 concurrent streams, on a random model with BitNet b1.58 2B4T's exact shapes.

    python bench/serve_load.py --streams 1,4,8,16 -p 16 -n 32 [--head int8] [--temperature 0,0.8 --top-p 0.95]

The server runs in this process (a thread, as in the tests) on a loopback port, with --max-batch
equal to the largest stream count; the clients run in a child process, so that parsing their
streams does not take the server's interpreter lock between engine steps, as real clients would
not. For each level, N streaming completions start at once, each with its own random prompt of P
tokens and max_tokens N_GEN, greedy (temperature 0) unless --temperature says otherwise (each
sampled request with its own seed; several temperatures run as separate cases of each level). Aggregate tokens/s is every generated token (the
server's usage counts) over the wall time from the first request to the last [DONE]; TTFT is per
request, from sending it to its first text chunk. The levels run in rounds (1, 4, 8, 16, then again)
and each level reports its median round; the ratio compares that with the single stream's median,
measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np


@dataclass
class StreamResult:
    ttft: float    # seconds from sending to the first text chunk
    tokens: int    # generated tokens (usage.completion_tokens)
    replica: str | None = None  # the X-Ternlm-Replica header (ternlm serve --ray)


async def one_stream(client: httpx.AsyncClient, model_id: str, prompt: str, max_tokens: int,
                     sampling: dict) -> StreamResult:
    body = {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, **sampling}
    start, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return StreamResult(ttft if ttft is not None else time.perf_counter() - start, tokens,
                        response.headers.get("x-ternlm-replica"))


GREEDY = {"temperature": 0}


async def load_level(url: str, model_id: str, prompts: list[str], max_tokens: int,
                     sampling: dict = GREEDY) -> tuple[float, list[StreamResult]]:
    """All prompts as concurrent streams; returns (wall seconds, each stream's result)."""
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, model_id, p, max_tokens, sampling_for(sampling, i))
                                         for i, p in enumerate(prompts)))
        return time.perf_counter() - start, list(results)


def sampling_for(sampling: dict, stream: int) -> dict:
    """The request's sampling fields: greedy, or the settings with a seed of the stream's own."""
    return dict(sampling, seed=stream) if sampling.get("temperature") else {"temperature": 0}


def run_level(url: str, model_id: str, prompts: list[str], max_tokens: int,
              sampling: dict = GREEDY) -> tuple[float, list[StreamResult]]:
    """load_level, in the clients' own process."""
    return asyncio.run(load_level(url, model_id, prompts, max_tokens, sampling))


def describe_sampling(sampling: dict) -> str:
    if not sampling["temperature"]:
        return "greedy"
    return f"temperature {sampling['temperature']:g}" + (f", top-p {sampling['top_p']:g}" if sampling["top_p"] < 1 else "")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,4,8,16", help="concurrent streams per level (default 1,4,8,16)")
    parser.add_argument("-p", "--n-prompt", type=int, default=16, help="prompt tokens per stream (default 16)")
    parser.add_argument("-n", "--n-gen", type=int, default=32, help="tokens generated per stream (default 32)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="engine threads (default: all cores)")
    parser.add_argument("--head", default="stored",
                        help="output matrix format: stored (as in the file, f16 here: `ternlm serve`'s default), "
                             "int8, q4, float16, bfloat16 or float32 (default stored)")
    parser.add_argument("--ternary-bits", type=float, choices=(2, 1.6), default=None,
                        help="ternary weights in memory, 2 or 1.6 bits each (default: the faster on this CPU)")
    parser.add_argument("--prefill-chunk", type=int, default=64, help="the server's --prefill-chunk (default 64)")
    parser.add_argument("--shape", default="2b4t", choices=("2b4t", "tiny"), help="synthetic shape (default 2b4t)")
    parser.add_argument("-r", "--repeat", type=int, default=3,
                        help="rounds over all the levels; each level reports its median round (default 3)")
    parser.add_argument("--temperature", default="0",
                        help="sampling temperatures, comma-separated: each level runs at each, interleaved "
                             "(default 0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    args = parser.parse_args()
    levels = [int(n) for n in args.streams.split(",")]
    samplings = [{"temperature": float(t), "top_p": args.top_p} for t in args.temperature.split(",")]
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    from ternlm import _core
    from ternlm.api import load_checkpoint
    from ternlm.bench import cpu_model
    from ternlm.server import ServerOptions, create_app, serving_in_thread
    from ternlm.weights.synthetic import SyntheticCheckpoint

    print(f"building the synthetic {args.shape} model ...", flush=True)
    model = load_checkpoint(SyntheticCheckpoint(args.shape), threads=args.threads,
                            head=None if args.head == "stored" else args.head, ternary_bits=args.ternary_bits)
    model.stop_ids = set()  # a random model may hit an end-of-text id: every stream runs its full length
    model_id = f"synthetic-{args.shape}"
    app = create_app(model, model_id, ServerOptions(max_batch=max(levels), max_waiting=max(levels),
                                                    prefill_chunk=args.prefill_chunk))
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size

    def prompt() -> str:  # the synthetic tokenizer's words: one token each, BOS added by the server
        return " ".join(f"w{i}" for i in rng.integers(0, vocab, size=args.n_prompt - 1))

    cases = [(n, i) for n in levels for i in range(len(samplings))]  # (streams, which sampling)
    runs: dict[tuple[int, int], list[tuple[int, float, list[float]]]] = {c: [] for c in cases}  # (tokens, s, TTFTs)
    clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))  # no fork of a threaded server
    with clients, serving_in_thread(app) as url:
        clients.submit(run_level, url, model_id, [prompt()], 4).result()  # warm-up: page the weights in
        for round_ in range(1, args.repeat + 1):  # rounds interleave the cases: a slow spell of the host hits them all
            for n, i in cases:
                seconds, results = clients.submit(run_level, url, model_id, [prompt() for _ in range(n)], args.n_gen,
                                                  samplings[i]).result()
                tokens = sum(r.tokens for r in results)
                runs[n, i].append((tokens, seconds, [r.ttft for r in results]))
                print(f"round {round_}: {n:>2} streams, {describe_sampling(samplings[i])}: {tokens} tokens in "
                      f"{seconds:.1f} s", flush=True)

    rows = []
    for n, i in cases:
        tokens, seconds, _ = sorted(runs[n, i], key=lambda run: run[0] / run[1])[(len(runs[n, i]) - 1) // 2]  # lower median
        ttfts = [t for _, _, level_ttfts in runs[n, i] for t in level_ttfts]
        rows.append((n, i, tokens, seconds, tokens / seconds, percentile(ttfts, 50), percentile(ttfts, 99)))
    single = {i: rate for n, i, _, _, rate, _, _ in rows if n == 1}
    print(f"\n{time.strftime('%Y-%m-%d')} | CPU: {cpu_model()} | kernels: {_core.kernel_name()} | "
          f"threads: {model.threads} | synthetic {args.shape}, head {args.head}, "
          f"{model.engine.ternary_bits:g}-bit ternary weights | prompt {args.n_prompt}, "
          f"generate {args.n_gen} tokens per stream | median of {args.repeat} rounds\n")
    print("| streams | sampling | generated tokens | wall s | aggregate tokens/s | vs 1 stream | TTFT p50 s | TTFT p99 s |")
    print("|---|---|---|---|---|---|---|---|")
    for n, i, tokens, seconds, rate, p50, p99 in rows:
        ratio = f"{rate / single[i]:.2f}x" if i in single else ""
        print(f"| {n} | {describe_sampling(samplings[i])} | {tokens} | {seconds:.1f} | {rate:.2f} | {ratio} | "
              f"{p50:.2f} | {p99:.2f} |")
    print("\n(wall s and tokens/s: each level's median round; TTFTs: over every stream of every round)")


if __name__ == "__main__":
    main()
