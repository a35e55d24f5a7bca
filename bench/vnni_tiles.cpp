// The AVX-512 VNNI ternary GEMM's tiles against each other on this CPU, one thread, in one process,
// interleaved run by run (so a noisy moment hits every tile alike), medians of the runs:
//   row_by_row   the 1 row x 8 tokens tile over 256-bit registers (kernels_x86_gemm.inc), the
//                kernel for several tokens before kernels_vnni_rows.inc;
//   zmm 8x8      what ternary_gemm_avx512vnni runs for 2 to 31 tokens: 8 rows x 8 tokens, four
//                rows per 512-bit register;
//   ymm 4x8      the same tile over 256-bit registers (two rows each), in as many registers;
//   ... unpacked once: the same two, each row tile unpacked once for all the token tiles, which
//                ternary_gemm_avx512vnni does from 32 tokens on.
// zmm against ymm is the rule for choosing 512-bit registers (see kernels_avx512vnni.cpp).
//
//     g++ -O2 -std=c++17 -mavx512f -mavx512bw -mavx512vl -mavx512vnni -Icsrc bench/vnni_tiles.cpp
//         csrc/kernels_ref.cpp -o /tmp/vnni_tiles && /tmp/vnni_tiles
//
// Shapes: 2B4T's q/o (2560 x 2560), gate/up (6912 x 2560) and down (2560 x 6912), and a matrix of
// 35 MB, which comes from memory as decode's weights do, each at several token counts. Every tile
// is first checked against the scalar reference.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels.h"

#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12, as in kernels_avx512vnni.cpp

#define TERNLM_DPBUSD _mm256_dpbusd_epi32
#define TERNLM_KERNEL_NAME row_by_row
#include "kernels_vnni.inc"
#include "kernels_vnni_rows.inc"

namespace ternlm {
namespace {

struct Ymm {
    using Vec = __m256i;
    static constexpr int kRows = 2;
    static TERNLM_INLINE void halves(const uint8_t* row, int64_t row_bytes, Vec& lo, Vec& hi) {
        const Vec a = load_block(row), b = load_block(row + row_bytes);
        lo = _mm256_permute2x128_si256(a, b, 0x20);
        hi = _mm256_permute2x128_si256(a, b, 0x31);
    }
    static TERNLM_INLINE Vec codes(Vec packed, int lane) { return unpack_lane(packed, lane); }
    static TERNLM_INLINE Vec broadcast16(const int8_t* x) {
        return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
    }
    static TERNLM_INLINE Vec dot(Vec acc, Vec c, Vec x) {
        acc = _mm256_dpbusd_epi32(acc, c, x);
        asm("" : "+v"(acc));
        return acc;
    }
    static TERNLM_INLINE Vec zero() { return _mm256_setzero_si256(); }
    static TERNLM_INLINE void lane_sums(Vec acc, int32_t* sums) {
        Vec v = _mm256_add_epi32(acc, _mm256_shuffle_epi32(acc, _MM_SHUFFLE(1, 0, 3, 2)));
        v = _mm256_add_epi32(v, _mm256_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1)));
        sums[0] = _mm256_cvtsi256_si32(v);
        sums[1] = _mm256_extract_epi32(v, 4);
    }
};

template <class V, int NV, int NT, int64_t kUnpackTokens>
void rows_tile(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq, const int32_t* xq_sums,
               int64_t tokens, int32_t* acc, int64_t out_stride) {
    interleaved_gemm<V, NV, NT, kUnpackTokens>(w, row_begin, row_end, xq, xq_sums, tokens, acc, out_stride, row_by_row);
}

struct Tile {
    const char* name;
    TernaryGemmFn gemm;
};
constexpr int64_t kNever = int64_t{1} << 40;
const Tile tiles[] = {{"row_by_row", row_by_row},
                      {"zmm 8x8", rows_tile<Zmm, 2, 8, kNever>},
                      {"ymm 4x8", rows_tile<Ymm, 2, 8, kNever>},
                      {"zmm 8x8 unpacked once", rows_tile<Zmm, 2, 8, 1>},
                      {"ymm 4x8 unpacked once", rows_tile<Ymm, 2, 8, 1>}};
constexpr int kTiles = sizeof(tiles) / sizeof(tiles[0]);

double median(std::vector<double> values) {
    std::sort(values.begin(), values.end());
    return values[values.size() / 2];
}

// Returns false if a tile disagrees with the reference.
bool compare(int rows, int cols, int tokens, int runs) {
    std::mt19937 rng(rows + cols + tokens);
    const int64_t padded = padded_cols(cols);
    std::vector<uint8_t> weights(rows * padded / 4);
    for (uint8_t& byte : weights) byte = static_cast<uint8_t>(rng() % 3 | rng() % 3 << 2 | rng() % 3 << 4 | rng() % 3 << 6);
    std::vector<int8_t> x(tokens * padded);
    std::vector<int32_t> sums(tokens, 0);
    for (int t = 0; t < tokens; ++t)
        for (int64_t k = 0; k < padded; ++k) sums[t] += x[t * padded + k] = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
    const TernaryView w{weights.data(), rows, cols};
    std::vector<int32_t> expected(tokens * rows), got(tokens * rows);
    ternary_gemm_ref(w, 0, rows, x.data(), sums.data(), tokens, expected.data(), rows);
    for (const Tile& tile : tiles) {
        tile.gemm(w, 0, rows, x.data(), sums.data(), tokens, got.data(), rows);
        if (got != expected) {
            std::printf("%s: WRONG RESULT at %d x %d, %d tokens\n", tile.name, rows, cols, tokens);
            return false;
        }
    }
    const double products = double(rows) * padded * tokens;
    const int calls = std::max(1, static_cast<int>(1e9 / products));
    std::vector<double> seconds[kTiles];
    for (int run = 0; run < runs; ++run)
        for (int i = 0; i < kTiles; ++i) {
            const auto start = std::chrono::steady_clock::now();
            for (int c = 0; c < calls; ++c) tiles[i].gemm(w, 0, rows, x.data(), sums.data(), tokens, got.data(), rows);
            seconds[i].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / calls);
        }
    std::printf("%5d x %4d, %3d tokens:", rows, cols, tokens);
    for (int i = 0; i < kTiles; ++i)
        std::printf("  %s %5.1f G/s (%.2fx)", tiles[i].name, products / median(seconds[i]) / 1e9,
                    median(seconds[0]) / median(seconds[i]));
    std::printf("\n");
    return true;
}

}  // namespace
}  // namespace ternlm

int main() {
    const int runs = 9;
    std::printf("G products/s per thread, median of %d interleaved runs; (ratio to row_by_row)\n", runs);
    bool ok = true;
    for (const int tokens : {2, 4, 8, 16, 128}) {
        ok &= ternlm::compare(2560, 2560, tokens, runs);
        ok &= ternlm::compare(6912, 2560, tokens, runs);
        ok &= ternlm::compare(2560, 6912, tokens, runs);
    }
    for (const int tokens : {2, 4, 8}) ok &= ternlm::compare(55296, 2560, tokens, runs);  // 35 MB: from memory
    return ok ? 0 : 1;
}
