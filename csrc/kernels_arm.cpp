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
