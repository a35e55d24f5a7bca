"""`ternlm serve --ray`: aggregate throughput with 1 and with 2 replicas, and where the requests went.

    python bench/ray_serve_load.py --without-ray --replicas 1,2 --streams 16 -n 128 --threads-per-replica 1

Starts Ray on this machine (a head on loopback), deploys the shipped model with R replicas of T engine
threads each, and sends S streaming completions at once through Ray's HTTP proxy (temperature 0, the
same S prompts at every level, so every level generates the same tokens). Aggregate tokens/s is every
generated token (the usage counts) over the wall time from the first request to the last [DONE];
requests per replica come from the X-Ternlm-Replica header of each response. --without-ray first
measures a plain `ternlm serve` (one engine, in this process) under the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

from serve_load import load_level, percentile

OPENINGS = ["To be, or not to be", "ROMEO:", "Now is the winter", "KING HENRY:", "O, what a rogue",
            "Friends, Romans", "HAMLET:", "My lord,"]
MODEL_ID = "ternlm-default"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2", help="replica counts to measure, comma-separated (default 1,2)")
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams (default 16)")
    parser.add_argument("-n", "--n-gen", type=int, default=64, help="max_tokens of each stream (default 64)")
    parser.add_argument("--threads-per-replica", type=int, default=1, help="engine threads per replica (default 1)")
    parser.add_argument("--max-batch", type=int, default=8, help="each replica's --max-batch (default 8)")
    parser.add_argument("--port", type=int, default=8000, help="Ray's HTTP proxy port (default 8000)")
    parser.add_argument("--without-ray", action="store_true",
                        help="first measure one plain ternlm serve (in this process), for Ray's own cost")
    args = parser.parse_args()

    from ternlm.bench import cpu_model
    from ternlm.server import ServerOptions
    from ternlm.server.ray_deploy import RayOptions, deploy, undeploy

    prompts = [OPENINGS[i % len(OPENINGS)] for i in range(args.streams)]
    options = ServerOptions(max_batch=args.max_batch, max_waiting=args.streams)
    rows = []

    def measure(label: str, url: str) -> None:
        asyncio.run(load_level(url, MODEL_ID, prompts[:4], 8))  # warm-up: every replica answers
        seconds, results = asyncio.run(load_level(url, MODEL_ID, prompts, args.n_gen))
        tokens = sum(r.tokens for r in results)
        per_replica = sorted(Counter(r.replica for r in results).values(), reverse=True)
        rows.append((label, tokens, seconds, tokens / seconds, per_replica, percentile([r.ttft for r in results], 50)))
        print(f"{label}: {tokens} tokens in {seconds:.1f} s, requests per replica {per_replica}", flush=True)

    if args.without_ray:
        import ternlm
        from ternlm.server import create_app, serving_in_thread

        model = ternlm.load(threads=args.threads_per_replica)
        with serving_in_thread(create_app(model, MODEL_ID, options)) as url:
            measure("ternlm serve (no Ray)", url)
    try:
        for replicas in (int(r) for r in args.replicas.split(",")):
            print(f"deploying {replicas} replica(s) ...", flush=True)
            url = deploy(None, MODEL_ID, {}, options, RayOptions(replicas=replicas,
                                                                 threads_per_replica=args.threads_per_replica),
                         port=args.port)
            measure(f"Ray Serve, {replicas} replica(s)", url)
    finally:
        undeploy()

    base = rows[0][3]
    print(f"\n{time.strftime('%Y-%m-%d')} | CPU: {cpu_model()} | shipped model | {args.threads_per_replica} "
          f"thread(s) per replica, --max-batch {args.max_batch} | {args.streams} streams of up to {args.n_gen} "
          f"tokens, temperature 0\n")
    print("| server | generated tokens | wall s | aggregate tokens/s | vs first row | requests per replica | TTFT p50 s |")
    print("|---|---|---|---|---|---|---|")
    for label, tokens, seconds, rate, per_replica, p50 in rows:
        print(f"| {label} | {tokens} | {seconds:.1f} | {rate:.1f} | {rate / base:.2f}x | "
              f"{' + '.join(map(str, per_replica))} | {p50:.2f} |")


if __name__ == "__main__":
    main()
