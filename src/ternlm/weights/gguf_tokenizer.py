"""The tokenizer from a GGUF file's metadata, as an HF `tokenizers` object: byte-level BPE
(tokenizer.ggml.model "gpt2": LLaMA-3, GPT-2) or SentencePiece BPE ("llama": LLaMA-2 and the
1bitLLM models). The tests compare it with the original tokenizers on the same texts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gguf import TokenType

from ..errors import FormatError
from ..tokenizer import Tokenizer

if TYPE_CHECKING:
    from .gguf import GGUFFile

# The LLaMA-3 pre-tokenizer split (tokenizer.ggml.pre "llama-bpe", or missing as in 2B4T's file).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")
GPT2_PRE = ("gpt-2", "gpt2")


def gguf_tokenizer(f: GGUFFile) -> Tokenizer:
    """The tokenizer a GGUF file describes in its tokenizer.ggml.* metadata."""
    return Tokenizer(*gguf_hf_tokenizer(f))


def gguf_hf_tokenizer(f: GGUFFile):
    """-> (tokenizers.Tokenizer, BOS text or None, EOS text or None, the chat template as stored or None)"""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    model = f.value("tokenizer.ggml.model", str)
    tokens = f.value("tokenizer.ggml.tokens", list)
    types = f.value("tokenizer.ggml.token_type", list, [int(TokenType.NORMAL)] * len(tokens))
    if len(types) != len(tokens):
        raise FormatError(f.path, f"{len(tokens)} tokens but {len(types)} token types")
    try:
        if model == "gpt2":
            tok = HFTokenizer(_byte_level_bpe(f, tokens))
            _byte_level_pipeline(tok, f.value("tokenizer.ggml.pre", str, "llama-bpe"), f.path)
        elif model == "llama":
            tok = HFTokenizer(_sentencepiece_bpe(f, tokens, types))
            _sentencepiece_pipeline(tok, f.value("tokenizer.ggml.add_space_prefix", bool, True))
        else:
            raise FormatError(f.path, f"unsupported tokenizer.ggml.model {model!r} (ternlm reads gpt2 and llama)")
    except FormatError:
        raise
    except Exception as e:  # tokenizers raises bare Exceptions for inconsistent vocabularies
        raise FormatError(f.path, f"cannot build the tokenizer: {e}") from None
    special = [t for t, kind in zip(tokens, types) if kind in (TokenType.CONTROL, TokenType.UNKNOWN)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, kind in zip(tokens, types) if kind == TokenType.USER_DEFINED]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def token(key: str) -> str | None:
        index = f.value(key, int, None)
        if index is not None and not 0 <= index < len(tokens):
            raise FormatError(f.path, f"{key} = {index} is outside the vocabulary of {len(tokens)}")
        return None if index is None else tokens[index]

    # ternlm's Tokenizer prepends BOS whenever it has one: drop it when the file says not to.
    bos = token("tokenizer.ggml.bos_token_id") if f.value("tokenizer.ggml.add_bos_token", bool, True) else None
    eos = token("tokenizer.ggml.eos_token_id")
    return tok, bos, eos, f.value("tokenizer.chat_template", str, None)


def _byte_level_bpe(f: GGUFFile, tokens: list[str]):
    from tokenizers import models

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise FormatError(f.path, "the vocabulary holds duplicate tokens")
    merges = []
    for merge in f.value("tokenizer.ggml.merges", list):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise FormatError(f.path, f"malformed merge {merge!r}")
        merges.append((parts[0], parts[1]))
    # LLaMA-3 (and llama.cpp's llama-bpe) take a whole word from the vocabulary before merging
    ignore_merges = f.value("tokenizer.ggml.pre", str, "llama-bpe") in LLAMA3_PRE
    return models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)


def _byte_level_pipeline(tok, pre: str, path: Path) -> None:
    from tokenizers import Regex, decoders, pre_tokenizers

    if pre in LLAMA3_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in GPT2_PRE:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise FormatError(path, f"unsupported tokenizer.ggml.pre {pre!r} (ternlm knows llama-bpe and gpt-2)")
    tok.decoder = decoders.ByteLevel()


def _sentencepiece_bpe(f: GGUFFile, tokens: list[str], types: list[int]):
    """A SentencePiece BPE vocabulary (pieces + scores) as HF BPE: SentencePiece merges the pair
    whose result scores highest, so the merges are every split of a piece into two pieces,
    ordered by the score of the piece (as transformers' SentencePieceExtractor does)."""
    from tokenizers import models

    scores = f.value("tokenizer.ggml.scores", list)
    if len(scores) != len(tokens):
        raise FormatError(f.path, f"{len(tokens)} tokens but {len(scores)} scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    candidates = []
    for piece, score, kind in zip(tokens, scores, types):
        if kind != TokenType.NORMAL:
            continue
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates.extend((-score, pair) for pair in splits)
    candidates.sort(key=lambda c: c[0])  # stable: ties keep the order above
    unk = f.value("tokenizer.ggml.unknown_token_id", int, 0)
    return models.BPE(vocab=vocab, merges=[pair for _, pair in candidates], unk_token=tokens[unk] if 0 <= unk < len(tokens) else None,
                      fuse_unk=True, byte_fallback=True)


def _sentencepiece_pipeline(tok, add_space_prefix: bool) -> None:
    from tokenizers import decoders, normalizers

    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
