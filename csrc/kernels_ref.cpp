// Scalar reference kernels: the definition of "correct" for every variant.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "tempering.h"

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

namespace {

// Rows of a ternary matrix stored in blocks of Block weights, Block / WeightsPerByte bytes each,
// that unpack_block(bytes, codes) turns into codes (0, 1, 2): each block is unpacked once and
// used for every token. xq rows are `padded` long.
template <int Block, int WeightsPerByte, typename UnpackBlock>
void codes_gemm(const uint8_t* data, int64_t padded, int64_t row_begin, int64_t row_end, const int8_t* xq,
                const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride, UnpackBlock unpack_block) {
    std::vector<int32_t> sums(static_cast<size_t>(tokens));
    for (int64_t r = row_begin; r < row_end; ++r) {
        const uint8_t* row = data + r * (padded / WeightsPerByte);
        std::fill(sums.begin(), sums.end(), 0);
        for (int64_t b = 0; b < padded / Block; ++b) {
            uint8_t codes[Block];
            unpack_block(row + b * (Block / WeightsPerByte), codes);
            for (int64_t t = 0; t < tokens; ++t) {
                const int8_t* x = xq + t * padded + b * Block;
                int32_t sum = 0;
                for (int i = 0; i < Block; ++i) sum += codes[i] * x[i];
                sums[t] += sum;
            }
        }
        // sum(code * x) - sum(x) = sum((code - 1) * x) = sum(w * x)
        for (int64_t t = 0; t < tokens; ++t) acc[t * out_stride + r] = sums[t] - xq_sums[t];
    }
}

}  // namespace

void ternary_gemm_ref(const TernaryView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                      const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride) {
    codes_gemm<kTernaryBlock, 4>(w.data, padded_cols(w.cols), row_begin, row_end, xq, xq_sums, tokens, acc, out_stride,
                                 unpack_ternary_block);
}

void trit_gemm_ref(const TritView& w, int64_t row_begin, int64_t row_end, const int8_t* xq,
                   const int32_t* xq_sums, int64_t tokens, int32_t* acc, int64_t out_stride) {
    codes_gemm<kTritBlock, 5>(w.data, trit_padded_cols(w.cols), row_begin, row_end, xq, xq_sums, tokens, acc, out_stride,
                              unpack_trit_block);
}

void trits_to_two_bit_ref(const uint8_t* trits, int64_t chunks, uint8_t* two_bit) {
    constexpr int kBlocksIn = kTritRowMultiple / kTritBlock, kBlocksOut = kTritRowMultiple / kTernaryBlock;
    uint8_t codes[kTritRowMultiple];
    for (int64_t c = 0; c < chunks; ++c) {
        for (int b = 0; b < kBlocksIn; ++b) unpack_trit_block(trits + b * kTritBlockBytes, codes + b * kTritBlock);
        for (int b = 0; b < kBlocksOut; ++b) pack_ternary_block(codes + b * kTernaryBlock, two_bit + b * kTernaryBlockBytes);
        trits += kBlocksIn * kTritBlockBytes;
        two_bit += kBlocksOut * kTernaryBlockBytes;
    }
}

float f16_to_f32(uint16_t h) {
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

void load_elements(const void* data, DType dtype, int64_t first, int64_t count, float* out) {
    switch (dtype) {
        case DType::F32:
            std::memcpy(out, static_cast<const float*>(data) + first, static_cast<size_t>(count) * 4);
            return;
        case DType::F16:
            for (int64_t k = 0; k < count; ++k) out[k] = f16_to_f32(static_cast<const uint16_t*>(data)[first + k]);
            return;
        case DType::BF16:
            for (int64_t k = 0; k < count; ++k) out[k] = bf16_to_f32(static_cast<const uint16_t*>(data)[first + k]);
            return;
    }
}

void dense_gemm_ref(const DenseMatrix& m, int64_t row_begin, int64_t row_end, const float* x,
                    int64_t tokens, float* out, int64_t out_stride) {
    std::vector<float> row(static_cast<size_t>(m.cols));
    for (int64_t r = row_begin; r < row_end; ++r) {
        load_elements(m.data, m.dtype, r * m.cols, m.cols, row.data());  // converted once, used for every token
        for (int64_t t = 0; t < tokens; ++t) {
            const float* xt = x + t * m.cols;
            float sum = 0.0f;
            for (int64_t k = 0; k < m.cols; ++k) sum += row[k] * xt[k];
            out[t * out_stride + r] = sum;
        }
    }
}

void int8_gemm_ref(const Int8RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq,
                   int64_t tokens, int32_t* acc, int64_t out_stride) {
    const int64_t padded = padded_cols(m.cols);
    for (int64_t r = row_begin; r < row_end; ++r) {
        const int8_t* row = m.q + r * padded;
        for (int64_t t = 0; t < tokens; ++t) {
            const int8_t* x = xq + t * padded;
            int32_t sum = 0;
            for (int64_t k = 0; k < padded; ++k) sum += row[k] * x[k];
            acc[t * out_stride + r] = sum;
        }
    }
}

float quantize_row_symmetric(const float* row, int64_t cols, int8_t* q) {
    float max_abs = 0.0f;
    for (int64_t k = 0; k < cols; ++k) max_abs = std::max(max_abs, std::fabs(row[k]));
    const float scale = max_abs / 127.0f;
    const float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
    for (int64_t k = 0; k < cols; ++k) q[k] = static_cast<int8_t>(std::nearbyint(row[k] * inverse));
    const int64_t padded = padded_cols(cols);
    if (padded > cols) std::memset(q + cols, 0, static_cast<size_t>(padded - cols));
    return scale;
}

uint16_t f32_to_f16(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    const uint32_t sign = (bits >> 16) & 0x8000;
    const uint32_t magnitude = bits & 0x7fffffff;
    if (magnitude >= 0x7f800000) return static_cast<uint16_t>(sign | 0x7c00 | (magnitude > 0x7f800000 ? 0x200 : 0));
    if (magnitude >= 0x477ff000) return static_cast<uint16_t>(sign | 0x7c00);  // rounds past 65504
    if (magnitude < 0x38800000) {  // f16 subnormal (or zero): round |x| * 2^24 to an integer
        float scaled;
        const uint32_t abs_bits = magnitude;
        std::memcpy(&scaled, &abs_bits, 4);
        return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled * 16777216.0f)));
    }
    // normal: drop 13 mantissa bits, rounding to nearest even (a carry into the exponent is right)
    const uint32_t rounded = magnitude + 0xfff + ((magnitude >> 13) & 1);
    return static_cast<uint16_t>(sign | ((rounded - 0x38000000) >> 13));
}

void f16_store_ref(const float* x, int64_t n, uint16_t* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = f32_to_f16(x[i]);
}

namespace {

float to_float(float x) { return x; }
float to_float(uint16_t h) { return f16_to_f32(h); }

template <typename Element>
void attention_ref(const float* q, int64_t heads, int64_t head_dim, const PagedRows<Element>& keys,
                   const PagedRows<Element>& values, int64_t count, float scale, float* scratch, float* out) {
    for (int64_t h = 0; h < heads; ++h) {
        const float* qh = q + h * head_dim;
        float* scores = scratch + h * count;
        float max_score = -INFINITY;
        for (int64_t j = 0; j < count; ++j) {
            float s = 0.0f;
            for (int64_t d = 0; d < head_dim; ++d) s += qh[d] * to_float(keys.row(j)[d]);
            scores[j] = s * scale;
            max_score = std::max(max_score, scores[j]);
        }
        float total = 0.0f;
        for (int64_t j = 0; j < count; ++j) total += (scores[j] = std::exp(scores[j] - max_score));
        float* oh = out + h * head_dim;
        std::fill(oh, oh + head_dim, 0.0f);
        for (int64_t j = 0; j < count; ++j) {
            const float p = scores[j] / total;
            for (int64_t d = 0; d < head_dim; ++d) oh[d] += p * to_float(values.row(j)[d]);
        }
    }
}

}  // namespace

void f16_attention_ref(const QueryRun& run, const PagedRows<uint16_t>& keys, const PagedRows<uint16_t>& values,
                       float scale, float* scratch) {
    each_query(run, [&](const float* q, float* out, int64_t count) {
        attention_ref(q, run.heads, run.head_dim, keys, values, count, scale, scratch, out);
    });
}

void f32_attention_ref(const QueryRun& run, const PagedRows<float>& keys, const PagedRows<float>& values, float scale,
                       float* scratch) {
    each_query(run, [&](const float* q, float* out, int64_t count) {
        attention_ref(q, run.heads, run.head_dim, keys, values, count, scale, scratch, out);
    });
}

void q4_gemm_ref(const Q4RowsView& m, int64_t row_begin, int64_t row_end, const int8_t* xq, int64_t tokens,
                 float* out, int64_t out_stride) {
    const int64_t padded = padded_cols(m.cols), groups = padded / kQ4Group;
    for (int64_t r = row_begin; r < row_end; ++r) {
        const uint8_t* row = m.q + r * padded / 2;
        const uint16_t* scales = m.scales + r * groups;
        for (int64_t t = 0; t < tokens; ++t) {
            const int8_t* x = xq + t * padded;
            float sum = 0.0f;
            for (int64_t g = 0; g < groups; ++g) {
                int32_t dot = 0;
                for (int j = 0; j < kQ4Group / 2; ++j) {
                    const uint8_t byte = row[g * kQ4Group / 2 + j];
                    dot += ((byte & 15) - 8) * x[g * kQ4Group + j] + ((byte >> 4) - 8) * x[g * kQ4Group + 16 + j];
                }
                sum += f16_to_f32(scales[g]) * static_cast<float>(dot);
            }
            out[t * out_stride + r] = sum;
        }
    }
}

void quantize_row_q4(const float* row, int64_t cols, uint8_t* q, uint16_t* scales) {
    const int64_t padded = padded_cols(cols);
    for (int64_t g = 0; g < padded / kQ4Group; ++g) {
        float extreme = 0.0f;
        for (int64_t k = g * kQ4Group; k < std::min<int64_t>(cols, (g + 1) * kQ4Group); ++k)
            if (std::fabs(row[k]) > std::fabs(extreme)) extreme = row[k];
        const float d = extreme / -8.0f, inverse = d != 0.0f ? 1.0f / d : 0.0f;
        scales[g] = f32_to_f16(d);
        for (int j = 0; j < kQ4Group / 2; ++j) {
            uint8_t nibbles[2];
            for (int half = 0; half < 2; ++half) {
                const int64_t k = g * kQ4Group + half * 16 + j;
                const float x = k < cols ? row[k] * inverse : 0.0f;  // within [-8, 8]
                nibbles[half] = static_cast<uint8_t>(std::min(15, static_cast<int>(x + 8.5f)));
            }
            q[g * kQ4Group / 2 + j] = static_cast<uint8_t>(nibbles[0] | (nibbles[1] << 4));
        }
    }
}

void temper_ref(const float* logits, int64_t n, float max, float inverse_temperature, float* distance, float* weight) {
    temper_row(logits, n, max, inverse_temperature, distance, weight);
}

}  // namespace ternlm
