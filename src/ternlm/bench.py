"""`ternlm bench`: prompt-processing and generation speed, like llama-bench.

pp<N>: one forward pass over N prompt tokens from an empty cache (tokens/s = N / time).
tg<N>: N single-token decode steps from an empty cache (tokens/s = N / time), each picking the next
token from its logits: greedily, and with sampling settings given, also sampled (the two runs
interleaved; both feed the same predetermined tokens, so their forward passes do the same work).
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
from .sampling import SamplingParams, sample


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
    sampling: str = "greedy"     # how tg picks each token: greedy, or the sampling settings
    ternary_bits: float = 2      # bits per ternary weight in memory: 2 or 1.6

    @property
    def kind(self) -> str:
        """pp (prompt processing) or tg (generation)."""
        return self.test[:2]

    @property
    def tokens(self) -> int:
        return int(self.test[2:])


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB. On Linux from /proc (VmHWM): getrusage's ru_maxrss
    survives fork and exec, so a process started by a larger one would report its parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def time_prompt(engine, tokens: np.ndarray) -> float:
    cache = engine.new_cache(len(tokens))
    start = time.perf_counter()
    engine.forward(cache, tokens, 0)
    return time.perf_counter() - start


def time_generation(engine, tokens: np.ndarray, params: SamplingParams) -> float:
    cache = engine.new_cache(len(tokens))
    rng, picked = np.random.default_rng(0), []
    start = time.perf_counter()
    for position in range(len(tokens)):
        logits = engine.forward(cache, tokens[position:position + 1], position)
        picked.append(sample(logits[-1], params, rng, picked))
    return time.perf_counter() - start


def describe(params: SamplingParams) -> str:
    """Sampling settings in a few words: greedy, or those that filter."""
    if params.temperature == 0:
        return "greedy"
    defaults = SamplingParams()
    return ", ".join(f"{name.replace('_', '-')} {getattr(params, name):g}"
                     for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
                     if name == "temperature" or getattr(params, name) != getattr(defaults, name))


def run(engines, prompt_lengths: list[int], generation_lengths: list[int], threads: list[int], repetitions: int,
        progress=None, sampling: SamplingParams | None = None) -> list[BenchResult]:
    """engines: the same model in each layout to compare (e.g. 2- and 1.6-bit ternary weights);
    sampling: settings for a sampled run of each tg beside the greedy one. Every engine and picker
    of a test runs in turn within each repetition, so a slow spell of the host hits them all."""
    rng = np.random.default_rng(0)
    vocab = engines[0].config.vocab_size
    pickers = [SamplingParams()] + ([sampling] if sampling else [])
    results = []
    for t in threads:
        for engine in engines:
            engine.threads = t
        for kind, n in [("pp", n) for n in prompt_lengths if n > 0] + [("tg", n) for n in generation_lengths if n > 0]:
            runs = [(engine, None) for engine in engines] if kind == "pp" else \
                [(engine, picker) for engine in engines for picker in pickers]
            tokens = rng.integers(0, vocab, size=n).astype(np.int32)
            rates: list[list[float]] = [[] for _ in runs]
            for repetition in range(-1, repetitions):  # -1: a warm-up, to page in the weights and size the caches
                for (engine, picker), run_rates in zip(runs, rates):
                    seconds = time_prompt(engine, tokens) if picker is None else time_generation(engine, tokens, picker)
                    if repetition >= 0:
                        run_rates.append(n / seconds)
                        if progress:
                            progress()
            for (engine, picker), run_rates in zip(runs, rates):
                median = statistics.median(run_rates)
                # a decode step streams every ternary weight and the whole head once
                gb_s = (engine.weight_bytes + engine.head_bytes) * median / 1e9 if kind == "tg" else None
                results.append(BenchResult(f"{kind}{n}", t, engine.head, _core.kernel_name(), median, min(run_rates),
                                           max(run_rates), 1000 / median, gb_s, None, peak_rss_mb(),
                                           describe(picker) if picker else "", engine.ternary_bits))
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
             "| test | threads | ternary bits | head | tokens picked | t/s median | t/s min–max | ms/token | GB/s | "
             "% of bound | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        gb = f"{r.gb_s:.1f}" if r.gb_s is not None else ""
        pct = f"{r.pct_of_bound:.0f} %" if r.pct_of_bound is not None else ""
        lines.append(f"| {r.test} | {r.threads} | {r.ternary_bits:g} | {r.head} | {r.sampling} | {r.t_s_median:.2f} | "
                     f"{r.t_s_min:.2f}–{r.t_s_max:.2f} | {r.ms_per_token:.1f} | {gb} | {pct} | "
                     f"{r.peak_rss_mb / 1000:.2f} GB |")
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
