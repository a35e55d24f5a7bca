"""What every checkpoint reader provides, in HF tensor names.

Readers (HF safetensors now, GGUF later) hand out one tensor at a time, so a loader never holds
two full copies of the weights.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
from dataclasses import dataclass

import numpy as np

from ..config import BitNetConfig
from ..errors import FormatError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The densest layout ternlm reads, TQ1_0, stores 4.7 ternary weights in a byte.
MAX_WEIGHTS_PER_BYTE = 5
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class DenseTensor:
    """A float tensor as stored: `array` holds bf16 as uint16 bit patterns."""

    array: np.ndarray
    dtype: str  # "float32" | "float16" | "bfloat16" | "float64"


@dataclass
class BlockTensor:
    """A matrix stored in ggml's quantized blocks (Q4_0 ... Q8_0, Q2_K ... Q6_K), as stored."""

    blocks: np.ndarray  # uint8 [rows, bytes per row], usually memory-mapped
    type: str  # ggml's name of the block type: "Q4_0", "Q8_0", "Q4_K", ...


def drop_pages(mapping: mmap.mmap | None, start: int, end: int) -> None:
    """Drops the whole pages of bytes [start, end) of a file mapping from this process's resident
    set, once the caller holds its own copy of them (the kernel keeps them in its page cache).
    Nothing is read there again, or only sparse rows, so those pages also lose readahead."""
    if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
        mapping.madvise(mmap.MADV_RANDOM, first, last - first)


@functools.cache
def _malloc_trim():
    libc = ctypes.util.find_library("c")
    function = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if function is not None:
        function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


def return_freed_memory() -> None:
    """Hands the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).
    Loading frees large temporaries tensor after tensor, and glibc keeps such blocks in its heap
    once its self-raising mmap threshold passes their size: without this, 2B4T's load peaked 36 MB
    higher, and the tokenizer's build left 28 MB behind."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def float32_of(t: DenseTensor) -> np.ndarray:
    if t.dtype == "bfloat16":
        return (t.array.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return t.array.astype(np.float32)


def linear_name(layer: int, projection: str) -> str:
    block = "self_attn" if projection in ATTENTION_PROJECTIONS else "mlp"
    return f"model.layers.{layer}.{block}.{projection}.weight"


def norm_name(layer: int, norm: str) -> str:
    if norm == "attn_sub_norm":
        return f"model.layers.{layer}.self_attn.attn_sub_norm.weight"
    if norm == "ffn_sub_norm":
        return f"model.layers.{layer}.mlp.ffn_sub_norm.weight"
    return f"model.layers.{layer}.{norm}.weight"


def linear_shape(config: BitNetConfig, projection: str) -> tuple[int, int]:
    """[out, in] of a projection."""
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    return {
        "q_proj": (q_width, config.hidden_size),
        "k_proj": (kv_width, config.hidden_size),
        "v_proj": (kv_width, config.hidden_size),
        "o_proj": (config.hidden_size, q_width),
        "gate_proj": (config.intermediate_size, config.hidden_size),
        "up_proj": (config.intermediate_size, config.hidden_size),
        "down_proj": (config.hidden_size, config.intermediate_size),
    }[projection]


def layer_norms(config: BitNetConfig) -> tuple[str, ...]:
    norms = ("input_layernorm", "post_attention_layernorm")
    return norms + (("attn_sub_norm", "ffn_sub_norm") if config.has_sub_norms else ())


class Checkpoint:
    """Base class of checkpoint readers. Subclasses set `config` and implement the three readers."""

    config: BitNetConfig
    source: str  # the file or directory, for error messages
    file_bytes: int | None = None  # the size of the files holding the weights (None: built in memory)

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def check_weights_fit(self) -> None:
        """Refuses a config that claims more weights than the checkpoint's files can hold. Called
        before a whole model is built from it (load, convert): a hostile config cannot make the
        loader reserve memory (layer slots, RoPE tables, conversion plans) that its files do not back."""
        claimed = self.config.weight_count()
        if self.file_bytes is not None and claimed > MAX_WEIGHTS_PER_BYTE * self.file_bytes:
            raise FormatError(self.source, f"the config describes {claimed} weights, but the model's files hold "
                                           f"only {self.file_bytes} bytes")

    def dense(self, name: str) -> DenseTensor:
        """A float tensor, memory-mapped where the file allows."""
        raise NotImplementedError

    def blocks(self, name: str) -> BlockTensor | None:
        """An embedding or head stored in quantized blocks, as stored (the engine decodes rows as
        it needs them); None when it is stored as floats: then dense() reads it."""
        return None

    def ternary(self, name: str, rows: int, cols: int) -> tuple[np.ndarray, float]:
        """A BitLinear weight as (int8 {-1,0,1} [rows, cols], scale that multiplies)."""
        raise NotImplementedError

    def runtime_packed(self, name: str, rows: int, cols: int) -> tuple[np.ndarray, float] | None:
        """A BitLinear weight whose stored bytes already are the engine's runtime layout
        (csrc/formats.h), as (uint8 [rows * cols / 4], scale), or None: then use ternary()."""
        return None

    def stored_name(self, name: str) -> str:
        """What the file calls a tensor, for messages."""
        return name

    def ggml_ternary_blocks(self, name: str, rows: int, cols: int) -> tuple[np.ndarray, bool] | None:
        """A BitLinear weight stored as GGUF's TQ1_0 or TQ2_0 blocks that the engine decodes itself, as
        (the blocks' bytes, whether TQ1_0), or None: then use runtime_packed() or ternary()."""
        return None

    def release(self, name: str, first_row: int = 0, end_row: int | None = None) -> None:
        """A hint that the caller has its own copy of the tensor (or of rows [first_row, end_row)):
        memory-mapped readers drop those pages from the resident set."""

    def file_location(self, name: str) -> tuple[int, int] | None:
        """Where a float tensor's values lie exactly as dense() gives them (or a quantized one's
        blocks as blocks() gives them): (descriptor of the open file they are mapped from, byte
        offset of the first value), so that a few rows can be read without mapping them; None when
        they do not lie whole in one file."""
        return None

    def tokenizer(self):
        """The model's ternlm.tokenizer.Tokenizer (with its chat template, if any)."""
        raise NotImplementedError

    def stop_ids(self, tokenizer) -> set[int]:
        """Every end-of-sequence id the model declares, plus <|eot_id|> when the vocabulary has it."""
        stop = set(self.config.eos_token_ids)
        for token in (tokenizer.eos_id, tokenizer.token_to_id("<|eot_id|>")):
            if token is not None:
                stop.add(token)
        return stop

    def generation_defaults(self) -> dict:
        """The model's own sampling settings (generation_config.json), as keyword arguments of
        SamplingParams: what applies wherever the caller sets nothing. None here."""
        return {}

    def head_name(self) -> str:
        """The output matrix: `lm_head.weight` when untied, else the embedding."""
        return "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"

    def norm(self, name: str, size: int) -> np.ndarray:
        values = float32_of(self.dense(name)).reshape(-1)
        if values.size != size:
            raise FormatError(self.source, f"tensor {name!r} has {values.size} values, expected {size}")
        return values
