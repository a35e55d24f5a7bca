// AVX-512 VNNI (Ice Lake, Zen 4). One token (decode, memory-bound) takes the 256-bit kernel of
// kernels_x86_gemm.inc, four rows at a time; several tokens take 8 rows x 8 tokens with four rows
// per 512-bit register (kernels_vnni_rows.inc). Zen 4 splits 512-bit operations into two 256-bit
// halves, and there the same tile over 256-bit registers (two rows each, so 4 rows x 8 tokens in
// as many registers) is as fast, within 3 % (bench/vnni_tiles.cpp); cores that run 512-bit
// operations at full width do twice the products per instruction. So the 512-bit form is used
// wherever AVX-512 VNNI is.
#include "kernels_x86.h"

#include <algorithm>
#include <vector>

// GCC 12's AVX-512 intrinsics initialise their "undefined" operands from themselves, which
// -Wmaybe-uninitialized reports at every use (GCC bug 105593); the warning says nothing about this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace ternlm {
static void row_by_row(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                       const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);
static void trit_tokens_256(const TritView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                            const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);
}

#define TERNLM_DPBUSD _mm256_dpbusd_epi32
#define TERNLM_KERNEL_NAME row_by_row
#include "kernels_vnni.inc"
#define TERNLM_TRIT_KERNEL_NAME trit_tokens_256
#include "kernels_x86_trits.inc"
#include "kernels_vnni_rows.inc"

namespace ternlm {

// From this many tokens on, each row tile is unpacked once for all of them (measured with
// bench/vnni_tiles.cpp: 5-10 % faster at 128 tokens, slower at 8).
constexpr int64_t kUnpackTokens = 32;

namespace {

// The 1.6-bit kernel (kernels_x86_trits.inc) over 512-bit registers: a block of a row is one
// register, its digit n the codes of weights 64n + j, summed from the bytes as they are (digit_sum).
TERNLM_INLINE __m512i times3(__m512i x) { return _mm512_add_epi8(x, _mm512_add_epi8(x, x)); }

template <int NR>
inline void trit_rows_512(const uint8_t* rows, int64_t row_bytes, int64_t blocks, const int8_t* x, int32_t sums[NR]) {
    __m512i acc[NR], carried[NR];
    for (int r = 0; r < NR; ++r) acc[r] = carried[r] = _mm512_setzero_si512();
    for (int64_t b = 0; b < blocks; ++b) {
        __m512i digits[NR];
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) {
            _mm_prefetch(reinterpret_cast<const char*>(rows + NR * row_bytes + 2 * kPrefetchAhead + (b * NR + r) * kTritBlockBytes),
                         _MM_HINT_T0);
            digits[r] = _mm512_loadu_si512(rows + r * row_bytes + b * kTritBlockBytes);
        }
#pragma GCC unroll 5
        for (int n = 0; n < kTritDigits; ++n) {
            const __m512i xv = _mm512_loadu_si512(x + b * kTritBlock + 64 * n);
#pragma GCC unroll 8
            for (int r = 0; r < NR; ++r) {
                const __m512i next = times3(digits[r]);
                acc[r] = Zmm::dot(acc[r], digits[r], xv);
                carried[r] = Zmm::dot(carried[r], next, xv);
                digits[r] = next;
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        sums[r] = static_cast<int32_t>((3 * int64_t{_mm512_reduce_add_epi32(acc[r])} - _mm512_reduce_add_epi32(carried[r])) >> 8);
}

}  // namespace

void trit_gemm_avx512vnni(const TritView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                          const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride) {
    if (tokens > 1) return trit_tokens_256(w, row_begin, row_end, xq, xq_sums, tokens, acc, out_stride);
    const int64_t padded = trit_padded_cols(w.cols), row_bytes = padded / 5, blocks = padded / kTritBlock;
    int32_t sums[kRowGroup];
    int64_t r = row_begin;
    for (; r + kRowGroup <= row_end; r += kRowGroup) {
        trit_rows_512<kRowGroup>(w.data + r * row_bytes, row_bytes, blocks, xq, sums);
        for (int i = 0; i < kRowGroup; ++i) acc[r + i] = sums[i] - xq_sums[0];
    }
    // The last rows take the 256-bit kernel, which is also AVX-VNNI's (so the tests run its code here).
    if (r < row_end) trit_tokens_256(w, r, row_end, xq, xq_sums, 1, acc, out_stride);
}

void ternary_gemm_avx512vnni(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                             const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride) {
    if (tokens == 1) return row_by_row(w, row_begin, row_end, xq, xq_sums, tokens, acc, out_stride);
    interleaved_gemm<Zmm, 2, 8, kUnpackTokens>(w, row_begin, row_end, xq, xq_sums, tokens, acc, out_stride, row_by_row);
}

}  // namespace ternlm

// The int8 head. vpdpbusd multiplies unsigned bytes by signed ones, so each weight q is read as the
// unsigned byte q ^ 0x80 = q + 128 and 128 * sum(x) is taken off each token's sum. The sums wrap
// modulo 2^32 on the way (vpdpbusd does not saturate), which leaves the final difference exact.
namespace ternlm {
namespace {

// Requesting the head's bytes ahead keeps more of them in flight; into L2, and further ahead than
// kernels_avx2.cpp's one-token kernel asks into L1. Measured on Zen 4, one thread, 2B4T's int8 head:
// 27 ms for 8 tokens and 17 ms for 4, against 36 and 25 when asking into L1 4 KB ahead.
constexpr int64_t kHeadPrefetchAhead = 16384;
constexpr int64_t kInt8VnniTokens = 4;

inline uint32_t activation_sum(const int8_t* x, int64_t padded) {
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = 0; k < padded; k += 64)
        sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi8(1), _mm512_loadu_si512(x + k));
    return static_cast<uint32_t>(_mm512_reduce_add_epi32(sum));
}

// One row against NT tokens: each weight register is offset once for all of them.
template <int NT>
inline void int8_row_tile(const int8_t* row, int64_t padded, const int8_t* x, const uint32_t* x_sums, int32_t* acc,
                          int64_t out_stride) {
    __m512i sums[NT];
    for (int t = 0; t < NT; ++t) sums[t] = _mm512_setzero_si512();
    for (int64_t k = 0; k < padded; k += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(row + k + kHeadPrefetchAhead), _MM_HINT_T1);
        const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(row + k), _mm512_set1_epi8(-128));
        for (int t = 0; t < NT; ++t) sums[t] = Zmm::dot(sums[t], w, _mm512_loadu_si512(x + t * padded + k));
    }
    for (int t = 0; t < NT; ++t)
        acc[t * out_stride] = static_cast<int32_t>(static_cast<uint32_t>(_mm512_reduce_add_epi32(sums[t])) - 128u * x_sums[t]);
}

}  // namespace

void int8_gemm_avx512vnni(const Int8RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq,
                          int64_t tokens, int32_t* acc, int64_t out_stride) {
    // Few tokens are bound by memory, where this kernel was measured no faster (one row at a time:
    // tiles of two or four rows streamed the head slower).
    if (tokens < kInt8VnniTokens) return int8_gemm_avx2(m, row_begin, row_end, xq, tokens, acc, out_stride);
    constexpr int kTokens = 8;
    const int64_t padded = padded_cols(m.cols);
    for (int64_t t0 = 0; t0 < tokens; t0 += kTokens)
        with_count<kTokens>(static_cast<int>(tokens - t0 < kTokens ? tokens - t0 : kTokens), [&](auto count) {
            constexpr int C = decltype(count)::value;
            uint32_t x_sums[C];
            for (int t = 0; t < C; ++t) x_sums[t] = activation_sum(xq + (t0 + t) * padded, padded);
            for (int64_t r = row_begin; r < row_end; ++r)
                int8_row_tile<C>(m.q + r * padded, padded, xq + t0 * padded, x_sums, acc + t0 * out_stride + r, out_stride);
        });
}

}  // namespace ternlm

// The q4 head, four groups (128 weights, 64 bytes of nibbles) at a time: their low nibbles are one
// register and their high nibbles another, and each 32-bit lane of either holds four weights of one
// group. vpdpbusd multiplies the nibbles (unsigned, 0..15) by the activations gathered into the same
// order, starting from -8 times the sum of those activations, so a lane ends at the exact sum of
// (q - 8) * x over its eight weights; one FMA by its group's scale per lane. The activations are
// gathered once per call. Every row and token go through the same operations whatever the tile, so
// a token's logits do not depend on the other tokens of a batch.
namespace ternlm {
namespace {

constexpr int64_t kQ4Chunk = 4 * kQ4Group;           // weights in one low and one high nibble register
constexpr int64_t kQ4Gathered = 64 + 64 + 16 * 4;    // bytes per chunk and token: low x, high x, lane starts
// A tile is up to 4 rows x 4 tokens; one token takes four rows and two take two, so that four FMA
// chains run side by side (one chain waits on the FMA's latency).
constexpr int kQ4Rows = 4;
constexpr int kQ4Tokens = 4;
// Requested into L2 as the int8 head's rows, half as far ahead: measured on Zen 4, one thread, 2B4T's
// head, one token: 8.4 ms against 15 ms requested into L1 4 KB ahead (or 19 ms with no request).
constexpr int64_t kQ4PrefetchAhead = 8192;

// One token's activations in chunk order: for each chunk, those meeting the low nibbles (the first
// 16 of each group), those meeting the high ones, then each lane's start, -8 * sum of its eight.
void gather_q4_activations(const int8_t* x, int64_t chunks, uint8_t* out) {
    const __m512i low_halves = _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13);
    const __m512i high_halves = _mm512_setr_epi64(2, 3, 6, 7, 10, 11, 14, 15);
    for (int64_t c = 0; c < chunks; ++c, x += kQ4Chunk, out += kQ4Gathered) {
        const __m512i first = _mm512_loadu_si512(x), second = _mm512_loadu_si512(x + 64);
        const __m512i low = _mm512_permutex2var_epi64(first, low_halves, second);
        const __m512i high = _mm512_permutex2var_epi64(first, high_halves, second);
        const __m512i eight = _mm512_set1_epi8(8);
        const __m512i offset = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, low), eight, high);
        _mm512_storeu_si512(out, low);
        _mm512_storeu_si512(out + 64, high);
        _mm512_storeu_si512(out + 128, _mm512_sub_epi32(_mm512_setzero_si512(), offset));
    }
}

template <int NR, int NT>
inline void q4_tile(const uint8_t* rows, const uint16_t* scales, int64_t chunks, const uint8_t* gathered,
                    int64_t gathered_stride, float sums[NR][NT]) {
    const int64_t row_bytes = chunks * 64, groups = chunks * 4;
    const __m256i spread = _mm256_setr_epi16(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);  // a scale per lane
    const __m512i low_nibbles = _mm512_set1_epi8(15);
    __m512 acc[NR][NT];
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) {
            const uint8_t* bytes = rows + r * row_bytes + c * 64;
            _mm_prefetch(reinterpret_cast<const char*>(bytes + kQ4PrefetchAhead), _MM_HINT_T1);
            const __m512i packed = _mm512_loadu_si512(bytes);
            const __m512i low = _mm512_and_si512(packed, low_nibbles);
            const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
            const __m128i four = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales + r * groups + 4 * c));
            const __m512 scale = _mm512_cvtph_ps(_mm256_permutexvar_epi16(spread, _mm256_castsi128_si256(four)));
#pragma GCC unroll 4
            for (int t = 0; t < NT; ++t) {
                const uint8_t* x = gathered + t * gathered_stride + c * kQ4Gathered;
                __m512i lanes = _mm512_loadu_si512(x + 128);
                lanes = _mm512_dpbusd_epi32(lanes, low, _mm512_loadu_si512(x));
                lanes = _mm512_dpbusd_epi32(lanes, high, _mm512_loadu_si512(x + 64));
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes), scale, acc[r][t]);
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) sums[r][t] = _mm512_reduce_add_ps(acc[r][t]);
}

}  // namespace

void q4_gemm_avx512vnni(const Q4RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq, int64_t tokens,
                        float* out, int64_t out_stride) {
    const int64_t padded = padded_cols(m.cols), chunks = padded / kQ4Chunk, gathered_stride = chunks * kQ4Gathered;
    thread_local std::vector<uint8_t> gathered;
    gathered.resize(static_cast<size_t>(tokens * gathered_stride));
    for (int64_t t = 0; t < tokens; ++t) gather_q4_activations(xq + t * padded, chunks, gathered.data() + t * gathered_stride);
    const int row_tile = static_cast<int>(kQ4Rows / std::min<int64_t>(tokens, kQ4Rows));
    for (int64_t r0 = row_begin; r0 < row_end; r0 += row_tile)
        with_count<kQ4Rows>(static_cast<int>(std::min<int64_t>(row_end - r0, row_tile)), [&](auto row_count) {
            constexpr int NR = decltype(row_count)::value;
            for (int64_t t0 = 0; t0 < tokens; t0 += kQ4Tokens)
                with_count<kQ4Tokens>(static_cast<int>(std::min<int64_t>(tokens - t0, kQ4Tokens)), [&](auto token_count) {
                    constexpr int NT = decltype(token_count)::value;
                    float sums[NR][NT];
                    q4_tile<NR, NT>(m.q + r0 * padded / 2, m.scales + r0 * (padded / kQ4Group), chunks,
                                    gathered.data() + t0 * gathered_stride, gathered_stride, sums);
                    for (int r = 0; r < NR; ++r)
                        for (int t = 0; t < NT; ++t) out[(t0 + t) * out_stride + r0 + r] = sums[r][t];
                });
        });
}

}  // namespace ternlm

// The sampler's tempering, vectorized 16 floats wide.
#include "tempering.h"

namespace ternlm {
void temper_avx512(const float* logits, int64_t n, float max, float inverse_temperature, float* distance,
                   float* weight) {
    temper_row(logits, n, max, inverse_temperature, distance, weight);
}
}  // namespace ternlm
