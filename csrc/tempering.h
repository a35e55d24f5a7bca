// The sampler's tempering pass (kernels.h, TemperFn), written once in plain C++ and compiled by each
// variant's translation unit with its own ISA flags, where the loop vectorizes (std::exp would not
// without -ffast-math). Every step is an elementwise IEEE operation, none fused: variants agree bit
// for bit. Internal linkage: each translation unit keeps the copy its flags produced.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace ternlm {
namespace {

template <typename To, typename From>
inline To bits_as(From value) {
    static_assert(sizeof(To) == sizeof(From));
    To result;
    std::memcpy(&result, &value, sizeof result);
    return result;
}

// e^-d for d >= 0 within a few ulp (Cephes' expf), and 0 past d = 87 (a weight below 1e-38 of the
// largest one) or for d = +inf.
inline float exp_minus(float d) {
    const float x = std::max(-d, -87.0f);
    const float shifted = x * 1.44269504f + 12582912.0f;  // + 1.5 * 2^23 rounds x / ln 2 to an integer n
    const float n = shifted - 12582912.0f;
    const int32_t exponent = bits_as<int32_t>(shifted) - bits_as<int32_t>(12582912.0f);
    const float r = x - n * 0.693359375f - n * -2.12194440e-4f;  // x - n ln 2, ln 2 in two parts
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e_r = p * r * r + r + 1.0f;
    const float two_to_n = bits_as<float>((exponent + 127) << 23);
    return d > 87.0f ? 0.0f : e_r * two_to_n;
}

inline void temper_row(const float* __restrict logits, int64_t n, float max, float inverse_temperature,
                       float* __restrict distance, float* __restrict weight) {
    for (int64_t i = 0; i < n; ++i) {
        distance[i] = (max - logits[i]) * inverse_temperature;
        weight[i] = exp_minus(distance[i]);
    }
}

}  // namespace
}  // namespace ternlm
