// AVX-512 VNNI (Ice Lake, Zen 4): the EVEX form of vpdpbusd on 256-bit registers. Zen 4 executes
// 512-bit operations as two 256-bit halves, so the wider form would not be faster there.
#include "kernels_x86.h"

#include <immintrin.h>

namespace ternlm {
namespace {
inline __m256i dot_accumulate(__m256i acc, __m256i codes, __m256i x) {
    return _mm256_dpbusd_epi32(acc, codes, x);
}
}  // namespace
}  // namespace ternlm

#define TERNLM_KERNEL_NAME ternary_gemm_avx512vnni
#include "kernels_x86_gemm.inc"
