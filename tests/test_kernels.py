"""Every kernel variant against the NumPy reference: identical integers, odd shapes included."""

from __future__ import annotations

import numpy as np
import pytest

from ternlm import _core, reference
from ternlm.weights.packing import pack_ternary_hf, quantize_ternary, unpack_ternary_hf

SHAPES = [(1, 1, 1), (3, 5, 7), (4, 128, 8), (2, 129, 33), (7, 300, 65), (16, 256, 128), (5, 1000, 17),
          (1, 2560, 13), (1, 6912, 9), (3, 2200, 6),
          (8, 384, 8), (9, 256, 31), (15, 130, 32), (17, 2560, 41), (2, 6912, 16), (31, 640, 24), (32, 300, 16), (40, 8192, 9),
          (33, 8320, 17),
          (3, 640, 32), (4, 640, 16), (64, 2560, 48), (129, 300, 33), (200, 640, 64)]
# (tokens, cols, rows); one token takes a separate path (groups of rows), and more than 16 blocks
# per row exercise the AVX2 kernel's int16 -> int32 widening. The last nine: token counts at and
# around the AVX-512 tile's 8 tokens and the 32 from which it unpacks rows once, row counts at and
# around its 8 rows (the rows past the last whole tile take another kernel), and rows at and past
# the 64 blocks that the unpacked rows may have. The last five: the AMX kernel's threshold (4 tokens),
# its tiles of 16 rows and tokens in pairs, and its chunks of 128 tokens.


def random_ternary(rng, rows, cols):
    return rng.integers(-1, 2, size=(rows, cols), dtype=np.int8)


def test_amx_is_listed_or_its_absence_explained():
    """Where the CPU has AMX-INT8 (and AVX-512 VNNI, which its kernels also use), either the `amx`
    variant runs or `ternlm info`'s note says why not (the OS refused the tile state); elsewhere
    neither."""
    features, note = _core.cpu_features(), _core.unavailable_kernels_note()
    if {"amx-int8", "avx512vnni", "avx512bw", "avx512vl"} <= set(features):
        assert ("amx" in _core.available_kernels()) != bool(note), note
    else:
        assert "amx" not in _core.available_kernels() and note == ""


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize("tokens,cols,rows", SHAPES)
@pytest.mark.parametrize("bits", [2, 1.6])
def test_ternary_matmul_is_exact(kernel, tokens, cols, rows, bits):
    rng = np.random.default_rng(tokens * 1000 + cols)
    ternary = random_ternary(rng, rows, cols)
    xq = rng.integers(-128, 128, size=(tokens, cols), dtype=np.int8)
    got = _core.kernels.TernaryMatrix(ternary, 1.0, bits).matmul_int(xq, kernel)
    expected = xq.astype(np.int64) @ ternary.T.astype(np.int64)
    assert got.dtype == np.int32
    assert np.array_equal(got, expected)
    assert np.array_equal(got, reference.integer_matmul(xq, ternary))


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize("tokens", [1, 2, 8, 9, 33])
@pytest.mark.parametrize("value", [-128, -127, 127])
@pytest.mark.parametrize("weight", [-1, 1])
@pytest.mark.parametrize("bits", [2, 1.6])
@pytest.mark.parametrize("cols", [6912, 28672])
def test_extreme_activations_do_not_overflow(kernel, tokens, value, weight, bits, cols):
    """Extreme activations against all +1 or all -1 over 6912 columns (the 2B4T FFN width) and
    28,672 (Llama3-8B-1.58's) are exact, in whole row tiles (8 rows for AVX-512, 16 for AMX) and in
    the rows past them."""
    ternary = np.full((45, cols), weight, dtype=np.int8)
    xq = np.full((tokens, cols), value, dtype=np.int8)
    got = _core.kernels.TernaryMatrix(ternary, 1.0, bits).matmul_int(xq, kernel)
    assert np.all(got == weight * value * cols)


def trit_layout_bytes(ternary: np.ndarray) -> np.ndarray:
    """The 1.6-bit layout as csrc/formats.h defines it, built here from that text alone: rows padded
    with weight 0 to a multiple of 640, blocks of 320 weights, byte j of a block holding the codes of
    weights j, 64 + j, 128 + j, 192 + j, 256 + j as base-3 digits (first most significant), the
    number v stored as ceil(v * 256 / 243) (TQ1_0's scaling)."""
    rows, cols = ternary.shape
    padded = -(-cols // 640) * 640
    codes = np.ones((rows, padded), dtype=np.int64)
    codes[:, :cols] = ternary.astype(np.int64) + 1
    digits = codes.reshape(rows, padded // 320, 5, 64)  # [row, block, digit, byte]
    value = np.einsum("rbnj,n->rbj", digits, np.array([81, 27, 9, 3, 1]))
    return ((value * 256 + 242) // 243).astype(np.uint8).reshape(rows, -1)


@pytest.mark.parametrize("cols", [1, 300, 640, 2560, 6912])
def test_trit_layout_is_the_documented_one(cols):
    ternary = random_ternary(np.random.default_rng(cols), 5, cols)
    matrix = _core.kernels.TernaryMatrix(ternary, 1.0, 1.6)
    assert matrix.ternary_bits == 1.6
    assert np.array_equal(matrix.packed_bytes(), trit_layout_bytes(ternary))
    assert matrix.nbytes == 5 * (-(-cols // 640) * 640) // 5


def test_trit_bytes_decode_as_tq1_0_digits():
    """Every stored byte value decodes, digit by digit, as gguf-py's TQ1_0 dequantizer reads the same
    byte (an independent implementation of the base-3 decoding)."""
    from gguf import GGMLQuantizationType, quants

    values = np.arange(243)
    stored = ((values * 256 + 242) // 243).astype(np.uint8)
    # a TQ1_0 block: 48 + 4 digit bytes, then an f16 scale of 1; the first 32 bytes hold weights
    # m + 32k (digit k of byte m), so put each stored byte in byte 0 of its own block
    blocks = np.zeros((243, 54), dtype=np.uint8)
    blocks[:, 0] = stored
    blocks[:, 52:54] = np.frombuffer(np.float16(1).tobytes(), dtype=np.uint8)
    weights = quants.dequantize(blocks.reshape(-1), GGMLQuantizationType.TQ1_0).reshape(243, 256)
    tq1_0_digits = weights[:, [0, 32, 64, 96, 128]].astype(np.int64) + 1
    expected = np.stack([values // 81, values // 27 % 3, values // 9 % 3, values // 3 % 3, values % 3], axis=1)
    assert np.array_equal(tq1_0_digits, expected)


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 9])
def test_every_trit_byte_decodes_exactly(kernel, tokens):
    """243 rows in which every byte position holds every base-3 value once (so every digit reads every
    byte value it can meet), against an exact NumPy product."""
    values = (np.arange(243)[:, None] + np.arange(64)[None, :]) % 243  # [row, byte]
    digits = np.stack([values // 81, values // 27 % 3, values // 9 % 3, values // 3 % 3, values % 3], axis=1)
    ternary = np.tile(digits.reshape(243, 320) - 1, (1, 2)).astype(np.int8)  # two blocks a row: 640 columns
    xq = np.random.default_rng(tokens).integers(-127, 128, size=(tokens, 640), dtype=np.int8)
    got = _core.kernels.TernaryMatrix(ternary, 1.0, 1.6).matmul_int(xq, kernel)
    assert np.array_equal(got, xq.astype(np.int64) @ ternary.T.astype(np.int64))


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize("cols", [5, 640, 2560, 6912])
def test_trits_unpack_to_the_two_bit_layout(kernel, cols):
    """Prompts unpack 1.6-bit rows into the 2-bit layout: the bytes bitnet.cpp's I2_S packing gives
    the same weights, rows padded with zeros to the 1.6-bit width (I2_S's layout is the 2-bit one)."""
    from ternlm.weights.gguf_ternary import pack_i2_s

    rows = 7
    ternary = random_ternary(np.random.default_rng(cols), rows, cols)
    padded = np.zeros((rows, -(-cols // 640) * 640), dtype=np.int8)
    padded[:, :cols] = ternary
    expected = pack_i2_s(padded, 1.0)[:-32].reshape(rows, -1)
    assert np.array_equal(_core.kernels.TernaryMatrix(ternary, 1.0, 1.6).unpacked_to_two_bit(kernel), expected)


def test_ternary_bits_must_be_2_or_1_6():
    with pytest.raises(ValueError, match="2 or 1.6"):
        _core.kernels.TernaryMatrix(np.zeros((1, 4), dtype=np.int8), 1.0, 1.5)


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize("cols", [1, 7, 32, 128, 333, 2560])
def test_activation_quantization_matches_reference(kernel, cols):
    rng = np.random.default_rng(cols)
    x = (rng.standard_normal((9, cols)) * rng.uniform(0.01, 50, size=(9, 1))).astype(np.float32)
    x[0] = 0.0                          # all zeros: the 1e-5 clamp
    x[1, 0] = 1e30 if cols > 1 else 1.0  # one huge value
    x[2] = (np.arange(cols) % 7 - 3).astype(np.float32) / 2  # many exact .5 ties
    x[3, -1] = -x[3].max() * 4           # the largest magnitude in the scalar tail
    xq, a, sums = _core.kernels.quantize_activations(x, kernel)
    ref_xq, ref_a = reference.quantize_activations(x)
    assert np.array_equal(xq[:, :cols], ref_xq)
    assert not xq[:, cols:].any()        # the padding the kernels read is zero
    assert np.array_equal(a, ref_a[:, 0])
    assert np.array_equal(sums, ref_xq.sum(axis=1, dtype=np.int64))


@pytest.mark.parametrize("kernel", _core.available_kernels())
def test_absmax_quantization_never_produces_minus_128(kernel):
    """The int8 head kernel relies on it (it negates activations)."""
    x = np.array([[-1.0, 0.5, 1.0], [-3.0, 2.9999998, 1e-8]], dtype=np.float32)
    xq, _, _ = _core.kernels.quantize_activations(np.tile(x, 13), kernel)
    assert xq.min() == -127


@pytest.mark.parametrize("kernel", _core.available_kernels())
def test_quantization_rounds_half_to_even(kernel):
    x = np.tile(np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.5, -2.5]], dtype=np.float32), 5)  # a = 1
    xq, _, _ = _core.kernels.quantize_activations(x, kernel)
    assert xq[0, :40].tolist() == [127, 0, 2, 2, 0, -2, 4, -2] * 5


@pytest.mark.slow
def test_hf_packing_against_transformers():
    """Our packer is checked against transformers' own unpacking and packing."""
    import torch
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    rng = np.random.default_rng(0)
    ternary = random_ternary(rng, 64, 24)
    packed = pack_ternary_hf(ternary)
    assert packed.shape == (16, 24) and packed.dtype == np.uint8
    theirs = unpack_weights.__wrapped__ if hasattr(unpack_weights, "__wrapped__") else unpack_weights
    assert np.array_equal(theirs(torch.from_numpy(packed), torch.float32).numpy(), ternary)
    assert np.array_equal(pack_weights(torch.from_numpy(ternary.copy())).numpy(), packed)
    assert np.array_equal(unpack_ternary_hf(packed), ternary)


def test_unpack_rejects_code_three():
    with pytest.raises(ValueError, match="code 3"):
        unpack_ternary_hf(np.full((1, 4), 0xFF, dtype=np.uint8))


@pytest.mark.slow
def test_absmean_quantization_matches_transformers():
    import torch
    from transformers.integrations.bitnet import WeightQuant

    w = np.random.default_rng(1).standard_normal((48, 40)).astype(np.float32) * 0.02
    ternary, scale = quantize_ternary(w)
    forward = WeightQuant.forward.__wrapped__ if hasattr(WeightQuant.forward, "__wrapped__") else WeightQuant.forward
    dequantized = forward(None, torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(ternary * scale, dequantized, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("tokens,cols,rows", [(1, 7, 3), (3, 64, 9), (5, 2560, 33), (9, 131, 17)])
def test_dense_gemm_matches_numpy(kernel, dtype, tokens, cols, rows):
    """The head's float kernel (f32/f16/bf16 storage) against NumPy in float64."""
    rng = np.random.default_rng(rows)
    matrix = rng.standard_normal((rows, cols)).astype(np.float32)
    if dtype == "float16":
        matrix = matrix.astype(np.float16)
        stored, exact = matrix, matrix.astype(np.float64)
    elif dtype == "bfloat16":
        bits = (matrix.view(np.uint32) >> 16).astype(np.uint16)
        stored, exact = bits, (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    else:
        stored, exact = matrix, matrix.astype(np.float64)
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    got = _core.kernels.dense_gemm(stored, dtype, x, kernel)
    expected = x.astype(np.float64) @ exact.T
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.sqrt(cols) * np.abs(expected).max())


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize("tokens,cols,rows", [(1, 1, 1), (2, 33, 5), (3, 2560, 17), (6, 200, 40), (8, 2560, 9),
                                              (9, 300, 7), (17, 129, 3), (8, 256, 16), (40, 2560, 48), (130, 640, 33)])
def test_int8_head_product_is_exact(kernel, tokens, cols, rows):
    rng = np.random.default_rng(cols)
    q = rng.integers(-127, 128, size=(rows, cols), dtype=np.int8)
    xq = rng.integers(-127, 128, size=(tokens, cols), dtype=np.int8)  # absmax quantization never gives -128
    got = _core.kernels.int8_gemm(q, xq, kernel)
    assert np.array_equal(got, xq.astype(np.int64) @ q.T.astype(np.int64))


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("weight,value", [(127, 127), (-127, 127), (127, -127), (-127, -127)])
def test_int8_head_extremes_are_exact(kernel, tokens, weight, value):
    """Every product at its largest, over 6912 columns, in whole row tiles and past them."""
    q = np.full((35, 6912), weight, dtype=np.int8)
    xq = np.full((tokens, 6912), value, dtype=np.int8)
    assert np.all(_core.kernels.int8_gemm(q, xq, kernel) == weight * value * 6912)


@pytest.mark.parametrize("kernel", _core.available_kernels())
def test_f16_rounding_matches_numpy(kernel):
    """The f16 KV cache rounds exactly as NumPy's float16 (to nearest, ties to even)."""
    rng = np.random.default_rng(5)
    x = np.concatenate([
        rng.standard_normal(1000).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 1000),
        np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e6, -1e6, np.inf, -np.inf, 2.0**-24, 2.0**-25,
                  3 * 2.0**-26, 2.0**-14, 2.0**-14 - 2.0**-25, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11], dtype=np.float32),
    ]).astype(np.float32)
    got = _core.kernels.f16_round(x, kernel)
    with np.errstate(over="ignore"):  # overflow to inf is part of what is checked
        expected = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(got, expected)


def _q4_0_blocks(head, padded):
    """gguf-py's Q4_0 quantization of the zero-padded rows: uint8 [rows, groups, 18], each block an
    f16 scale then 16 bytes of nibbles."""
    from gguf import GGMLQuantizationType, quants

    rows, cols = head.shape
    padded_head = np.zeros((rows, padded), dtype=np.float32)
    padded_head[:, :cols] = head
    return quants.quantize(padded_head, GGMLQuantizationType.Q4_0).reshape(rows, padded // 32, 18)


@pytest.mark.parametrize("cols", [32, 100, 2560])
def test_q4_format_is_llama_cpp_q4_0(cols):
    """Our q4 head is llama.cpp's Q4_0 with the scales kept apart: the same bytes as gguf-py's
    quantizer, ties, zero groups and padding included."""
    rng = np.random.default_rng(cols)
    head = rng.standard_normal((9, cols)).astype(np.float32)
    head[0] = 0.0
    head[1, :8] = head[1, 8:16] = 3.0                             # equal magnitudes: the first wins
    head[2] = np.round(head[2] * 4) / 4                            # many values that land on .5
    q, scales = _core.kernels.q4_quantize(head)
    blocks = _q4_0_blocks(head, q.shape[1] * 2)
    assert np.array_equal(scales, blocks[..., :2].copy().view(np.uint16)[..., 0])
    assert np.array_equal(q.reshape(9, -1, 16), blocks[..., 2:])


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize("tokens,cols,rows", [(1, 32, 3), (2, 100, 7), (3, 2560, 11), (6, 300, 9), (1, 2560, 13),
                                              (9, 640, 6)])
def test_q4_head_matches_numpy(kernel, tokens, cols, rows):
    """The 4-bit head against gguf-py's Q4_0 quantization and float64 products."""
    rng = np.random.default_rng(cols)
    head = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    got = _core.kernels.q4_head_logits(head, x, kernel)

    padded = -(-cols // 128) * 128
    blocks = _q4_0_blocks(head, padded)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)  # [rows, groups, 1]
    qs = blocks[..., 2:]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float32)
    dequantized = ((q - 8) * d).reshape(rows, padded)[:, :cols].astype(np.float64)
    xq, a = reference.quantize_activations(x)
    expected = (xq.astype(np.float64) @ dequantized.T) / a.astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # and within the rounding bounds of the exact product: |w error| <= |d| / 2 plus 8 |d| times f16's
    # relative rounding of d (2^-11), |x error| <= 1 / (2a)
    exact = x.astype(np.float64) @ head.T.astype(np.float64)
    weight_error = np.abs(d).repeat(32, -1).reshape(rows, padded)[:, :cols] * (0.5 + 8 * 2.0**-11)
    bound = np.abs(x) @ weight_error.T + (np.abs(head).sum(1)[None, :] + weight_error.sum(1)[None, :]) / (2 * a)
    assert np.all(np.abs(got - exact) <= bound * (1 + 1e-5))


@pytest.mark.parametrize("kernel", _core.available_kernels())
def test_q4_head_extremes_and_batch_invariance(kernel):
    """Nibbles 0 and 15 against activations of +-127 (the largest lane sums), and each token's logits
    bit for bit the same alone as in a batch of 9, whatever tile of rows and tokens it falls in."""
    rng = np.random.default_rng(4)
    rows, cols = 11, 1280
    head = rng.standard_normal((rows, cols)).astype(np.float32)
    head[0] = np.where(np.arange(cols) % 2, -1.0, 1.0)  # nibbles 0 and 15 (q - 8 = -8 and 7) in turn
    head[1] = -head[0]
    x = rng.standard_normal((9, cols)).astype(np.float32)
    x[0] = 1.0                                          # every activation 127
    x[1] = head[0]                                      # +-127
    batch = _core.kernels.q4_head_logits(head, x, kernel)
    alone = np.concatenate([_core.kernels.q4_head_logits(head, x[t:t + 1], kernel) for t in range(len(x))])
    assert np.array_equal(batch, alone)
    blocks = _q4_0_blocks(head, cols)                   # gguf-py's Q4_0 of the same rows
    d = blocks[..., :2].copy().view(np.float16).astype(np.float64)
    codes = np.concatenate([blocks[..., 2:] & 15, blocks[..., 2:] >> 4], axis=-1).astype(np.float64)
    dequantized = ((codes - 8) * d).reshape(rows, cols)
    xq, a = reference.quantize_activations(x)
    expected = (xq.astype(np.float64) @ dequantized.T) / a.astype(np.float64)
    np.testing.assert_allclose(batch, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize("heads,head_dim,count,width,column",
                         [(1, 8, 1, 8, 0), (4, 128, 37, 640, 256), (3, 24, 2, 48, 24), (5, 20, 9, 40, 20),
                          (2, 7, 5, 21, 14), (8, 64, 130, 64, 0)])
def test_f16_attention_matches_numpy(kernel, heads, head_dim, count, width, column):
    """Grouped-query attention over an f16 cache against float64 NumPy: heads not a multiple of the
    variant's group, head dims with scalar tails, a single position, keys strided inside wider rows,
    and scores far apart (so most weights underflow and the softmax must not)."""
    rng = np.random.default_rng(heads * 1000 + count)
    q = (rng.standard_normal((heads, head_dim)) * 3).astype(np.float32)
    keys = (rng.standard_normal((count, width)) * 3).astype(np.float16)
    values = rng.standard_normal((count, width)).astype(np.float16)
    scale = 1 / np.sqrt(head_dim)
    got = _core.kernels.f16_attention(q, keys.view(np.uint16), values.view(np.uint16), column, scale, kernel)

    k = keys[:, column:column + head_dim].astype(np.float64)
    v = values[:, column:column + head_dim].astype(np.float64)
    scores = q.astype(np.float64) @ k.T * scale
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    expected = weights / weights.sum(axis=1, keepdims=True) @ v
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize("queries,heads,head_dim,count", [(5, 4, 128, 37), (33, 4, 128, 70), (7, 3, 24, 7), (20, 1, 8, 40),
                                                          (9, 5, 20, 17)])
def test_f16_attention_of_consecutive_positions(kernel, queries, heads, head_dim, count):
    """The last `queries` positions at once, each attending to the positions up to its own, against
    float64 NumPy; and each query's result is bit for bit the one it gets alone, whatever queries
    share its call (tiles of rows that mix positions and heads: 4 x 4, 3 heads into 16 rows, ...),
    so a prompt computed in pieces gives the logits of one pass."""
    rng = np.random.default_rng(queries * 100 + heads)
    width = 2 * head_dim + 3
    q = (rng.standard_normal((queries, heads, head_dim)) * 3).astype(np.float32)
    keys = (rng.standard_normal((count, width)) * 3).astype(np.float16)
    values = rng.standard_normal((count, width)).astype(np.float16)
    column, scale = head_dim, 1 / np.sqrt(head_dim)
    got = _core.kernels.f16_attention(q, keys.view(np.uint16), values.view(np.uint16), column, scale, kernel)

    k = keys[:, column:column + head_dim].astype(np.float64)
    v = values[:, column:column + head_dim].astype(np.float64)
    for i in range(queries):
        n = count - queries + 1 + i
        scores = q[i].astype(np.float64) @ k[:n].T * scale
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        np.testing.assert_allclose(got[i], weights / weights.sum(axis=1, keepdims=True) @ v[:n], rtol=1e-4, atol=1e-5)
        alone = _core.kernels.f16_attention(q[i], keys[:n].view(np.uint16), values[:n].view(np.uint16), column, scale,
                                            kernel)
        assert np.array_equal(got[i], alone)
    assert np.array_equal(got[2:], _core.kernels.f16_attention(q[2:], keys.view(np.uint16), values.view(np.uint16),
                                                               column, scale, kernel))


def test_f16_attention_rejects_bad_shapes():
    q = np.zeros((2, 8), dtype=np.float32)
    keys = np.zeros((3, 8), dtype=np.uint16)
    with pytest.raises(ValueError, match="head inside width"):
        _core.kernels.f16_attention(q, keys, keys, 4, 1.0)
    with pytest.raises(ValueError, match="count >= queries"):
        _core.kernels.f16_attention(np.zeros((4, 2, 8), dtype=np.float32), keys, keys, 0, 1.0)
