// NEON with the dot-product extension (ARMv8.2+, e.g. Apple M1, Graviton 2+): sdot.
#include "kernels_arm.h"

#include <arm_neon.h>

namespace ternlm {
namespace {
TERNLM_INLINE int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b) { return vdotq_s32(acc, a, b); }
}  // namespace
}  // namespace ternlm

#define TERNLM_VARIANT dotprod
#include "kernels_arm.inc"
