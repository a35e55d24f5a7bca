"""What each `ternlm` command does, once cli.py has parsed its arguments: `cmd_NAME(args)` returns the
exit status. Errors a user can cause are raised (FormatError, ValueError, ...) and printed by cli.main."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from .errors import FormatError
from .progress import progress_bar, stderr_console


def _filters(args) -> dict:
    """The sampling filters given on the command line (unset ones left out)."""
    given = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                 repetition_penalty=args.repeat_penalty)
    return {name: value for name, value in given.items() if value is not None}


def _sampling(args) -> dict:
    return dict(_filters(args), seed=args.seed)


def _load(args):
    from rich.progress import BarColumn, TextColumn

    from .api import load

    with progress_bar(TextColumn("{task.description}"), BarColumn()) as progress:
        task = progress.add_task("loading", total=None)

        def step(done, total):
            progress.update(task, completed=done, total=total)

        model = load(args.model, threads=args.threads, backend=args.backend, n_ctx=args.ctx, head=args.head,
                     kv_cache=args.kv_cache, progress=step, ternary_bits=args.ternary_bits)
    if getattr(args, "verbose", False) and hasattr(model.engine, "head_origin"):
        print(f"loaded {model.path}: head {_head_summary(model.engine)}", file=sys.stderr)
    return model


def _head_summary(engine) -> str:
    """The native engine's output matrix: its format, where it came from, its size."""
    return f"{engine.head}, {engine.head_origin} ({engine.head_bytes / 1e6:.0f} MB)"


def _print_stats(model, args, first_token_seconds: float | None = None) -> None:
    if args.verbose:
        s = model.last_stats
        ttft = f"first token after {first_token_seconds:.2f} s | " if first_token_seconds is not None else ""
        print(f"\n{ttft}prompt: {s.prompt_tokens} tokens ({s.cached_prompt_tokens} cached, "
              f"{s.prompt_tokens - s.cached_prompt_tokens} new), {s.prompt_tokens_per_second:.1f} tokens/s | "
              f"generation: {s.generated_tokens} tokens, {s.generation_tokens_per_second:.1f} tokens/s | "
              f"threads: {model.threads} | finish: {s.finish_reason}", file=sys.stderr)


def _constraint(args) -> dict:
    """--json-schema FILE, --grammar FILE or --regex RE as generate()'s keyword (read before loading the model)."""
    from .jsonfile import read_json_object

    if args.json_schema:
        return {"json_schema": read_json_object(Path(args.json_schema))}
    if args.grammar:
        try:
            return {"grammar": Path(args.grammar).read_text(encoding="utf-8")}
        except (OSError, UnicodeDecodeError) as e:
            raise FormatError(args.grammar, f"cannot read the grammar: {e}") from None
    return {"regex": args.regex} if args.regex is not None else {}


def cmd_generate(args) -> int:
    constraint = _constraint(args)
    model = _load(args)
    if args.prompt_cache:
        from .prompt_file import load_prompt_file

        if model.backend != "native":
            raise ValueError("--prompt-cache needs the native backend")
        problem = load_prompt_file(model, Path(args.prompt_cache), model.prompt_ids(args.prompt))
        if problem:
            print(f"ternlm: warning: prompt cache {args.prompt_cache}: {problem}; computing the prompt and "
                  f"writing the file again", file=sys.stderr)
    for piece in model.stream(args.prompt, max_tokens=args.max_tokens, **constraint, **_sampling(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.prompt_cache:
        from .prompt_file import save_prompt_file

        save_prompt_file(model, Path(args.prompt_cache), model.prompt_ids(args.prompt))
    _print_stats(model, args)
    return 0


CHAT_HELP = "commands: /reset starts a new conversation, /exit quits; Ctrl-C stops the current answer"
CHAT_ANSWER_SHARE = 4  # by default an answer takes at most a quarter of the context, leaving room for more turns


def cmd_chat(args) -> int:
    model = _load(args)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    start = len(messages)
    max_tokens = args.max_tokens if args.max_tokens is not None else min(256, model.n_ctx // CHAT_ANSWER_SHARE)
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
            model.reset_prompt_cache()
            print("(new conversation)", file=sys.stderr)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        answer = []
        asked = time.perf_counter()
        first_token_seconds = None
        try:
            _, dropped = model.fit_chat(messages, max_tokens)
            if dropped:
                del messages[start:start + dropped]
                print(f"(the conversation outgrew the context of {model.n_ctx} tokens: its oldest {dropped} "
                      f"messages are left out)", file=sys.stderr)
            for piece in model.stream_chat(messages, max_tokens=max_tokens, **_sampling(args)):
                if first_token_seconds is None:
                    first_token_seconds = time.perf_counter() - asked
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
        _print_stats(model, args, first_token_seconds)


def cmd_info(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import _core
    from .bench import cpu_model
    from .engines import default_ternary_bits

    console = Console()
    table = Table(title="ternlm", show_header=False)
    table.add_row("version", __import__("ternlm").__version__)
    table.add_row("python", platform.python_version())
    table.add_row("machine", f"{platform.machine()} — {cpu_model()}")
    table.add_row("CPU features", " ".join(_core.cpu_features()) or "(none detected)")
    unavailable = _core.unavailable_kernels_note()
    table.add_row("kernels", f"{_core.kernel_name()} (available: {', '.join(_core.available_kernels())}; "
                             f"TERNLM_KERNELS overrides)" + (f"; not usable: {unavailable}" if unavailable else ""))
    table.add_row("ternary GEMM", _core.ternary_gemm_paths())
    table.add_row("ternary weights", f"{default_ternary_bits():g} bits each by default on this CPU "
                                     f"({_core.ternary_bits_rule()}; --ternary-bits overrides)")
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
    bits = getattr(model.engine, "ternary_bits", None)
    table.add_row("backend", f"{model.backend}, {model.threads} threads" +
                  (f", ternary weights in {bits:g} bits ({model.engine.weight_bytes / 1e6:.1f} MB)" if bits else ""))
    if hasattr(model.engine, "head_origin"):
        table.add_row("head", _head_summary(model.engine))
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


def _check_plotting(args) -> None:
    """With --plot, a missing matplotlib is an error at once, not after the measurements."""
    if args.plot:
        from .plots import pyplot
        pyplot()


def cmd_bench(args) -> int:
    from . import bench
    from .hub import resolve_model_path
    from .engines import HEAD_DTYPES, NativeEngine
    from .sampling import SamplingParams
    from .weights import open_checkpoint
    from .weights.synthetic import SyntheticCheckpoint

    if args.model and args.synthetic:
        raise ValueError("give either -m MODEL or --synthetic SHAPE, not both")
    if min(args.threads) < 1 or args.repetitions < 1:
        raise ValueError("threads and repetitions must be at least 1")
    _check_plotting(args)
    sampling = SamplingParams(**_filters(args)) if args.temperature else None
    if sampling:
        sampling.validate()
    console = stderr_console()
    with console.status("building the model" if args.synthetic or not args.model else "loading the model"):
        if args.model:
            checkpoint = open_checkpoint(resolve_model_path(args.model))
            name = args.model
        else:
            shape = args.synthetic or "2b4t"
            checkpoint = SyntheticCheckpoint(shape, HEAD_DTYPES.get(args.head, "float16"))
            name = f"synthetic {shape}"
        engines = [NativeEngine(checkpoint, max(args.threads), head=args.head, ternary_bits=bits)
                   for bits in args.ternary_bits or [None]]
    generation_runs = sum(1 for n in args.n_gen if n) * (2 if sampling else 1)
    runs = len(engines) * len(args.threads) * args.repetitions * (sum(1 for n in args.n_prompt if n) + generation_runs)
    with progress_bar() as progress:
        task = progress.add_task("benchmarking", total=runs)
        results = bench.run(engines, args.n_prompt, args.n_gen, args.threads, args.repetitions,
                            progress=lambda: progress.advance(task), sampling=sampling)
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
    writing_base = args.kl_divergence_base is not None and base is None
    with progress_bar() as progress:
        task = progress.add_task("perplexity", total=None)

        def show(totals, windows):
            estimate = f"perplexity {totals.perplexity:.4f}" + (f" ± {totals.stderr:.4f}" if totals.tokens > 1 else "")
            progress.update(task, advance=1, total=windows, description=estimate)

        totals = perplexity.measure(model.engine, model.tokenizer, text, n_ctx, args.batch or n_ctx, args.chunks, base,
                                    args.kl_divergence_base if writing_base else None, args.kl_top_k, show)
    if writing_base:
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


def served_model_id(model_arg: str | None, path: Path) -> str:
    """The name clients send as `model`: what -m named (a repo id as given, a path by its last part);
    `path` is where the model was found."""
    if model_arg is None:
        return "ternlm-default"
    return path.resolve().name if Path(model_arg).expanduser().exists() else model_arg


def cmd_serve(args) -> int:
    try:
        from .server import ServerOptions, serve
    except ImportError as e:
        raise ValueError(f"ternlm serve needs the serve extra: pip install 'ternlm[serve]' ({e})") from None
    api_key = args.api_key or os.environ.get("TERNLM_API_KEY") or None
    options = ServerOptions(api_key=api_key, max_batch=args.max_batch, max_waiting=args.max_queue,
                            kv_budget_bytes=args.kv_memory * 2**20 if args.kv_memory else None,
                            prefill_chunk=args.prefill_chunk, cors_origins=args.cors_origin,
                            request_timeout=args.request_timeout,
                            prompt_cache_bytes=None if args.prompt_cache_mb is None else args.prompt_cache_mb * 2**20)
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
    from .hub import resolve_model_path
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
    load_options = dict(backend=args.backend, n_ctx=args.ctx, head=args.head, kv_cache=args.kv_cache,
                        ternary_bits=args.ternary_bits)
    serve_on_ray(model, served_model_id(args.model, path), load_options, options, ray_options, args.host, args.port)
    return 0
