// The speed of light of the AVX2 ternary GEMM tile on this CPU: how many cycles the instructions
// of one 128-weight block of a 1-row x 4-token tile (csrc/kernels_x86_gemm.inc) take in a hot loop,
// with everything in L1, adding one kind of instruction at a time; then the same for a 2-row x
// 4-token tile, which shares each activation load between two rows. A kernel built from these
// instruction mixes cannot beat their last lines, which bounds what prefill and batched decode can
// reach here.
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

constexpr int kTokenStride = 2560;  // four tokens' rows of 2B4T's hidden width, one after the other as in the model
alignas(64) int8_t activations[4 * kTokenStride];
alignas(64) uint8_t weights[2 * 640];  // two rows' first blocks, a 2560-wide row (640 bytes) apart

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
#define PRODUCTS_FROM_MEMORY(OFF)                                                        \
    "vpmaddubsw " #OFF "(%[x0]), %%ymm14, %%ymm12\n\t vpaddw %%ymm12, %%ymm0, %%ymm0\n\t" \
    "vpmaddubsw " #OFF "(%[x1]), %%ymm14, %%ymm11\n\t vpaddw %%ymm11, %%ymm1, %%ymm1\n\t" \
    "vpmaddubsw " #OFF "(%[x2]), %%ymm14, %%ymm10\n\t vpaddw %%ymm10, %%ymm2, %%ymm2\n\t" \
    "vpmaddubsw " #OFF "(%[x3]), %%ymm14, %%ymm9\n\t vpaddw %%ymm9, %%ymm3, %%ymm3\n\t"
// One lane of codes from the block's bytes (ymm15) and the mask of 3s (ymm13).
#define UNPACK(SHIFT) "vpsrlw $" #SHIFT ", %%ymm15, %%ymm14\n\t vpand %%ymm13, %%ymm14, %%ymm14\n\t"
#define UNPACK_LAST "vpand %%ymm13, %%ymm15, %%ymm14\n\t"
#define TOKEN_ROWS                                                                                  \
    [x0] "r"(activations), [x1] "r"(activations + kTokenStride), [x2] "r"(activations + 2 * kTokenStride), \
        [x3] "r"(activations + 3 * kTokenStride)

// 2 rows x 4 tokens, one lane: both rows' codes (from ymm10 and ymm11, mask in ymm15) in ymm14 and
// ymm13, each token's activations loaded once into ymm12 for both rows; accumulators ymm0-7.
#define TWO_ROWS_TOKEN(T, ROW1_ACC, OFF)                                                                     \
    "vmovdqu " #OFF "(%[x" #T "]), %%ymm12\n\t"                                                           \
    "vpmaddubsw %%ymm12, %%ymm14, %%ymm8\n\t vpaddw %%ymm8, %%ymm" #T ", %%ymm" #T "\n\t"                  \
    "vpmaddubsw %%ymm12, %%ymm13, %%ymm9\n\t vpaddw %%ymm9, %%ymm" #ROW1_ACC ", %%ymm" #ROW1_ACC "\n\t"
#define TWO_ROWS_LANE(UNPACK_ROWS, OFF)                                                              \
    UNPACK_ROWS TWO_ROWS_TOKEN(0, 4, OFF) TWO_ROWS_TOKEN(1, 5, OFF) TWO_ROWS_TOKEN(2, 6, OFF) \
        TWO_ROWS_TOKEN(3, 7, OFF)
#define UNPACK_TWO(SHIFT)                                                                 \
    "vpsrlw $" #SHIFT ", %%ymm10, %%ymm14\n\t vpand %%ymm15, %%ymm14, %%ymm14\n\t" \
    "vpsrlw $" #SHIFT ", %%ymm11, %%ymm13\n\t vpand %%ymm15, %%ymm13, %%ymm13\n\t"
#define UNPACK_TWO_LAST "vpand %%ymm15, %%ymm10, %%ymm14\n\t vpand %%ymm15, %%ymm11, %%ymm13\n\t"

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
                     : TOKEN_ROWS
                     : CLOBBERS);
    });
}

double whole_tile(long blocks) {  // + loading and unpacking the block's codes: the kernel's full mix
    return seconds([&] {
        asm volatile("1:\n\t vmovdqu (%[w]), %%ymm15\n\t" UNPACK(6) PRODUCTS_FROM_MEMORY(0) UNPACK(4) PRODUCTS_FROM_MEMORY(32)
                         UNPACK(2) PRODUCTS_FROM_MEMORY(64) UNPACK_LAST PRODUCTS_FROM_MEMORY(96) "dec %[n]\n\t jnz 1b"
                     : [n] "+r"(blocks)
                     : TOKEN_ROWS, [w] "r"(weights)
                     : CLOBBERS);
    });
}

double two_row_tile(long blocks) {  // 32 vpmaddubsw per block: the results count per 16
    return seconds([&] {
        asm volatile("1:\n\t vmovdqu (%[w]), %%ymm10\n\t vmovdqu 640(%[w]), %%ymm11\n\t" TWO_ROWS_LANE(UNPACK_TWO(6), 0)
                         TWO_ROWS_LANE(UNPACK_TWO(4), 32) TWO_ROWS_LANE(UNPACK_TWO(2), 64)
                             TWO_ROWS_LANE(UNPACK_TWO_LAST, 96) "dec %[n]\n\t jnz 1b"
                     : [n] "+r"(blocks)
                     : TOKEN_ROWS, [w] "r"(weights)
                     : CLOBBERS);
    }) / 2;
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
    double (*const steps[])(long) = {multiplies_alone, with_adds, with_loads, whole_tile, two_row_tile};
    const char* names[] = {"16 vpmaddubsw", "+ 16 vpaddw", "+ 16 loads", "+ unpacking (whole tile)",
                           "2 rows x 4 tokens, per 16"};
    constexpr int kSteps = sizeof(names) / sizeof(names[0]);
    std::vector<double> cycles[kSteps];
    double hz = 0;
    for (int run = 0; run < runs; ++run) {  // interleaved, so that a noisy moment hits every step alike
        hz = clock_hz();
        for (int s = 0; s < kSteps; ++s) cycles[s].push_back(steps[s](blocks) / blocks * hz);
    }
    std::printf("clock %.2f GHz; cycles per block of 16 vpmaddubsw (512 products), median of %d:\n", hz / 1e9, runs);
    for (int s = 0; s < kSteps; ++s) {
        const double c = median(cycles[s]);
        std::printf("  %-26s %5.1f cycles  %3.0f%% of peak  %6.1f G products/s\n", names[s], c, 100 * 8.0 / c,
                    512.0 / c * hz / 1e9);
    }
}
