"""Engines: a checkpoint turned into something that maps token ids to logits.

Both engines expose the same calls, used by generation and by the server's batches:
    cache = engine.new_cache(n_ctx)          # or engine.new_cache(n_ctx, pool) to share blocks
    logits = engine.forward(cache, tokens, start_pos, all_logits)   # float32 [T or 1, vocab]
    logits = engine.forward_batch([(cache, tokens, start_pos), ...])  # [sequences, vocab]
`native` runs the C++ core; `reference` runs reference.py (NumPy).
"""

from __future__ import annotations

import numpy as np

from . import _core
from .config import BitNetConfig
from .errors import FormatError
from .reference import ReferenceModel
from .weights.checkpoint import (ATTENTION_PROJECTIONS, MLP_PROJECTIONS, BlockTensor, Checkpoint, DenseTensor,
                                 float32_of, layer_norms, linear_name, linear_shape, norm_name, return_freed_memory)

BACKENDS = ("native", "reference")


def model_shape(config: BitNetConfig) -> _core.ModelShape:
    shape = _core.ModelShape()
    shape.vocab = config.vocab_size
    shape.hidden = config.hidden_size
    shape.intermediate = config.intermediate_size
    shape.layers = config.num_hidden_layers
    shape.heads = config.num_attention_heads
    shape.kv_heads = config.num_key_value_heads
    shape.head_dim = config.head_dim
    shape.rms_norm_eps = config.rms_norm_eps
    shape.relu2 = config.hidden_act == "relu2"
    shape.sub_norms = config.has_sub_norms
    shape.rope_inv_freq = config.rope_inv_freq().tolist()
    return shape


# head formats, spelt as in GGUF and `ternlm convert --head`: the float ones by the storage they convert to
HEAD_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
HEADS = (*HEAD_DTYPES, "int8", "q4")
KV_CACHES = ("f16", "f32")
# bits a ternary weight takes in memory: 2 (four to a byte) or 1.6 (five to a byte, csrc/formats.h)
TERNARY_BITS = (2, 1.6)


def default_ternary_bits() -> float:
    """The layout that decodes faster with this CPU's kernels (the rule: csrc/dispatch.cpp)."""
    return _core.default_ternary_bits()


def check_ternary_bits(bits: float | None) -> float:
    if bits is None:
        return default_ternary_bits()
    if bits not in TERNARY_BITS:
        raise ValueError(f"ternary_bits must be 2 or 1.6, got {bits!r}")
    return float(bits)


HEAD_CHUNK_ROWS = 2048  # 10 MB of a 2B4T f16 embedding resident at a time while quantizing: a lower peak RSS
EMBEDDING = "model.embed_tokens.weight"
# Block types of at most 4.5 bits a weight, which the q4 head (4.5 bits) holds about as well.
FOUR_BIT_BLOCKS = ("Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K")


def head_for_blocks(block_type: str) -> str:
    """The head a matrix stored in ggml blocks becomes when no format is asked for: Q4_0 is the q4
    head's own format (used as it is), other types of 4.5 bits or fewer become q4, wider ones
    (Q5_*, Q6_K, Q8_0) int8; never a float copy of the whole matrix."""
    return "q4" if block_type in FOUR_BIT_BLOCKS else "int8"


class NativeEngine:
    """head: the output matrix's format. None keeps the checkpoint's own storage, memory-mapped
    (one stored in quantized blocks becomes q4 or int8: head_for_blocks); f16/bf16/f32 convert it
    (and a tied embedding); int8 quantizes each row with its own scale, q4 each group of 32
    weights to 4 bits (as llama.cpp's Q4_0; a Q4_0 matrix is taken as it is), and both multiply
    an int8-quantized final hidden state against it. An embedding stored in quantized blocks stays
    so: a lookup decodes the rows of its tokens.
    kv_cache: "f16" (half the memory) or "f32" keys and values.
    ternary_bits: 2 or 1.6 bits a ternary weight takes in memory (None: default_ternary_bits());
    the logits are the same either way."""

    def __init__(self, checkpoint: Checkpoint, threads: int | None = None, progress=None,
                 head: str | None = None, kv_cache: str = "f16", ternary_bits: float | None = None):
        if head is not None and head not in HEADS:
            raise ValueError(f"unknown head format {head!r}; choose one of {', '.join(HEADS)}")
        if kv_cache not in KV_CACHES:
            raise ValueError(f"unknown KV cache type {kv_cache!r}; choose one of {', '.join(KV_CACHES)}")
        self.kv_cache = kv_cache
        config = self.config = checkpoint.config
        self.shape = model_shape(config)
        self.ternary_bits = check_ternary_bits(ternary_bits)
        self._model = _core.Model(self.shape, threads or default_threads(config), self.ternary_bits)
        for i in range(config.num_hidden_layers):
            for proj in ATTENTION_PROJECTIONS + MLP_PROJECTIONS:
                name, (rows, cols) = linear_name(i, proj), linear_shape(config, proj)
                self._set_linear(checkpoint, i, proj, name, rows, cols)
            for norm in layer_norms(config):
                size = config.intermediate_size if norm == "ffn_sub_norm" else config.hidden_size
                self._model.set_norm(i, norm, checkpoint.norm(norm_name(i, norm), size))
            return_freed_memory()  # this layer's temporaries
            if progress:
                progress(i + 1, config.num_hidden_layers)
        self._model.set_final_norm(checkpoint.norm("model.norm.weight", config.hidden_size))
        self._set_embedding_and_head(checkpoint, head)
        self._model.check_complete()

    def _set_embedding_and_head(self, checkpoint: Checkpoint, head: str | None) -> None:
        config = self.config
        head_name = checkpoint.head_name()
        tied = head_name == EMBEDDING
        embedding_blocks = checkpoint.blocks(EMBEDDING)
        head_blocks = embedding_blocks if tied else checkpoint.blocks(head_name)
        if head is None and head_blocks is not None:
            head = head_for_blocks(head_blocks.type)
        head_dtype = HEAD_DTYPES.get(head)
        # A float head format converts the embedding only when it is the head.
        embedding_dtype = head_dtype if tied else None
        stored = self._set_stored(checkpoint, EMBEDDING, embedding_blocks, self._model.set_embedding, embedding_dtype)
        if not tied:
            stored = self._set_stored(checkpoint, head_name, head_blocks, self._model.set_head, head_dtype)
        if head in ("int8", "q4"):
            # in chunks, dropping each chunk's mapped pages: only looked-up embedding rows are read again
            for begin in range(0, config.vocab_size, HEAD_CHUNK_ROWS):
                end = min(begin + HEAD_CHUNK_ROWS, config.vocab_size)
                self._model.quantize_head(head, begin, end)
                checkpoint.release(head_name, begin, end)
        self.head = head if head in ("int8", "q4") else stored
        if head == "q4" and stored == "Q4_0":
            self.head_origin = "the file's Q4_0 blocks as they are"
        elif head in ("int8", "q4"):
            self.head_origin = f"quantized from {stored} at load"
        else:
            self.head_origin = "as stored" if head is None else "converted at load"
        # Unless it is also the head as stored (read whole every step), the embedding is only
        # looked up, a row per token: those rows are read from the file, never mapped (see
        # Model.read_embedding_from).
        looked_up_only = head in ("int8", "q4") or not tied
        location = checkpoint.file_location(EMBEDDING)
        self.embedding_read_from_file = bool(looked_up_only and embedding_dtype is None and location)
        if self.embedding_read_from_file:
            self._model.read_embedding_from(*location)
            checkpoint.release(EMBEDDING)

    def _set_linear(self, checkpoint: Checkpoint, layer: int, projection: str, name: str, rows: int, cols: int) -> None:
        """Hands the core a BitLinear weight in the most direct form the checkpoint offers: bytes in
        the 2-bit runtime layout, GGUF TQ blocks, else int8 values."""
        packed = checkpoint.runtime_packed(name, rows, cols)
        blocks = None if packed is not None else checkpoint.ggml_ternary_blocks(name, rows, cols)
        if packed is None and blocks is None:
            return self._model.set_linear(layer, projection, *checkpoint.ternary(name, rows, cols))
        try:
            if packed is not None:
                self._model.set_linear_packed(layer, projection, packed[0], rows, cols, packed[1])
            else:
                self._model.set_linear_tq(layer, projection, blocks[0], blocks[1], rows, cols)
        except ValueError as e:
            raise FormatError(checkpoint.source, f"tensor {checkpoint.stored_name(name)!r}: {e}") from None
        checkpoint.release(name)

    def _set_stored(self, checkpoint: Checkpoint, name: str, blocks: BlockTensor | None, setter,
                    dtype: str | None) -> str:
        """Hands the core a [vocab, hidden] matrix, which it reads in place: its quantized `blocks`
        as stored unless a float `dtype` is asked for, floats as stored or converted to `dtype`.
        Returns the storage: a head name of HEAD_DTYPES, or the block type ("Q4_0", ...)."""
        if blocks is not None and dtype is None:
            try:  # the core checks the shape: [vocab, hidden] in whole blocks
                setter(blocks.blocks, blocks.type, blocks.blocks)
            except ValueError as e:
                raise FormatError(checkpoint.source, f"tensor {name!r} ({blocks.type}): {e}") from None
            return blocks.type
        tensor = checkpoint.dense(name)
        expected = (self.config.vocab_size, self.config.hidden_size)
        if tensor.array.shape != expected:
            raise FormatError(checkpoint.source, f"tensor {name!r} has shape {list(tensor.array.shape)}, "
                                                 f"expected {list(expected)}")
        dtype = dtype or ("float32" if tensor.dtype == "float64" else tensor.dtype)
        if dtype not in HEAD_DTYPES.values():
            raise ValueError(f"unknown head dtype {dtype!r}; choose one of {', '.join(HEAD_DTYPES.values())}")
        if dtype != tensor.dtype:
            tensor = convert_dense(tensor, dtype)
        # The core reads it in place (a memory-mapped file stays mapped); it needs aligned rows.
        array = np.require(tensor.array, requirements=["C", "A"])
        setter(array, dtype, array)
        return next(name for name, storage in HEAD_DTYPES.items() if storage == dtype)

    @property
    def threads(self) -> int:
        return self._model.threads

    @threads.setter
    def threads(self, threads: int) -> None:
        self._model.threads = threads

    @property
    def weight_bytes(self) -> int:
        """Bytes of ternary weights a decode step streams (the head not included)."""
        return self._model.weight_bytes

    @property
    def head_bytes(self) -> int:
        return self._model.head_bytes

    def new_block_pool(self, blocks: int) -> _core.KVBlockPool:
        """Blocks of KV_BLOCK positions that caches made with it share (see csrc/kv_cache.h)."""
        return _core.KVBlockPool(self.shape, blocks, self.kv_cache == "f16")

    def new_cache(self, n_ctx: int, pool: _core.KVBlockPool | None = None):
        """A sequence's KV cache: in `pool`, or with a pool of its own just large enough for n_ctx."""
        if pool is None:
            return _core.KVCache(self.shape, n_ctx, self.kv_cache == "f16")
        return _core.KVCache(pool, n_ctx)

    def forward(self, cache, tokens, start_pos: int, all_logits: bool = False) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        return self._model.forward(cache, tokens, start_pos, all_logits)

    def forward_batch(self, segments, logits_for=None) -> np.ndarray:
        """One step over several sequences, each (cache, tokens, start_pos) with its own cache:
        their tokens go through every matrix together. Returns the last-token logits of each
        sequence whose `logits_for` flag is true (all by default), in order: a prompt chunk that
        does not finish its prompt can skip the head."""
        arrays = [np.asarray(tokens, dtype=np.int32).reshape(-1) for _, tokens, _ in segments]
        flags = [True] * len(segments) if logits_for is None else [bool(f) for f in logits_for]
        return self._model.forward_batch([cache for cache, _, _ in segments],
                                         np.concatenate(arrays) if arrays else np.zeros(0, np.int32),
                                         [len(a) for a in arrays], [pos for _, _, pos in segments], flags)


def convert_dense(tensor: DenseTensor, dtype: str) -> DenseTensor:
    values = float32_of(tensor)
    if dtype == "bfloat16":  # round to nearest even on the upper 16 bits
        bits = values.view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return DenseTensor((rounded >> np.uint32(16)).astype(np.uint16), "bfloat16")
    return DenseTensor(values.astype(dtype), dtype)


# Below about a million weights per matrix, a layer's products take less time than handing them
# to other threads (a few microseconds a job), so small models run on one thread unless told.
SMALL_MATRIX = 1 << 20


def default_threads(config: BitNetConfig) -> int:
    if config.hidden_size * config.intermediate_size < SMALL_MATRIX:
        return 1
    return _core.default_threads()


def build_engine(checkpoint: Checkpoint, backend: str = "native", threads: int | None = None, progress=None,
                 head: str | None = None, kv_cache: str = "f16", ternary_bits: float | None = None):
    if backend == "native":
        return NativeEngine(checkpoint, threads, progress, head, kv_cache, ternary_bits)
    if ternary_bits is not None:
        check_ternary_bits(ternary_bits)
    if head is not None:
        raise ValueError("the reference backend computes the head in float32 from the file; head formats are native only")
    if backend == "reference":
        return ReferenceModel(checkpoint, progress)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
