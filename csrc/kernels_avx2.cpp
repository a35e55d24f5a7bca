// AVX2: pmaddubsw (u8 code x s8 activation, pairs summed to int16), summed in int16 across blocks,
// then pmaddwd by 1 to int32. Codes are at most 2 and |x| <= 127, so a pair is within [-508, 508]:
// pmaddubsw never saturates, one block adds at most 4 * 508 = 2032 to a lane, and 16 blocks stay
// within int16 (32512).
#include "kernels_x86.h"

#include <immintrin.h>

namespace ternlm {
namespace {
constexpr int64_t kBlocksPerWiden = 16;

TERNLM_INLINE __m256i block_dot(__m256i acc, __m256i c0, __m256i c1, __m256i c2, __m256i c3, const int8_t* x) {
    const __m256i p01 = _mm256_add_epi16(_mm256_maddubs_epi16(c0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
                                         _mm256_maddubs_epi16(c1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))));
    const __m256i p23 = _mm256_add_epi16(_mm256_maddubs_epi16(c2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64))),
                                         _mm256_maddubs_epi16(c3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 96))));
    return _mm256_add_epi16(acc, _mm256_add_epi16(p01, p23));
}

TERNLM_INLINE __m256i widen(__m256i wide, __m256i acc) {
    return _mm256_add_epi32(wide, _mm256_madd_epi16(acc, _mm256_set1_epi16(1)));
}
}  // namespace
}  // namespace ternlm

#define TERNLM_KERNEL_NAME ternary_gemm_avx2
#define TERNLM_TOKEN_TILE 4  // block_dot needs four temporaries
#include "kernels_x86_gemm.inc"

// The head's kernels: float rows (f32/f16/bf16) and int8 rows.
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

inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

constexpr int kDenseTokenTile = 4;

// One row against NT tokens. Each token gets two accumulators (even and odd groups of eight), so
// consecutive FMAs do not wait on each other even for a single token.
template <DType D, int NT>
inline void dense_row_tile(const DenseMatrix& m, int64_t r, const float* x, float sums[NT]) {
    const int64_t cols = m.cols, pairs = cols / 16 * 16, whole = cols / 8 * 8, first = r * cols;
    __m256 even[NT], odd[NT];
    for (int t = 0; t < NT; ++t) even[t] = odd[t] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < pairs; k += 16) {
        const __m256 w0 = load8<D>(m.data, first + k), w1 = load8<D>(m.data, first + k + 8);
        for (int t = 0; t < NT; ++t) {
            even[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * cols + k), even[t]);
            odd[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * cols + k + 8), odd[t]);
        }
    }
    for (; k < whole; k += 8) {
        const __m256 w = load8<D>(m.data, first + k);
        for (int t = 0; t < NT; ++t) even[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * cols + k), even[t]);
    }
    float tail[8];
    if (whole < cols) load_elements(m.data, D, first + whole, cols - whole, tail);
    for (int t = 0; t < NT; ++t) {
        sums[t] = horizontal_sum(_mm256_add_ps(even[t], odd[t]));
        for (int64_t j = whole; j < cols; ++j) sums[t] += tail[j - whole] * x[t * cols + j];
    }
}

template <DType D>
void dense_gemv_typed(const DenseMatrix& m, int64_t row_begin, int64_t row_end, const float* x,
                      int64_t tokens, float* out, int64_t out_stride) {
    for (int64_t t0 = 0; t0 < tokens; t0 += kDenseTokenTile) {
        const int nt = static_cast<int>(tokens - t0 < kDenseTokenTile ? tokens - t0 : kDenseTokenTile);
        const float* xt = x + t0 * m.cols;
        for (int64_t r = row_begin; r < row_end; ++r) {
            float sums[kDenseTokenTile];
            switch (nt) {
                case 1: dense_row_tile<D, 1>(m, r, xt, sums); break;
                case 2: dense_row_tile<D, 2>(m, r, xt, sums); break;
                case 3: dense_row_tile<D, 3>(m, r, xt, sums); break;
                default: dense_row_tile<D, 4>(m, r, xt, sums); break;
            }
            for (int t = 0; t < nt; ++t) out[(t0 + t) * out_stride + r] = sums[t];
        }
    }
}
}  // namespace

// As for the ternary weights (kernels_x86_gemm.inc): decode streams the head from memory once, and
// requesting bytes ahead keeps more of them in flight than the hardware prefetcher alone.
constexpr int64_t kHeadPrefetchAhead = 4096;

// s8 x s8 with pmaddubsw, which wants one unsigned operand: |q| times x with q's sign moved onto x.
// |q| <= 127 and |x| <= 128, so a pair sums to at most 32512: no saturation.
void int8_gemv_avx2(const Int8RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq,
                    int64_t tokens, int32_t* acc, int64_t out_stride) {
    const int64_t padded = padded_cols(m.cols);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t r = row_begin; r < row_end; ++r) {
        const int8_t* row = m.q + r * padded;
        for (int64_t t = 0; t < tokens; ++t) {
            const int8_t* x = xq + t * padded;
            __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
            int64_t k = 0;
            for (; k + 64 <= padded; k += 64) {
                _mm_prefetch(reinterpret_cast<const char*>(row + k + kHeadPrefetchAhead), _MM_HINT_T0);
                const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
                const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k + 32));
                const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
                const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k + 32));
                sum0 = _mm256_add_epi32(sum0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(q0), _mm256_sign_epi8(x0, q0)), ones));
                sum1 = _mm256_add_epi32(sum1, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(q1), _mm256_sign_epi8(x1, q1)), ones));
            }
            for (; k < padded; k += 32) {
                const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
                const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
                sum0 = _mm256_add_epi32(sum0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(q0), _mm256_sign_epi8(x0, q0)), ones));
            }
            acc[t * out_stride + r] = horizontal_sum(_mm256_add_epi32(sum0, sum1));
        }
    }
}

void dense_gemv_avx2(const DenseMatrix& m, int64_t row_begin, int64_t row_end, const float* x,
                     int64_t tokens, float* out, int64_t out_stride) {
    switch (m.dtype) {
        case DType::F32: return dense_gemv_typed<DType::F32>(m, row_begin, row_end, x, tokens, out, out_stride);
        case DType::F16: return dense_gemv_typed<DType::F16>(m, row_begin, row_end, x, tokens, out, out_stride);
        case DType::BF16: return dense_gemv_typed<DType::BF16>(m, row_begin, row_end, x, tokens, out, out_stride);
    }
}

void f16_store_avx2(const float* x, int64_t n, uint16_t* out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; ++i) out[i] = f32_to_f16(x[i]);
}

float f16_dot_avx2(const float* q, const uint16_t* k, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8<DType::F16>(k, i), acc);
    float sum = horizontal_sum(acc);
    float tail[8];
    if (i < n) load_elements(k, DType::F16, i, n - i, tail);
    for (int64_t j = i; j < n; ++j) sum += q[j] * tail[j - i];
    return sum;
}

void f16_axpy_avx2(float p, const uint16_t* v, int64_t n, float* out) {
    const __m256 scale = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(scale, load8<DType::F16>(v, i), _mm256_loadu_ps(out + i)));
    float tail[8];
    if (i < n) load_elements(v, DType::F16, i, n - i, tail);
    for (int64_t j = i; j < n; ++j) out[j] += p * tail[j - i];
}

// Per group: 16 bytes -> 32 nibbles in weight order, minus 8, then the same sign trick as the int8
// head (|q - 8| <= 8, so pmaddubsw pairs stay within 2032); one FMA by the group's scale.
void q4_gemv_avx2(const Q4RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq, int64_t tokens,
                  float* out, int64_t out_stride) {
    const int64_t padded = padded_cols(m.cols), groups = padded / kQ4Group;
    const __m128i low_nibbles = _mm_set1_epi8(15);
    const __m256i eight = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
    for (int64_t r = row_begin; r < row_end; ++r) {
        const uint8_t* row = m.q + r * padded / 2;
        const float* scales = m.scales + r * groups;
        for (int64_t t = 0; t < tokens; ++t) {
            const int8_t* x = xq + t * padded;
            __m256 acc = _mm256_setzero_ps();
            for (int64_t g = 0; g < groups; ++g) {
                const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * kQ4Group / 2));
                const __m256i q = _mm256_sub_epi8(
                    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibbles), _mm_and_si128(bytes, low_nibbles)),
                    eight);
                const __m256i xg = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + g * kQ4Group));
                const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(xg, q)), ones);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(scales[g]), _mm256_cvtepi32_ps(dot), acc);
            }
            out[t * out_stride + r] = horizontal_sum(acc);
        }
    }
}

}  // namespace ternlm
