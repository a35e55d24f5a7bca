// x86 kernel variants. Each lives in its own translation unit compiled with its own ISA flags;
// dispatch.cpp calls them only after CPUID says the CPU has that ISA.
#pragma once
#include "kernels.h"

namespace ternlm {

void ternary_gemm_avx2(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                       const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);
void ternary_gemm_avxvnni(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                          const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);
void ternary_gemm_avx512vnni(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                             const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);

void dense_gemv_avx2(const DenseMatrix& m, int64_t row_begin, int64_t row_end, const float* x,
                     int64_t tokens, float* out, int64_t out_stride);

void int8_gemv_avx2(const Int8RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq,
                    int64_t tokens, int32_t* acc, int64_t out_stride);

void q4_gemv_avx2(const Q4RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq, int64_t tokens,
                  float* out, int64_t out_stride);
void f16_store_avx2(const float* x, int64_t n, uint16_t* out);
float f16_dot_avx2(const float* q, const uint16_t* k, int64_t n);
void f16_axpy_avx2(float p, const uint16_t* v, int64_t n, float* out);

}  // namespace ternlm
