// Attention over the f16 KV cache with 512-bit registers (AVX-512F), for the AVX-512 and AMX kernel
// sets: a run of consecutive positions (a prompt) at once, or one position (decode), with the same
// arithmetic for each query either way. A block of kAttentionKeyBlock keys and values is converted
// to f32 once for every query of the run, then:
//   scores: per (query head, key), 16 lanes of d accumulate q . k by FMA over the head's 16-wide
//           chunks in order, 16 keys at a time (16 independent chains); the lanes of the 16 keys
//           then add up in one tree, the same for every key (sum_lanes), times the scale;
//   softmax: exp_minus_max over the row's positions;
//   out: per (query head, d), the weighted values add up over the positions in order, by FMA.
// A position's result thus depends on its own query and positions only, never on the batch.
#include "kernels_x86.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

// GCC bug 105593, as in kernels_avx512vnni.cpp: its AVX-512 intrinsics' "undefined" operands warn at every use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace ternlm {
namespace {

#include "kernels_x86_softmax.inc"

constexpr int kLanes = 16;

TERNLM_INLINE __mmask16 first_lanes(int64_t n) { return n >= kLanes ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

// Positions whose rows are requested ahead of their conversion: the cache's rows are a KV head's
// slice of wider rows, a stride the hardware prefetcher follows late.
constexpr int64_t kRowsAhead = 8;

// Rows [first, first + count) of `available` in f32, chunk by chunk of 16 of d: out[d / 16][j][16]
// (zero past head_dim), so that the keys a chunk of d meets lie at fixed offsets.
constexpr int64_t kChunkStride = kAttentionKeyBlock * kLanes;  // floats from one chunk of d to the next

void convert_rows(const PagedRows<uint16_t>& rows, int64_t first, int64_t count, int64_t available, int64_t head_dim,
                  float* out) {
    for (int64_t j = first; j < first + count; ++j) {
        if (j + kRowsAhead < available) {
            const char* ahead = reinterpret_cast<const char*>(rows.row(j + kRowsAhead));
            for (int64_t byte = 0; byte < head_dim * 2; byte += 64) _mm_prefetch(ahead + byte, _MM_HINT_T0);
        }
        const uint16_t* row = rows.row(j);
        float* converted = out + (j - first) * kLanes;
        int64_t d = 0;
        for (; d + kLanes <= head_dim; d += kLanes)
            _mm512_storeu_ps(converted + d / kLanes * kChunkStride, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d))));
        if (d < head_dim)
            _mm512_storeu_ps(converted + d / kLanes * kChunkStride,
                             _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(head_dim - d), row + d)));
    }
}

// Lane i of the result is the sum of v[i]'s 16 lanes, each added up in the same order: pairs of
// lanes two apart, then those pairs, then the 128-bit quarters.
TERNLM_INLINE __m512 sum_lanes(__m512 v[kLanes]) {
    __m512 pairs[8], quads[4];
    for (int i = 0; i < 8; ++i)
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    // pairs[i], each quarter: (v[2i] lanes 0+2, v[2i+1] lanes 0+2, v[2i] 1+3, v[2i+1] 1+3)
    for (int i = 0; i < 4; ++i) {
        const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
        quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    // quads[i], quarter q: the sums of quarter q of v[4i .. 4i + 3]
    const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x44), _mm512_shuffle_f32x4(quads[0], quads[1], 0xEE));
    const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x44), _mm512_shuffle_f32x4(quads[2], quads[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88), _mm512_shuffle_f32x4(low, high, 0xDD));
}

// scores[k] = scale * q . keys[k] for the `count` (<= 16) keys from `keys` of a converted block.
void score_sixteen(const float* q, const float* keys, int64_t count, int64_t dp, float scale, float* scores) {
    // The first chunk's products start the sums (as an FMA onto zero would, without zeroing 16 registers).
    __m512 acc[kLanes];
    const __m512 q0 = _mm512_loadu_ps(q);
#pragma GCC unroll 16
    for (int k = 0; k < kLanes; ++k) acc[k] = _mm512_mul_ps(q0, _mm512_loadu_ps(keys + k * kLanes));
    for (int64_t d = kLanes; d < dp; d += kLanes) {
        const __m512 qd = _mm512_loadu_ps(q + d);
        const float* chunk = keys + d / kLanes * kChunkStride;
#pragma GCC unroll 16
        for (int k = 0; k < kLanes; ++k) acc[k] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(chunk + k * kLanes), acc[k]);
    }
    _mm512_mask_storeu_ps(scores, first_lanes(count), _mm512_mul_ps(sum_lanes(acc), _mm512_set1_ps(scale)));
}

// sums[h][d0 .. d0 + 16 C] += sum over the block's `count` positions of weights[h][j] * values[j][..],
// for the H heads of one query (weights `weight_stride` apart, sums `dp` apart), in order of j: H x C
// accumulators, each value chunk loaded once for the H heads.
template <int H, int C>
TERNLM_INLINE void mix_chunks(const float* weights, int64_t weight_stride, const float* values, int64_t count, int64_t dp,
                              int64_t d0, float* sums) {
    __m512 acc[H][C];
    for (int h = 0; h < H; ++h)
        for (int c = 0; c < C; ++c) acc[h][c] = _mm512_loadu_ps(sums + h * dp + d0 + c * kLanes);
    for (int64_t j = 0; j < count; ++j) {
        __m512 value[C];
        for (int c = 0; c < C; ++c) value[c] = _mm512_loadu_ps(values + (d0 / kLanes + c) * kChunkStride + j * kLanes);
        for (int h = 0; h < H; ++h) {
            const __m512 w = _mm512_set1_ps(weights[h * weight_stride + j]);
            for (int c = 0; c < C; ++c) acc[h][c] = _mm512_fmadd_ps(w, value[c], acc[h][c]);
        }
    }
    for (int h = 0; h < H; ++h)
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(sums + h * dp + d0 + c * kLanes, acc[h][c]);
}

// The same over every chunk of d, four at a time (4 x H accumulators and the values fit the 32 registers).
template <int H>
void mix_block(const float* weights, int64_t weight_stride, const float* values, int64_t count, int64_t dp, float* sums) {
    int64_t d0 = 0;
    for (; d0 + 4 * kLanes <= dp; d0 += 4 * kLanes) mix_chunks<H, 4>(weights, weight_stride, values, count, dp, d0, sums);
    switch ((dp - d0) / kLanes) {
        case 3: return mix_chunks<H, 3>(weights, weight_stride, values, count, dp, d0, sums);
        case 2: return mix_chunks<H, 2>(weights, weight_stride, values, count, dp, d0, sums);
        case 1: return mix_chunks<H, 1>(weights, weight_stride, values, count, dp, d0, sums);
    }
}

}  // namespace

void f16_attention_avx512(const QueryRun& run, const PagedRows<uint16_t>& keys, const PagedRows<uint16_t>& values,
                          float scale, float* scratch) {
    const int64_t heads = run.heads, hd = run.head_dim, dp = (hd + kLanes - 1) / kLanes * kLanes;
    const int64_t rows = run.queries * heads, positions = run.last_count();
    // scratch (attention_scratch_floats): scores [rows][positions], sums and queries [rows][dp], and
    // a block of keys (then values) in f32
    float* scores = scratch;
    float* sums = scores + rows * positions;
    float* queries = sums + rows * dp;
    float* block_rows = queries + rows * dp;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < dp; d += kLanes) {
            const float* q = run.q + r / heads * run.stride + r % heads * hd;
            _mm512_storeu_ps(queries + r * dp + d, _mm512_maskz_loadu_ps(first_lanes(hd - d), q + d));
            _mm512_storeu_ps(sums + r * dp + d, _mm512_setzero_ps());
        }
    // Query i attends to positions [0, first_count + i): the later queries see every block.
    const auto attending = [&](int64_t first, const auto& work) {
        const int64_t block = std::min(kAttentionKeyBlock, positions - first);
        for (int64_t i = run.queries - 1; i >= 0 && run.first_count + i > first; --i)
            work(i, std::min(block, run.first_count + i - first));
    };
    for (int64_t first = 0; first < positions; first += kAttentionKeyBlock) {
        convert_rows(keys, first, std::min(kAttentionKeyBlock, positions - first), positions, hd, block_rows);
        attending(first, [&](int64_t i, int64_t count) {
            for (int64_t r = i * heads; r < (i + 1) * heads; ++r)
                for (int64_t j = 0; j < count; j += kLanes)
                    score_sixteen(queries + r * dp, block_rows + j * kLanes, std::min<int64_t>(kLanes, count - j), dp, scale,
                                  scores + r * positions + first + j);
        });
    }
    float* inverse_total = queries;  // the queries are done with
    for (int64_t r = 0; r < rows; ++r)
        inverse_total[r] = 1.0f / exp_minus_max(scores + r * positions, run.first_count + r / heads);
    for (int64_t first = 0; first < positions; first += kAttentionKeyBlock) {
        convert_rows(values, first, std::min(kAttentionKeyBlock, positions - first), positions, hd, block_rows);
        attending(first, [&](int64_t i, int64_t count) {
            in_fours(heads, [&](auto group, int64_t h) {
                const int64_t r = i * heads + h;
                mix_block<decltype(group)::value>(scores + r * positions + first, positions, block_rows, count, dp, sums + r * dp);
            });
        });
    }
    for (int64_t r = 0; r < rows; ++r) {
        float* out = run.out + r / heads * run.stride + r % heads * hd;
        for (int64_t d = 0; d < dp; d += kLanes)
            _mm512_mask_storeu_ps(out + d, first_lanes(hd - d),
                                  _mm512_mul_ps(_mm512_loadu_ps(sums + r * dp + d), _mm512_set1_ps(inverse_total[r])));
    }
}

}  // namespace ternlm
