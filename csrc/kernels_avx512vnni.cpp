// AVX-512 VNNI (Ice Lake, Zen 4): the EVEX form of vpdpbusd on 256-bit registers. Zen 4 executes
// 512-bit operations as two 256-bit halves, so the wider form would not be faster there.
#include "kernels_x86.h"

#define TERNLM_DPBUSD _mm256_dpbusd_epi32
#define TERNLM_KERNEL_NAME ternary_gemm_avx512vnni
#include "kernels_vnni.inc"

// The sampler's tempering, vectorized 16 floats wide.
#include "tempering.h"

namespace ternlm {
void temper_avx512(const float* logits, int64_t n, float max, float inverse_temperature, float* distance,
                   float* weight) {
    temper_row(logits, n, max, inverse_temperature, distance, weight);
}
}  // namespace ternlm
