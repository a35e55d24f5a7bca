"""The `ternlm` command line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from .errors import FormatError, HubError, MissingExtraError
from .model import HEADS, KV_CACHES
from .progress import progress_bar, stderr_console

MODEL_HELP = "model: an HF directory, a GGUF file, or an HF repo id already downloaded (default: the model shipped with ternlm)"


def _add_model_args(p: argparse.ArgumentParser, ctx_help: str = "context length (default: the model's maximum)",
                    verbose_help: str | None = "print timings (tokens/s) to stderr") -> None:
    p.add_argument("-m", "--model", default=None, help=MODEL_HELP)
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="worker threads (default: all cores; one for models too small to gain from more)")
    p.add_argument("--backend", choices=("native", "reference"), default="native",
                   help="native: the C++ engine; reference: the slow NumPy oracle")
    p.add_argument("--ctx", type=int, default=None, help=ctx_help)
    p.add_argument("--head", choices=HEADS, default=None,
                   help="format of the output matrix (default: as stored in the file; int8 halves its bytes, q4 quarters them)")
    p.add_argument("--kv-cache", choices=KV_CACHES, default="f16", help="keys and values in f16 (default) or f32")
    if verbose_help:
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
    from rich.progress import BarColumn, TextColumn

    from .api import load

    with progress_bar(TextColumn("{task.description}"), BarColumn()) as progress:
        task = progress.add_task("loading", total=None)

        def step(done, total):
            progress.update(task, completed=done, total=total)

        return load(args.model, threads=args.threads, backend=args.backend, n_ctx=args.ctx, head=args.head,
                    kv_cache=args.kv_cache, progress=step)


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
    table.add_row("ternary GEMM", _core.ternary_gemm_paths())
    table.add_row("threads", f"{_core.default_threads()} by default (one for very small models)")
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
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from .weights.convert import convert_to_gguf, convert_to_hf

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with progress_bar(*columns, transient=False) as progress:
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


def _check_plotting(args) -> None:
    """With --plot, a missing matplotlib is an error at once, not after the measurements."""
    if args.plot:
        from .plots import pyplot
        pyplot()


def cmd_bench(args) -> int:
    from . import bench
    from .api import open_checkpoint, resolve_model_path
    from .model import HEAD_DTYPES, NativeEngine
    from .weights.synthetic import SyntheticCheckpoint

    if args.model and args.synthetic:
        raise ValueError("give either -m MODEL or --synthetic SHAPE, not both")
    if min(args.threads) < 1 or args.repetitions < 1:
        raise ValueError("threads and repetitions must be at least 1")
    _check_plotting(args)
    console = stderr_console()
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
    with progress_bar() as progress:
        task = progress.add_task("benchmarking", total=runs)
        results = bench.run(engine, args.n_prompt, args.n_gen, args.threads, args.repetitions,
                            progress=lambda: progress.advance(task))
    with console.status("measuring read bandwidth"):
        bandwidth = bench.measure_bandwidth(args.threads)
    bench.add_bandwidth_bound(results, bandwidth)
    print(bench.format_json(results) if args.output == "json" else bench.format_markdown(results, name, bandwidth))
    if args.plot:
        from .plots import plot_bench
        plot_bench(results, f"{name} | kernels {results[0].kernels} | head {results[0].head}", args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


DEFAULT_PERPLEXITY_CTX = 512  # llama.cpp's default, which published numbers use


def cmd_perplexity(args) -> int:
    from . import perplexity

    _check_plotting(args)
    if args.kl_divergence and not args.kl_divergence_base:
        raise ValueError("--kl-divergence compares against a base run: give its file with --kl-divergence-base FILE")
    if any(value is not None and value < 1 for value in (args.batch, args.chunks, args.kl_top_k)):
        raise ValueError("--batch, --chunks and --kl-top-k must be at least 1")
    base = perplexity.load_base(args.kl_divergence_base) if args.kl_divergence else None
    if base is not None:
        if args.ctx is not None and args.ctx != base.windows.n_ctx:
            raise ValueError(f"the base run used --ctx {base.windows.n_ctx}; a KL divergence needs the same windows")
        args.ctx = base.windows.n_ctx
    elif args.file is None:
        raise ValueError("give the text to measure with -f FILE")
    text = perplexity.read_text(args.file) if args.file else None
    model = _load(args)
    n_ctx = args.ctx or min(DEFAULT_PERPLEXITY_CTX, model.n_ctx)
    windows = perplexity.token_windows(model.tokenizer, text, n_ctx, args.chunks) if text is not None else None
    if base is not None:
        windows = base.windows_to_compare(windows, args.chunks)
    writing_base = args.kl_divergence_base is not None and base is None
    scores = []
    with progress_bar() as progress:
        task = progress.add_task("perplexity", total=len(windows.tokens))
        for totals, score in perplexity.evaluate(model.engine, windows, args.batch or n_ctx,
                                                 args.kl_top_k if writing_base else None, base):
            if writing_base:
                scores.append(score)
            estimate = f"perplexity {totals.perplexity:.4f}" + (f" ± {totals.stderr:.4f}" if totals.tokens > 1 else "")
            progress.update(task, advance=1, description=estimate)
    if writing_base:
        perplexity.save_base(args.kl_divergence_base, windows, scores, model.config.vocab_size)
        print(f"wrote the base logits to {args.kl_divergence_base}", file=sys.stderr)
    result = {**totals.summary(), "n_ctx": n_ctx}
    if args.output == "json":
        print(json.dumps(result))
    else:
        print(_format_perplexity(result))
    if args.plot:
        from .plots import plot_window_losses
        plot_window_losses(totals.window_losses, n_ctx, f"{args.model or 'default model'}: perplexity "
                                                        f"{result['perplexity']:.3f}", args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _format_perplexity(r: dict) -> str:
    lines = [f"{r['windows']} windows of {r['n_ctx']} tokens, {r['tokens']} tokens scored ({r['bytes']} bytes)",
             f"perplexity: {r['perplexity']:.4f} ± {r['stderr']:.4f}",
             f"bits per byte: {r['bits_per_byte']:.4f}"]
    if "kl_divergence" in r:
        lines += [f"base perplexity: {r['base_perplexity']:.4f}",
                  f"mean KL divergence: {r['kl_divergence']:.6f} ± {r['kl_divergence_stderr']:.6f} nats/token",
                  f"same top token: {100 * r['same_top']:.2f} ± {100 * r['same_top_stderr']:.2f} %"]
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from .evaluate import run_tasks

    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    model = _load(args)
    results = run_tasks(model, args.tasks, args.include_path, args.limit, args.num_fewshot, args.batch_size, args.seed)
    if args.output == "json":
        print(json.dumps(results["results"], indent=1, default=str))
    else:
        from lm_eval.utils import make_table
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
    return 0


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_pull(args) -> int:
    from .hub import pull

    path = pull(args.repo_id, args.revision, args.gguf)
    print(path)
    print(f"run it with: ternlm generate -m {args.repo_id} \"...\"" if args.revision is None else
          f"run it with: ternlm generate -m {path} \"...\" (-m {args.repo_id} means its default branch)", file=sys.stderr)
    return 0


def cmd_list(args) -> int:
    import datetime

    from rich.console import Console
    from rich.table import Table

    from .hub import list_cached

    cache, models = list_cached()
    if not models:
        print(f"no models in the Hugging Face cache ({cache}); download one with ternlm pull REPO_ID")
        return 0
    table = Table(title=f"models in {cache}")
    for column in ("model", "size", "files", "refs", "modified"):
        table.add_column(column, justify="right" if column in ("size", "files") else "left")
    for m in models:
        modified = datetime.datetime.fromtimestamp(m.last_modified).strftime("%Y-%m-%d %H:%M")
        table.add_row(m.repo_id, f"{m.size_bytes / 1e9:.2f} GB", str(m.files), ", ".join(m.refs) or "-", modified)
    Console().print(table)
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


def served_model_id(model_arg: str | None, path: Path) -> str:
    """The name clients send as `model`: what -m named (a repo id as given, a path by its last part);
    `path` is where the model was found."""
    if model_arg is None:
        return "ternlm-default"
    return path.resolve().name if Path(model_arg).expanduser().exists() else model_arg


def _autoscale(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    if not (sep and low.isdigit() and high.isdigit() and int(low) <= int(high) and int(high) >= 1):
        raise argparse.ArgumentTypeError(f"expected MIN:MAX replicas with 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return int(low), int(high)


def cmd_serve(args) -> int:
    try:
        from .server import ServerOptions, serve
    except ImportError as e:
        raise ValueError(f"ternlm serve needs the serve extra: pip install 'ternlm[serve]' ({e})") from None
    api_key = args.api_key or os.environ.get("TERNLM_API_KEY") or None
    options = ServerOptions(api_key=api_key, max_batch=args.max_batch, max_waiting=args.max_queue,
                            kv_budget_bytes=args.kv_memory * 2**20 if args.kv_memory else None,
                            prefill_chunk=args.prefill_chunk, cors_origins=args.cors_origin,
                            request_timeout=args.request_timeout)
    if args.ray:
        return _serve_on_ray(args, options)
    if any(flag is not None for flag in (args.address, args.replicas, args.autoscale, args.threads_per_replica)):
        raise ValueError("--address, --replicas, --autoscale and --threads-per-replica go with --ray")
    model = _load(args)
    model_id = served_model_id(args.model, model.path)
    print(f"ternlm: serving {model_id!r} at http://{args.host}:{args.port}/ (chat page) and /v1 (OpenAI API)"
          f"{'; API key required' if api_key else ''}", file=sys.stderr)
    serve(model, model_id, options, args.host, args.port, access_log=args.verbose)
    return 0


def _serve_on_ray(args, options) -> int:
    from .api import resolve_model_path
    from .server.ray_deploy import RayOptions, serve_on_ray

    if args.threads is not None:
        raise ValueError("with --ray, give each replica's threads with --threads-per-replica")
    # Each replica loads the model itself, in a process whose working directory is not ours: a local
    # path goes to the replicas made absolute, a repo id as given (each node finds it in its own HF cache).
    path = resolve_model_path(args.model)  # a clear error now if the model is not here either
    local = args.model is not None and Path(args.model).expanduser().exists()
    model = str(path.resolve()) if local else args.model
    ray_options = RayOptions(address=args.address, replicas=args.replicas or 1, autoscale=args.autoscale,
                             threads_per_replica=args.threads_per_replica or 1)
    load_options = dict(backend=args.backend, n_ctx=args.ctx, head=args.head, kv_cache=args.kv_cache)
    serve_on_ray(model, served_model_id(args.model, path), load_options, options, ray_options, args.host, args.port)
    return 0


SERVE_DESCRIPTION = """\
Serve the model over HTTP: OpenAI's API (GET /v1/models, POST /v1/chat/completions and
/v1/completions, streaming or not), GET /health, GET /metrics (Prometheus), and a chat page at /.
Requests are batched continuously: each engine step runs every active sequence together.
Needs the serve extra: pip install "ternlm[serve]".

With --ray the same app runs as a Ray Serve deployment: each replica loads the model and batches its
own requests, and Ray's proxy at --host:--port spreads requests over them (pip install "ternlm[ray]";
docs/scale-out.md)."""


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
                   help="requests that may wait for a free slot; more are refused with 429 (default 64)")
    g.add_argument("--kv-memory", type=_positive_int, default=None, metavar="MB",
                   help="KV-cache budget of all sequences together, in MiB; a request waits until its cache fits "
                        "(default: --max-batch sequences of the full context)")
    g.add_argument("--prefill-chunk", type=_positive_int, default=64, metavar="N",
                   help="most prompt tokens processed per step, so a long prompt does not stall running streams "
                        "(default 64)")
    g.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="most seconds a request may take from its arrival: a running one then ends with the text so "
                        "far (finish_reason length), a waiting one is refused with 503 (default: no limit)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API; repeatable "
                        "(default: none, CORS off)")
    g = p.add_argument_group("scale-out on Ray Serve")
    g.add_argument("--ray", action="store_true",
                   help="serve as a Ray Serve deployment of one or more replicas, each with its own engine")
    g.add_argument("--address", default=None, metavar="ADDR",
                   help="the Ray cluster to join, as `ray start --head` printed it (default: start Ray here)")
    scaling = g.add_mutually_exclusive_group()
    scaling.add_argument("--replicas", type=_positive_int, default=None, metavar="N", help="replicas (default 1)")
    scaling.add_argument("--autoscale", type=_autoscale, default=None, metavar="MIN:MAX",
                         help="let Ray Serve scale between MIN and MAX replicas with the load")
    g.add_argument("--threads-per-replica", type=_positive_int, default=None, metavar="T",
                   help="engine threads of each replica, which reserves T CPUs for it in Ray (default 1)")
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
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also draw tokens/s against threads and against prompt length into this PNG (needs matplotlib)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("perplexity", help="perplexity and bits per byte of a text file (llama.cpp's method)",
                       description="Perplexity of the model on a text file, computed as llama.cpp's llama-perplexity "
                                   "does: the file is cut into non-overlapping windows of --ctx tokens, each starting "
                                   "with BOS, and the second half of every window is scored. Prints the running "
                                   "estimate, then the perplexity with its standard error and the bits per UTF-8 byte "
                                   "of the scored text. KL divergence: a first run with --kl-divergence-base FILE "
                                   "saves the model's top-k log-probabilities; a second run with the same "
                                   "--kl-divergence-base FILE and --kl-divergence (e.g. with --head int8) reports the "
                                   "mean KL divergence from the first, and how often both rank the same token first.")
    p.add_argument("-f", "--file", default=None, help="the UTF-8 text to score (not needed with --kl-divergence)")
    _add_model_args(p, ctx_help=f"window length in tokens (default {DEFAULT_PERPLEXITY_CTX}, or the model's "
                                f"context if smaller)", verbose_help=None)
    p.add_argument("-b", "--batch", type=int, default=None,
                   help="most tokens per forward pass (default: half a window); fewer bound the memory of the "
                        "logits, N x vocab x 4 bytes")
    p.add_argument("--chunks", type=int, default=None, help="score only the first N windows (default: all)")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text",
                   help="text lines, or one JSON object with perplexity, stderr, bits_per_byte, tokens, ...")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also draw the loss of every window into this PNG (needs matplotlib)")
    p.add_argument("--kl-divergence-base", metavar="FILE", default=None,
                   help="without --kl-divergence: write this run's top-k log-probabilities here (an .npz file); "
                        "with it: the base run to compare against")
    p.add_argument("--kl-divergence", action="store_true",
                   help="compare with the base run in --kl-divergence-base (the windows come from that file)")
    p.add_argument("--kl-top-k", type=int, default=256,
                   help="tokens kept per position in a base file (default 256; the rest are merged into one bucket, "
                        "so a smaller k slightly underestimates the KL divergence)")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("eval", help="run lm-evaluation-harness tasks (ARC, HellaSwag, MMLU, local YAML, ...)",
                       description="Evaluate the model on lm-evaluation-harness tasks with lm_eval's own evaluator "
                                   "(needs ternlm[eval]). Standard tasks download their data from the Hugging Face "
                                   "Hub; local tasks are YAML files in --include-path. For every lm_eval flag, "
                                   "run lm_eval's command line with ternlm registered: python -m ternlm.evaluate "
                                   "--model ternlm --model_args pretrained=MODEL --tasks ...")
    p.add_argument("--tasks", type=_comma_list, required=True,
                   help="comma-separated task, group or tag names, e.g. arc_easy,arc_challenge,hellaswag")
    _add_model_args(p, verbose_help=None)
    p.add_argument("--include-path", default=None, help="a folder of extra task YAML files (local tasks)")
    p.add_argument("--limit", type=float, default=None,
                   help="at most this many documents per task (a number below 1 is a fraction of each task)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="prompts generated together, one token each per step (generation tasks; default 1)")
    p.add_argument("--seed", type=int, default=1234, help="seed for few-shot sampling and sampled generations")
    p.add_argument("-o", "--output", choices=("md", "json"), default="md",
                   help="lm_eval's markdown table, or the results per task as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("pull", help="download a model into the Hugging Face cache",
                       description="Download the files ternlm needs from a Hugging Face repository into the standard "
                                   "HF cache (HF_HOME): safetensors weights with config and tokenizer, or one GGUF "
                                   "file. Afterwards -m REPO_ID finds it without the network.")
    p.add_argument("repo_id", help="the repository, e.g. microsoft/bitnet-b1.58-2B-4T")
    p.add_argument("--revision", default=None, help="a branch, tag or commit (default: the default branch)")
    p.add_argument("--gguf", default=None,
                   help="the GGUF file to download, a name or a glob (needed when a repository has several)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="show the models in the Hugging Face cache, with their sizes",
                       description="List the model repositories in the Hugging Face cache (HF_HOME) with their size "
                                   "on disk, files and branches.")
    p.set_defaults(func=cmd_list)
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
    except (FormatError, ValueError, HubError, MissingExtraError) as e:
        print(f"ternlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
