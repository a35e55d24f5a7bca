"""A bounded load test of `ternlm serve` on loopback: many clients, some of them hostile.

    python bench/load_test.py --clients 64 --seconds 120        # the run in docs/reliability.md
    python bench/load_test.py --clients 16 --seconds 20         # about what tests/test_load.py runs

The server is a real `ternlm serve` process (the shipped model unless -m) on a free loopback port.
Each client loops until the time is up, sending in turn: a completion, a streamed chat completion
read to [DONE], a stream it drops after the first chunk, a streamed completion that starts with one
of a few long shared prefixes (so that the prompt cache shares and evicts blocks between clients),
random bytes as a body, valid JSON with bad parameters, and a body over the 1 MiB limit. A warm-up of WARM_UP_REQUESTS comes first; the
server's resident memory (RSS) is read after it and again after the run, once the server is idle.

It checks that every answer is one the API documents for that request (200 or 429 for generation,
400 for bad bodies, 413 for the oversized one; no 5xx), that every stream which is read to the end
ends with [DONE], that no slot is left in use (/metrics: no active sequence, no queued request, no
KV-cache bytes), that the KV-cache bytes in use, read every 0.2 s during the run, never exceeded the
server's KV budget, and that RSS grew by less than --rss-tolerance-mb. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MODEL_ID = "ternlm-default"
WARM_UP_REQUESTS = 200
OVERSIZE_BYTES = (1 << 20) + 1024
EXPECTED = {  # kind -> statuses the API documents for it
    "completion": {200, 429}, "chat_stream": {200, 429}, "disconnect": {200, 429}, "shared_prefix": {200, 429},
    "garbage": {400}, "bad_parameters": {400},
    # the server answers 413 from the Content-Length alone and closes the connection: a client still
    # sending may see it reset instead of the answer
    "oversize": {413, "connection closed"},
}
KINDS = tuple(EXPECTED)
WORDS = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
SHARED_PREFIXES = [" ".join(random.Random(n).choices(WORDS, k=random.Random(n).randint(48, 128))) for n in range(4)]


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)     # (kind, status) -> count
    unexpected: list[str] = field(default_factory=list)    # one line per answer the API does not document
    unfinished_streams: int = 0                            # read to the end without [DONE]
    requests: int = 0

    def record(self, kind: str, status: int | str, detail: str = "") -> None:
        self.requests += 1
        self.statuses[kind, status] += 1
        if status not in EXPECTED[kind]:
            self.unexpected.append(f"{kind}: {status} {detail[:200]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc")


def start_server(port: int, model: str | None, max_batch: int, max_queue: int, timeout_s: float) -> subprocess.Popen:
    command = [sys.executable, "-m", "ternlm.cli", "serve", "--port", str(port), "-t", "1",
               "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--request-timeout", str(timeout_s)]
    if model:
        command += ["-m", model]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not start within 120 s")


def request_for(kind: str, rng: random.Random) -> tuple[str, bytes, bool]:
    """(path, body, stream?) of one request of `kind`."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
    if kind == "completion":
        body = {"prompt": prompt, "max_tokens": rng.randint(1, 32), "temperature": 0.8, "seed": rng.randint(0, 1000)}
    elif kind == "shared_prefix":
        body = {"prompt": f"{rng.choice(SHARED_PREFIXES)} {prompt}", "max_tokens": rng.randint(1, 32), "stream": True}
    elif kind in ("chat_stream", "disconnect"):
        body = {"messages": [{"role": "user", "content": prompt}], "stream": True, "max_tokens": rng.randint(8, 64),
                "stream_options": {"include_usage": True}}
    elif kind == "garbage":
        return "/v1/completions", bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 512))), False
    elif kind == "bad_parameters":
        body = rng.choice([{"prompt": 5}, {"prompt": "x", "max_tokens": -1}, {"prompt": [10**9]},
                           {"prompt": "x", "top_p": 0}, {"messages": [{"role": "robot", "content": "x"}]}])
    else:
        body = {"prompt": "x" * OVERSIZE_BYTES}
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    return path, json.dumps({"model": MODEL_ID, **body}).encode(), body.get("stream", False)


async def one_request(client: httpx.AsyncClient, kind: str, rng: random.Random, tally: Tally) -> None:
    path, content, stream = request_for(kind, rng)
    headers = {"Content-Type": "application/json"}
    try:
        if not stream:
            response = await client.post(path, content=content, headers=headers)
            tally.record(kind, response.status_code, response.text)
            return
        async with client.stream("POST", path, content=content, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                tally.record(kind, response.status_code, response.text)
                return
            tally.record(kind, 200)
            last = ""
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    last = line
                    if kind == "disconnect":
                        return  # leaving the block closes the connection mid-stream
            if last != "data: [DONE]":
                tally.unfinished_streams += 1
    except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError) as e:
        tally.record(kind, "connection closed", f"{type(e).__name__}: {e}")
    except httpx.TransportError as e:
        tally.record(kind, f"transport error {type(e).__name__}")


async def client_loop(url: str, seed: int, deadline: float, tally: Tally, limit: int | None) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        turn = seed
        while time.monotonic() < deadline and (limit is None or tally.requests < limit):
            await one_request(client, KINDS[turn % len(KINDS)], rng, tally)
            turn += 1


async def peak_kv_bytes(url: str, deadline: float) -> float:
    """The highest ternlm_kv_cache_bytes read every 0.2 s until the deadline."""
    peak = 0.0
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while time.monotonic() < deadline:
            peak = max(peak, metric_value((await client.get("/metrics")).text, "ternlm_kv_cache_bytes"))
            await asyncio.sleep(0.2)
    return peak


async def drive(url: str, clients: int, seconds: float, tally: Tally, limit: int | None = None) -> float:
    """Runs the clients; returns the peak of KV-cache bytes in use meanwhile."""
    deadline = time.monotonic() + seconds
    peak, *_ = await asyncio.gather(peak_kv_bytes(url, deadline if limit is None else time.monotonic()),
                                    *(client_loop(url, seed, deadline, tally, limit) for seed in range(clients)))
    return peak


def metric_value(metrics_text: str, name: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def metric(url: str, name: str) -> float:
    return metric_value(httpx.get(f"{url}/metrics", timeout=10).text, name)


def idle(url: str) -> bool:
    return all(metric(url, name) == 0 for name in ("ternlm_active_sequences", "ternlm_queue_length",
                                                   "ternlm_kv_cache_bytes"))


def run(clients: int, seconds: float, model: str | None = None, max_batch: int = 8, max_queue: int = 32,
        request_timeout: float = 60.0, warm_up_requests: int = WARM_UP_REQUESTS) -> dict:
    """Runs the test; returns its summary (`failures` checks it)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, model, max_batch, max_queue, request_timeout)
    try:
        warm_up = Tally()
        asyncio.run(drive(url, min(clients, 8), 3600, warm_up, limit=warm_up_requests))
        rss_before = rss_bytes(server.pid)
        tally = Tally()
        started = time.monotonic()
        peak_kv = asyncio.run(drive(url, clients, seconds, tally))
        duration = time.monotonic() - started
        settle_deadline = time.monotonic() + 60
        while not idle(url) and time.monotonic() < settle_deadline:
            time.sleep(0.2)
        stuck = {name: metric(url, name) for name in ("ternlm_active_sequences", "ternlm_queue_length",
                                                       "ternlm_kv_cache_bytes")}
        rss_after = rss_bytes(server.pid)
        kv_budget = metric(url, "ternlm_kv_cache_budget_bytes")
        prompt_cache = {name: metric(url, name) for name in ("ternlm_prompt_cache_hits_total",
                                                             "ternlm_prompt_cache_evictions_total")}
        alive = httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return {
        "clients": clients, "seconds": round(duration, 1), "requests": tally.requests,
        "warm_up_requests": warm_up.requests,
        "statuses": {f"{kind} {status}": n for (kind, status), n in sorted(tally.statuses.items(), key=str)},
        "unexpected": tally.unexpected + warm_up.unexpected,
        "unfinished_streams": tally.unfinished_streams + warm_up.unfinished_streams,
        "stuck": stuck, "healthy_after": alive,
        "peak_kv_mb": round(peak_kv / 2**20, 2), "kv_budget_mb": round(kv_budget / 2**20, 2), **prompt_cache,
        "rss_before_mb": round(rss_before / 2**20, 1), "rss_after_mb": round(rss_after / 2**20, 1),
    }


def failures(summary: dict, rss_tolerance_mb: float) -> list[str]:
    problems = [f"undocumented answer: {line}" for line in summary["unexpected"][:20]]
    if summary["unfinished_streams"]:
        problems.append(f"{summary['unfinished_streams']} streams ended without [DONE]")
    problems += [f"{name} = {value} after the run" for name, value in summary["stuck"].items() if value]
    if summary["peak_kv_mb"] > summary["kv_budget_mb"]:
        problems.append(f"KV cache in use peaked at {summary['peak_kv_mb']} MB, over its budget of "
                        f"{summary['kv_budget_mb']} MB")
    if not summary["healthy_after"]:
        problems.append("/health did not answer 200 after the run")
    growth = summary["rss_after_mb"] - summary["rss_before_mb"]
    if growth > rss_tolerance_mb:
        problems.append(f"RSS grew by {growth:.1f} MB (tolerance {rss_tolerance_mb} MB)")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--seconds", type=float, default=120, help="duration of the loaded phase (default 120)")
    parser.add_argument("-m", "--model", default=None, help="model to serve (default: the shipped one)")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (default 8)")
    parser.add_argument("--max-queue", type=int, default=32, help="the server's --max-queue (default 32)")
    parser.add_argument("--rss-tolerance-mb", type=float, default=32, help="allowed RSS growth (default 32 MB)")
    args = parser.parse_args()
    summary = run(args.clients, args.seconds, args.model, args.max_batch, args.max_queue)
    print(json.dumps(summary, indent=1))
    problems = failures(summary, args.rss_tolerance_mb)
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
