// AVX2: pmaddubsw (u8 code x s8 activation, pairs summed to int16), summed in int16 across blocks,
// then pmaddwd by 1 to int32. Codes are at most 2 and |x| <= 127, so a pair is within [-508, 508]:
// pmaddubsw never saturates, one block adds at most 4 * 508 = 2032 to a lane, and 16 blocks stay
// within int16 (32512).
#include "kernels_x86.h"
#include "tempering.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace ternlm {
namespace {
constexpr int64_t kBlocksPerWiden = 16;
constexpr bool kTritCarrySums = false;  // kernels_x86_trits.inc

TERNLM_INLINE __m256i lane_dot(__m256i acc, __m256i codes, __m256i x) {
    acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(codes, x));
    // Keeps each accumulator in its register: left free, GCC regroups these integer sums into
    // trees that need more registers than AVX2 has and spills them inside the loop.
    asm("" : "+x"(acc));
    return acc;
}

TERNLM_INLINE __m256i widen(__m256i wide, __m256i acc) {
    return _mm256_add_epi32(wide, _mm256_madd_epi16(acc, _mm256_set1_epi16(1)));
}
}  // namespace
}  // namespace ternlm

#define TERNLM_KERNEL_NAME ternary_gemm_avx2
#define TERNLM_TOKEN_TILE 4  // each token takes two accumulators (int16 and int32): 8 of the 16 registers
#include "kernels_x86_gemm.inc"
#define TERNLM_TRIT_KERNEL_NAME trit_gemm_avx2
#include "kernels_x86_trits.inc"

namespace ternlm {

// Each run of 640 weights: 20 lanes of 32 codes (lane 10b + 2n + h is block b's half h, digit n),
// four lanes to a 2-bit block.
void trits_to_two_bit_avx2(const uint8_t* trits, int64_t chunks, uint8_t* two_bit) {
    constexpr int kLanes = kTritRowMultiple / kCodesPerLane;
    for (int64_t c = 0; c < chunks; ++c, trits += kTritRowMultiple / 5, two_bit += kTritRowMultiple / 4) {
        __m256i lanes[kLanes];
        for (int b = 0; b < kTritRowMultiple / kTritBlock; ++b)
            for (int h = 0; h < 2; ++h) {
                __m256i digits = load32(trits + b * kTritBlockBytes + 32 * h);
                for (int n = 0; n < kTritDigits; ++n) {
                    const __m256i next = times3(digits);
                    lanes[10 * b + 2 * n + h] = top_trit(digits, next);
                    digits = next;
                }
            }
        for (int k = 0; k < kTritRowMultiple / kTernaryBlock; ++k) {
            // codes are at most 2: shifted left by up to 6 they stay within their byte
            const __m256i high = _mm256_or_si256(_mm256_slli_epi16(lanes[4 * k], 6), _mm256_slli_epi16(lanes[4 * k + 1], 4));
            const __m256i low = _mm256_or_si256(_mm256_slli_epi16(lanes[4 * k + 2], 2), lanes[4 * k + 3]);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(two_bit + k * kTernaryBlockBytes), _mm256_or_si256(high, low));
        }
    }
}

}  // namespace ternlm

// The head's kernels: float rows (f32/f16/bf16), int8 rows and q4 rows.
namespace ternlm {
namespace {

// Eight matrix elements as float32, whatever their storage (F16C for f16, a shift for bf16).
template <DType D>
inline __m256 load8(const void* data, int64_t index) {
    if (D == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(data) + index);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(data) + index));
    if (D == DType::F16) return _mm256_cvtph_ps(raw);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

#include "kernels_x86_softmax.inc"

// NR consecutive rows against NT tokens, an accumulator for each pair: at 4 x 2, eight independent
// FMA chains, each weight vector converted once for both tokens and each activation vector loaded
// once for the four rows. (The activations of more tokens would not stay in L1: 2560 floats are
// 10 KB. Measured on 2B4T's f16 head, one thread: against one row x 4 tokens, 8 tokens 28 % faster,
// 2 tokens 31 %, 1 token 12 %.)
// With `prefetch`, it also requests the next NR rows, each cache line of them once.
template <DType D, int NR, int NT>
inline void dense_tile(const DenseMatrix& m, int64_t r, const float* x, float* out, int64_t out_stride, bool prefetch) {
    const int64_t cols = m.cols, whole = cols / 8 * 8, element = dtype_bytes(D);
    const char* next = static_cast<const char*>(m.data) + (r + NR) * cols * element;
    __m256 acc[NR][NT];
    for (int i = 0; i < NR; ++i)
        for (int t = 0; t < NT; ++t) acc[i][t] = _mm256_setzero_ps();
    for (int64_t k = 0; k < whole; k += 8) {
        if (prefetch && k * element % 64 == 0)
            for (int i = 0; i < NR; ++i) _mm_prefetch(next + (i * cols + k) * element, _MM_HINT_T0);
        __m256 w[NR];
        for (int i = 0; i < NR; ++i) w[i] = load8<D>(m.data, (r + i) * cols + k);
        for (int t = 0; t < NT; ++t) {
            const __m256 xv = _mm256_loadu_ps(x + t * cols + k);
            for (int i = 0; i < NR; ++i) acc[i][t] = _mm256_fmadd_ps(w[i], xv, acc[i][t]);
        }
    }
    float tail[8];
    for (int i = 0; i < NR; ++i) {
        if (whole < cols) load_elements(m.data, D, (r + i) * cols + whole, cols - whole, tail);
        for (int t = 0; t < NT; ++t) {
            float sum = horizontal_sum(acc[i][t]);
            for (int64_t j = whole; j < cols; ++j) sum += tail[j - whole] * x[t * cols + j];
            out[t * out_stride + r + i] = sum;
        }
    }
}

// Rows outer, so that a group of rows is read from memory once and meets every token from L1. The
// first pass over a group requests the next group: the hardware prefetcher alone keeps too few
// of the head's bytes in flight (8 tokens of 2B4T's f16 head, one thread: another 15 % faster).
template <DType D>
void dense_gemm_typed(const DenseMatrix& m, int64_t row_begin, int64_t row_end, const float* x,
                      int64_t tokens, float* out, int64_t out_stride) {
    const auto rows_against_tokens = [&](auto group, int64_t r) {
        constexpr int NR = decltype(group)::value;
        for (int64_t t = 0; t < tokens; t += 2) {
            if (t + 2 <= tokens) dense_tile<D, NR, 2>(m, r, x + t * m.cols, out + t * out_stride, out_stride, t == 0);
            else dense_tile<D, NR, 1>(m, r, x + t * m.cols, out + t * out_stride, out_stride, t == 0);
        }
    };
    int64_t r = row_begin;
    for (; r + 4 <= row_end; r += 4) rows_against_tokens(std::integral_constant<int, 4>{}, r);
    for (; r < row_end; ++r) rows_against_tokens(std::integral_constant<int, 1>{}, r);
}
}  // namespace

// As for the ternary weights (kernels_x86_gemm.inc): decode streams the head from memory once, and
// requesting bytes ahead keeps more of them in flight than the hardware prefetcher alone.
constexpr int64_t kHeadPrefetchAhead = 4096;

namespace {

// Products of 32 s8 weights q with 32 s8 activations x, summed four by four into eight int32.
// pmaddubsw wants one unsigned operand, so |q| (`magnitude`, computed once for all the tokens) times
// x with q's sign moved onto x. |q| <= 127 and |x| <= 127, so a pair sums to at most 32258: no
// saturation, but two pairs could, hence the pmaddwd at once.
TERNLM_INLINE __m256i signed_dot(__m256i magnitude, __m256i q, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, q)), _mm256_set1_epi16(1));
}

// One int8 row against NT tokens.
template <int NT>
inline void int8_row_tile(const int8_t* row, int64_t padded, const int8_t* x, int32_t* sums) {
    __m256i acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_si256();
    for (int64_t k = 0; k < padded; k += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(row + k + kHeadPrefetchAhead), _MM_HINT_T0);
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
        const __m256i magnitude = _mm256_abs_epi8(q);
        for (int t = 0; t < NT; ++t) {
            const __m256i xt = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * padded + k));
            acc[t] = _mm256_add_epi32(acc[t], signed_dot(magnitude, q, xt));
        }
    }
    for (int t = 0; t < NT; ++t) sums[t] = horizontal_sum(acc[t]);
}

}  // namespace

void int8_gemm_avx2(const Int8RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq,
                    int64_t tokens, int32_t* acc, int64_t out_stride) {
    const int64_t padded = padded_cols(m.cols);
    for (int64_t r = row_begin; r < row_end; ++r)
        in_fours(tokens, [&](auto tile, int64_t t0) {
            constexpr int NT = decltype(tile)::value;
            int32_t sums[NT];
            int8_row_tile<NT>(m.q + r * padded, padded, xq + t0 * padded, sums);
            for (int t = 0; t < NT; ++t) acc[(t0 + t) * out_stride + r] = sums[t];
        });
}

void dense_gemm_avx2(const DenseMatrix& m, int64_t row_begin, int64_t row_end, const float* x,
                     int64_t tokens, float* out, int64_t out_stride) {
    switch (m.dtype) {
        case DType::F32: return dense_gemm_typed<DType::F32>(m, row_begin, row_end, x, tokens, out, out_stride);
        case DType::F16: return dense_gemm_typed<DType::F16>(m, row_begin, row_end, x, tokens, out, out_stride);
        case DType::BF16: return dense_gemm_typed<DType::BF16>(m, row_begin, row_end, x, tokens, out, out_stride);
    }
}

void f16_store_avx2(const float* x, int64_t n, uint16_t* out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; ++i) out[i] = f32_to_f16(x[i]);
}

namespace {

// Scores of H heads against K consecutive keys: H * K independent FMA chains, each key converted
// from f16 once for all heads of the group.
template <int H, int K>
TERNLM_INLINE void score_keys(const float* q, int64_t head_dim, const PagedRows<uint16_t>& keys, int64_t j,
                              int64_t count, float scale, float* scores) {
    const int64_t vec = head_dim / 8 * 8;
    const uint16_t* key_rows[K];
    for (int k = 0; k < K; ++k) key_rows[k] = keys.row(j + k);
    __m256 acc[K][H];
    for (int k = 0; k < K; ++k)
        for (int h = 0; h < H; ++h) acc[k][h] = _mm256_setzero_ps();
    for (int64_t d = 0; d < vec; d += 8)
        for (int k = 0; k < K; ++k) {
            const __m256 key = load8<DType::F16>(key_rows[k], d);
            for (int h = 0; h < H; ++h) acc[k][h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * head_dim + d), key, acc[k][h]);
        }
    for (int k = 0; k < K; ++k) {
        float tail[8];
        if (vec < head_dim) load_elements(key_rows[k], DType::F16, vec, head_dim - vec, tail);
        for (int h = 0; h < H; ++h) {
            float s = horizontal_sum(acc[k][h]);
            for (int64_t d = vec; d < head_dim; ++d) s += q[h * head_dim + d] * tail[d - vec];
            scores[h * count + j + k] = s * scale;
        }
    }
}

// out[h, d0 : d0 + 8 * V] = inv_total[h] * sum_j p[h, j] * v[j, d0 : ...]: each value vector is
// converted once for all heads.
template <int H, int V>
TERNLM_INLINE void mix_values(const float* p, int64_t count, const PagedRows<uint16_t>& values, int64_t head_dim,
                              int64_t d0, const float* inv_total, float* out) {
    __m256 acc[H][V];
    for (int h = 0; h < H; ++h)
        for (int v = 0; v < V; ++v) acc[h][v] = _mm256_setzero_ps();
    for (int64_t j = 0; j < count; ++j) {
        const uint16_t* row = values.row(j);
        __m256 value[V];
        for (int v = 0; v < V; ++v) value[v] = load8<DType::F16>(row, d0 + 8 * v);
        for (int h = 0; h < H; ++h) {
            const __m256 weight = _mm256_broadcast_ss(p + h * count + j);
            for (int v = 0; v < V; ++v) acc[h][v] = _mm256_fmadd_ps(weight, value[v], acc[h][v]);
        }
    }
    for (int h = 0; h < H; ++h)
        for (int v = 0; v < V; ++v)
            _mm256_storeu_ps(out + h * head_dim + d0 + 8 * v, _mm256_mul_ps(acc[h][v], _mm256_set1_ps(inv_total[h])));
}

template <int H>
void attention_group(const float* q, int64_t head_dim, const PagedRows<uint16_t>& keys,
                     const PagedRows<uint16_t>& values, int64_t count, float scale, float* scores, float* out) {
    int64_t j = 0;
    for (; j + 2 <= count; j += 2) score_keys<H, 2>(q, head_dim, keys, j, count, scale, scores);
    if (j < count) score_keys<H, 1>(q, head_dim, keys, j, count, scale, scores);
    float inv_total[H];
    for (int h = 0; h < H; ++h) inv_total[h] = 1.0f / exp_minus_max(scores + h * count, count);
    int64_t d = 0;
    for (; d + 16 <= head_dim; d += 16) mix_values<H, 2>(scores, count, values, head_dim, d, inv_total, out);
    for (; d + 8 <= head_dim; d += 8) mix_values<H, 1>(scores, count, values, head_dim, d, inv_total, out);
    for (; d < head_dim; ++d)
        for (int h = 0; h < H; ++h) {
            float sum = 0.0f;
            for (int64_t k = 0; k < count; ++k) {
                float value;
                load_elements(values.row(k), DType::F16, d, 1, &value);
                sum += scores[h * count + k] * value;
            }
            out[h * head_dim + d] = sum * inv_total[h];
        }
}

}  // namespace

void f16_attention_avx2(const QueryRun& run, const PagedRows<uint16_t>& keys, const PagedRows<uint16_t>& values,
                        float scale, float* scratch) {
    each_query(run, [&](const float* q, float* out, int64_t count) {
        in_fours(run.heads, [&](auto group, int64_t h) {
            attention_group<decltype(group)::value>(q + h * run.head_dim, run.head_dim, keys, values, count, scale,
                                                    scratch + h * count, out + h * run.head_dim);
        });
    });
}

// The reference's steps on eight floats at a time, each rounding the same way: the same product
// x * a, round to nearest even, then the clamps with NaN going where std::max/min send it.
float quantize_row_avx2(const float* x, int64_t cols, int8_t* xq, int32_t* sum) {
    const int64_t whole8 = cols / 8 * 8, whole32 = cols / 32 * 32;
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 top = _mm256_setzero_ps();
    for (int64_t k = 0; k < whole8; k += 8) top = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + k), magnitude), top);
    float max_abs = horizontal_max(top);
    for (int64_t k = whole8; k < cols; ++k) max_abs = std::max(max_abs, std::fabs(x[k]));
    const float a = 127.0f / std::max(max_abs, 1e-5f);

    const __m256 scale = _mm256_set1_ps(a), low = _mm256_set1_ps(-128.0f), high = _mm256_set1_ps(127.0f);
    const auto quantize8 = [&](const float* p) {
        const __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(p), scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        return _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(q, low), high));
    };
    __m256i total = _mm256_setzero_si256();
    for (int64_t k = 0; k < whole32; k += 32) {
        const __m256i q0 = quantize8(x + k), q1 = quantize8(x + k + 8), q2 = quantize8(x + k + 16), q3 = quantize8(x + k + 24);
        total = _mm256_add_epi32(total, _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3)));
        // The packs work within 128-bit lanes; the permutation puts the 4-byte groups back in order.
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + k),
                            _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
    int32_t sum_q = horizontal_sum(total);  // kernels_x86_gemm.inc's int32 one
    for (int64_t k = whole32; k < cols; ++k) {
        const int32_t v = static_cast<int32_t>(std::min(127.0f, std::max(-128.0f, std::nearbyint(x[k] * a))));
        xq[k] = static_cast<int8_t>(v);
        sum_q += v;
    }
    const int64_t padded = padded_cols(cols);
    for (int64_t k = cols; k < padded; ++k) xq[k] = 0;
    *sum = sum_q;
    return a;
}

namespace {

// One q4 row against NT tokens. Per group: 16 bytes -> 32 nibbles in weight order, minus 8 (once
// for all NT tokens), then signed_dot as for the int8 head (|q - 8| <= 8); one FMA per token by the
// group's scale.
template <int NT>
inline void q4_row_tile(const uint8_t* row, const uint16_t* scales, int64_t groups, int64_t padded, const int8_t* x,
                        float sums[NT]) {
    const __m128i low_nibbles = _mm_set1_epi8(15);
    const __m256i eight = _mm256_set1_epi8(8);
    __m256 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * kQ4Group / 2));
        const __m256i q = _mm256_sub_epi8(
            _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibbles), _mm_and_si128(bytes, low_nibbles)),
            eight);
        const __m256i magnitude = _mm256_abs_epi8(q);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(scales[g]));
        for (int t = 0; t < NT; ++t) {
            const __m256i xg = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * padded + g * kQ4Group));
            acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(signed_dot(magnitude, q, xg)), acc[t]);
        }
    }
    for (int t = 0; t < NT; ++t) sums[t] = horizontal_sum(acc[t]);
}

}  // namespace

void q4_gemm_avx2(const Q4RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq, int64_t tokens,
                  float* out, int64_t out_stride) {
    const int64_t padded = padded_cols(m.cols), groups = padded / kQ4Group;
    for (int64_t r = row_begin; r < row_end; ++r)
        in_fours(tokens, [&](auto tile, int64_t t0) {
            constexpr int NT = decltype(tile)::value;
            float sums[NT];
            q4_row_tile<NT>(m.q + r * padded / 2, m.scales + r * groups, groups, padded, xq + t0 * padded, sums);
            for (int t = 0; t < NT; ++t) out[(t0 + t) * out_stride + r] = sums[t];
        });
}

void temper_avx2(const float* logits, int64_t n, float max, float inverse_temperature, float* distance, float* weight) {
    temper_row(logits, n, max, inverse_temperature, distance, weight);
}

}  // namespace ternlm
