"""The `ternlm` command line."""

from __future__ import annotations

import argparse
import platform
import sys

from .errors import FormatError

MODEL_HELP = "model: an HF directory, or an HF repo id already downloaded (default: the model shipped with ternlm)"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None, help=MODEL_HELP)
    p.add_argument("-t", "--threads", type=int, default=None, help="worker threads (default: all cores)")
    p.add_argument("--backend", choices=("native", "reference"), default="native",
                   help="native: the C++ engine; reference: the slow NumPy oracle")
    p.add_argument("--ctx", type=int, default=None, help="context length (default: the model's maximum)")
    p.add_argument("-v", "--verbose", action="store_true", help="print timings (tokens/s) to stderr")


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

        return load(args.model, threads=args.threads, backend=args.backend, n_ctx=args.ctx, progress=step)


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

    console = Console()
    table = Table(title="ternlm", show_header=False)
    table.add_row("version", __import__("ternlm").__version__)
    table.add_row("python", platform.python_version())
    table.add_row("machine", f"{platform.machine()} — {_cpu_model()}")
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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


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

    p = sub.add_parser("info", help="show the CPU, the kernels chosen and the model",
                       description="Show CPU features, the kernel variant in use and a summary of the model.")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FormatError, ValueError) as e:
        print(f"ternlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
