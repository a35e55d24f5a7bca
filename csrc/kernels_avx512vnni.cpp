// AVX-512 VNNI (Ice Lake, Zen 4). One token (decode, memory-bound) takes the 256-bit kernel of
// kernels_x86_gemm.inc, four rows at a time; several tokens take 8 rows x 8 tokens with four rows
// per 512-bit register (kernels_vnni_rows.inc). Zen 4 splits 512-bit operations into two 256-bit
// halves, and there the same tile over 256-bit registers (two rows each, so 4 rows x 8 tokens in
// as many registers) is as fast, within 3 % (bench/vnni_tiles.cpp); cores that run 512-bit
// operations at full width do twice the products per instruction. So the 512-bit form is used
// wherever AVX-512 VNNI is.
#include "kernels_x86.h"

// GCC 12's AVX-512 intrinsics initialise their "undefined" operands from themselves, which
// -Wmaybe-uninitialized reports at every use (GCC bug 105593); the warning says nothing about this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace ternlm {
static void row_by_row(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                       const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);
}

#define TERNLM_DPBUSD _mm256_dpbusd_epi32
#define TERNLM_KERNEL_NAME row_by_row
#include "kernels_vnni.inc"
#include "kernels_vnni_rows.inc"

namespace ternlm {

// From this many tokens on, each row tile is unpacked once for all of them (measured with
// bench/vnni_tiles.cpp: 5-10 % faster at 128 tokens, slower at 8).
constexpr int64_t kUnpackTokens = 32;

void ternary_gemm_avx512vnni(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                             const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride) {
    if (tokens == 1) return row_by_row(w, row_begin, row_end, xq, xq_sums, tokens, acc, out_stride);
    interleaved_gemm<Zmm, 2, 8, kUnpackTokens>(w, row_begin, row_end, xq, xq_sums, tokens, acc, out_stride, row_by_row);
}

}  // namespace ternlm
