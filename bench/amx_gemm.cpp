// The AMX-INT8 ternary GEMM (kernels_amx.cpp) against the AVX-512 VNNI one on this CPU, one thread,
// at 2B4T's shapes and several token counts, interleaved run by run, medians; the same for the int8
// head (a quarter of 2B4T's rows); and the peak of the
// instruction itself: tdpbusd on four sum tiles from tiles already loaded, nothing else. Every result
// is first checked against the scalar reference. Build (each ISA's file with its flags, as CMake does):
//
//     F="-O2 -std=c++17 -Icsrc"; O=/tmp/amx_gemm; mkdir -p $O
//     g++ $F -mavx2 -mfma -mf16c -c csrc/kernels_avx2.cpp -o $O/avx2.o
//     g++ $F -mavx2 -mavxvnni -c csrc/kernels_avxvnni.cpp -o $O/avxvnni.o
//     g++ $F -mavx2 -mavx512f -mavx512bw -mavx512vl -mavx512vnni -c csrc/kernels_avx512vnni.cpp -o $O/avx512.o
//     g++ $F -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -c csrc/kernels_avx512_attention.cpp -o $O/attention.o
//     g++ $F -mavx2 -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mamx-tile -mamx-int8 -c csrc/kernels_amx.cpp -o $O/amx.o
//     g++ $F -mamx-tile -mamx-int8 bench/amx_gemm.cpp csrc/dispatch.cpp csrc/kernels_ref.cpp $O/*.o -o $O/run && $O/run
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "dispatch.h"

using namespace ternlm;

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// G products/s of tdpbusd alone (the tile state must already be granted: find_kernels("amx") asks).
double tdpbusd_peak() {
    struct alignas(64) {
        uint8_t palette = 1, start_row = 0, reserved[14] = {};
        uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
        uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
    } config;
    alignas(64) static uint8_t ones[1024];
    std::fill(ones, ones + sizeof ones, 1);
    _tile_loadconfig(&config);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, ones, 64);
    _tile_loadd(5, ones, 64);
    _tile_loadd(6, ones, 64);
    _tile_loadd(7, ones, 64);
    const int64_t rounds = 2000000;
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < rounds; ++i) {
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
    }
    const double elapsed = seconds_since(start);
    _tile_release();
    return rounds * 4 * 16384.0 / elapsed / 1e9;
}

}  // namespace

int main() {
    const KernelSet& amx = find_kernels("amx");  // throws, naming the reason, where AMX cannot run
    const KernelSet& avx512 = find_kernels("avx512");
    std::printf("tdpbusd alone: %.0f G products/s\n", tdpbusd_peak());
    std::mt19937 rng(1);
    std::uniform_int_distribution<int> ternary(-1, 1), activation(-127, 127);
    const int shapes[][2] = {{6912, 2560}, {2560, 6912}};  // 2B4T's gate/up and down
    for (const auto& shape : shapes) {
        const int rows = shape[0], cols = shape[1];
        const int64_t padded = padded_cols(cols);
        // the 2-bit layout (formats.h), built here from random codes
        std::vector<uint8_t> packed(rows * padded / 4);
        for (auto& byte : packed) {
            uint8_t codes = 0;
            for (int i = 0; i < 4; ++i) codes = static_cast<uint8_t>(codes << 2 | (ternary(rng) + 1));
            byte = codes;
        }
        const TernaryView w{packed.data(), rows, padded};
        for (int tokens : {2, 4, 8, 16, 32, 64, 128, 512}) {
            std::vector<int8_t> x(tokens * padded);
            std::vector<int32_t> sums(tokens, 0), expected(tokens * rows), got(tokens * rows);
            for (int t = 0; t < tokens; ++t)
                for (int64_t k = 0; k < padded; ++k) sums[t] += x[t * padded + k] = static_cast<int8_t>(activation(rng));
            ternary_gemm_ref(w, 0, rows, x.data(), sums.data(), tokens, expected.data(), rows);
            std::vector<double> times[2];
            const KernelSet* variants[2] = {&avx512, &amx};
            for (int run = 0; run < 7; ++run)
                for (int v = 0; v < 2; ++v) {
                    const auto start = std::chrono::steady_clock::now();
                    variants[v]->ternary_gemm(w, 0, rows, x.data(), sums.data(), tokens, got.data(), rows);
                    times[v].push_back(seconds_since(start));
                    if (got != expected) {
                        std::printf("%s differs from the reference at %d x %d, %d tokens\n", variants[v]->name.c_str(), rows,
                                    cols, tokens);
                        return 1;
                    }
                }
            std::printf("%5d x %5d, %3d tokens:", rows, cols, tokens);
            for (int v = 0; v < 2; ++v) {
                std::sort(times[v].begin(), times[v].end());
                const double median = times[v][times[v].size() / 2];
                std::printf("  %s %7.3f ms %4.0f G/s", variants[v]->name.c_str(), median * 1e3,
                            double(rows) * padded * tokens / median / 1e9);
            }
            std::printf("\n");
        }
    }
    // The int8 head (tdpbssd on its rows in place), a quarter of 2B4T's: 32,064 rows x 2560.
    const int rows = 32064, cols = 2560;
    std::vector<int8_t> head(int64_t{rows} * cols);
    std::uniform_int_distribution<int> weight(-127, 127);
    for (auto& q : head) q = static_cast<int8_t>(weight(rng));
    const Int8RowsView m{head.data(), rows, cols};
    for (int tokens : {4, 8, 64, 256}) {
        std::vector<int8_t> x(tokens * cols);
        for (auto& v : x) v = static_cast<int8_t>(activation(rng));
        std::vector<int32_t> expected(int64_t{tokens} * rows), got(expected.size());
        int8_gemm_ref(m, 0, rows, x.data(), tokens, expected.data(), rows);
        std::vector<double> times[2];
        const KernelSet* variants[2] = {&avx512, &amx};
        for (int run = 0; run < 5; ++run)
            for (int v = 0; v < 2; ++v) {
                const auto start = std::chrono::steady_clock::now();
                variants[v]->int8_gemm(m, 0, rows, x.data(), tokens, got.data(), rows);
                times[v].push_back(seconds_since(start));
                if (got != expected) {
                    std::printf("%s's int8 head differs from the reference, %d tokens\n", variants[v]->name.c_str(), tokens);
                    return 1;
                }
            }
        std::printf("int8 head %d x %d, %3d tokens:", rows, cols, tokens);
        for (int v = 0; v < 2; ++v) {
            std::sort(times[v].begin(), times[v].end());
            const double median = times[v][times[v].size() / 2];
            std::printf("  %s %7.3f ms %4.0f G/s", variants[v]->name.c_str(), median * 1e3, double(rows) * cols * tokens / median / 1e9);
        }
        std::printf("\n");
    }
}
