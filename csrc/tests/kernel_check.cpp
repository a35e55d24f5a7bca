// Every kernel variant this CPU can run against the scalar reference, on random inputs including
// odd sizes: integer results must be identical. Built and run without Python, so the ARM variants
// can be cross-compiled and checked under qemu-user (tests/test_cross_arm.py).
#include <cstdio>
#include <random>
#include <vector>

#include "../dispatch.h"
#include "../model.h"

using namespace ternlm;

int main() {
    std::mt19937 rng(1234);
    std::uniform_int_distribution<int> ternary(-1, 1), activation(-127, 127), weight8(-127, 127);
    const int shapes[][3] = {{1, 1, 1}, {3, 5, 7}, {4, 128, 8}, {2, 129, 33}, {7, 300, 65}, {16, 256, 128}, {5, 1000, 17}, {9, 256, 31}, {17, 2560, 41}, {40, 640, 48}};
    int failures = 0, checks = 0;
    for (const std::string& name : available_kernel_names()) {
        const KernelSet& kernels = find_kernels(name);
        for (const auto& shape : shapes) {
            const int tokens = shape[0], cols = shape[1], rows = shape[2];
            const int64_t padded = padded_cols(cols);
            const int failures_before = failures;
            std::vector<int8_t> w(rows * cols), x(tokens * padded, 0), q(rows * padded, 0);
            std::vector<int32_t> sums(tokens, 0);
            for (auto& v : w) v = static_cast<int8_t>(ternary(rng));
            for (int t = 0; t < tokens; ++t)
                for (int k = 0; k < cols; ++k) sums[t] += x[t * padded + k] = static_cast<int8_t>(activation(rng));
            for (int r = 0; r < rows; ++r)
                for (int k = 0; k < cols; ++k) q[r * padded + k] = static_cast<int8_t>(weight8(rng));
            const TernaryMatrix m = TernaryMatrix::from_ternary(w.data(), rows, cols, 1.0f);
            std::vector<int32_t> expected(tokens * rows), got(tokens * rows);
            ternary_gemm_ref(m.view(), 0, rows, x.data(), sums.data(), tokens, expected.data(), rows);
            kernels.ternary_gemm(m.view(), 0, rows, x.data(), sums.data(), tokens, got.data(), rows);
            failures += expected != got;
            const Int8RowsView head{q.data(), rows, cols};
            int8_gemm_ref(head, 0, rows, x.data(), tokens, expected.data(), rows);
            kernels.int8_gemm(head, 0, rows, x.data(), tokens, got.data(), rows);
            failures += expected != got;
            // the reference itself against a direct sum over the unpacked weights
            std::vector<int32_t> direct(tokens * rows, 0);
            for (int t = 0; t < tokens; ++t)
                for (int r = 0; r < rows; ++r)
                    for (int k = 0; k < cols; ++k) direct[t * rows + r] += w[r * cols + k] * x[t * padded + k];
            ternary_gemm_ref(m.view(), 0, rows, x.data(), sums.data(), tokens, expected.data(), rows);
            failures += expected != direct;
            // the 1.6-bit layout: its GEMM, and its unpacking to the 2-bit layout for prompts
            const int64_t wide = trit_padded_cols(cols);
            std::vector<int8_t> xt(tokens * wide, 0);
            for (int t = 0; t < tokens; ++t)
                for (int k = 0; k < cols; ++k) xt[t * wide + k] = x[t * padded + k];
            const TernaryMatrix trits = TernaryMatrix::from_ternary(w.data(), rows, cols, 1.0f, TernaryLayout::Trits);
            kernels.trit_gemm(trits.trit_view(), 0, rows, xt.data(), sums.data(), tokens, got.data(), rows);
            failures += got != direct;
            std::vector<uint8_t> unpacked(rows * wide / 4), reference(rows * wide / 4);
            trits_to_two_bit_ref(trits.bytes.data(), rows * wide / kTritRowMultiple, reference.data());
            kernels.trits_to_two_bit(trits.bytes.data(), rows * wide / kTritRowMultiple, unpacked.data());
            failures += unpacked != reference;
            checks += 5;
            if (failures > failures_before)
                std::printf("%s: %d failures at %d tokens x %d columns x %d rows\n", name.c_str(), failures - failures_before,
                            tokens, cols, rows);
        }
        std::printf("%s: checked\n", name.c_str());
    }
    std::printf("%d checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
