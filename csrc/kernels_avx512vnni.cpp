// AVX-512 VNNI (Ice Lake, Zen 4): the EVEX form of vpdpbusd on 256-bit registers. Zen 4 executes
// 512-bit operations as two 256-bit halves, so the wider form would not be faster there.
#include "kernels_x86.h"

#include <immintrin.h>

namespace ternlm {
namespace {
inline __m256i block_dot(__m256i acc, __m256i c0, __m256i c1, __m256i c2, __m256i c3, const int8_t* x) {
    acc = _mm256_dpbusd_epi32(acc, c0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
    acc = _mm256_dpbusd_epi32(acc, c1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32)));
    acc = _mm256_dpbusd_epi32(acc, c2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64)));
    return _mm256_dpbusd_epi32(acc, c3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 96)));
}
}  // namespace
}  // namespace ternlm

#define TERNLM_KERNEL_NAME ternary_gemm_avx512vnni
#include "kernels_x86_gemm.inc"
