"""The `ternlm` command line: its arguments and their help. What each command does is in commands.py."""

from __future__ import annotations

import argparse
import os
import sys

from .commands import (CHAT_HELP, DEFAULT_PERPLEXITY_CTX, cmd_bench, cmd_chat, cmd_convert, cmd_eval, cmd_generate,
                       cmd_info, cmd_list, cmd_perplexity, cmd_pull, cmd_serve)
from .errors import FormatError, HubError, MissingExtraError
from .engines import HEADS, KV_CACHES, TERNARY_BITS


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
                   help="format of the output matrix (default: as stored in the file, except that a GGUF head in "
                        "quantized blocks becomes q4 (Q4_0 as it is, Q4_1/Q2_K-Q4_K) or int8 (Q5_*, Q6_K, Q8_0); "
                        "int8 halves the bytes of f16, q4 quarters them; docs/gguf.md)")
    p.add_argument("--kv-cache", choices=KV_CACHES, default="f16", help="keys and values in f16 (default) or f32")
    p.add_argument("--ternary-bits", type=_ternary_bits, default=None, metavar="{2,1.6}",
                   help=TERNARY_BITS_HELP)
    if verbose_help:
        p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)


SAMPLING_HELP = ("Unset sampling flags take the model's generation_config.json values (the shipped model's: "
                 "temperature 0.8, top-p 0.95, repeat-penalty 1.3), else greedy decoding. Filters apply in this "
                 "order: repeat penalty, temperature, top-k, top-p, min-p.")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens_help: str | None = None) -> None:
    g = p.add_argument_group("sampling", SAMPLING_HELP)
    if max_tokens_help:
        g.add_argument("-n", "--max-tokens", type=int, default=None, help=max_tokens_help)
    else:
        g.add_argument("-n", "--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    _add_filter_args(g)
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling (default: random)")


def _add_filter_args(g) -> None:
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy; unset: the model's, else 0")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (0 = all; unset: "
                                                          "the model's, else 0)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1.0 = off; unset: the model's, "
                                                            "else 1.0)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability "
                                                            "(unset: the model's, else 0 = off)")
    g.add_argument("--repeat-penalty", type=float, default=None, help="penalty for the last 64 tokens (1.0 = off; "
                                                                     "unset: the model's, else 1.0)")


TERNARY_BITS_HELP = ("ternary weights in memory as 2 bits each or 1.6 (five to a byte: fewer bytes per token, more "
                     "work to decode); the logits are the same (default: the faster one on this CPU, see `ternlm info`)")


def _ternary_bits(text: str) -> float:
    try:
        bits = float(text)
    except ValueError:
        bits = None
    if bits not in TERNARY_BITS:
        raise argparse.ArgumentTypeError(f"expected 2 or 1.6, got {text!r}")
    return bits


def _ternary_bits_list(text: str) -> list[float]:
    return [_ternary_bits(v) for v in text.split(",") if v.strip()] or [_ternary_bits(text)]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "0 or a positive integer")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return int(text)


def _autoscale(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    if not (sep and low.isdigit() and high.isdigit() and int(low) <= int(high) and int(high) >= 1):
        raise argparse.ArgumentTypeError(f"expected MIN:MAX replicas with 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return int(low), int(high)


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
    g = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid against this JSON schema")
    g.add_argument("--grammar", metavar="FILE", help="the output follows this Lark grammar (llguidance's syntax)")
    g.add_argument("--regex", metavar="RE", help="the whole output matches this regular expression")
    p.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="keep the prompt's keys and values in FILE; a later run whose prompt starts the same way "
                        "loads them instead of computing them (a file that does not fit is recomputed and rewritten)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description=f"Chat with the model. {CHAT_HELP}. Each turn computes only its new tokens: the "
                                   f"conversation so far is in the prompt cache. When the conversation outgrows the "
                                   f"context, its oldest turns are left out (never the system message).")
    _add_model_args(p, verbose_help="print the time to the first token, cached and new prompt tokens and speeds "
                                    "to stderr")
    _add_sampling_args(p, max_tokens_help="most tokens per answer (default: a quarter of the context, at most "
                                          "256, so that the conversation can go on)")
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
    g.add_argument("--prompt-cache-mb", type=_non_negative_int, default=None, metavar="MB",
                   help="of the KV budget, how much computed prompts may keep once their requests are done, for "
                        "later requests that start the same way; requests running together share their common "
                        "prefix whatever this is, and cached blocks give way to new requests (default: half of "
                        "--kv-memory; 0: off)")
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
    p.add_argument("--ternary-bits", type=_ternary_bits_list, default=None, metavar="{2,1.6}[,...]",
                   help=TERNARY_BITS_HELP.replace(" (default", "; several, comma-separated, are measured interleaved"
                                                              " (default"))
    p.add_argument("-o", "--output", choices=("md", "json"), default="md", help="a markdown table or a JSON array")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also draw tokens/s against threads and against prompt length into this PNG (needs matplotlib)")
    _add_filter_args(p.add_argument_group(
        "sampled decoding", "with --temperature above 0, every tgN also runs sampled with these settings, its "
                            "repetitions interleaved with the greedy ones"))
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
    except BrokenPipeError:  # `ternlm generate ... | head`: the reader has gone, so stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit-time flush must not fail too
        return 141  # 128 + SIGPIPE, what a C program killed by the signal reports


if __name__ == "__main__":
    sys.exit(main())
