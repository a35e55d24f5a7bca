"""GGUF's ternary tensor types, unpacked to int8 {-1, 0, 1} [rows, cols] plus one scale, and packed back
(docs/design.md §2; gguf-py's gguf.quants is the tests' reference for TQ1_0 and TQ2_0):
- I2_S (bitnet.cpp's id 36): the whole tensor in blocks of 128 weights -> 32 bytes; byte j of a block
  holds weights j, 32+j, 64+j, 96+j in bits 7:6, 5:4, 3:2, 1:0 as codes 0,1,2 = -1,0,+1; after the
  n/4 code bytes a 32-byte tail whose first 4 bytes are the f32 scale.
- TQ2_0 (35): blocks of 256 -> 64 code bytes + f16 scale; byte 32h+m holds weights 128h+32k+m in
  bits 2k+1:2k.
- TQ1_0 (34): blocks of 256 -> 48 + 4 bytes of base-3 digits + f16 scale (see pack_tq1_0).
TQ blocks carry their own f16 scale; a BitLinear has one per tensor, so every block holding a
nonzero weight must carry the same scale (all-zero blocks may carry any, llama.cpp writes 0).
"""

from __future__ import annotations

import numpy as np

TQ1_0, TQ2_0 = 34, 35  # ggml's ids (GGMLQuantizationType.TQ1_0, .TQ2_0)
I2_S = 36  # bitnet.cpp's id; not in gguf-py's enum
TERNARY_TYPE_NAMES = {I2_S: "I2_S", TQ2_0: "TQ2_0", TQ1_0: "TQ1_0"}
QK_I2_S, QK_K = 128, 256
_TERNARY_BLOCK_BYTES = {TQ2_0: 66, TQ1_0: 54}


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
    bits = block_scales.view(np.uint16)
    if bits.size and np.all(bits == bits[0]) and block_scales[0] > 0:
        return float(block_scales[0])  # as converters write it: no need to look at the weights
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
