// Kernel interface. Each kernel has a scalar reference in kernels_ref.cpp; fast variants must give
// bit-identical integer results.
#pragma once
#include <cstdint>

#include "formats.h"

// The innermost helpers of the SIMD kernels must be inlined into their loops (GCC otherwise may
// call them once per block).
#define TERNLM_INLINE inline __attribute__((always_inline))

namespace ternlm {

struct TernaryView {
    const uint8_t* data;  // rows * padded_cols / 4 bytes in the runtime layout (formats.h)
    int64_t rows;
    int64_t cols;         // logical columns; rows are stored padded to padded_cols(cols)
};

// Per-token absmax int8 quantization of x [cols] into xq [padded_cols(cols)] (zero padded).
// Returns the activation scale a = 127 / max|x| (max clamped >= 1e-5); *sum receives sum(xq).
// Values round half to even and never reach -128 (|x * a| <= 127). Variants are bit-identical.
using QuantizeRowFn = float (*)(const float* x, int64_t cols, int8_t* xq, int32_t* sum);

float quantize_row_int8(const float* x, int64_t cols, int8_t* xq, int32_t* sum);

// acc[t * out_stride + r] = sum_k w[r, k] * xq[t, k] for rows [row_begin, row_end) and t < tokens.
// xq rows are padded_cols(w.cols) long and xq_sums[t] = sum_k xq[t, k].
using TernaryGemmFn = void (*)(const TernaryView& w, int64_t row_begin, int64_t row_end,
                               const int8_t* xq, const int32_t* xq_sums, int64_t tokens,
                               int32_t* acc, int64_t out_stride);

void ternary_gemm_ref(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                      const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);

// A ternary matrix in the 1.6-bit layout (formats.h): rows of trit_padded_cols(cols) / 5 bytes.
struct TritView {
    const uint8_t* data;
    int64_t rows;
    int64_t cols;
};

// As TernaryGemmFn over the 1.6-bit layout; xq rows are trit_padded_cols(w.cols) long.
using TritGemmFn = void (*)(const TritView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                            const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);

void trit_gemm_ref(const TritView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                   const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);

// Rewrites `chunks` runs of kTritRowMultiple weights from the 1.6-bit layout (128 bytes each) into
// the 2-bit layout (160 bytes each): the same codes, so that the 2-bit GEMM can take a tile of
// 1.6-bit rows (as rows of trit_padded_cols(cols) columns) once several tokens share it.
using TritsToTwoBitFn = void (*)(const uint8_t* trits, int64_t chunks, uint8_t* two_bit);

void trits_to_two_bit_ref(const uint8_t* trits, int64_t chunks, uint8_t* two_bit);

// A float matrix [rows, cols] whose memory belongs to someone else (usually a memory-mapped file).
struct DenseMatrix {
    const void* data = nullptr;
    DType dtype = DType::F32;
    int64_t rows = 0, cols = 0;
};

// Converts `count` elements from F32/F16/BF16 storage, starting at element `first`, to float32.
void load_elements(const void* data, DType dtype, int64_t first, int64_t count, float* out);

// out[t * out_stride + r] = dot(m[r, :], x[t, :]) for rows [row_begin, row_end), t < tokens.
// Float sums: variants agree with the reference to rounding, not bit for bit.
using DenseGemmFn = void (*)(const DenseMatrix& m, int64_t row_begin, int64_t row_end, const float* x,
                             int64_t tokens, float* out, int64_t out_stride);

void dense_gemm_ref(const DenseMatrix& m, int64_t row_begin, int64_t row_end, const float* x,
                    int64_t tokens, float* out, int64_t out_stride);

// An int8 matrix (the int8 head format): rows padded with zeros to padded_cols(cols), like the
// activations they meet; one float scale per row is kept by the caller (row ~= q * scale).
struct Int8RowsView {
    const int8_t* q;  // rows * padded_cols(cols), values in [-127, 127]
    int64_t rows, cols;
};

// acc[t * out_stride + r] = sum_k q[r, k] * xq[t, k]; xq rows are padded_cols(cols) long, with
// values in [-127, 127], which is all quantize_row_int8 produces (fast variants negate them).
using Int8GemmFn = void (*)(const Int8RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq,
                            int64_t tokens, int32_t* acc, int64_t out_stride);

void int8_gemm_ref(const Int8RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq,
                   int64_t tokens, int32_t* acc, int64_t out_stride);

// Symmetric quantization of a float row into q [padded_cols(cols)]: returns the scale max|row| / 127.
float quantize_row_symmetric(const float* row, int64_t cols, int8_t* q);

// The 4-bit head format is llama.cpp's Q4_0 with the scales kept apart: groups of 32 weights along
// a row (padded to padded_cols), each with an f16 scale d: weight ~= (q - 8) * d, q in [0, 15].
// Byte j of a group's 16 bytes holds weight j in its low nibble and weight 16 + j in its high
// nibble, so one 16-byte load unpacks to 32 weights in order.
constexpr int kQ4Group = 32;

struct Q4RowsView {
    const uint8_t* q;         // rows * padded_cols(cols) / 2
    const uint16_t* scales;   // rows * padded_cols(cols) / 32, f16
    int64_t rows, cols;
};

// out[t * out_stride + r] = sum_g d[r, g] * sum_{k in g} (q[r, k] - 8) * xq[t, k]. Each group's
// integer sum is exact; the float sum over groups is ordered differently by each variant.
using Q4GemmFn = void (*)(const Q4RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq,
                          int64_t tokens, float* out, int64_t out_stride);

void q4_gemm_ref(const Q4RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq, int64_t tokens,
                 float* out, int64_t out_stride);

// Quantizes a float row into q [padded_cols(cols) / 2] and f16 scales [padded_cols(cols) / 32] with
// the steps and roundings of llama.cpp's Q4_0: per group d = m / -8, where m is the value of largest
// magnitude, q = min(15, trunc(x / d + 8.5)), and d stored as f16.
void quantize_row_q4(const float* row, int64_t cols, uint8_t* q, uint16_t* scales);

float f16_to_f32(uint16_t h);

// The f16 KV cache: rounding to f16 (to nearest, ties to even, as F16C and NumPy do).
using F16StoreFn = void (*)(const float* x, int64_t n, uint16_t* out);

uint16_t f32_to_f16(float x);
void f16_store_ref(const float* x, int64_t n, uint16_t* out);

// Cached key (or value) rows of one KV head, in blocks of 2^log2_block positions (the paged KV
// cache): position j's row starts at blocks[j >> log2_block] + (j & mask) * stride. A contiguous
// cache is one block.
template <typename Element>
struct PagedRows {
    const Element* const* blocks;
    int log2_block;
    int64_t stride;  // elements from one position's row to the next within a block
    TERNLM_INLINE const Element* row(int64_t j) const {
        return blocks[j >> log2_block] + (j & ((int64_t{1} << log2_block) - 1)) * stride;
    }
};

// Attention of consecutive positions of one sequence against its cache, for the query heads that
// share one KV head (grouped-query attention): query i, `heads` rows of head_dim floats at
// q + i * stride, attends to the first first_count + i cached positions, and
// out[i][h] = sum_j softmax_j(scale * q[i][h] . k[j]) * v[j] goes to out + i * stride. Positions are
// taken in order whatever the blocks, so the result depends on the keys and values only, not on
// where they are stored; and each query's result is the same whichever other queries share the
// call, so a prompt computed in pieces gives the logits of one pass. Float sums: variants agree
// with the reference to rounding, not bit for bit.
struct QueryRun {
    const float* q;
    float* out;
    int64_t queries, stride, heads, head_dim, first_count;
    int64_t last_count() const { return first_count + queries - 1; }
};

// Keys (and values) that a kernel may convert to f32 at a time, for every query of the run.
constexpr int64_t kAttentionKeyBlock = 32;

// The floats of scratch an attention kernel may use for a run: each row's (query head's) scores, sums
// and query, and a block of keys or values in f32.
inline int64_t attention_scratch_floats(const QueryRun& run) {
    const int64_t padded_dim = (run.head_dim + 15) / 16 * 16;
    return run.queries * run.heads * (run.last_count() + 2 * padded_dim) + kAttentionKeyBlock * padded_dim;
}

using F16AttentionFn = void (*)(const QueryRun& run, const PagedRows<uint16_t>& keys, const PagedRows<uint16_t>& values,
                                float scale, float* scratch);

void f16_attention_ref(const QueryRun& run, const PagedRows<uint16_t>& keys, const PagedRows<uint16_t>& values,
                       float scale, float* scratch);
// The same over an f32 cache (`--kv-cache f32`, the exact-but-slow option): scalar only.
void f32_attention_ref(const QueryRun& run, const PagedRows<float>& keys, const PagedRows<float>& values, float scale,
                       float* scratch);

// Calls attend(q, out, count) for each query of a run, one at a time (the variants that have no
// multi-query kernel).
template <class Attend>
void each_query(const QueryRun& run, const Attend& attend) {
    for (int64_t i = 0; i < run.queries; ++i) attend(run.q + i * run.stride, run.out + i * run.stride, run.first_count + i);
}

// The sampler's tempering (sampler.cpp): distance[i] = (max - logits[i]) * inverse_temperature and
// weight[i] = e^-distance[i] (0 past 87). Elementwise, nothing fused: variants are bit-identical.
using TemperFn = void (*)(const float* logits, int64_t n, float max, float inverse_temperature, float* distance,
                          float* weight);

void temper_ref(const float* logits, int64_t n, float max, float inverse_temperature, float* distance, float* weight);

}  // namespace ternlm
