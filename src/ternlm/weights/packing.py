"""Ternary weight quantization and the HF 2-bit packing (NumPy).

HF packed layout (BitNet b1.58 2B4T): a ternary matrix W [out, in] is stored as uint8
[out/4, in]; packed row r holds rows r, r+out/4, r+out/2, r+3*out/4 in bits 1:0, 3:2, 5:4, 7:6,
each as the code W+1 in {0, 1, 2}.
"""

from __future__ import annotations

import numpy as np

VALUES_PER_BYTE = 4


def quantize_ternary(weight: np.ndarray) -> tuple[np.ndarray, float]:
    """absmean ternary quantization of a master weight: returns (int8 {-1,0,1} [out, in], mean|W|).

    Multiplies by the reciprocal, as BitNet's training code and transformers do, so that ties
    round the same way.
    """
    w = np.asarray(weight, dtype=np.float32)
    scale = max(float(np.abs(w).mean(dtype=np.float32)), 1e-5)
    reciprocal = np.float32(1.0) / np.float32(scale)
    ternary = np.clip(np.round(w * reciprocal), -1, 1).astype(np.int8)
    return ternary, float(np.float32(scale))


def pack_ternary_hf(ternary: np.ndarray) -> np.ndarray:
    """int8 {-1,0,1} [out, in] -> uint8 [out/4, in] in the HF packed layout (out % 4 == 0)."""
    out_features = ternary.shape[0]
    if out_features % VALUES_PER_BYTE:
        raise ValueError(f"packed ternary weights need out_features % 4 == 0, got {out_features}")
    codes = (ternary.astype(np.int16) + 1).astype(np.uint8)
    quarter = out_features // VALUES_PER_BYTE
    packed = np.zeros((quarter, *ternary.shape[1:]), dtype=np.uint8)
    for i in range(VALUES_PER_BYTE):
        packed |= codes[i * quarter:(i + 1) * quarter] << np.uint8(2 * i)
    return packed


def unpack_ternary_hf(packed: np.ndarray) -> np.ndarray:
    """uint8 [out/4, in] in the HF packed layout -> int8 {-1,0,1} [out, in]. Code 3 is rejected."""
    packed = np.asarray(packed, dtype=np.uint8)
    parts = [(packed >> np.uint8(2 * i)) & np.uint8(3) for i in range(VALUES_PER_BYTE)]
    codes = np.concatenate(parts, axis=0)
    if (codes == 3).any():
        raise ValueError("packed ternary weights contain the invalid 2-bit code 3")
    return codes.astype(np.int8) - np.int8(1)
