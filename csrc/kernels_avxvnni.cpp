// AVX-VNNI (VEX encoded, e.g. Alder Lake, Zen 5): vpdpbusd does u8 x s8, four products, into int32.
#include "kernels_x86.h"

#include <immintrin.h>

namespace ternlm {
namespace {
inline __m256i dot_accumulate(__m256i acc, __m256i codes, __m256i x) {
    return _mm256_dpbusd_avx_epi32(acc, codes, x);
}
}  // namespace
}  // namespace ternlm

#define TERNLM_KERNEL_NAME ternary_gemm_avxvnni
#include "kernels_x86_gemm.inc"
