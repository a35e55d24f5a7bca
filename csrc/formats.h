// Runtime layouts shared by every kernel variant. The bytes are the same on every CPU.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ternlm {

// Ternary weights are stored row-major, each row in blocks of 128 weights -> 32 bytes.
// Byte j of a block holds the codes (w + 1 in {0, 1, 2}) of weights
//   j in bits 7:6,  32 + j in bits 5:4,  64 + j in bits 3:2,  96 + j in bits 1:0.
// Shifting a 32-byte load by 6, 4, 2, 0 and masking with 3 yields 32 consecutive codes, which is
// what SIMD kernels want. It is also I2_S's block layout, so I2_S tensors map onto it directly.
constexpr int kTernaryBlock = 128;
constexpr int kTernaryBlockBytes = kTernaryBlock / 4;
constexpr int kCodesPerLane = 32;
static_assert(kTernaryBlockBytes == 32, "a ternary block is 32 bytes");
static_assert(kTernaryBlock == 4 * kCodesPerLane, "four 2-bit lanes per byte");

// Activations are int8 rows padded with zeros to a whole number of ternary blocks. Padded weight
// codes are 1 (weight 0), so padding contributes nothing to either sum.
// `static`: these headers are also compiled with AVX flags; internal linkage keeps the linker from
// handing an AVX-compiled copy to baseline code.
static inline int64_t padded_cols(int64_t cols) {
    return (cols + kTernaryBlock - 1) / kTernaryBlock * kTernaryBlock;
}

static inline int code_shift(int index_in_block) {  // bit position of weight `index_in_block`'s code
    return 6 - 2 * (index_in_block / kCodesPerLane);
}

// Floating-point storage of dense tensors (embeddings, untied heads) as they come from the file.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

static inline int64_t dtype_bytes(DType dtype) { return dtype == DType::F32 ? 4 : 2; }

}  // namespace ternlm
