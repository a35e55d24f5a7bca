// ARM kernel variants: NEON (every ARMv8 CPU) and NEON with the dot-product extension (sdot).
#pragma once
#include "kernels.h"

namespace ternlm {

void ternary_gemm_neon(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                       const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);
void trit_gemm_neon(const TritView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                    const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);
void trit_gemm_dotprod(const TritView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                       const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);
void trits_to_two_bit_neon(const uint8_t* trits, int64_t chunks, uint8_t* two_bit);
void int8_gemm_neon(const Int8RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq,
                    int64_t tokens, int32_t* acc, int64_t out_stride);
void ternary_gemm_dotprod(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                          const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);
void int8_gemm_dotprod(const Int8RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq,
                       int64_t tokens, int32_t* acc, int64_t out_stride);

}  // namespace ternlm
