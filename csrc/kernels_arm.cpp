// NEON without the dot-product extension: widening multiplies, pairwise-added into int32.
// |product| <= 128 * 127, and vpadalq adds pairs of int16 straight into int32: no overflow.
#include "kernels_arm.h"

#include <arm_neon.h>

namespace ternlm {
namespace {
TERNLM_INLINE int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b) {
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    return vpadalq_s16(acc, vmull_high_s8(a, b));
}
}  // namespace
}  // namespace ternlm

#define TERNLM_VARIANT neon
#include "kernels_arm.inc"

namespace ternlm {

// Each run of 640 weights: 40 vectors of 16 codes (vector 20b + 4n + q is block b's quarter q,
// digit n), eight to a 2-bit block.
void trits_to_two_bit_neon(const uint8_t* trits, int64_t chunks, uint8_t* two_bit) {
    constexpr int kVectors = kTritRowMultiple / 16;
    for (int64_t c = 0; c < chunks; ++c, trits += kTritRowMultiple / 5, two_bit += kTritRowMultiple / 4) {
        uint8x16_t codes[kVectors];
        for (int b = 0; b < kTritRowMultiple / kTritBlock; ++b)
            for (int q = 0; q < 4; ++q) {
                uint8x16_t digits = vld1q_u8(trits + b * kTritBlockBytes + 16 * q);
                for (int n = 0; n < kTritDigits; ++n) {
                    const uint8x16_t next = vmulq_u8(digits, vdupq_n_u8(3));
                    codes[20 * b + 4 * n + q] = top_trit(digits, next);
                    digits = next;
                }
            }
        for (int k = 0; k < kTritRowMultiple / kTernaryBlock; ++k)
            for (int half = 0; half < 2; ++half) {
                const uint8x16_t* lane = codes + 8 * k + half;  // lane i of the block is vectors 2i, 2i + 1
                const uint8x16_t high = vorrq_u8(vshlq_n_u8(lane[0], 6), vshlq_n_u8(lane[2], 4));
                const uint8x16_t low = vorrq_u8(vshlq_n_u8(lane[4], 2), lane[6]);
                vst1q_u8(two_bit + k * kTernaryBlockBytes + 16 * half, vorrq_u8(high, low));
            }
    }
}

}  // namespace ternlm
