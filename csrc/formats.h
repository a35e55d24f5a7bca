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

// The 1.6-bit layout (`--ternary-bits 1.6`): five weights per byte as base-3 digits, as in
// llama.cpp's TQ1_0. Rows are stored in blocks of 320 weights -> 64 bytes; byte j of a block holds
// the codes c0..c4 of weights j, 64 + j, 128 + j, 192 + j, 256 + j as the number
// v = c0 * 81 + c1 * 27 + c2 * 9 + c3 * 3 + c4, stored as ceil(v * 256 / 243). Digit n comes back
// as the top "trit" of x = byte * 3^n mod 256: ((x * 3) >> 8), a multiply and a shift in 8-bit
// lanes (weights 64n + j for all 64 bytes: two 32-byte vectors of consecutive weights).
// Rows are padded to a multiple of 640 weights, which is also a whole number of 2-bit blocks
// (640 = 5 * 128): a 1.6-bit row unpacks into a 2-bit row of the same padded width, and the
// activations of a 1.6-bit model are padded to that width for both.
constexpr int kTritBlock = 320;
constexpr int kTritBlockBytes = kTritBlock / 5;
constexpr int kTritDigits = 5;
constexpr int kTritRowMultiple = 640;
static_assert(kTritBlockBytes == 64, "a 1.6-bit block is 64 bytes");
static_assert(kTritRowMultiple % kTritBlock == 0 && kTritRowMultiple % kTernaryBlock == 0,
              "a 1.6-bit row is whole 1.6-bit and 2-bit blocks");

static inline int64_t trit_padded_cols(int64_t cols) {
    return (cols + kTritRowMultiple - 1) / kTritRowMultiple * kTritRowMultiple;
}

// The byte holding codes c[0] (most significant digit) .. c[4], each in {0, 1, 2}.
static inline uint8_t encode_trits(const uint8_t c[kTritDigits]) {
    const int v = (((c[0] * 3 + c[1]) * 3 + c[2]) * 3 + c[3]) * 3 + c[4];
    return static_cast<uint8_t>((v * 256 + 242) / 243);
}

// Code `digit` (0 = most significant) of a byte made by encode_trits.
static inline uint8_t decode_trit(uint8_t byte, int digit) {
    static const uint8_t kPow3[kTritDigits] = {1, 3, 9, 27, 81};
    const uint8_t x = static_cast<uint8_t>(byte * kPow3[digit]);
    return static_cast<uint8_t>((x * 3) >> 8);
}

// The 2-bit block (32 bytes) of 128 codes.
static inline void pack_ternary_block(const uint8_t codes[kTernaryBlock], uint8_t* block) {
    for (int j = 0; j < kCodesPerLane; ++j)
        block[j] = static_cast<uint8_t>(codes[j] << 6 | codes[32 + j] << 4 | codes[64 + j] << 2 | codes[96 + j]);
}

// The 128 codes of a 2-bit block (32 bytes), in weight order.
static inline void unpack_ternary_block(const uint8_t* block, uint8_t codes[kTernaryBlock]) {
    for (int i = 0; i < kTernaryBlock; ++i) codes[i] = (block[i % kCodesPerLane] >> code_shift(i)) & 3;
}

// The 320 codes of a 1.6-bit block (64 bytes), in weight order.
static inline void unpack_trit_block(const uint8_t* block, uint8_t codes[kTritBlock]) {
    for (int n = 0; n < kTritDigits; ++n)
        for (int j = 0; j < kTritBlockBytes; ++j) codes[n * kTritBlockBytes + j] = decode_trit(block[j], n);
}

static inline void pack_trit_block(const uint8_t codes[kTritBlock], uint8_t* block) {
    for (int j = 0; j < kTritBlockBytes; ++j) {
        const uint8_t c[kTritDigits] = {codes[j], codes[64 + j], codes[128 + j], codes[192 + j], codes[256 + j]};
        block[j] = encode_trits(c);
    }
}

// How a ternary matrix is stored in memory.
enum class TernaryLayout : int { TwoBit = 0, Trits = 1 };

// Floating-point storage of dense tensors (embeddings, untied heads) as they come from the file.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

static inline int64_t dtype_bytes(DType dtype) { return dtype == DType::F32 ? 4 : 2; }

}  // namespace ternlm
