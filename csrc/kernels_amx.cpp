// AMX-INT8 (Intel Sapphire Rapids and later Xeons): the ternary GEMM and the int8 head for several
// tokens on the tile unit, whose tdpbusd multiplies a 16 x 64 tile of unsigned bytes by a 64 x 16
// tile of signed bytes into 16 x 16 int32 sums (16,384 products in one instruction; tdpbssd takes
// both signed). One token (decode, memory-bound) and the rows past the last whole 16 keep the
// AVX-512 VNNI kernels.
//
//   weights (A): 16 rows x 64 bytes per tile, unpacked a few blocks at a time into a buffer in L1:
//                the codes (w + 1, in 0..2) of the 2-bit layout, or the 1.6-bit layout's bytes
//                times powers of 3 (TritRows says how those give the digits' sums undecoded);
//                the int8 head's rows are read where they are;
//   activations (B): tdpbusd wants tile row i to hold bytes 4i..4i+3 of each of the 16 tokens, so
//                each 16 tokens x 64 bytes are transposed as 16 x 16 int32 into [step][i][token],
//                once per call;
//   sums (C): 16 rows x 16 tokens, transposed back on the way out, minus each token's sum (the
//                codes are w + 1, as in every kernel).
// Up to two row tiles and two token tiles go together (four C tiles), so each A and B tile loaded
// feeds two tdpbusd; each slab of unpacked weights meets every pair of token tiles of a chunk of
// tokens before the next slab is unpacked (SlabTurn).
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
// From this many tokens on, the tile unit takes the product (fewer take the AVX-512 kernels): measured
// on the Xeon, one thread, at 4 tokens AMX ties with them on the ternary GEMM and is 0.92x on the
// int8 head (both bound by memory there), at 8 tokens 1.5x and 1.3x (bench/amx_gemm.cpp).
constexpr int64_t kAmxTokens = 4;
constexpr int64_t kAmxHeadTokens = 8;
// Tokens whose activations are laid out at once: 128 tokens of 2B4T's widest rows (6912) are 864 KB,
// which stay in L2 while every row tile passes over them.
constexpr int64_t kTokenChunk = 128;

// Every tile is 16 rows of 64 bytes: tmm0..3 hold sums, tmm4, 5 weights, tmm6, 7 activations (which
// sums where: multiply_row_pair and TritRows).
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

// The activations laid out as B tiles (lay_out_activations), one buffer per thread for every layout.
thread_local Scratch activation_scratch;

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

// Rows are unpacked into A tiles (out[tile][row][64 bytes]) 16 at a time, each row's blocks read in
// order and requested kUnpackAhead bytes ahead.
constexpr int64_t kUnpackAhead = 4096;

TERNLM_INLINE void store_step(uint8_t* out, int64_t tile, int r, __m512i bytes) {
    _mm512_store_si512(out + tile * kTileBytes + r * kStep, bytes);
}

// Writes a tile of sums [16 rows][16 tokens]: acc[t * out_stride + r] = tile[r][t] - x_sums[t] (or
// tile[r][t] where x_sums is null) for the first `count` tokens (fewer than 16 in a last tile).
void write_tile(const int32_t* tile, int64_t count, const int32_t* x_sums, int32_t* acc, int64_t out_stride) {
    __m512i r[kTile];
    for (int i = 0; i < kTile; ++i) r[i] = _mm512_load_si512(tile + i * kTile);
    transpose16x16(r);  // now r[t] holds token t's sums of the 16 rows
    for (int64_t t = 0; t < count; ++t)
        _mm512_storeu_si512(acc + t * out_stride, x_sums ? _mm512_sub_epi32(r[t], _mm512_set1_epi32(x_sums[t])) : r[t]);
}

// Tokens in a token tile starting at `first` of `tokens`.
inline int64_t tile_count(int64_t tokens, int64_t first) { return tokens - first < kTile ? tokens - first : kTile; }

// sums += rows . activations with the instruction for Rows' bytes: tdpbssd for signed rows, tdpbusd for
// unsigned codes. (GCC's tile intrinsics take literal tile numbers only, hence a macro.)
#define TERNLM_TILE_DOT(sums, rows, activations)                            \
    if constexpr (Rows::kSignedRows) _tile_dpbssd(sums, rows, activations); \
    else                                                                      \
        _tile_dpbusd(sums, rows, activations)

// A kernel's sum tiles are 2a + b for a < A, b < B (of tmm0..3) while it multiplies a slab of steps:
// zeroed on the first slab, or loaded from `sums` (`load`), or still in the tile registers from the
// slab before; stored to `sums` after it if `store`. Several groups of tokens then take turns over
// each slab of weights, unpacked once, with their sums waiting in memory (L1) in between.
struct SlabTurn {
    bool first, load, store;
};

template <int A, int B>
TERNLM_INLINE void begin_sums(SlabTurn turn, int32_t (*sums)[kTile * kTile]) {
    if (turn.first) {
        _tile_zero(0);
        if (B > 1) _tile_zero(1);
        if (A > 1) _tile_zero(2);
        if (A > 1 && B > 1) _tile_zero(3);
    } else if (turn.load) {
        _tile_loadd(0, sums[0], kStep);
        if (B > 1) _tile_loadd(1, sums[1], kStep);
        if (A > 1) _tile_loadd(2, sums[2], kStep);
        if (A > 1 && B > 1) _tile_loadd(3, sums[3], kStep);
    }
}

template <int A, int B>
TERNLM_INLINE void end_sums(SlabTurn turn, int32_t (*sums)[kTile * kTile]) {
    if (!turn.store) return;
    _tile_stored(0, sums[0], kStep);
    if (B > 1) _tile_stored(1, sums[1], kStep);
    if (A > 1) _tile_stored(2, sums[2], kStep);
    if (A > 1 && B > 1) _tile_stored(3, sums[3], kStep);
}

// The turns of `pairs` groups of tokens over a slab: only several groups need their sums in memory.
inline SlabTurn slab_turn(int64_t pairs, bool first_slab, bool last_slab) { return {first_slab, pairs > 1, pairs > 1 || last_slab}; }

// The sum tiles of each pair of token tiles of a chunk, while the pairs take turns over the slabs.
constexpr int64_t kMaxPairs = kTokenChunk / (2 * kTile);
using PairSums = int32_t[kMaxPairs][4][kTile * kTile];

inline int64_t token_pairs(int64_t tokens) { return (tokens + 2 * kTile - 1) / (2 * kTile); }

// Calls take(p, std::integral_constant<int, NB>{}) for each pair p of token tiles of `tokens`, NB
// the tiles it has (1 for a last lone tile).
template <class Take>
void each_token_pair(int64_t tokens, const Take& take) {
    for (int64_t p = 0; p < token_pairs(tokens); ++p) {
        if ((2 * p + 1) * kTile < tokens)
            take(p, std::integral_constant<int, 2>{});
        else
            take(p, std::integral_constant<int, 1>{});
    }
}

// A slab of steps of one or two row tiles (tmm4, 5) against one or two token tiles (tmm6, 7), into
// the sum tiles 2a + b.
template <class Rows, int NA, int NB>
TERNLM_INLINE void multiply_slab(const uint8_t* a0, const uint8_t* a1, int64_t stride, const uint8_t* x,
                                 int64_t token_tile_bytes, int64_t count, SlabTurn turn, int32_t (*sums)[kTile * kTile]) {
    const int64_t next = Rows::step_bytes;
    begin_sums<NA, NB>(turn, sums);
    for (int64_t s = 0; s < count; ++s) {
        _tile_loadd(4, a0 + s * next, stride);
        _tile_loadd(6, x + s * kTileBytes, kStep);
        TERNLM_TILE_DOT(0, 4, 6);
        if (NB > 1) {
            _tile_loadd(7, x + token_tile_bytes + s * kTileBytes, kStep);
            TERNLM_TILE_DOT(1, 4, 7);
        }
        if (NA > 1) {
            _tile_loadd(5, a1 + s * next, stride);
            TERNLM_TILE_DOT(2, 5, 6);
            if (NB > 1) {
                TERNLM_TILE_DOT(3, 5, 7);
            }
        }
    }
    end_sums<NA, NB>(turn, sums);
}

// One or two row tiles against every token of a chunk (up to kTokenChunk), two token tiles at a
// time. Rows::slab gives the row tiles' A tiles a slab of steps at a time: unpacked into a buffer
// that stays in L1 (TwoBitRows), or read in place (Int8Rows). Each slab meets every pair of token
// tiles before the next is unpacked, so a pair's sum tiles wait in memory (L1) between slabs (a
// single pair keeps them in the tile registers). Measured on the Xeon, one thread, 6912 x 2560:
// against unpacking every slab once per pair, 1.15-1.25x at 128 tokens and 1.3x at 512.
// `x_sums` may be null: nothing to subtract.
template <class Rows, int NA>
void multiply_row_pair(const uint8_t* rows, int64_t row_bytes, const uint8_t* activations, int64_t token_tile_bytes,
                       int64_t tokens, const int32_t* x_sums, int32_t* acc, int64_t out_stride) {
    typename Rows::Slab slab;
    alignas(64) PairSums sums;
    const int64_t steps = Rows::steps(row_bytes), stride = Rows::tile_stride(row_bytes);
    for (int64_t s0 = 0; s0 < steps; s0 += Rows::kSlabSteps) {
        const int64_t count = steps - s0 < Rows::kSlabSteps ? steps - s0 : Rows::kSlabSteps;
        const uint8_t* a0 = Rows::slab(rows, row_bytes, 0, s0, count, slab);
        const uint8_t* a1 = NA > 1 ? Rows::slab(rows, row_bytes, 1, s0, count, slab) : nullptr;
        const SlabTurn turn = slab_turn(token_pairs(tokens), s0 == 0, s0 + count == steps);
        each_token_pair(tokens, [&](int64_t p, auto nb) {
            multiply_slab<Rows, NA, nb()>(a0, a1, stride, activations + 2 * p * token_tile_bytes + s0 * kTileBytes,
                                          token_tile_bytes, count, turn, sums[p]);
        });
    }
    each_token_pair(tokens, [&](int64_t p, auto nb) {
        for (int a = 0; a < NA; ++a)
            for (int b = 0; b < nb(); ++b) {
                const int64_t t = (2 * p + b) * kTile;
                write_tile(sums[p][2 * a + b], tile_count(tokens, t), x_sums ? x_sums + t : nullptr, acc + t * out_stride + a * kTile,
                           out_stride);
            }
    });
}
#undef TERNLM_TILE_DOT

// What TwoBitRows and Int8Rows share: two row tiles at a time, through multiply_row_pair, which
// takes every token of a chunk.
template <class Rows>
struct RowPairs {
    static constexpr int kRowTiles = 2;
    static void multiply_chunk(bool two_row_tiles, const uint8_t* rows, int64_t row_bytes, const uint8_t* activations,
                               int64_t token_tile_bytes, int64_t tokens, const int32_t* x_sums, int32_t* acc,
                               int64_t out_stride) {
        if (two_row_tiles) return multiply_row_pair<Rows, 2>(rows, row_bytes, activations, token_tile_bytes, tokens, x_sums, acc, out_stride);
        multiply_row_pair<Rows, 1>(rows, row_bytes, activations, token_tile_bytes, tokens, x_sums, acc, out_stride);
    }
};

// The 2-bit layout: a block is two steps, its bytes shifted by 6 and 4 (weights 0..63), or by 2 and 0
// (64..127), and masked into codes (unsigned: tdpbusd). The row tiles are unpacked a slab at a time.
// (Unpacking each row tile once into an L2 panel that every group of token tiles then reads was
// measured slower at 8-32 tokens and no faster at 64-512: Xeon, one thread, 2B4T's shapes. A slab
// that stays in L1 while the token pairs take turns is faster: multiply_row_pair.)
struct TwoBitRows : RowPairs<TwoBitRows> {
    static constexpr bool kSignedRows = false;
    static constexpr int64_t kSlabSteps = 8, step_bytes = kTileBytes;
    struct Slab {
        alignas(64) uint8_t codes[2][kSlabSteps * kTileBytes];
    };
    static int64_t padded(int64_t cols) { return padded_cols(cols); }
    static int64_t row_bytes(int64_t padded) { return padded / 4; }
    static int64_t steps(int64_t row_bytes) { return row_bytes * 4 / kStep; }
    static int64_t tile_stride(int64_t) { return kStep; }

    // The codes of steps [first, first + count) of row tile a: out[step][row][64 codes].
    static const uint8_t* slab(const uint8_t* rows, int64_t row_bytes, int a, int64_t first, int64_t count, Slab& slab) {
        // shift counts of the 16-bit lanes: the low 256 bits' and the high 256 bits'
        const __m512i first_half = _mm512_inserti64x4(_mm512_set1_epi16(6), _mm256_set1_epi16(4), 1);
        const __m512i second_half = _mm512_inserti64x4(_mm512_set1_epi16(2), _mm256_set1_epi16(0), 1);
        const __m512i three = _mm512_set1_epi8(3);
        uint8_t* out = slab.codes[a];
        rows += a * kTile * row_bytes + first / 2 * kTernaryBlockBytes;
        for (int r = 0; r < kTile; ++r)
            for (int64_t b = 0; b < count / 2; ++b) {
                const uint8_t* block = rows + r * row_bytes + b * kTernaryBlockBytes;
                _mm_prefetch(reinterpret_cast<const char*>(block + kUnpackAhead), _MM_HINT_T0);
                const __m512i bytes = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)));
                store_step(out, 2 * b, r, _mm512_and_si512(_mm512_srlv_epi16(bytes, first_half), three));
                store_step(out, 2 * b + 1, r, _mm512_and_si512(_mm512_srlv_epi16(bytes, second_half), three));
            }
        return out;
    }
};

// The int8 head: its rows are signed bytes already (tdpbssd), and each A tile is read where it is,
// 16 rows `row_bytes` apart.
struct Int8Rows : RowPairs<Int8Rows> {
    static constexpr bool kSignedRows = true;
    static constexpr int64_t kSlabSteps = 1 << 30, step_bytes = kStep;
    struct Slab {};
    static int64_t padded(int64_t cols) { return padded_cols(cols); }
    static int64_t row_bytes(int64_t padded) { return padded; }
    static int64_t steps(int64_t row_bytes) { return row_bytes / kStep; }
    static int64_t tile_stride(int64_t row_bytes) { return row_bytes; }
    static const uint8_t* slab(const uint8_t* rows, int64_t row_bytes, int a, int64_t first, int64_t, Slab&) {
        return rows + a * kTile * row_bytes + first * kStep;
    }
};

// The 1.6-bit layout, with no decoding at all: one row tile against up to two token tiles. A block's
// 64 bytes x hold five base-3 digits each; with x_n = x * 3^n mod 256 (two adds per n), digit n is
// the top trit of x_n, and 3 x_n = x_(n+1) + 256 digit_n. So the sum of digit_n * a over a row is
// (3 sum(x_n a) - sum(x_(n+1) a)) / 256, as in kernels_x86_trits.inc: two tdpbusd of bytes as they
// are, into two sums per token tile (tmm0, 1 and tmm2, 3), instead of decoding every digit; tmm4
// and 5 hold x_n and x_(n+1), tmm6 and 7 the activations. The int32 sums may wrap on the way (from
// rows of about 22k weights): their combination, 256 times a sum of codes by activations, fits, so
// it comes out exact. Against decoding the digits into codes (one tdpbusd a step, two row tiles as
// for 2 bits), measured on the Xeon: 0.65x the time at 4-16 tokens (one thread, 2B4T's shapes) and
// 0.77x the GEMM's time in a 128-token prompt. The token pairs take turns over each slab as for 2
// bits: 6912 x 2560 at one thread 1.14x at 128 tokens, 1.2x at 512 (slabs of 1 or 4 blocks: slower).
struct TritRows {
    static constexpr int kRowTiles = 1;
    static constexpr int64_t kSlabBlocks = 2, kPowers = kTritDigits + 1;
    static int64_t padded(int64_t cols) { return trit_padded_cols(cols); }
    static int64_t row_bytes(int64_t padded) { return padded / 5; }

    // x_0 .. x_5 of blocks [first, first + count) of 16 rows: out[block][n][row][64 bytes].
    static void unpack(const uint8_t* rows, int64_t row_bytes, int64_t first, int64_t count, uint8_t* out) {
        for (int r = 0; r < kTile; ++r)
            for (int64_t b = 0; b < count; ++b) {
                const uint8_t* block = rows + r * row_bytes + (first + b) * kTritBlockBytes;
                _mm_prefetch(reinterpret_cast<const char*>(block + kUnpackAhead), _MM_HINT_T0);
                __m512i x = _mm512_loadu_si512(block);
                for (int n = 0; n < kPowers; ++n) {
                    store_step(out, kPowers * b + n, r, x);
                    x = _mm512_add_epi8(x, _mm512_add_epi8(x, x));
                }
            }
    }

    // Digit n of a block: x_n (tmm4) and x_(n+1) (tmm5) against the digit's activations.
    template <int NB>
    static TERNLM_INLINE void digit(const uint8_t* powers, const uint8_t* x, int64_t token_tile_bytes) {
        _tile_loadd(4, powers, kStep);
        _tile_loadd(5, powers + kTileBytes, kStep);
        _tile_loadd(6, x, kStep);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 5, 6);
        if (NB > 1) {
            _tile_loadd(7, x + token_tile_bytes, kStep);
            _tile_dpbusd(2, 4, 7);
            _tile_dpbusd(3, 5, 7);
        }
    }

    // A slab of `count` blocks (`powers`: their x_0 .. x_5) against NB token tiles (x: their
    // activations from the slab's first block): the sums of token tile b are tiles 2b (x_n) and
    // 2b + 1 (x_(n+1)).
    template <int NB>
    static TERNLM_INLINE void multiply_slab(const uint8_t* powers, const uint8_t* x, int64_t token_tile_bytes, int64_t count,
                                            SlabTurn turn, int32_t (*sums)[kTile * kTile]) {
        begin_sums<NB, 2>(turn, sums);
        for (int64_t b = 0; b < count; ++b)
            for (int n = 0; n < kTritDigits; ++n)
                digit<NB>(powers + (b * kPowers + n) * kTileBytes, x + (b * kTritDigits + n) * kTileBytes, token_tile_bytes);
        end_sums<NB, 2>(turn, sums);
    }

    // One row tile (its two sums per token tile take the tiles) against every token of a chunk, two
    // token tiles at a time, each slab unpacked once for all of them (as multiply_row_pair does).
    static void multiply_chunk(bool, const uint8_t* rows, int64_t row_bytes, const uint8_t* activations,
                               int64_t token_tile_bytes, int64_t tokens, const int32_t* x_sums, int32_t* acc,
                               int64_t out_stride) {
        alignas(64) uint8_t slab[kSlabBlocks * kPowers * kTileBytes];
        alignas(64) PairSums sums;
        const int64_t blocks = row_bytes / kTritBlockBytes;
        for (int64_t b0 = 0; b0 < blocks; b0 += kSlabBlocks) {
            const int64_t count = blocks - b0 < kSlabBlocks ? blocks - b0 : kSlabBlocks;
            unpack(rows, row_bytes, b0, count, slab);
            const SlabTurn turn = slab_turn(token_pairs(tokens), b0 == 0, b0 + count == blocks);
            each_token_pair(tokens, [&](int64_t p, auto nb) {
                multiply_slab<nb()>(slab, activations + 2 * p * token_tile_bytes + b0 * kTritDigits * kTileBytes, token_tile_bytes,
                                    count, turn, sums[p]);
            });
        }
        each_token_pair(tokens, [&](int64_t p, auto nb) {
            for (int b = 0; b < nb(); ++b) {
                int32_t* digit_sums = sums[p][2 * b];
                for (int i = 0; i < kTile * kTile; i += 16) {
                    const __m512i powers = _mm512_load_si512(digit_sums + i), carried = _mm512_load_si512(sums[p][2 * b + 1] + i);
                    const __m512i times256 = _mm512_sub_epi32(_mm512_add_epi32(powers, _mm512_add_epi32(powers, powers)), carried);
                    _mm512_store_si512(digit_sums + i, _mm512_srai_epi32(times256, 8));
                }
                const int64_t t = (2 * p + b) * kTile;
                write_tile(digit_sums, tile_count(tokens, t), x_sums + t, acc + t * out_stride, out_stride);
            }
        });
    }
};

// Whole 16-row tiles from row_begin over every token, a chunk of tokens at a time (xq_sums null:
// nothing to subtract).
template <class Rows>
void amx_gemm(const uint8_t* data, int64_t cols, int64_t row_begin, int64_t row_end, const int8_t* xq,
              const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride) {
    const int64_t padded = Rows::padded(cols), row_bytes = Rows::row_bytes(padded);
    const int64_t token_tile_bytes = padded / kStep * kTileBytes;
    const int64_t token_tiles = ((tokens < kTokenChunk ? tokens : kTokenChunk) + kTile - 1) / kTile;
    uint8_t* activations = activation_scratch.get(static_cast<size_t>(token_tiles * token_tile_bytes));
    configure_tiles();
    for (int64_t c0 = 0; c0 < tokens; c0 += kTokenChunk) {
        const int64_t chunk = tokens - c0 < kTokenChunk ? tokens - c0 : kTokenChunk;
        for (int64_t t = 0; t < chunk; t += kTile)
            lay_out_activations(xq + (c0 + t) * padded, padded, static_cast<int>(tile_count(chunk, t)),
                                activations + t / kTile * token_tile_bytes);
        for (int64_t r = row_begin; r < row_end; r += Rows::kRowTiles * kTile)
            Rows::multiply_chunk(r + 2 * kTile <= row_end, data + r * row_bytes, row_bytes, activations, token_tile_bytes,
                                 chunk, xq_sums ? xq_sums + c0 : nullptr, acc + c0 * out_stride + r, out_stride);
    }
    _tile_release();
}

}  // namespace

void ternary_gemm_amx(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                      const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride) {
    const int64_t whole_end = row_begin + (row_end - row_begin) / kTile * kTile;
    if (tokens < kAmxTokens || whole_end == row_begin)
        return ternary_gemm_avx512vnni(w, row_begin, row_end, xq, xq_sums, tokens, acc, out_stride);
    amx_gemm<TwoBitRows>(w.data, w.cols, row_begin, whole_end, xq, xq_sums, tokens, acc, out_stride);
    if (whole_end < row_end) ternary_gemm_avx512vnni(w, whole_end, row_end, xq, xq_sums, tokens, acc, out_stride);
}

void trit_gemm_amx(const TritView& w, int64_t row_begin, int64_t row_end, const int8_t* xq, const int32_t* xq_sums,
                   int64_t tokens, int32_t* acc, int64_t out_stride) {
    const int64_t whole_end = row_begin + (row_end - row_begin) / kTile * kTile;
    if (tokens < kAmxTokens || whole_end == row_begin)
        return trit_gemm_avx512vnni(w, row_begin, row_end, xq, xq_sums, tokens, acc, out_stride);
    amx_gemm<TritRows>(w.data, w.cols, row_begin, whole_end, xq, xq_sums, tokens, acc, out_stride);
    if (whole_end < row_end) trit_gemm_avx512vnni(w, whole_end, row_end, xq, xq_sums, tokens, acc, out_stride);
}

// The int8 head for many tokens: a perplexity window, or a step of many sequences.
void int8_gemm_amx(const Int8RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq, int64_t tokens,
                   int32_t* acc, int64_t out_stride) {
    const int64_t whole_end = row_begin + (row_end - row_begin) / kTile * kTile;
    if (tokens < kAmxHeadTokens || whole_end == row_begin)
        return int8_gemm_avx512vnni(m, row_begin, row_end, xq, tokens, acc, out_stride);
    amx_gemm<Int8Rows>(reinterpret_cast<const uint8_t*>(m.q), m.cols, row_begin, whole_end, xq, nullptr, tokens, acc,
                       out_stride);
    if (whole_end < row_end) int8_gemm_avx512vnni(m, whole_end, row_end, xq, tokens, acc, out_stride);
}

}  // namespace ternlm
