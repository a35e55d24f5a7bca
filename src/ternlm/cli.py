"""The `ternlm` command line."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

from .errors import FormatError
from .model import HEADS, KV_CACHES

MODEL_HELP = "model: an HF directory, a GGUF file, or an HF repo id already downloaded (default: the model shipped with ternlm)"


def _add_model_args(p: argparse.ArgumentParser, verbose_help: str = "print timings (tokens/s) to stderr") -> None:
    p.add_argument("-m", "--model", default=None, help=MODEL_HELP)
    p.add_argument("-t", "--threads", type=int, default=None, help="worker threads (default: all cores)")
    p.add_argument("--backend", choices=("native", "reference"), default="native",
                   help="native: the C++ engine; reference: the slow NumPy oracle")
    p.add_argument("--ctx", type=int, default=None, help="context length (default: the model's maximum)")
    p.add_argument("--head", choices=HEADS, default=None,
                   help="format of the output matrix (default: as stored in the file; int8 halves its bytes, q4 quarters them)")
    p.add_argument("--kv-cache", choices=KV_CACHES, default="f16", help="keys and values in f16 (default) or f32")
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="penalty for the last 64 tokens (1.0 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")


def _sampling(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repeat_penalty, seed=args.seed)


def _load(args):
    from rich.progress import Progress

    from .api import load

    with Progress(transient=True, console=_stderr_console()) as progress:
        task = progress.add_task("loading", total=None)

        def step(done, total):
            progress.update(task, completed=done, total=total)

        return load(args.model, threads=args.threads, backend=args.backend, n_ctx=args.ctx, head=args.head,
                    kv_cache=args.kv_cache, progress=step)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _print_stats(model, args) -> None:
    if args.verbose:
        s = model.last_stats
        print(f"\nprompt: {s.prompt_tokens} tokens, {s.prompt_tokens_per_second:.1f} tokens/s | "
              f"generation: {s.generated_tokens} tokens, {s.generation_tokens_per_second:.1f} tokens/s | "
              f"threads: {model.threads} | finish: {s.finish_reason}", file=sys.stderr)


def cmd_generate(args) -> int:
    model = _load(args)
    for piece in model.stream(args.prompt, max_tokens=args.max_tokens, **_sampling(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _print_stats(model, args)
    return 0


CHAT_HELP = "commands: /reset starts a new conversation, /exit quits; Ctrl-C stops the current answer"


def cmd_chat(args) -> int:
    model = _load(args)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    start = len(messages)
    print(f"ternlm chat with {model.path.name} — {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        command = line.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            del messages[start:]
            print("(new conversation)", file=sys.stderr)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        answer = []
        try:
            for piece in model.stream_chat(messages, max_tokens=args.max_tokens, **_sampling(args)):
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except ValueError as e:  # the conversation outgrew the context
            messages.pop()
            print(f"\nerror: {e} — use /reset to start over", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(answer)})
        _print_stats(model, args)


def cmd_info(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import _core
    from .bench import cpu_model

    console = Console()
    table = Table(title="ternlm", show_header=False)
    table.add_row("version", __import__("ternlm").__version__)
    table.add_row("python", platform.python_version())
    table.add_row("machine", f"{platform.machine()} — {cpu_model()}")
    table.add_row("CPU features", " ".join(_core.cpu_features()) or "(none detected)")
    table.add_row("kernels", f"{_core.kernel_name()} (available: {', '.join(_core.available_kernels())}; "
                             f"TERNLM_KERNELS overrides)")
    table.add_row("threads", f"{_core.default_threads()} by default")
    try:
        model = _load(args)
    except FormatError as e:
        if args.model is not None:
            raise
        table.add_row("model", f"none ({e.problem})")
        console.print(table)
        return 0
    c = model.config
    table.add_row("model", str(model.path))
    table.add_row("architecture", f"{c.architecture} ({c.model_type}), activation {c.hidden_act}, "
                                  f"sub-norms {'yes' if c.has_sub_norms else 'no'}")
    table.add_row("shape", f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, FFN {c.intermediate_size}, "
                           f"heads {c.num_attention_heads}/{c.num_key_value_heads} kv, head_dim {c.head_dim}")
    table.add_row("vocabulary", f"{c.vocab_size} (tokenizer: {model.tokenizer.vocab_size}), "
                                f"{'tied' if c.tie_word_embeddings else 'separate'} head")
    table.add_row("context", f"{model.n_ctx} of {c.max_position_embeddings}, RoPE θ {c.rope_theta:g}")
    table.add_row("stop tokens", ", ".join(f"{i} {model.tokenizer.id_to_token(i)!r}" for i in sorted(model.stop_ids)))
    table.add_row("backend", f"{model.backend}, {model.threads} threads")
    console.print(table)
    return 0


def cmd_convert(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .weights.convert import convert_to_gguf, convert_to_hf

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=_stderr_console()) as progress:
        task = progress.add_task(f"writing {args.destination}", total=None)

        def step(done, total):
            progress.update(task, completed=done, total=total)

        if args.to == "hf":
            convert_to_hf(args.source, args.destination, progress=step)
        else:
            convert_to_gguf(args.source, args.destination, ternary=args.type, head=args.head, progress=step)
    print(f"wrote {args.destination}", file=sys.stderr)
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def cmd_bench(args) -> int:
    from rich.progress import Progress

    from . import bench
    from .api import open_checkpoint, resolve_model_path
    from .model import HEAD_DTYPES, NativeEngine
    from .weights.synthetic import SyntheticCheckpoint

    if args.model and args.synthetic:
        raise ValueError("give either -m MODEL or --synthetic SHAPE, not both")
    if min(args.threads) < 1 or args.repetitions < 1:
        raise ValueError("threads and repetitions must be at least 1")
    console = _stderr_console()
    with console.status("building the model" if args.synthetic or not args.model else "loading the model"):
        if args.model:
            checkpoint = open_checkpoint(resolve_model_path(args.model))
            name = args.model
        else:
            shape = args.synthetic or "2b4t"
            checkpoint = SyntheticCheckpoint(shape, args.head if args.head in HEAD_DTYPES else "float16")
            name = f"synthetic {shape}"
        engine = NativeEngine(checkpoint, max(args.threads), head=args.head)
    runs = len(args.threads) * args.repetitions * (sum(1 for n in args.n_prompt if n) + sum(1 for n in args.n_gen if n))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=runs)
        results = bench.run(engine, args.n_prompt, args.n_gen, args.threads, args.repetitions,
                            progress=lambda: progress.advance(task))
    with console.status("measuring read bandwidth"):
        bandwidth = bench.measure_bandwidth(args.threads)
    bench.add_bandwidth_bound(results, bandwidth)
    print(bench.format_json(results) if args.output == "json" else bench.format_markdown(results, name, bandwidth))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return int(text)


def served_model_id(model_arg: str | None, model) -> str:
    """The name clients send as `model`: what -m named (a repo id as given, a path by its last part)."""
    if model_arg is None:
        return "ternlm-default"
    return model.path.resolve().name if Path(model_arg).expanduser().exists() else model_arg


def cmd_serve(args) -> int:
    try:
        from .server import ServerOptions, serve
    except ImportError as e:
        raise ValueError(f"ternlm serve needs the serve extra: pip install 'ternlm[serve]' ({e})") from None
    api_key = args.api_key or os.environ.get("TERNLM_API_KEY") or None
    model = _load(args)
    model_id = served_model_id(args.model, model)
    options = ServerOptions(api_key=api_key, max_batch=args.max_batch, max_waiting=args.max_queue,
                            kv_budget_bytes=args.kv_memory * 2**20 if args.kv_memory else None,
                            prefill_chunk=args.prefill_chunk, cors_origins=args.cors_origin)
    print(f"ternlm: serving {model_id!r} at http://{args.host}:{args.port}/ (chat page) and /v1 (OpenAI API)"
          f"{'; API key required' if api_key else ''}", file=sys.stderr)
    serve(model, model_id, options, args.host, args.port, access_log=args.verbose)
    return 0


SERVE_DESCRIPTION = """\
Serve the model over HTTP: OpenAI's API (GET /v1/models, POST /v1/chat/completions and
/v1/completions, streaming or not), GET /health, GET /metrics (Prometheus), and a chat page at /.
Requests are batched continuously: each engine step runs every active sequence together.
Needs the serve extra: pip install "ternlm[serve]"."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ternlm", description="Run ternary (1.58-bit) language models on the CPU.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="continue a prompt, streaming to stdout",
                       description="Continue PROMPT with the model and stream the text to stdout.")
    p.add_argument("prompt", help="the text to continue")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat", description=f"Chat with the model. {CHAT_HELP}.")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", default=None, help="a system message to start every conversation with")
    p.set_defaults(func=cmd_chat)

    from .weights.convert import HEAD_TYPES, TERNARY_TYPES

    p = sub.add_parser("convert", help="write a model as GGUF (I2_S, TQ2_0, TQ1_0), or a GGUF file as an HF directory",
                       description="Convert SOURCE (an HF directory or a GGUF file) to DESTINATION: a GGUF file "
                                   "(default), or with --to hf an HF directory (SOURCE must be GGUF).")
    p.add_argument("source", help="an HF model directory or a GGUF file")
    p.add_argument("destination", help="the GGUF file (or, with --to hf, the directory) to write")
    p.add_argument("--to", choices=("gguf", "hf"), default="gguf", help="output format (default gguf)")
    p.add_argument("--type", choices=list(TERNARY_TYPES), default="i2_s",
                   help="ternary weight type: i2_s (bitnet.cpp), tq2_0 / tq1_0 (llama.cpp); default i2_s")
    p.add_argument("--head", choices=list(HEAD_TYPES), default="f16",
                   help="type of the embedding and (when untied) the output matrix; default f16")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page",
                       description=SERVE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p, verbose_help="log every HTTP request to stderr")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    g.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $TERNLM_API_KEY if set, else no key)")
    g.add_argument("--max-batch", type=_positive_int, default=8, metavar="N",
                   help="most sequences generated together, one engine step for all (default 8)")
    g.add_argument("--max-queue", type=_positive_int, default=64, metavar="N",
                   help="requests that may wait for a free slot; more are refused with 503 (default 64)")
    g.add_argument("--kv-memory", type=_positive_int, default=None, metavar="MB",
                   help="KV-cache budget of all sequences together, in MiB; a request waits until its cache fits "
                        "(default: --max-batch sequences of the full context)")
    g.add_argument("--prefill-chunk", type=_positive_int, default=64, metavar="N",
                   help="most prompt tokens processed per step, so a long prompt does not stall running streams "
                        "(default 64)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API; repeatable "
                        "(default: none, CORS off)")
    p.set_defaults(func=cmd_serve)

    # listed for --help; main() hands `ternlm train ...` to ternlm.train, which parses its own options
    sub.add_parser("train", help="train or fine-tune a ternary model (needs ternlm[train]; --help lists its options)")

    p = sub.add_parser("info", help="show the CPU, the kernels chosen and the model",
                       description="Show CPU features, the kernel variant in use and a summary of the model.")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="measure prompt and generation speed (like llama-bench)",
                       description="Measure prompt processing (ppN: N tokens in one pass) and generation (tgN: N "
                                   "one-token steps) in tokens/s, with achieved GB/s against this machine's "
                                   "measured read bandwidth and peak RSS.")
    p.add_argument("-m", "--model", default=None, help="a model to measure (default: --synthetic 2b4t)")
    p.add_argument("--synthetic", choices=("2b4t", "tiny"), default=None,
                   help="a random model with these exact shapes, built in memory (2b4t: BitNet b1.58 2B4T)")
    p.add_argument("-p", "--n-prompt", type=_int_list, default=[128], help="prompt lengths, comma-separated (default 128)")
    p.add_argument("-n", "--n-gen", type=_int_list, default=[64], help="generation lengths, comma-separated (default 64)")
    p.add_argument("-t", "--threads", type=_int_list, default=None, help="thread counts, comma-separated (default: all cores)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="runs per test after a warm-up (default 5)")
    p.add_argument("--head", choices=HEADS, default=None,
                   help="format of the output matrix (default: as in the file; float16 for synthetic)")
    p.add_argument("-o", "--output", choices=("md", "json"), default="md", help="a markdown table or a JSON array")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from .train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "func", None) is cmd_bench and args.threads is None:
        from . import _core
        args.threads = [_core.default_threads()]
    try:
        return args.func(args)
    except (FormatError, ValueError) as e:
        print(f"ternlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
