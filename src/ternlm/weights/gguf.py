"""GGUF files (bitnet.cpp's and llama.cpp's) as a Checkpoint, plus the ternary block layouts.

The container (header, metadata, tensor table) is parsed by the `gguf` package's GGUFReader,
with two changes: every read is bounds-checked, so hostile counts end in an error after at most a
file's worth of steps, and the tensor data is left to us, because GGUFReader would give ids 36-39
upstream ggml's meanings while bitnet.cpp uses them for its own types (36 = I2_S, 39 = TL2 vs
upstream's MXFP4). We accept id 36 only as I2_S, and only where its size proves it; 37-39 are errors.

Ternary layouts (docs/design.md §2), each unpacked to int8 {-1, 0, 1} [rows, cols] plus one scale:
- I2_S (36): the whole tensor in blocks of 128 weights -> 32 bytes; byte j of a block holds weights
  j, 32+j, 64+j, 96+j in bits 7:6, 5:4, 3:2, 1:0 as codes 0,1,2 = -1,0,+1; after the n/4 code bytes
  a 32-byte tail whose first 4 bytes are the f32 scale.
- TQ2_0 (35): blocks of 256 -> 64 code bytes + f16 scale; byte 32h+m holds weights 128h+32k+m in
  bits 2k+1:2k.
- TQ1_0 (34): blocks of 256 -> 48 + 4 bytes of base-3 digits + f16 scale (see pack_tq1_0).
TQ blocks carry their own f16 scale; a BitLinear has one per tensor, so every block holding a
nonzero weight must carry the same scale (all-zero blocks may carry any, llama.cpp writes 0).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, TokenType
from gguf import quants as gguf_quants

from ..chat import BITNET_2B4T_TEMPLATE, ChatTemplate
from ..config import BitNetConfig
from ..errors import FormatError
from ..tokenizer import Tokenizer
from .checkpoint import Checkpoint, DenseTensor, drop_pages, float32_of
from .names import gguf_name, unpermute_rope_rows
from .packing import quantize_ternary

F32, F16, BF16 = GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16
TQ1_0, TQ2_0 = GGMLQuantizationType.TQ1_0, GGMLQuantizationType.TQ2_0
I2_S = 36  # bitnet.cpp's id; not in gguf-py's enum
# ids whose meaning depends on who wrote the file: bitnet.cpp vs upstream ggml
CLASHING_IDS = {
    37: "I8_S in bitnet.cpp, IQ4_NL_4_8 in old upstream ggml",
    38: "TL1 in bitnet.cpp, IQ4_NL_8_8 in old upstream ggml",
    39: "TL2 in bitnet.cpp, MXFP4 in upstream ggml",
}
TERNARY_TYPES = {I2_S: "I2_S", TQ2_0: "TQ2_0", TQ1_0: "TQ1_0"}
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

# The LLaMA-3 pre-tokenizer split (tokenizer.ggml.pre "llama-bpe", or missing as in 2B4T's file).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")
GPT2_PRE = ("gpt-2", "gpt2")

QK_I2_S, QK_K = 128, 256
_TERNARY_BLOCK_BYTES = {TQ2_0: 66, TQ1_0: 54}


# -- ternary layouts --------------------------------------------------------------------------
def _codes(ternary: np.ndarray) -> np.ndarray:
    return (np.asarray(ternary, dtype=np.int8) + np.int8(1)).astype(np.uint8)


def pack_i2_s(ternary: np.ndarray, scale: float) -> np.ndarray:
    """int8 {-1,0,1} [rows, cols] -> the bytes of an I2_S tensor (n/4 codes + 32-byte tail)."""
    n = ternary.size
    if n % QK_I2_S:
        raise ValueError(f"I2_S needs a multiple of {QK_I2_S} weights, got {n}")
    codes = _codes(ternary).reshape(-1, 4, 32)  # [block, group, position]
    out = np.zeros(n // 4 + 32, dtype=np.uint8)
    packed = out[: n // 4].reshape(-1, 32)
    for group in range(4):
        packed |= codes[:, group, :] << np.uint8(6 - 2 * group)
    out[n // 4: n // 4 + 4] = np.frombuffer(np.float32(scale).astype("<f4").tobytes(), dtype=np.uint8)
    return out


def unpack_i2_s(data: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, float]:
    n = rows * cols
    ternary = np.empty((n // QK_I2_S, 4, 32), dtype=np.int8)
    _unpack_2bit(data[: n // 4].reshape(-1, 32), [6, 4, 2, 0], ternary)
    scale = float(data[n // 4: n // 4 + 4].view("<f4")[0])
    return ternary.reshape(rows, cols), scale


def _unpack_2bit(packed: np.ndarray, shifts: list[int], out: np.ndarray) -> None:
    """out[b, ..., k, :] = code at bit `shifts[k]` of packed[b, ...] - 1, rejecting code 3.
    A slab of blocks at a time, so the temporaries stay in cache (3-4x faster on 2B4T)."""
    step = 8192
    for start in range(0, len(packed), step):
        slab = packed[start: start + step]
        # a 2-bit field is 3 exactly when both of its bits are set
        if np.any(slab & (slab >> np.uint8(1)) & np.uint8(0x55)):
            raise ValueError("contains the invalid 2-bit code 3")
        for k, shift in enumerate(shifts):
            np.subtract((slab >> np.uint8(shift)) & np.uint8(3), 1, out=out[start: start + step, ..., k, :],
                        casting="unsafe")


def _block_scales(ternary_blocks: np.ndarray, scale: float) -> np.ndarray:
    """f16 bytes per block: the tensor scale, or 0 where every weight is 0 (as llama.cpp writes it)."""
    nonzero = np.any(ternary_blocks != 0, axis=1)
    return np.where(nonzero, np.float16(scale), np.float16(0)).astype("<f2").view(np.uint8).reshape(-1, 2)


def pack_tq2_0(ternary: np.ndarray, scale: float) -> np.ndarray:
    blocks = _ternary_blocks(ternary)
    codes = _codes(blocks).reshape(-1, 2, 4, 32)  # [block, half, k, m]: weight 128*half + 32*k + m
    qs = np.zeros((len(blocks), 2, 32), dtype=np.uint8)
    for k in range(4):
        qs |= codes[:, :, k, :] << np.uint8(2 * k)
    return np.concatenate([qs.reshape(-1, 64), _block_scales(blocks, scale)], axis=1).reshape(-1)


def unpack_tq2_0(data: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (int8 [rows, cols], f16 scale per block)"""
    blocks = data.reshape(-1, 66)
    ternary = np.empty((len(blocks), 2, 4, 32), dtype=np.int8)
    _unpack_2bit(blocks[:, :64].reshape(-1, 2, 32), [0, 2, 4, 6], ternary)
    return ternary.reshape(rows, cols), blocks[:, 64:66].copy().view("<f2").reshape(-1)


# TQ1_0: 5 base-3 digits per byte. Weights 0..159 in bytes 0..31 (digit k of byte m is weight
# 32k+m), 160..239 in bytes 32..47 (weight 160+16k+m), 240..255 in bytes 48..51 (4 digits,
# weight 240+4k+m). A byte stores the digits d0..d4 (d0 most significant) as the number
# v = sum d_k 3^(4-k) scaled to ceil(v * 256 / 243); digit k comes back as the top "trit" of
# (byte * 3^k mod 256) * 3 — ggml's trick that decodes with a multiply and a shift.
_TQ1_0_GROUPS = ((0, 32, 5), (160, 16, 5), (240, 4, 4))  # (first weight, bytes, digits per byte)
_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)


def pack_tq1_0(ternary: np.ndarray, scale: float) -> np.ndarray:
    blocks = _ternary_blocks(ternary)
    codes = _codes(blocks).astype(np.uint16)
    parts = []
    for first, width, digits in _TQ1_0_GROUPS:
        group = codes[:, first: first + width * digits].reshape(-1, digits, width)  # [block, k, m]
        value = np.einsum("bkm,k->bm", group, _POW3[:digits])
        parts.append(((value * 256 + 242) // 243).astype(np.uint8))
    parts.append(_block_scales(blocks, scale))
    return np.concatenate(parts, axis=1).reshape(-1)


def unpack_tq1_0(data: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = data.reshape(-1, 54)
    ternary = np.empty((len(blocks), QK_K), dtype=np.int8)
    step = 4096  # blocks per slab: the temporaries stay in cache
    for slab in range(0, len(blocks), step):
        out = ternary[slab: slab + step]
        start = 0
        for first, width, digits in _TQ1_0_GROUPS:
            packed = blocks[slab: slab + step, start: start + width].astype(np.uint16)
            for k in range(digits):
                shifted = (packed * (3 ** k)) & 0xFF
                out[:, first + k * width: first + (k + 1) * width] = ((shifted * 3) >> 8).astype(np.int8) - 1
            start += width
    return ternary.reshape(rows, cols), blocks[:, 52:54].copy().view("<f2").reshape(-1)


def _ternary_blocks(ternary: np.ndarray) -> np.ndarray:
    if ternary.shape[-1] % QK_K:
        raise ValueError(f"TQ1_0/TQ2_0 need rows of a multiple of {QK_K} weights, got {ternary.shape[-1]}")
    return np.asarray(ternary, dtype=np.int8).reshape(-1, QK_K)


def tensor_scale(ternary: np.ndarray, block_scales: np.ndarray) -> float:
    """The one scale of a TQ tensor: the f16 scale shared by every block with a nonzero weight."""
    nonzero = np.any(ternary.reshape(len(block_scales), -1) != 0, axis=1)
    used = np.unique(block_scales[nonzero].view(np.uint16))
    if used.size == 0:
        return 1.0  # an all-zero matrix: any scale gives the same zeros
    if used.size > 1:
        values = used.view(np.float16).astype(np.float32)
        raise ValueError(f"has {used.size} different block scales (e.g. {values[0]:g}, {values[1]:g}); "
                         "a BitNet weight has one scale per tensor")
    return float(used.view(np.float16)[0])


def ternary_nbytes(type_id: int, n: int) -> int:
    if type_id == I2_S:
        return n // 4 + 32
    return n // QK_K * _TERNARY_BLOCK_BYTES[type_id]


# -- the container -------------------------------------------------------------------------------
class _PastEnd(Exception):
    pass


class _BoundedReader(GGUFReader):
    """GGUFReader with bounds-checked reads that leaves tensor data to the caller (see module doc)."""

    def _get(self, offset, dtype, count=1, override_order=None):
        count = int(count)
        end = int(offset) + np.dtype(dtype).itemsize * count
        if count < 0 or end > self.data.size:
            raise _PastEnd(f"the header runs past the end of the file (needs byte {end}, file has {self.data.size})")
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs, fields) -> None:
        self.tensor_fields = fields

    def _get_field_parts(self, orig_offs, raw_type):
        """Arrays with the parts GGUFReader would build, built in bulk. GGUFReader reads an array
        element by element with two NumPy views each: minutes for 2B4T's 128k tokens and 280k
        merges. Here a numeric array is one view and a string array one view per string."""
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        itype = GGUFValueType(raw_itype[0])
        start = orig_offs + 12
        scalar = self.gguf_scalar_to_np.get(itype)
        if scalar is not None:
            values = self._get(start, scalar, count[0])
            return 12 + values.nbytes, [raw_itype, count, values], [2], [GGUFValueType.ARRAY, itype]
        if itype != GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)  # arrays of arrays: the generic path
        data = self.data.view(np.ndarray)  # slicing a plain view is much cheaper than slicing the memmap
        parts, position, size = [raw_itype, count], start, data.size
        for _ in range(int(count[0])):  # each string takes >= 8 bytes: a hostile count soon runs out of file
            if position + 8 > size:
                raise _PastEnd("a string array runs past the end of the file")
            (length,) = struct.unpack_from("<Q", data, position)
            if position + 8 + length > size:
                raise _PastEnd(f"a string of {length} bytes runs past the end of the file")
            parts.append(data[position + 8: position + 8 + length])
            position += 8 + length
        return position - orig_offs, parts, list(range(2, len(parts))), [GGUFValueType.ARRAY, GGUFValueType.STRING]


@dataclass
class TensorInfo:
    name: str
    type_id: int
    shape: tuple[int, ...]  # NumPy order: [rows, cols]
    offset: int  # absolute, in bytes
    nbytes: int

    @property
    def type_name(self) -> str:
        if self.type_id in TERNARY_TYPES:
            return TERNARY_TYPES[self.type_id]
        return GGMLQuantizationType(self.type_id).name


class GGUFFile:
    """A validated GGUF file: metadata values and bounds-checked, zero-copy tensor bytes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._handle = open(self.path, "rb")  # open as long as the mapping: file_location hands out its descriptor
            self._reader = _BoundedReader(self._handle)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise FormatError(self.path, f"cannot open: {e.strerror}") from None
        except (ValueError, KeyError, IndexError, OverflowError, TypeError, _PastEnd) as e:
            raise FormatError(self.path, f"not a valid GGUF file: {e}") from None
        if self._reader.byte_order != "I":
            raise FormatError(self.path, "big-endian GGUF files are not supported")
        self.data: np.ndarray = self._reader.data
        self.tensors: dict[str, TensorInfo] = {}
        for field in self._reader.tensor_fields:
            info = self._tensor_info(field)
            if info.name in self.tensors:
                raise FormatError(self.path, f"tensor {info.name!r} appears twice")
            self.tensors[info.name] = info
        self._check_extents()

    def _tensor_info(self, field) -> TensorInfo:
        _, name_bytes, _, dims, raw_type, offset = field.parts
        try:
            name = bytes(name_bytes).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(self.path, "a tensor name is not UTF-8") from None

        def fail(problem: str):
            raise FormatError(self.path, f"tensor {name!r}: {problem}")

        shape = tuple(int(d) for d in reversed(dims.tolist()))  # GGUF lists the fastest dimension first
        if not 1 <= len(shape) <= 4 or any(d <= 0 for d in shape):
            fail(f"invalid shape {list(shape)}")
        n = int(np.prod(shape, dtype=object))
        if n > 8 * self.data.size:
            fail(f"{n} elements cannot fit in a file of {self.data.size} bytes")
        type_id = int(raw_type[0])
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
        return TensorInfo(name, type_id, shape, self._reader.data_offset + int(offset[0]), nbytes)

    def _check_extents(self) -> None:
        """Every tensor inside the file and clear of the next one. An id-36 tensor must fill exactly
        the I2_S size up to the next tensor: that, not the id, is what tells I2_S from other types."""
        alignment = int(self._reader.alignment)
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
        field = self._reader.fields.get(key)
        if field is None:
            if default is FormatError:
                raise FormatError(self.path, f"missing metadata key {key!r}")
            return default
        try:
            value = field.contents()
        except (UnicodeDecodeError, IndexError, ValueError) as e:
            raise FormatError(self.path, f"metadata {key!r} cannot be read: {e}") from None
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, (int, float)))
        if not ok:
            raise FormatError(self.path, f"metadata {key!r} has the wrong type ({type(value).__name__})")
        return value

    def fields(self) -> dict:
        """The metadata as gguf-py ReaderFields, by key."""
        return dict(self._reader.fields)

    def release(self, info: TensorInfo, first_row: int = 0, end_row: int | None = None) -> None:
        """Drop a tensor's pages (or those of rows [first_row, end_row)) from this process's
        resident set once the caller has its own copy, so the file and the runtime layout do not
        both count (as SafetensorsFile.release). Rows are whole blocks in every ggml type."""
        rows = info.shape[0] if len(info.shape) > 1 else 1
        row_bytes = info.nbytes // rows
        start = info.offset + first_row * row_bytes
        end = info.offset + (rows if end_row is None else end_row) * row_bytes
        drop_pages(getattr(self.data, "_mmap", None), start, end)  # the mmap object under np.memmap

    def fileno(self) -> int:
        return self._handle.fileno()

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
        if info.type_id in TERNARY_TYPES or info.type_id not in _DEQUANTIZABLE:
            raise FormatError(self.source, f"tensor {info.name!r} has type {info.type_name}, which ternlm "
                                           "cannot read for an embedding, head or norm")
        try:
            return DenseTensor(_dequantize_to_f16(data, info), "float16")
        except ValueError as e:
            raise FormatError(self.source, f"tensor {info.name!r}: {e}") from None

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
        return (self.file.fileno(), info.offset) if info.type_id in DENSE_TYPES else None

    def release(self, name: str, first_row: int = 0, end_row: int | None = None) -> None:
        self.file.release(self._info(name), first_row, end_row)

    def tokenizer(self) -> Tokenizer:
        return gguf_tokenizer(self.file)


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


# quantized types we dequantize for embeddings and heads (ids < 34: the same in every ggml)
_DEQUANTIZABLE = {GGMLQuantizationType[n] for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                                                    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}


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


# -- tokenizer ---------------------------------------------------------------------------------
def gguf_tokenizer(f: GGUFFile) -> Tokenizer:
    return Tokenizer(*gguf_hf_tokenizer(f))


def gguf_hf_tokenizer(f: GGUFFile):
    """-> (tokenizers.Tokenizer, BOS text or None, EOS text or None, chat template or None)"""
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
    template = _chat_template(f.value("tokenizer.chat_template", str, None), tokens, bos, eos)
    return tok, bos, eos, template


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


def _chat_template(template: str | None, tokens: list[str], bos: str | None, eos: str | None) -> str | None:
    """The file's template, unless it is a broken 2B4T one, as the official converter writes: a
    "Role: content" template that does not render 2B4T's format exactly (turns must end in
    <|eot_id|>, or the model talks on for both sides). None -> the built-in 2B4T template."""
    if template is None or "<|eot_id|>" not in tokens:
        return template
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    try:
        text = ChatTemplate(template, bos or "", eos or "").render(messages)
    except (FormatError, ValueError):
        return template  # a template that does not render is reported when the model is loaded
    if "User: hi" in text and text != ChatTemplate(BITNET_2B4T_TEMPLATE, bos or "", eos or "").render(messages):
        return None
    return template
