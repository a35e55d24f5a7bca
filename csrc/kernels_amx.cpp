// AMX-INT8 (Intel Sapphire Rapids and later Xeons): the ternary GEMM for several tokens on the tile
// unit, whose tdpbusd multiplies a 16 x 64 tile of unsigned bytes by a 64 x 16 tile of signed bytes
// into 16 x 16 int32 sums (16,384 products in one instruction). One token (decode, memory-bound)
// and the rows past the last whole 16 keep the AVX-512 VNNI kernels.
//
//   weights (A): 16 rows x 64 codes (w + 1, in 0..2) per tile, unpacked from the 2-bit layout a few
//                blocks at a time into a buffer in L1, [step][row][64];
//   activations (B): tdpbusd wants tile row i to hold bytes 4i..4i+3 of each of the 16 tokens, so
//                each 16 tokens x 64 bytes are transposed as 16 x 16 int32 into [step][i][token],
//                once per call;
//   sums (C): 16 rows x 16 tokens, transposed back on the way out, minus each token's sum (the
//                codes are w + 1, as in every kernel).
// Two row tiles and two token tiles go together (four C tiles), so each A and B tile loaded feeds
// two tdpbusd.
#include "kernels_x86.h"

#include <immintrin.h>

#include <cstdlib>
#include <new>
#include <type_traits>

// GCC bug 105593, as in kernels_avx512vnni.cpp: its AVX-512 intrinsics' "undefined" operands warn at every use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace ternlm {
namespace {

constexpr int kTile = 16;                       // rows of a weight tile; tokens of an activation tile
constexpr int64_t kStep = 64;                   // columns one tdpbusd takes: a tile row's bytes
constexpr int64_t kTileBytes = kTile * kStep;   // 1 KB
// From this many tokens on, the tile unit takes the product (fewer take the AVX-512 kernel).
constexpr int64_t kAmxTokens = 4;
// Tokens whose activations are laid out at once: 128 tokens of 2B4T's widest rows (6912) are 864 KB,
// which stay in L2 while every row tile passes over them.
constexpr int64_t kTokenChunk = 128;

// tmm0..3: sums of (row tile a, token tile b) in tile 2a + b; tmm4, 5: weights; tmm6, 7: activations.
struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
};

void configure_tiles() {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
        config.bytes_per_row[t] = kStep;
        config.rows[t] = kTile;
    }
    _tile_loadconfig(&config);
}

// A 64-byte-aligned scratch buffer per thread, grown as needed. Not std::vector: a standard-library
// instantiation compiled with this file's ISA flags could be handed to baseline code by the linker.
struct Scratch {
    uint8_t* data = nullptr;
    size_t size = 0;
    uint8_t* get(size_t bytes) {
        if (bytes > size) {
            std::free(data);
            size = (bytes + 63) / 64 * 64;
            data = static_cast<uint8_t*>(std::aligned_alloc(64, size));
            if (!data) {
                size = 0;
                throw std::bad_alloc();
            }
        }
        return data;
    }
    ~Scratch() { std::free(data); }
};

// Rows of 16 int32 in r[0..15] become columns: r[i][j] -> r[j][i].
TERNLM_INLINE void transpose16x16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // now r[4i + j], 128-bit lane l, holds column 4l + j of rows 4i..4i+3
    for (int i = 0; i < 4; ++i) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int j = 0; j < 4; ++j) {
        const __m512i a = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88), b = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xDD);
        const __m512i c = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88), d = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xDD);
        t[j] = _mm512_shuffle_i32x4(a, c, 0x88);
        t[4 + j] = _mm512_shuffle_i32x4(b, d, 0x88);
        t[8 + j] = _mm512_shuffle_i32x4(a, c, 0xDD);
        t[12 + j] = _mm512_shuffle_i32x4(b, d, 0xDD);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// `count` (<= 16) tokens' activations as B tiles, one per step: [step][i][token] int32, the tokens
// past `count` zero.
void lay_out_activations(const int8_t* x, int64_t padded, int count, uint8_t* out) {
    for (int64_t s = 0; s < padded / kStep; ++s) {
        __m512i r[kTile];
        for (int t = 0; t < kTile; ++t) r[t] = t < count ? _mm512_loadu_si512(x + t * padded + s * kStep) : _mm512_setzero_si512();
        transpose16x16(r);
        for (int i = 0; i < kTile; ++i) _mm512_store_si512(out + s * kTileBytes + i * kStep, r[i]);
    }
}

// Blocks [first, first + count) of 16 rows' codes as A tiles, one per step: out[step][row][64 codes].
// A step is half a 2-bit block: the block's bytes shifted by 6 and 4 (weights 0..63), or by 2 and 0
// (64..127), and masked. Each row's blocks are read in order and requested kUnpackAhead bytes ahead.
constexpr int64_t kUnpackAhead = 4096;

void unpack_row_tile(const uint8_t* rows, int64_t row_bytes, int64_t first, int64_t count, uint8_t* out) {
    // shift counts of the 16-bit lanes: the low 256 bits' and the high 256 bits'
    const __m512i first_half = _mm512_inserti64x4(_mm512_set1_epi16(6), _mm256_set1_epi16(4), 1);
    const __m512i second_half = _mm512_inserti64x4(_mm512_set1_epi16(2), _mm256_set1_epi16(0), 1);
    const __m512i three = _mm512_set1_epi8(3);
    for (int r = 0; r < kTile; ++r)
        for (int64_t b = 0; b < count; ++b) {
            const uint8_t* block = rows + r * row_bytes + (first + b) * kTernaryBlockBytes;
            _mm_prefetch(reinterpret_cast<const char*>(block + kUnpackAhead), _MM_HINT_T0);
            const __m512i bytes = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)));
            _mm512_store_si512(out + 2 * b * kTileBytes + r * kStep, _mm512_and_si512(_mm512_srlv_epi16(bytes, first_half), three));
            _mm512_store_si512(out + (2 * b + 1) * kTileBytes + r * kStep,
                               _mm512_and_si512(_mm512_srlv_epi16(bytes, second_half), three));
        }
}

// The sums of NA row tiles x NB token tiles, held in the tile registers while steps accumulate.
template <int NA, int NB>
struct SumTiles {
    static void zero() {
        _tile_zero(0);
        if (NB > 1) _tile_zero(1);
        if (NA > 1) _tile_zero(2);
        if (NA > 1 && NB > 1) _tile_zero(3);
    }
    // `steps` steps of the row tiles at a (`a_bytes` apart) and the token tiles at b (`b_bytes` apart).
    static void accumulate(const uint8_t* a, int64_t a_bytes, const uint8_t* b, int64_t b_bytes, int64_t steps) {
        for (int64_t s = 0; s < steps; ++s) {
            _tile_loadd(4, a + s * kTileBytes, kStep);
            _tile_loadd(6, b + s * kTileBytes, kStep);
            _tile_dpbusd(0, 4, 6);
            if (NB > 1) {
                _tile_loadd(7, b + b_bytes + s * kTileBytes, kStep);
                _tile_dpbusd(1, 4, 7);
            }
            if (NA > 1) {
                _tile_loadd(5, a + a_bytes + s * kTileBytes, kStep);
                _tile_dpbusd(2, 5, 6);
                if (NB > 1) _tile_dpbusd(3, 5, 7);
            }
        }
    }
    // acc[t * out_stride + 16 a + r] = sum (a, b)[r][t] - x_sums[t], for the `tokens` tokens from
    // the first token tile's first (fewer than the tiles hold in a last group).
    static void write(int64_t tokens, const int32_t* x_sums, int32_t* acc, int64_t out_stride) {
        alignas(64) int32_t sums[4][kTile * kTile];
        _tile_stored(0, sums[0], kStep);
        if (NB > 1) _tile_stored(1, sums[1], kStep);
        if (NA > 1) _tile_stored(2, sums[2], kStep);
        if (NA > 1 && NB > 1) _tile_stored(3, sums[3], kStep);
        for (int a = 0; a < NA; ++a)
            for (int b = 0; b < NB; ++b) {
                const int64_t first = b * kTile, count = tokens - first < kTile ? tokens - first : kTile;
                __m512i r[kTile];
                for (int i = 0; i < kTile; ++i) r[i] = _mm512_load_si512(sums[2 * a + b] + i * kTile);
                transpose16x16(r);  // now r[t] holds token t's sums of the 16 rows
                for (int t = 0; t < count; ++t)
                    _mm512_storeu_si512(acc + (first + t) * out_stride + a * kTile,
                                        _mm512_sub_epi32(r[t], _mm512_set1_epi32(x_sums[first + t])));
            }
    }
};

// Two row tiles against up to two token tiles. The row tiles are unpacked kSlabBlocks blocks at a
// time into a buffer that stays in L1, and the sums stay in the tile registers from the first slab to
// the last. (Unpacking each row tile once into an L2 panel that every group of token tiles then reads
// was measured slower at 8-32 tokens and no faster at 64-512: Xeon, one thread, 2B4T's shapes.)
constexpr int64_t kSlabBlocks = 4;

template <int NA, int NB>
void multiply_rows(const uint8_t* rows, int64_t row_bytes, const uint8_t* activations, int64_t token_tile_bytes,
                   int64_t tokens, const int32_t* x_sums, int32_t* acc, int64_t out_stride) {
    alignas(64) uint8_t slab[2][2 * kSlabBlocks * kTileBytes];
    const int64_t blocks = row_bytes / kTernaryBlockBytes;
    SumTiles<NA, NB>::zero();
    for (int64_t b0 = 0; b0 < blocks; b0 += kSlabBlocks) {
        const int64_t count = blocks - b0 < kSlabBlocks ? blocks - b0 : kSlabBlocks;
        for (int a = 0; a < NA; ++a) unpack_row_tile(rows + a * kTile * row_bytes, row_bytes, b0, count, slab[a]);
        SumTiles<NA, NB>::accumulate(slab[0], sizeof slab[0], activations + 2 * b0 * kTileBytes, token_tile_bytes, 2 * count);
    }
    SumTiles<NA, NB>::write(tokens, x_sums, acc, out_stride);
}

// Calls work.template operator()<NA, NB>() with the tile counts as constants.
template <class Work>
void with_tiles(bool two_row_tiles, bool two_token_tiles, const Work& work) {
    if (two_row_tiles && two_token_tiles) return work(std::integral_constant<int, 2>{}, std::integral_constant<int, 2>{});
    if (two_row_tiles) return work(std::integral_constant<int, 2>{}, std::integral_constant<int, 1>{});
    if (two_token_tiles) return work(std::integral_constant<int, 1>{}, std::integral_constant<int, 2>{});
    work(std::integral_constant<int, 1>{}, std::integral_constant<int, 1>{});
}

// Whole 16-row tiles from row_begin over every token, a chunk of tokens at a time.
void amx_gemm(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq, const int32_t* xq_sums,
              int64_t tokens, int32_t* acc, int64_t out_stride) {
    const int64_t padded = padded_cols(w.cols), row_bytes = padded / 4;
    const int64_t token_tile_bytes = padded / kStep * kTileBytes;
    const int64_t token_tiles = ((tokens < kTokenChunk ? tokens : kTokenChunk) + kTile - 1) / kTile;
    thread_local Scratch scratch;
    uint8_t* activations = scratch.get(static_cast<size_t>(token_tiles * token_tile_bytes));
    configure_tiles();
    for (int64_t c0 = 0; c0 < tokens; c0 += kTokenChunk) {
        const int64_t chunk = tokens - c0 < kTokenChunk ? tokens - c0 : kTokenChunk;
        for (int64_t t = 0; t < chunk; t += kTile)
            lay_out_activations(xq + (c0 + t) * padded, padded, static_cast<int>(chunk - t < kTile ? chunk - t : kTile),
                                activations + t / kTile * token_tile_bytes);
        for (int64_t r = row_begin; r < row_end; r += 2 * kTile)
            for (int64_t t0 = 0; t0 < chunk; t0 += 2 * kTile)
                with_tiles(r + 2 * kTile <= row_end, t0 + kTile < chunk, [&](auto na, auto nb) {
                    multiply_rows<na(), nb()>(w.data + r * row_bytes, row_bytes, activations + t0 / kTile * token_tile_bytes,
                                              token_tile_bytes, chunk - t0, xq_sums + c0 + t0,
                                              acc + (c0 + t0) * out_stride + r, out_stride);
                });
    }
    _tile_release();
}

}  // namespace

void ternary_gemm_amx(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                      const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride) {
    const int64_t whole_end = row_begin + (row_end - row_begin) / kTile * kTile;
    if (tokens < kAmxTokens || whole_end == row_begin)
        return ternary_gemm_avx512vnni(w, row_begin, row_end, xq, xq_sums, tokens, acc, out_stride);
    amx_gemm(w, row_begin, whole_end, xq, xq_sums, tokens, acc, out_stride);
    if (whole_end < row_end) ternary_gemm_avx512vnni(w, whole_end, row_end, xq, xq_sums, tokens, acc, out_stride);
}

}  // namespace ternlm
