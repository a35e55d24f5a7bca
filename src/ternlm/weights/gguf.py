"""GGUF files (bitnet.cpp's and llama.cpp's) as a Checkpoint.

gguf_file.py reads the container; here the tensor table is checked against the ggml types (ids 36-39
mean one thing to bitnet.cpp and another to upstream ggml: we accept id 36 only as I2_S, and only
where its size proves it; 37-39 are errors), and tensors are handed out in HF names: ternary
weights through gguf_ternary.py, dense ones as stored or dequantized, the tokenizer through
gguf_tokenizer.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from ..config import BitNetConfig
from ..errors import FormatError
from ..tokenizer import Tokenizer
from .checkpoint import BlockTensor, Checkpoint, DenseTensor, float32_of
from .gguf_file import GGUFContainer, Metadata, TensorEntry
from .gguf_tokenizer import gguf_tokenizer
from .gguf_ternary import (I2_S, QK_I2_S, TERNARY_TYPE_NAMES, TQ1_0, TQ2_0, tensor_scale, ternary_nbytes,
                           unpack_i2_s, unpack_tq1_0, unpack_tq2_0)
from .names import gguf_name, unpermute_rope_rows
from .packing import quantize_ternary

F32, F16, BF16 = GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16
# ids whose meaning depends on who wrote the file: bitnet.cpp vs upstream ggml
CLASHING_IDS = {
    37: "I8_S in bitnet.cpp, IQ4_NL_4_8 in old upstream ggml",
    38: "TL1 in bitnet.cpp, IQ4_NL_8_8 in old upstream ggml",
    39: "TL2 in bitnet.cpp, MXFP4 in upstream ggml",
}
DENSE_TYPES = {F32: ("float32", np.float32), F16: ("float16", np.float16), BF16: ("bfloat16", np.uint16)}

# general.architecture -> (HF architecture, activation). bitnet.cpp calls 2B4T `bitnet-b1.58`
# (earlier `bitnet-25`); `bitnet` is the 1bitLLM family and what llama.cpp's BitNet graph reads.
ARCHITECTURES = {
    "bitnet-b1.58": ("BitNetForCausalLM", "relu2"),
    "bitnet-25": ("BitNetForCausalLM", "relu2"),
    "bitnet": ("BitNetForCausalLM", "silu"),
    "llama": ("LlamaForCausalLM", "silu"),
}
# Written by ternlm: llama.cpp knows only `bitnet` (and computes SiLU); this key keeps relu2
# models right when they are stored under that name.
HIDDEN_ACT_KEY = "ternlm.hidden_act"


# -- the file ----------------------------------------------------------------------------------
@dataclass
class TensorInfo:
    name: str
    type_id: int
    shape: tuple[int, ...]  # NumPy order: [rows, cols]
    offset: int  # absolute, in bytes
    nbytes: int

    @property
    def type_name(self) -> str:
        if self.type_id in TERNARY_TYPE_NAMES:
            return TERNARY_TYPE_NAMES[self.type_id]
        return GGMLQuantizationType(self.type_id).name


class GGUFFile:
    """A validated GGUF file: metadata values and bounds-checked, zero-copy tensor bytes."""

    def __init__(self, path: str | Path):
        self._container = GGUFContainer(path)
        self.path = self._container.path
        self.data: np.ndarray = self._container.data
        self.tensors: dict[str, TensorInfo] = {}
        for entry in self._container.tensors:
            info = self._tensor_info(entry)
            if info.name in self.tensors:
                raise FormatError(self.path, f"tensor {info.name!r} appears twice")
            self.tensors[info.name] = info
        self._check_extents()

    def _tensor_info(self, entry: TensorEntry) -> TensorInfo:
        def fail(problem: str):
            raise FormatError(self.path, f"tensor {entry.name!r}: {problem}")

        shape, type_id = entry.shape, entry.type_id
        if any(d <= 0 for d in shape):
            fail(f"invalid shape {list(shape)}")
        n = int(np.prod(shape, dtype=object))
        if n > 8 * self.data.size:
            fail(f"{n} elements cannot fit in a file of {self.data.size} bytes")
        if type_id in CLASHING_IDS:
            fail(f"type id {type_id} is {CLASHING_IDS[type_id]}; ternlm reads I2_S, TQ1_0 and TQ2_0 "
                 "(convert the model from its HF checkpoint)")
        if type_id == I2_S:
            if n % QK_I2_S:
                fail(f"type id 36 (I2_S) needs a multiple of {QK_I2_S} weights, has {n}")
            nbytes = ternary_nbytes(I2_S, n)
        else:
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
            except (ValueError, KeyError):
                fail(f"unknown GGML type id {type_id}")
            if shape[-1] % block:
                fail(f"row of {shape[-1]} is not a multiple of the {GGMLQuantizationType(type_id).name} block ({block})")
            nbytes = n // block * block_bytes
        return TensorInfo(entry.name, type_id, shape, entry.offset, nbytes)

    def _check_extents(self) -> None:
        """Every tensor inside the file and clear of the next one. An id-36 tensor must fill exactly
        the I2_S size up to the next tensor: that, not the id, is what tells I2_S from other types."""
        alignment = self._container.alignment
        ordered = sorted(self.tensors.values(), key=lambda t: t.offset)
        for info, following in zip(ordered, ordered[1:] + [None]):
            end = following.offset if following else self.data.size
            if info.offset + info.nbytes > end:
                where = f"overlaps {following.name!r}" if following else "runs past the end of the file (truncated?)"
                raise FormatError(self.path, f"tensor {info.name!r} ({info.type_name}, {info.nbytes} bytes) {where}")
            padded = -(-info.nbytes // alignment) * alignment
            if info.type_id == I2_S and following and following.offset - info.offset != padded:
                raise FormatError(self.path, f"tensor {info.name!r} has type id 36 but occupies "
                                             f"{following.offset - info.offset} bytes, not the {padded} of I2_S")

    def value(self, key: str, kind: type | tuple, default=FormatError):
        """A metadata value of the given Python type; `default` when absent (an error if none given)."""
        entry = self._container.metadata.get(key)
        if entry is None:
            if default is FormatError:
                raise FormatError(self.path, f"missing metadata key {key!r}")
            return default
        try:
            value = entry.python()
        except UnicodeDecodeError as e:
            raise FormatError(self.path, f"metadata {key!r} cannot be read: {e}") from None
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, (int, float)))
        if not ok:
            raise FormatError(self.path, f"metadata {key!r} has the wrong type ({type(value).__name__})")
        return value

    def metadata(self) -> dict[str, Metadata]:
        """Every metadata entry as stored, by key."""
        return dict(self._container.metadata)

    def release(self, info: TensorInfo, first_row: int = 0, end_row: int | None = None) -> None:
        """Drop a tensor's pages (or those of rows [first_row, end_row)) from this process's
        resident set once the caller has its own copy, so the file and the runtime layout do not
        both count (as SafetensorsFile.release). Rows are whole blocks in every ggml type."""
        rows = info.shape[0] if len(info.shape) > 1 else 1
        row_bytes = info.nbytes // rows
        self._container.release(info.offset + first_row * row_bytes,
                                info.offset + (rows if end_row is None else end_row) * row_bytes)

    def release_header(self) -> None:
        """Drops the header's pages (2B4T's: 9 MB, mostly the vocabulary and merges) from the
        resident set; metadata read later comes back from the page cache."""
        self._container.release(0, self._container.data_start)

    def fileno(self) -> int:
        return self._container.handle.fileno()

    def bytes_of(self, info: TensorInfo) -> np.ndarray:
        return self.data[info.offset: info.offset + info.nbytes]


# -- the checkpoint ----------------------------------------------------------------------------
class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: str | Path):
        self.file = GGUFFile(path)
        self.source = str(self.file.path)
        self.arch = self.file.value("general.architecture", str)
        if self.arch not in ARCHITECTURES:
            raise FormatError(self.source, f"unsupported architecture {self.arch!r}; "
                                           f"ternlm reads {', '.join(ARCHITECTURES)}")
        self.config = self._config()
        self.file_bytes = int(self.file.data.size)
        # llama.cpp's `llama` graph pairs RoPE dimensions (2i, 2i+1), so its converter permutes the
        # q/k rows; we pair (j, j + head_dim/2) as HF does and undo that permutation.
        self._permuted_rope = self.arch == "llama"

    def _config(self) -> BitNetConfig:
        f, a = self.file, self.arch
        architecture, activation = ARCHITECTURES[a]
        embedding = f.tensors.get("token_embd.weight")
        if embedding is None or len(embedding.shape) != 2:
            raise FormatError(self.source, "missing the 2-D tensor 'token_embd.weight'")
        heads = f.value(f"{a}.attention.head_count", int)
        hidden = f.value(f"{a}.embedding_length", int)
        eos = f.value("tokenizer.ggml.eos_token_id", int, None)
        eot = f.value("tokenizer.ggml.eot_token_id", int, None)
        raw = {
            "architectures": [architecture],
            "model_type": "llama" if architecture == "LlamaForCausalLM" else "bitnet",
            "vocab_size": embedding.shape[0],
            "hidden_size": hidden,
            "intermediate_size": f.value(f"{a}.feed_forward_length", int),
            "num_hidden_layers": f.value(f"{a}.block_count", int),
            "num_attention_heads": heads,
            "num_key_value_heads": f.value(f"{a}.attention.head_count_kv", int, heads),
            "head_dim": f.value(f"{a}.attention.key_length", int, None),
            "hidden_act": f.value(HIDDEN_ACT_KEY, str, activation),
            "rms_norm_eps": f.value(f"{a}.attention.layer_norm_rms_epsilon", (int, float)),
            "rope_theta": f.value(f"{a}.rope.freq_base", (int, float), 10000.0),
            "max_position_embeddings": f.value(f"{a}.context_length", int),
            "tie_word_embeddings": "output.weight" not in f.tensors,
            "bos_token_id": f.value("tokenizer.ggml.bos_token_id", int, None),
            "eos_token_id": [t for t in dict.fromkeys((eos, eot)) if t is not None] or None,
            # GGUF scales multiply (bitnet.cpp, llama.cpp): the `autobitlinear` convention
            "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear"},
        }
        if embedding.shape[1] != hidden:
            raise FormatError(self.source, f"token_embd.weight is {list(embedding.shape)} but embedding_length is {hidden}")
        config = BitNetConfig.from_dict(raw, self.source)
        rope_dims = f.value(f"{a}.rope.dimension_count", int, config.head_dim)
        if rope_dims != config.head_dim:
            raise FormatError(self.source, f"RoPE over {rope_dims} of {config.head_dim} head dimensions is not supported")
        scaling = f.value(f"{a}.rope.scaling.type", str, "none")
        if scaling != "none" or "rope_freqs.weight" in f.tensors:
            raise FormatError(self.source, "RoPE scaling in GGUF files is not supported")
        return config

    # -- Checkpoint interface ----------------------------------------------------------------
    def has(self, name: str) -> bool:
        return gguf_name(name) in self.file.tensors

    def _info(self, name: str) -> TensorInfo:
        info = self.file.tensors.get(gguf_name(name) or "")
        if info is None:
            raise FormatError(self.source, f"missing tensor {gguf_name(name) or name!r} ({name})")
        return info

    def dense(self, name: str) -> DenseTensor:
        info = self._info(name)
        data = self.file.bytes_of(info)
        if info.type_id in DENSE_TYPES:
            label, storage = DENSE_TYPES[info.type_id]
            return DenseTensor(data.view(storage).reshape(info.shape), label)
        if info.type_id in TERNARY_TYPE_NAMES or info.type_id not in _DEQUANTIZABLE:
            raise FormatError(self.source, f"tensor {info.name!r} has type {info.type_name}, which ternlm "
                                           "cannot read for an embedding, head or norm")
        try:
            return DenseTensor(_dequantize_to_f16(data, info), "float16")
        except ValueError as e:
            raise FormatError(self.source, f"tensor {info.name!r}: {e}") from None

    def blocks(self, name: str) -> BlockTensor | None:
        """Checked first: every f16 scale (and minimum) of the blocks is finite, which makes every
        weight finite; the pages read for it are dropped again a chunk at a time."""
        info = self._info(name)
        if info.type_id not in _DEQUANTIZABLE or len(info.shape) != 2:
            return None
        rows = self.file.bytes_of(info).reshape(info.shape[0], -1)
        block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(info.type_id)][1]
        for start in range(0, len(rows), _CHECK_CHUNK_ROWS):
            blocks = rows[start: start + _CHECK_CHUNK_ROWS].reshape(-1, block_bytes)
            for offset in _F16_FIELDS[info.type_id]:
                bits = blocks[:, offset].astype(np.uint16) | blocks[:, offset + 1].astype(np.uint16) << 8
                if np.any(bits & 0x7C00 == 0x7C00):
                    raise FormatError(self.source, f"tensor {info.name!r} has a block scale that is infinite or NaN")
            self.file.release(info, start, min(start + _CHECK_CHUNK_ROWS, len(rows)))
        return BlockTensor(rows, info.type_name)

    def runtime_packed(self, name: str, rows: int, cols: int) -> tuple[np.ndarray, float] | None:
        """I2_S blocks are the engine's blocks: with whole blocks per row (and no llama q/k row
        permutation to undo) the file's bytes are used as they are."""
        info = self._info(name)
        projection = name.split(".")[-2]
        if (info.type_id != I2_S or info.shape != (rows, cols) or cols % QK_I2_S
                or (self._permuted_rope and projection in ("q_proj", "k_proj"))):
            return None
        data = self.file.bytes_of(info)
        scale = float(data[rows * cols // 4: rows * cols // 4 + 4].view("<f4")[0])
        if not (np.isfinite(scale) and scale > 0):
            raise FormatError(self.source, f"tensor {info.name!r} has the scale {scale}, not a positive number")
        return data[: rows * cols // 4], scale

    def stored_name(self, name: str) -> str:
        return self._info(name).name

    def ggml_ternary_blocks(self, name: str, rows: int, cols: int) -> tuple[np.ndarray, bool] | None:
        """TQ1_0 and TQ2_0 tensors go to the engine as they are (it checks their scales), unless their
        rows must be reordered first (llama's q/k permutation)."""
        info = self._info(name)
        projection = name.split(".")[-2]
        if (info.type_id not in (TQ1_0, TQ2_0) or info.shape != (rows, cols)
                or (self._permuted_rope and projection in ("q_proj", "k_proj"))):
            return None
        return self.file.bytes_of(info), info.type_id == TQ1_0

    def ternary(self, name: str, rows: int, cols: int) -> tuple[np.ndarray, float]:
        info = self._info(name)
        if info.shape != (rows, cols):
            raise FormatError(self.source, f"tensor {info.name!r} has shape {list(info.shape)}, expected {[rows, cols]}")
        data = self.file.bytes_of(info)
        try:
            if info.type_id == I2_S:
                ternary, scale = unpack_i2_s(data, rows, cols)
            elif info.type_id == TQ2_0:
                ternary, block_scales = unpack_tq2_0(data, rows, cols)
                scale = tensor_scale(ternary, block_scales)
            elif info.type_id == TQ1_0:
                ternary, block_scales = unpack_tq1_0(data, rows, cols)
                scale = tensor_scale(ternary, block_scales)
            elif info.type_id in DENSE_TYPES and self.arch != "llama":
                ternary, scale = _ternary_of_float(self.dense(name))
            else:
                raise ValueError(f"has type {info.type_name}; a BitLinear weight must be I2_S, TQ1_0 or TQ2_0"
                                 + ("" if self.arch == "llama" else " or a float type"))
        except ValueError as e:
            raise FormatError(self.source, f"tensor {info.name!r} {e}") from None
        self.file.release(info)
        if not (np.isfinite(scale) and scale > 0):
            raise FormatError(self.source, f"tensor {info.name!r} has the scale {scale}, not a positive number")
        projection = name.split(".")[-2]
        if self._permuted_rope and projection in ("q_proj", "k_proj"):
            heads = self.config.num_attention_heads if projection == "q_proj" else self.config.num_key_value_heads
            ternary = unpermute_rope_rows(ternary, heads)
        return ternary, scale

    def file_location(self, name: str) -> tuple[int, int] | None:
        info = self._info(name)
        return (self.file.fileno(), info.offset) if info.type_id in DENSE_TYPES or info.type_id in _DEQUANTIZABLE else None

    def release(self, name: str, first_row: int = 0, end_row: int | None = None) -> None:
        self.file.release(self._info(name), first_row, end_row)

    def tokenizer(self) -> Tokenizer:
        tokenizer = gguf_tokenizer(self.file)
        self.file.release_header()  # its strings are the tokenizer's now
        return tokenizer


def _ternary_of_float(tensor: DenseTensor) -> tuple[np.ndarray, float]:
    """A float BitLinear weight. llama.cpp's BitNet converter stores the dequantized ternary
    values (t * scale): recognise them exactly, since absmean would get their scale wrong.
    Anything else is a master weight, quantized as at training time."""
    weight = float32_of(tensor)
    peak = float(np.abs(weight).max())
    magnitudes = np.abs(weight)
    if peak > 0 and np.all((magnitudes == 0) | (magnitudes == peak)):
        return np.sign(weight).astype(np.int8), peak
    return quantize_ternary(weight)


# The quantized types embeddings and heads may have (ids < 34: the same in every ggml), with the
# byte offsets of the f16 fields (scales, minimums) in each of their blocks.
_F16_FIELDS = {GGMLQuantizationType[n]: offsets for n, offsets in (
    ("Q4_0", (0,)), ("Q4_1", (0, 2)), ("Q5_0", (0,)), ("Q5_1", (0, 2)), ("Q8_0", (0,)),
    ("Q2_K", (80, 82)), ("Q3_K", (108,)), ("Q4_K", (0, 2)), ("Q5_K", (0, 2)), ("Q6_K", (208,)))}
_DEQUANTIZABLE = set(_F16_FIELDS)
_CHECK_CHUNK_ROWS = 4096


def _dequantize_to_f16(data: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Dequantize a slab of rows at a time into float16: a 2B4T embedding stays at 0.66 GB."""
    rows, cols = info.shape[0], int(np.prod(info.shape[1:]))
    qtype = GGMLQuantizationType(info.type_id)
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    packed = data.reshape(rows, cols // block * block_bytes)
    out = np.empty((rows, cols), dtype=np.float16)
    step = max(1, (1 << 22) // cols)
    for start in range(0, rows, step):
        values = gguf_quants.dequantize(packed[start: start + step], qtype)
        if not np.all(np.abs(values) <= np.finfo(np.float16).max):
            raise ValueError("dequantized values exceed the float16 range")
        out[start: start + step] = values
    return out.reshape(info.shape)
