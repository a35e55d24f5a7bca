"""Random models with real shapes, built in memory: what speed is measured on (no download needed)."""

from __future__ import annotations

import zlib

import numpy as np

from ..config import BitNetConfig
from ..tokenizer import Tokenizer
from .checkpoint import Checkpoint, DenseTensor

SHAPES = {
    # BitNet b1.58 2B4T: microsoft/bitnet-b1.58-2B-4T's config.json
    "2b4t": dict(vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_hidden_layers=30,
                 num_attention_heads=20, num_key_value_heads=5, max_position_embeddings=4096),
    # a few MB, for tests of the tools themselves
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=640, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}


class SyntheticCheckpoint(Checkpoint):
    """Uniform random ternary weights, unit norms, a random f16 (or bf16) embedding; seeded."""

    def __init__(self, shape: str = "2b4t", embedding_dtype: str = "float16", seed: int = 0):
        if shape not in SHAPES:
            raise ValueError(f"unknown synthetic shape {shape!r}; choose one of {', '.join(SHAPES)}")
        self.config = BitNetConfig(**SHAPES[shape])
        self.source = f"synthetic {shape}"
        self._seed = seed
        rng = np.random.default_rng(seed)
        c = self.config
        embedding = (rng.standard_normal((c.vocab_size, c.hidden_size), dtype=np.float32) * 0.02)
        if embedding_dtype == "bfloat16":
            self._embedding = DenseTensor((embedding.view(np.uint32) >> 16).astype(np.uint16), "bfloat16")
        elif embedding_dtype in ("float16", "float32"):
            self._embedding = DenseTensor(embedding.astype(embedding_dtype), embedding_dtype)
        else:
            raise ValueError(f"unsupported embedding dtype {embedding_dtype!r}")

    def has(self, name: str) -> bool:
        return name == "model.embed_tokens.weight" or name.endswith("norm.weight") or name.endswith("proj.weight")

    def dense(self, name: str) -> DenseTensor:
        if name == "model.embed_tokens.weight":
            return self._embedding
        size = self.config.intermediate_size if "ffn_sub_norm" in name else self.config.hidden_size
        return DenseTensor(np.ones(size, dtype=np.float32), "float32")

    def ternary(self, name: str, rows: int, cols: int) -> tuple[np.ndarray, float]:
        rng = np.random.default_rng([self._seed, zlib.crc32(name.encode())])
        return rng.integers(-1, 2, size=(rows, cols), dtype=np.int8), 0.02

    def tokenizer(self) -> Tokenizer:
        """Token i is the word "w<i>" (space-separated): every id decodes to text, so the synthetic
        model also runs behind text interfaces such as the server."""
        from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

        vocab = {f"w{i}": i for i in range(self.config.vocab_size)}
        words = HFTokenizer(models.WordLevel(vocab, unk_token="w0"))
        words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        bos = self.config.bos_token_id
        return Tokenizer(words, bos_token=f"w{bos}" if bos is not None and bos < self.config.vocab_size else None)
