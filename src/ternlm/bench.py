"""`ternlm bench`: prompt-processing and generation speed, like llama-bench.

pp<N>: one forward pass over N prompt tokens from an empty cache (tokens/s = N / time).
tg<N>: N single-token decode steps from an empty cache (tokens/s = N / time).
Each test runs once to warm up, then `repetitions` times; medians and spreads are reported, with
the bytes a decode step must stream (ternary weights + head) turned into achieved GB/s and a
percentage of this machine's measured read bandwidth.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import _core


@dataclass
class BenchResult:
    test: str            # "pp128", "tg64"
    threads: int
    head: str            # format of the output matrix: float16, bfloat16, float32, int8
    kernels: str
    t_s_median: float    # tokens per second
    t_s_min: float
    t_s_max: float
    ms_per_token: float
    gb_s: float | None           # bytes streamed per decode token / time per token (tg only)
    pct_of_bound: float | None   # gb_s / measured read bandwidth at this thread count
    peak_rss_mb: float

    @property
    def kind(self) -> str:
        """pp (prompt processing) or tg (generation)."""
        return self.test[:2]

    @property
    def tokens(self) -> int:
        return int(self.test[2:])


def peak_rss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def time_prompt(engine, tokens: np.ndarray) -> float:
    cache = engine.new_cache(len(tokens))
    start = time.perf_counter()
    engine.forward(cache, tokens, 0)
    return time.perf_counter() - start


def time_generation(engine, tokens: np.ndarray) -> float:
    cache = engine.new_cache(len(tokens))
    start = time.perf_counter()
    for position, token in enumerate(tokens):
        engine.forward(cache, tokens[position:position + 1], position)
    return time.perf_counter() - start


def run(engine, prompt_lengths: list[int], generation_lengths: list[int], threads: list[int], repetitions: int,
        progress=None) -> list[BenchResult]:
    rng = np.random.default_rng(0)
    vocab = engine.config.vocab_size
    results = []
    for t in threads:
        engine.threads = t
        tests = [("pp", n, time_prompt) for n in prompt_lengths if n > 0] + \
                [("tg", n, time_generation) for n in generation_lengths if n > 0]
        for kind, n, timer in tests:
            tokens = rng.integers(0, vocab, size=n).astype(np.int32)
            timer(engine, tokens)  # warm-up: page in the weights, size the caches
            rates = []
            for _ in range(repetitions):
                rates.append(n / timer(engine, tokens))
                if progress:
                    progress()
            median = statistics.median(rates)
            # a decode step streams every ternary weight and the whole head once
            gb_s = (engine.weight_bytes + engine.head_bytes) * median / 1e9 if kind == "tg" else None
            results.append(BenchResult(f"{kind}{n}", t, engine.head, _core.kernel_name(), median, min(rates), max(rates),
                                       1000 / median, gb_s, None, peak_rss_mb()))
    return results


def measure_bandwidth(threads: list[int]) -> dict[int, float]:
    """Read bandwidth per thread count. Run it after the tests: its buffer would count in peak RSS."""
    return {t: _core.measure_read_bandwidth(512 << 20, t, 5) for t in threads}


def add_bandwidth_bound(results: list[BenchResult], bandwidth: dict[int, float]) -> None:
    for r in results:
        if r.gb_s is not None and bandwidth.get(r.threads):
            r.pct_of_bound = 100 * r.gb_s / bandwidth[r.threads]


def format_markdown(results: list[BenchResult], model: str, bandwidth: dict[int, float]) -> str:
    lines = [f"model: {model} | kernels: {_core.kernel_name()} | CPU: {cpu_model()} | "
             f"read bandwidth: " + ", ".join(f"{bw:.1f} GB/s at {t} thread{'s' if t > 1 else ''}"
                                             for t, bw in bandwidth.items()),
             "",
             "| test | threads | head | t/s median | t/s min–max | ms/token | GB/s | % of bound | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        gb = f"{r.gb_s:.1f}" if r.gb_s is not None else ""
        pct = f"{r.pct_of_bound:.0f} %" if r.pct_of_bound is not None else ""
        lines.append(f"| {r.test} | {r.threads} | {r.head} | {r.t_s_median:.2f} | {r.t_s_min:.2f}–{r.t_s_max:.2f} | "
                     f"{r.ms_per_token:.1f} | {gb} | {pct} | {r.peak_rss_mb / 1000:.2f} GB |")
    return "\n".join(lines)


def format_json(results: list[BenchResult]) -> str:
    return json.dumps([asdict(r) for r in results], indent=1)


# AMD (family, first model, last model) -> core generation, for CPUs (often VMs) whose model name
# says only "AMD EPYC".
AMD_CORES = [(23, 0x00, 0x2F, "Zen/Zen+"), (23, 0x30, 0xFF, "Zen 2"), (25, 0x00, 0x0F, "Zen 3"),
             (25, 0x10, 0x1F, "Zen 4"), (25, 0x20, 0x5F, "Zen 3"), (25, 0x60, 0xAF, "Zen 4"), (26, 0x00, 0xFF, "Zen 5")]


def cpu_model() -> str:
    """The CPU's model name, with AMD's family, model and core generation when the name is vague."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or fields.get("Model")
    if not name:
        return platform.processor() or platform.machine()
    if fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family", "").isdigit() and fields.get("model", "").isdigit():
        family, model = int(fields["cpu family"]), int(fields["model"])
        core = next((c for f, lo, hi, c in AMD_CORES if f == family and lo <= model <= hi), None)
        name += f" (family {family}, model {model}{', ' + core if core else ''})"
    return name
