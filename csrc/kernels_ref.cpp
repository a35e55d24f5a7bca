// Scalar reference kernels: the definition of "correct" for every variant.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace ternlm {

float quantize_row_int8(const float* x, int64_t cols, int8_t* xq, int32_t* sum) {
    float max_abs = 0.0f;
    for (int64_t k = 0; k < cols; ++k) max_abs = std::max(max_abs, std::fabs(x[k]));
    const float a = 127.0f / std::max(max_abs, 1e-5f);
    int32_t total = 0;
    for (int64_t k = 0; k < cols; ++k) {
        // nearbyint rounds half to even, as torch.round does.
        const float q = std::nearbyint(x[k] * a);
        const int32_t v = static_cast<int32_t>(std::min(127.0f, std::max(-128.0f, q)));
        xq[k] = static_cast<int8_t>(v);
        total += v;
    }
    const int64_t padded = padded_cols(cols);
    if (padded > cols) std::memset(xq + cols, 0, static_cast<size_t>(padded - cols));
    *sum = total;
    return a;
}

void ternary_gemm_ref(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                      const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride) {
    const int64_t padded = padded_cols(w.cols);
    const int64_t row_bytes = padded / 4;
    for (int64_t r = row_begin; r < row_end; ++r) {
        const uint8_t* row = w.data + r * row_bytes;
        for (int64_t t = 0; t < tokens; ++t) {
            const int8_t* x = xq + t * padded;
            int32_t sum = 0;  // sum of code * xq, codes in {0, 1, 2}
            for (int64_t k = 0; k < padded; ++k) {
                const int64_t block = k / kTernaryBlock, i = k % kTernaryBlock;
                const uint8_t byte = row[block * kTernaryBlockBytes + i % kCodesPerLane];
                sum += ((byte >> code_shift(static_cast<int>(i))) & 3) * x[k];
            }
            acc[t * out_stride + r] = sum - xq_sums[t];
        }
    }
}

static float f16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    const uint32_t exponent = (h >> 10) & 0x1f;
    const uint32_t mantissa = h & 0x3ff;
    float magnitude;
    if (exponent == 0) {
        magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    } else if (exponent == 31) {
        magnitude = mantissa ? NAN : INFINITY;
    } else {
        magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), static_cast<int>(exponent) - 25);
    }
    uint32_t bits;
    std::memcpy(&bits, &magnitude, 4);
    bits |= sign;
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

static float bf16_to_f32(uint16_t b) {
    const uint32_t bits = static_cast<uint32_t>(b) << 16;
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

float load_scalar(const void* data, DType dtype, int64_t index) {
    switch (dtype) {
        case DType::F32: return static_cast<const float*>(data)[index];
        case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(data)[index]);
        case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(data)[index]);
    }
    return 0.0f;
}

void load_row(const void* data, DType dtype, int64_t row, int64_t cols, float* out) {
    for (int64_t k = 0; k < cols; ++k) out[k] = load_scalar(data, dtype, row * cols + k);
}

float dot_row(const void* data, DType dtype, int64_t row, const float* x, int64_t cols) {
    float sum = 0.0f;
    for (int64_t k = 0; k < cols; ++k) sum += load_scalar(data, dtype, row * cols + k) * x[k];
    return sum;
}

}  // namespace ternlm
