// AVX-VNNI (VEX encoded, e.g. Alder Lake, Zen 5).
#include "kernels_x86.h"

#define TERNLM_DPBUSD _mm256_dpbusd_avx_epi32
#define TERNLM_KERNEL_NAME ternary_gemm_avxvnni
#include "kernels_vnni.inc"
#define TERNLM_TRIT_KERNEL_NAME trit_gemm_avxvnni
#include "kernels_x86_trits.inc"
