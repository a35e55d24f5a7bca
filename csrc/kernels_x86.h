// x86 kernel variants. Each lives in its own translation unit compiled with its own ISA flags;
// dispatch.cpp calls them only after CPUID says the CPU has that ISA.
#pragma once
#include <algorithm>
#include <type_traits>

#include "kernels.h"

namespace ternlm {

// Calls work(std::integral_constant<int, N>{}, first) over [0, count) in pieces of N = 4 (the last
// one shorter): kernels keep one accumulator per token (or head) of a piece, so N is a constant.
template <typename Work>
inline void in_fours(int64_t count, const Work& work) {
    for (int64_t first = 0; first < count; first += 4) {
        switch (std::min<int64_t>(count - first, 4)) {
            case 1: work(std::integral_constant<int, 1>{}, first); break;
            case 2: work(std::integral_constant<int, 2>{}, first); break;
            case 3: work(std::integral_constant<int, 3>{}, first); break;
            default: work(std::integral_constant<int, 4>{}, first); break;
        }
    }
}

float quantize_row_avx2(const float* x, int64_t cols, int8_t* xq, int32_t* sum);
void ternary_gemm_avx2(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                       const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);
void ternary_gemm_avxvnni(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                          const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);
void ternary_gemm_avx512vnni(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                             const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);
void ternary_gemm_amx(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                      const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);

void trit_gemm_avx2(const TritView& w, int64_t row_begin, int64_t row_end, const int8_t* xq, const int32_t* xq_sums,
                    int64_t tokens, int32_t* acc, int64_t out_stride);
void trit_gemm_avxvnni(const TritView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                       const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);
void trit_gemm_avx512vnni(const TritView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                          const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride);
void trit_gemm_amx(const TritView& w, int64_t row_begin, int64_t row_end, const int8_t* xq, const int32_t* xq_sums,
                   int64_t tokens, int32_t* acc, int64_t out_stride);
void trits_to_two_bit_avx2(const uint8_t* trits, int64_t chunks, uint8_t* two_bit);

void dense_gemm_avx2(const DenseMatrix& m, int64_t row_begin, int64_t row_end, const float* x,
                     int64_t tokens, float* out, int64_t out_stride);

void int8_gemm_avx2(const Int8RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq,
                    int64_t tokens, int32_t* acc, int64_t out_stride);
void int8_gemm_avx512vnni(const Int8RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq,
                          int64_t tokens, int32_t* acc, int64_t out_stride);
void int8_gemm_amx(const Int8RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq, int64_t tokens,
                   int32_t* acc, int64_t out_stride);

void q4_gemm_avx2(const Q4RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq, int64_t tokens,
                  float* out, int64_t out_stride);
void q4_gemm_avx512vnni(const Q4RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq, int64_t tokens,
                        float* out, int64_t out_stride);
void f16_store_avx2(const float* x, int64_t n, uint16_t* out);
void f16_attention_avx2(const QueryRun& run, const PagedRows<uint16_t>& keys, const PagedRows<uint16_t>& values,
                        float scale, float* scratch);
void f16_attention_avx512(const QueryRun& run, const PagedRows<uint16_t>& keys, const PagedRows<uint16_t>& values,
                          float scale, float* scratch);
void temper_avx2(const float* logits, int64_t n, float max, float inverse_temperature, float* distance,
                 float* weight);
void temper_avx512(const float* logits, int64_t n, float max, float inverse_temperature, float* distance,
                   float* weight);

}  // namespace ternlm
