"""Perplexity as llama.cpp's `llama-perplexity` computes it, bits per byte, and KL divergence
against a saved base run (to measure what a quantized head costs).

The method, so that numbers compare with published ones (2B4T on wikitext-2: 17.11):
- the whole text is tokenized once, BOS first when the tokenizer has one;
- it is cut into non-overlapping windows of n_ctx tokens; the tail that fills no window is dropped;
- each window is evaluated from an empty cache, its first token replaced by BOS (when there is one);
- only its second half is scored: the logits at positions first = n_ctx/2 … n_ctx-2 predict the
  tokens at first+1 … n_ctx-1 (n_ctx - 1 - first tokens a window), so every prediction sees at
  least n_ctx/2 tokens of context;
- perplexity = exp(mean nll) over all scored tokens; its standard error by the delta method,
  perplexity × sqrt(var(nll) / (count - 1)), as llama.cpp prints it.
Bits per byte = Σ nll / ln 2 / the UTF-8 bytes of the scored text, which is, per window, the text
from the end of token `first` to the end of token n_ctx-1 (a token that ends inside a multi-byte
character counts as ending after it).

KL divergence (as llama.cpp's `--kl-divergence-base` / `--kl-divergence`): a base run saves, for
every scored position, the top-k tokens and their log-probabilities (see save_base for the file);
a later run on the same windows reports the mean KL(base ‖ this run) per token, its standard error,
and how often both runs rank the same token first. Tokens outside the base's top k are merged into
one "rest" bucket on both sides, so with k < vocab the value is a slight underestimate (exact for
k ≥ vocab).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import FormatError
from .tokenizer import Tokenizer

MIN_CTX = 8          # at least 3 scored tokens a window, so a standard error exists
BASE_FORMAT_VERSION = 1
LOG_SOFTMAX_ROWS = 32  # rows converted to float64 at a time: [32, 128256] is 33 MB


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    return total_nats / n_bytes / math.log(2)


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """The mean and its standard error, sqrt((mean(v²) - mean(v)²) / (n - 1)), as llama.cpp computes both."""
    mean = float(np.mean(values))
    variance = max(float(np.mean(np.square(values))) - mean * mean, 0.0)
    return mean, math.sqrt(variance / (len(values) - 1))


def read_text(path: str | Path) -> str:
    """A UTF-8 text file, or a ValueError that names the file and the problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    return text


@dataclass
class Windows:
    """The windows exactly as they are evaluated (BOS already in place) and the scored text's bytes."""
    tokens: np.ndarray       # int32 [windows, n_ctx]
    text_bytes: np.ndarray   # int64 [windows]
    file_tokens: int         # tokens of the whole text, BOS included

    @property
    def n_ctx(self) -> int:
        return self.tokens.shape[1]

    @property
    def first(self) -> int:
        return self.n_ctx // 2


def token_windows(tokenizer: Tokenizer, text: str, n_ctx: int, max_windows: int | None = None) -> Windows:
    if n_ctx < MIN_CTX:
        raise ValueError(f"the context must be at least {MIN_CTX} tokens, got {n_ctx}")
    ids, ends = tokenizer.encode_with_ends(text, add_bos=True)
    n_windows = len(ids) // n_ctx
    if n_windows == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {n_ctx}: "
                         f"give a longer text or a smaller --ctx")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    tokens = np.array(ids[:n_windows * n_ctx], dtype=np.int32).reshape(n_windows, n_ctx)
    if tokenizer.bos_id is not None:
        tokens[:, 0] = tokenizer.bos_id
    # byte offset of every character boundary: where a UTF-8 lead (non-continuation) byte starts
    encoded = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    char_to_byte = np.append(np.flatnonzero((encoded & 0xC0) != 0x80), len(encoded))
    ends = np.array(ends[:n_windows * n_ctx], dtype=np.int64).reshape(n_windows, n_ctx)
    first = n_ctx // 2
    text_bytes = char_to_byte[ends[:, -1]] - char_to_byte[ends[:, first]]
    return Windows(tokens, text_bytes, len(ids))


@dataclass
class WindowScore:
    text_bytes: int
    nll: np.ndarray                       # float64 [scored]: -ln p(the actual next token)
    top_ids: np.ndarray | None = None     # int32 [scored, k], most likely first (when keep_top was asked)
    top_log_probs: np.ndarray | None = None
    kl: np.ndarray | None = None          # float64 [scored]: KL(base ‖ this run), nats (against a base)
    same_top: np.ndarray | None = None    # bool [scored]: both runs rank the same token first


@dataclass
class Base:
    """A saved base run: its windows, its top-k log-probabilities and its own nll."""
    windows: Windows
    top_ids: np.ndarray         # int32 [windows, scored, k]
    top_log_probs: np.ndarray   # float32 [windows, scored, k]
    nll: np.ndarray             # float64 [windows, scored]
    vocab_size: int

    def windows_to_compare(self, from_text: Windows | None, max_windows: int | None) -> Windows:
        """The base's windows (the first max_windows), after checking that a text given again
        tokenizes into the same ones."""
        if from_text is not None and not np.array_equal(from_text.tokens, self.windows.tokens[:len(from_text.tokens)]):
            raise ValueError("the text does not tokenize into the base run's windows (another text, tokenizer or --ctx?)")
        tokens = self.windows.tokens[:max_windows]
        return Windows(tokens, self.windows.text_bytes[:len(tokens)], self.windows.file_tokens)


def scored_logits(engine, window: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    """float32 logits [rows, vocab] for positions first … n_ctx-2 of one window, in chunks of at most
    `batch` tokens. The first half only fills the cache (its logits are never scored), and the last
    position is never run (it would predict past the window)."""
    n_ctx = len(window)
    first = n_ctx // 2
    cache = engine.new_cache(n_ctx)
    for start in range(0, first, batch):
        engine.forward(cache, window[start:min(start + batch, first)], start)
    for start in range(first, n_ctx - 1, batch):
        yield engine.forward(cache, window[start:min(start + batch, n_ctx - 1)], start, all_logits=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def kl_against_base(log_probs: np.ndarray, top_ids: np.ndarray, top_log_probs: np.ndarray) -> np.ndarray:
    """KL(base ‖ this run) per row, from this run's full log-probs [rows, vocab] and the base's top k."""
    base_logp = top_log_probs.astype(np.float64)
    ours_logp = np.take_along_axis(log_probs, top_ids, axis=1)
    kl = np.sum(np.exp(base_logp) * (base_logp - ours_logp), axis=1)
    if top_ids.shape[1] < log_probs.shape[1]:  # the rest bucket: every token outside the base's top k
        rest_base = np.clip(1.0 - np.exp(base_logp).sum(axis=1), 1e-12, None)
        rest_ours = np.clip(1.0 - np.exp(ours_logp).sum(axis=1), 1e-12, None)
        kl += rest_base * (np.log(rest_base) - np.log(rest_ours))
    return kl


def top_k(log_probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely tokens of each row, most likely first: (ids int32, log-probs float32)."""
    k = min(k, log_probs.shape[1])
    ids = np.argpartition(-log_probs, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(log_probs, ids, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1).astype(np.int32), np.take_along_axis(values, order, axis=1).astype(np.float32)


def score_window(engine, window: np.ndarray, text_bytes: int, batch: int, keep_top: int | None = None,
                 base_top: tuple[np.ndarray, np.ndarray] | None = None) -> WindowScore:
    """Scores one window. keep_top: also keep each position's k most likely tokens (for a base file).
    base_top: (top_ids, top_log_probs) of the same window from a base run, to compare against."""
    targets = window[len(window) // 2 + 1:]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("nll", "top_ids", "top_log_probs", "kl", "same_top")}
    row = 0
    for logits in scored_logits(engine, window, batch):
        for block in range(0, len(logits), LOG_SOFTMAX_ROWS):
            log_probs = log_softmax(logits[block:block + LOG_SOFTMAX_ROWS])
            rows = slice(row, row + len(log_probs))
            parts["nll"].append(-log_probs[np.arange(len(log_probs)), targets[rows]])
            if keep_top is not None:
                ids, values = top_k(log_probs, keep_top)
                parts["top_ids"].append(ids)
                parts["top_log_probs"].append(values)
            if base_top is not None:
                parts["kl"].append(kl_against_base(log_probs, base_top[0][rows], base_top[1][rows]))
                parts["same_top"].append(np.argmax(log_probs, axis=1) == base_top[0][rows, 0])
            row += len(log_probs)
    joined = {name: np.concatenate(arrays) if arrays else None for name, arrays in parts.items()}
    return WindowScore(text_bytes=text_bytes, **joined)


@dataclass
class Totals:
    """The running result over the windows scored so far."""
    nll: list[np.ndarray] = field(default_factory=list)
    text_bytes: int = 0
    kl: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)
    base_nll: list[np.ndarray] = field(default_factory=list)

    def add(self, score: WindowScore, base_nll: np.ndarray | None = None) -> None:
        self.nll.append(score.nll)
        self.text_bytes += score.text_bytes
        if score.kl is not None:
            self.kl.append(score.kl)
            self.same_top.append(score.same_top)
            self.base_nll.append(base_nll)

    @property
    def tokens(self) -> int:
        return sum(len(n) for n in self.nll)

    @property
    def window_losses(self) -> list[float]:
        """Mean nll (nats per token) of each window."""
        return [float(n.mean()) for n in self.nll]

    @property
    def perplexity(self) -> float:
        return math.exp(mean_and_stderr(np.concatenate(self.nll))[0])

    @property
    def stderr(self) -> float:
        """Of the perplexity: perplexity × the standard error of the mean nll (the delta method)."""
        return self.perplexity * mean_and_stderr(np.concatenate(self.nll))[1]

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(float(np.concatenate(self.nll).sum()), self.text_bytes)

    def summary(self) -> dict:
        result = {"perplexity": self.perplexity, "stderr": self.stderr, "bits_per_byte": self.bits_per_byte,
                  "tokens": self.tokens, "windows": len(self.nll), "bytes": self.text_bytes}
        if self.kl:
            kl, kl_stderr = mean_and_stderr(np.concatenate(self.kl))
            same = np.concatenate(self.same_top)
            p = float(same.mean())
            result.update(kl_divergence=kl, kl_divergence_stderr=kl_stderr,
                          same_top=p, same_top_stderr=math.sqrt(p * (1 - p) / (len(same) - 1)),
                          base_perplexity=math.exp(float(np.concatenate(self.base_nll).mean())))
        return result


def evaluate(engine, windows: Windows, batch: int, keep_top: int | None = None,
             base: Base | None = None) -> Iterator[tuple[Totals, WindowScore]]:
    """Scores the windows one by one, yielding the running totals after each (for a progress display)."""
    if batch < 1:
        raise ValueError(f"the batch must be at least 1 token, got {batch}")
    totals = Totals()
    if base is not None and base.vocab_size != engine.config.vocab_size:
        raise ValueError(f"the base run's model has {base.vocab_size} tokens, this one {engine.config.vocab_size}: "
                         f"KL divergence compares two versions of one model")
    for w, window in enumerate(windows.tokens):
        base_top = (base.top_ids[w], base.top_log_probs[w]) if base is not None else None
        score = score_window(engine, window, int(windows.text_bytes[w]), batch, keep_top, base_top)
        totals.add(score, base.nll[w] if base is not None else None)
        yield totals, score


def measure(engine, tokenizer: Tokenizer, text: str | None, n_ctx: int, batch: int, chunks: int | None = None,
            base: Base | None = None, write_base_to: str | Path | None = None, keep_top: int = 256,
            progress=None) -> Totals:
    """A whole run: the text cut into windows (or, with `base`, the base run's windows, which need no
    text), every window scored, and with `base` the KL divergence from it. `write_base_to` saves this
    run's top-`keep_top` log-probabilities there, the base of later runs. progress(totals, windows) is
    called after each window."""
    windows = token_windows(tokenizer, text, n_ctx, chunks) if text is not None else None
    if base is not None:
        windows = base.windows_to_compare(windows, chunks)
    scores = []
    for totals, score in evaluate(engine, windows, batch, keep_top if write_base_to else None, base):
        if write_base_to:
            scores.append(score)
        if progress:
            progress(totals, len(windows.tokens))
    if write_base_to:
        save_base(write_base_to, windows, scores, engine.config.vocab_size)
    return totals


def save_base(path: str | Path, windows: Windows, scores: list[WindowScore], vocab_size: int) -> None:
    """An .npz file of plain arrays (no pickled objects):
    format_version int64 (1), vocab_size int64, tokens int32 [windows, n_ctx] (as evaluated, BOS in place),
    text_bytes int64 [windows], file_tokens int64, nll float64 [windows, scored],
    top_ids int32 [windows, scored, k] (most likely first), top_log_probs float32 [windows, scored, k]."""
    with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the name
        np.savez(f, format_version=np.int64(BASE_FORMAT_VERSION), vocab_size=np.int64(vocab_size),
                 tokens=windows.tokens, text_bytes=windows.text_bytes, file_tokens=np.int64(windows.file_tokens),
                 nll=np.stack([s.nll for s in scores]), top_ids=np.stack([s.top_ids for s in scores]),
                 top_log_probs=np.stack([s.top_log_probs for s in scores]))


def load_base(path: str | Path) -> Base:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except FileNotFoundError:
        raise FormatError(path, "no such file (write it first with --kl-divergence-base FILE, without --kl-divergence)") from None
    except (OSError, ValueError) as e:
        raise FormatError(path, f"not a base logits file: {e}") from None
    expected = {"format_version", "vocab_size", "tokens", "text_bytes", "file_tokens", "nll", "top_ids", "top_log_probs"}
    if set(arrays) != expected or int(arrays["format_version"]) != BASE_FORMAT_VERSION:
        raise FormatError(path, f"not a version-{BASE_FORMAT_VERSION} base logits file written by ternlm perplexity")
    windows = Windows(arrays["tokens"], arrays["text_bytes"], int(arrays["file_tokens"]))
    return Base(windows, arrays["top_ids"], arrays["top_log_probs"], arrays["nll"], int(arrays["vocab_size"]))
