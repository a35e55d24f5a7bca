// AVX-VNNI (VEX encoded, e.g. Alder Lake, Zen 5): vpdpbusd does u8 x s8, four products, into int32.
#include "kernels_x86.h"

#include <immintrin.h>

namespace ternlm {
namespace {
inline __m256i block_dot(__m256i acc, __m256i c0, __m256i c1, __m256i c2, __m256i c3, const int8_t* x) {
    acc = _mm256_dpbusd_avx_epi32(acc, c0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
    acc = _mm256_dpbusd_avx_epi32(acc, c1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32)));
    acc = _mm256_dpbusd_avx_epi32(acc, c2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64)));
    return _mm256_dpbusd_avx_epi32(acc, c3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 96)));
}
}  // namespace
}  // namespace ternlm

#define TERNLM_KERNEL_NAME ternary_gemm_avxvnni
#include "kernels_x86_gemm.inc"
