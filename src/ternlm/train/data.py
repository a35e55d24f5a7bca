"""Training data: text files -> held-out split -> tokenizer -> token streams and batches.

Split: the held-out part of each file is its tail from the first newline at or after
(1 - heldout_fraction) of its bytes; the rest is training text. Deterministic, and no line is cut.

Training stream: for each file `<|begin_of_text|> text <|end_of_text|>`, concatenated; batches
are random windows of context + 1 tokens whose offsets depend only on (seed, step), so any
process can rebuild the batch of any step (exact resume, data parallelism).

Held-out protocol (bits per byte): each file's held-out text is encoded as
`<|begin_of_text|> text`, cut into windows of context + 1 tokens that overlap by one token;
every text token is predicted once, from the window's earlier tokens. bits per byte =
sum of -ln p over those tokens / UTF-8 bytes of the held-out text / ln 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, EOT]
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}


class DataError(ValueError):
    """Unusable training data; the message says what is wrong and where."""


def find_text_files(paths: list[str | Path]) -> list[Path]:
    """Files given directly, plus text files (by suffix) found recursively in folders, sorted."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"{path}: no text files (*.txt, *.md, *.rst) in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError("no training data given")
    return files


def split_text(text: str, heldout_fraction: float) -> tuple[str, str]:
    """(train, held-out): the held-out part starts after the first newline at or after the cut."""
    raw = text.encode("utf-8")
    cut = int(len(raw) * (1.0 - heldout_fraction))
    newline = raw.find(b"\n", cut)
    cut = len(raw) if newline < 0 or heldout_fraction <= 0 else newline + 1
    return raw[:cut].decode("utf-8"), raw[cut:].decode("utf-8")


def read_corpus(paths: list[str | Path], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Reads every file as UTF-8 and splits it: (train texts, held-out texts), one per file."""
    train, heldout = [], []
    for path in find_text_files(paths):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
        a, b = split_text(text, heldout_fraction)
        train.append(a)
        heldout.append(b)
    if sum(len(t) for t in train) == 0:
        raise DataError(f"the training data is empty ({len(train)} empty files)")
    return train, heldout


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) with the three special tokens at ids 0, 1, 2.

    Encoding with special tokens adds `<|begin_of_text|>` in front, as LLaMA-3's tokenizer does.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tokenizer


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    ids = {name: tokenizer.token_to_id(name) for name in SPECIAL_TOKENS}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise DataError(f"the tokenizer lacks the special tokens {', '.join(missing)}")
    return ids


def encode(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def train_stream(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """All training files as one int32 token stream: BOS text EOS, BOS text EOS, ..."""
    ids = special_ids(tokenizer)
    parts = [np.array([ids[BOS], *doc, ids[EOS]], dtype=np.int32) for doc in encode(tokenizer, texts)]
    return np.concatenate(parts)


def batch_offsets(seed: int, step: int, n: int, stream_len: int, context: int) -> np.ndarray:
    """Start offsets of the global batch of one step: depends on (seed, step) only."""
    if stream_len < context + 1:
        raise DataError(f"the training text has {stream_len} tokens, fewer than context + 1 = {context + 1}")
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, stream_len - context, size=n)


def windows(stream: np.ndarray, offsets: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets, each int64 (n, context)."""
    rows = np.stack([stream[o:o + context + 1] for o in offsets]).astype(np.int64)  # (n, context+1)
    return rows[:, :-1], rows[:, 1:]


@dataclass
class HeldOut:
    """Held-out windows: `inputs`/`targets` (n, context) with targets -100 where nothing is scored."""
    inputs: np.ndarray
    targets: np.ndarray
    n_bytes: int

    @property
    def n_tokens(self) -> int:
        return int((self.targets >= 0).sum())


def heldout_windows(tokenizer: Tokenizer, texts: list[str], context: int) -> HeldOut:
    bos = special_ids(tokenizer)[BOS]
    inputs, targets = [], []
    for doc in encode(tokenizer, [t for t in texts if t]):
        seq = np.array([bos, *doc], dtype=np.int64)
        for start in range(0, len(seq) - 1, context):
            chunk = seq[start:start + context + 1]                                    # (<= context+1,)
            x = np.zeros(context, dtype=np.int64)
            y = np.full(context, -100, dtype=np.int64)
            x[:len(chunk) - 1] = chunk[:-1]
            y[:len(chunk) - 1] = chunk[1:]
            inputs.append(x)
            targets.append(y)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if not inputs:
        return HeldOut(np.zeros((0, context), np.int64), np.zeros((0, context), np.int64), 0)
    return HeldOut(np.stack(inputs), np.stack(targets), n_bytes)


def load_or_train_tokenizer(path: str | Path | None, texts: list[str], vocab_size: int) -> Tokenizer:
    if path is None:
        return train_tokenizer(texts, vocab_size)
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad files
        raise DataError(f"{path}: cannot read the tokenizer ({e})") from None
    special_ids(tokenizer)
    return tokenizer
