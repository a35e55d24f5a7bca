// The speed of light of the AVX2 ternary GEMM tile on this CPU: how many cycles the instructions
// of one 128-weight block of a 1-row x 4-token tile (csrc/kernels_x86_gemm.inc) take in a hot loop,
// with everything in L1, adding one kind of instruction at a time. No real kernel can beat the
// last column, so it bounds what prefill and batched decode can reach here.
//
//     g++ -O2 bench/avx2_ceiling.cpp -o /tmp/avx2_ceiling && /tmp/avx2_ceiling
//
// The loops are written in assembly so that the compiler can neither drop nor reorder them.
// "peak" is two vpmaddubsw per cycle (32 products each), the most an AVX2 core issues.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

constexpr int kTokenStride = 2624;  // a 2560-wide activation row plus a cache line, as the model pads rows apart
alignas(64) int8_t activations[4 * kTokenStride];
alignas(64) uint8_t weights[64];

#define CLOBBERS                                                                                                \
    "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", \
        "xmm13", "xmm14", "xmm15", "memory", "cc"

// Four tokens' products with the codes in ymm14, each added to its accumulator (ymm0-3).
#define PRODUCTS_FROM_REGISTERS                                    \
    "vpmaddubsw %%ymm4, %%ymm14, %%ymm12\n\t vpaddw %%ymm12, %%ymm0, %%ymm0\n\t" \
    "vpmaddubsw %%ymm5, %%ymm14, %%ymm11\n\t vpaddw %%ymm11, %%ymm1, %%ymm1\n\t" \
    "vpmaddubsw %%ymm6, %%ymm14, %%ymm10\n\t vpaddw %%ymm10, %%ymm2, %%ymm2\n\t" \
    "vpmaddubsw %%ymm7, %%ymm14, %%ymm9\n\t vpaddw %%ymm9, %%ymm3, %%ymm3\n\t"
// The same with each token's 32 activations loaded from memory (lane offset OFF).
#define PRODUCTS_FROM_MEMORY(OFF)                                                      \
    "vpmaddubsw " #OFF "(%[x]), %%ymm14, %%ymm12\n\t vpaddw %%ymm12, %%ymm0, %%ymm0\n\t"      \
    "vpmaddubsw " #OFF "+2624(%[x]), %%ymm14, %%ymm11\n\t vpaddw %%ymm11, %%ymm1, %%ymm1\n\t" \
    "vpmaddubsw " #OFF "+5248(%[x]), %%ymm14, %%ymm10\n\t vpaddw %%ymm10, %%ymm2, %%ymm2\n\t" \
    "vpmaddubsw " #OFF "+7872(%[x]), %%ymm14, %%ymm9\n\t vpaddw %%ymm9, %%ymm3, %%ymm3\n\t"
// One lane of codes from the block's bytes (ymm15) and the mask of 3s (ymm13).
#define UNPACK(SHIFT) "vpsrlw $" #SHIFT ", %%ymm15, %%ymm14\n\t vpand %%ymm13, %%ymm14, %%ymm14\n\t"
#define UNPACK_LAST "vpand %%ymm13, %%ymm15, %%ymm14\n\t"

template <class Loop>
double seconds(Loop loop) {
    const auto start = std::chrono::steady_clock::now();
    loop();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double multiplies_alone(long blocks) {  // 16 independent vpmaddubsw
    return seconds([&] {
        asm volatile(
            "1:\n\t"
            "vpmaddubsw %%ymm4, %%ymm14, %%ymm0\n\t vpmaddubsw %%ymm5, %%ymm14, %%ymm1\n\t"
            "vpmaddubsw %%ymm6, %%ymm14, %%ymm2\n\t vpmaddubsw %%ymm7, %%ymm14, %%ymm3\n\t"
            "vpmaddubsw %%ymm4, %%ymm14, %%ymm8\n\t vpmaddubsw %%ymm5, %%ymm14, %%ymm9\n\t"
            "vpmaddubsw %%ymm6, %%ymm14, %%ymm10\n\t vpmaddubsw %%ymm7, %%ymm14, %%ymm11\n\t"
            "vpmaddubsw %%ymm4, %%ymm14, %%ymm0\n\t vpmaddubsw %%ymm5, %%ymm14, %%ymm1\n\t"
            "vpmaddubsw %%ymm6, %%ymm14, %%ymm2\n\t vpmaddubsw %%ymm7, %%ymm14, %%ymm3\n\t"
            "vpmaddubsw %%ymm4, %%ymm14, %%ymm8\n\t vpmaddubsw %%ymm5, %%ymm14, %%ymm9\n\t"
            "vpmaddubsw %%ymm6, %%ymm14, %%ymm10\n\t vpmaddubsw %%ymm7, %%ymm14, %%ymm11\n\t"
            "dec %[n]\n\t jnz 1b"
            : [n] "+r"(blocks)
            :
            : CLOBBERS);
    });
}

double with_adds(long blocks) {
    return seconds([&] {
        asm volatile("1:\n\t" PRODUCTS_FROM_REGISTERS PRODUCTS_FROM_REGISTERS PRODUCTS_FROM_REGISTERS PRODUCTS_FROM_REGISTERS
                     "dec %[n]\n\t jnz 1b"
                     : [n] "+r"(blocks)
                     :
                     : CLOBBERS);
    });
}

double with_loads(long blocks) {
    return seconds([&] {
        asm volatile("1:\n\t" PRODUCTS_FROM_MEMORY(0) PRODUCTS_FROM_MEMORY(32) PRODUCTS_FROM_MEMORY(64)
                         PRODUCTS_FROM_MEMORY(96) "dec %[n]\n\t jnz 1b"
                     : [n] "+r"(blocks)
                     : [x] "r"(activations)
                     : CLOBBERS);
    });
}

double whole_tile(long blocks) {  // + loading and unpacking the block's codes: the kernel's full mix
    return seconds([&] {
        asm volatile("1:\n\t vmovdqu (%[w]), %%ymm15\n\t" UNPACK(6) PRODUCTS_FROM_MEMORY(0) UNPACK(4) PRODUCTS_FROM_MEMORY(32)
                         UNPACK(2) PRODUCTS_FROM_MEMORY(64) UNPACK_LAST PRODUCTS_FROM_MEMORY(96) "dec %[n]\n\t jnz 1b"
                     : [n] "+r"(blocks)
                     : [x] "r"(activations), [w] "r"(weights)
                     : CLOBBERS);
    });
}

double clock_hz() {  // four dependent adds per iteration: one per cycle
    const long iterations = 200000000;
    long value = 0;
    return 4.0 * iterations / seconds([&] {
        for (long i = 0; i < iterations; ++i) asm volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(value));
    });
}

double median(std::vector<double> values) {
    std::sort(values.begin(), values.end());
    return values[values.size() / 2];
}

}  // namespace

int main() {
    const long blocks = 50000000;
    const int runs = 7;
    double (*const steps[])(long) = {multiplies_alone, with_adds, with_loads, whole_tile};
    const char* names[] = {"16 vpmaddubsw", "+ 16 vpaddw", "+ 16 loads", "+ unpacking (whole tile)"};
    std::vector<double> cycles[4];
    double hz = 0;
    for (int run = 0; run < runs; ++run) {  // interleaved, so that a noisy moment hits every step alike
        hz = clock_hz();
        for (int s = 0; s < 4; ++s) cycles[s].push_back(steps[s](blocks) / blocks * hz);
    }
    std::printf("clock %.2f GHz; cycles per block of 16 vpmaddubsw (512 products), median of %d:\n", hz / 1e9, runs);
    for (int s = 0; s < 4; ++s) {
        const double c = median(cycles[s]);
        std::printf("  %-26s %5.1f cycles  %3.0f%% of peak  %6.1f G products/s\n", names[s], c, 100 * 8.0 / c,
                    512.0 / c * hz / 1e9);
    }
}
