"""Random models with real shapes: what speed is measured on (no download needed)."""

from __future__ import annotations

import mmap
import tempfile
import zlib

import numpy as np

from ..config import BitNetConfig
from ..tokenizer import Tokenizer
from .checkpoint import Checkpoint, DenseTensor, drop_pages

SHAPES = {
    # BitNet b1.58 2B4T: microsoft/bitnet-b1.58-2B-4T's config.json
    "2b4t": dict(vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_hidden_layers=30,
                 num_attention_heads=20, num_key_value_heads=5, max_position_embeddings=4096),
    # a few MB, for tests of the tools themselves
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=640, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}


EMBEDDING = "model.embed_tokens.weight"
EMBEDDING_CHUNK_ROWS = 4096  # 42 MB of 2B4T float32 rows at a time


class SyntheticCheckpoint(Checkpoint):
    """Uniform random ternary weights, unit norms, a random f16 (or bf16) embedding; seeded.

    The embedding is written to an unnamed temporary file, a chunk of rows at a time, and mapped
    from it, as a model file's would be: the engine holds (and a benchmark's peak RSS counts) what
    it would for a model of this shape loaded from a file, neither a whole float32 draw nor, with
    a quantized head, an embedding that a loaded model only reads a row at a time."""

    def __init__(self, shape: str = "2b4t", embedding_dtype: str = "float16", seed: int = 0):
        if shape not in SHAPES:
            raise ValueError(f"unknown synthetic shape {shape!r}; choose one of {', '.join(SHAPES)}")
        if embedding_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"unsupported embedding dtype {embedding_dtype!r}")
        self.config = BitNetConfig(**SHAPES[shape])
        self.source = f"synthetic {shape}"
        self._seed = seed
        rng = np.random.default_rng(seed)
        c = self.config
        self._file = tempfile.TemporaryFile()
        for start in range(0, c.vocab_size, EMBEDDING_CHUNK_ROWS):
            rows = min(EMBEDDING_CHUNK_ROWS, c.vocab_size - start)
            values = rng.standard_normal((rows, c.hidden_size), dtype=np.float32) * 0.02
            if embedding_dtype == "bfloat16":
                stored = (values.view(np.uint32) >> 16).astype(np.uint16)
            else:
                stored = values.astype(embedding_dtype, copy=False)
            self._file.write(stored.tobytes())
        self._file.flush()
        self._mapping = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        storage = np.uint16 if embedding_dtype == "bfloat16" else embedding_dtype
        embedding = np.frombuffer(self._mapping, dtype=storage).reshape(c.vocab_size, c.hidden_size)
        self._embedding = DenseTensor(embedding, embedding_dtype)
        self._row_bytes = embedding.strides[0]

    def has(self, name: str) -> bool:
        return name == EMBEDDING or name.endswith("norm.weight") or name.endswith("proj.weight")

    def dense(self, name: str) -> DenseTensor:
        if name == EMBEDDING:
            return self._embedding
        size = self.config.intermediate_size if "ffn_sub_norm" in name else self.config.hidden_size
        return DenseTensor(np.ones(size, dtype=np.float32), "float32")

    def file_location(self, name: str) -> tuple[int, int] | None:
        return (self._file.fileno(), 0) if name == EMBEDDING else None

    def release(self, name: str, first_row: int = 0, end_row: int | None = None) -> None:
        if name == EMBEDDING:
            end = self.config.vocab_size if end_row is None else end_row
            drop_pages(self._mapping, first_row * self._row_bytes, end * self._row_bytes)

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
