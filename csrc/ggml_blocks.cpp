#include "ggml_blocks.h"

#include <cstring>
#include <stdexcept>

#include "kernels.h"

namespace ternlm {

namespace {

constexpr int64_t kSuperBlock = 256;  // ggml's QK_K

float f16_at(const uint8_t* p) {  // block fields are not aligned
    uint16_t h;
    std::memcpy(&h, p, sizeof h);
    return f16_to_f32(h);
}

// The 4-bit low part of weight i (0..31) of a 32-weight block: byte i's low nibble, or byte
// i - 16's high nibble.
int low_nibble_of(const uint8_t* qs, int i) { return i < 16 ? qs[i] & 15 : qs[i - 16] >> 4; }

// The fifth bit of weight i of a Q5_0 / Q5_1 block: bit i of a little-endian 32-bit field.
int high_bit(const uint8_t* qh, int i) { return qh[i / 8] >> (i % 8) & 1; }

// Weights of the Q4_0 family: (q - offset) * d, or d * q + m where a block stores a minimum.
void small_block(BlockType type, const uint8_t* b, float* out) {
    const float d = f16_at(b);
    switch (type) {
        case BlockType::Q4_0:
            for (int i = 0; i < 32; ++i) out[i] = d * static_cast<float>(low_nibble_of(b + 2, i) - 8);
            break;
        case BlockType::Q4_1: {
            const float m = f16_at(b + 2);
            for (int i = 0; i < 32; ++i) out[i] = d * static_cast<float>(low_nibble_of(b + 4, i)) + m;
            break;
        }
        case BlockType::Q5_0: {
            for (int i = 0; i < 32; ++i)
                out[i] = d * static_cast<float>((low_nibble_of(b + 6, i) | high_bit(b + 2, i) << 4) - 16);
            break;
        }
        case BlockType::Q5_1: {
            const float m = f16_at(b + 2);
            for (int i = 0; i < 32; ++i)
                out[i] = d * static_cast<float>(low_nibble_of(b + 8, i) | high_bit(b + 4, i) << 4) + m;
            break;
        }
        case BlockType::Q8_0:
            for (int i = 0; i < 32; ++i) out[i] = static_cast<float>(static_cast<int8_t>(b[2 + i])) * d;
            break;
        default:
            throw std::logic_error("not a 32-weight block type");
    }
}

// The 6-bit scale and minimum of sub-block j (0..7) of a Q4_K / Q5_K block's 12 scale bytes.
void scale_and_min(const uint8_t* s, int j, int* scale, int* min) {
    if (j < 4) {
        *scale = s[j] & 63;
        *min = s[j + 4] & 63;
    } else {
        *scale = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4;
        *min = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
    }
}

// The K-quants: 256 weights in sub-blocks, each with its own integer scale times the block's f16.
// Weight i's bits are spread as ggml's dequantize_row_*_K reads them.
void super_block(BlockType type, const uint8_t* b, float* out) {
    switch (type) {
        case BlockType::Q2_K: {  // scales[16] (scale | min << 4), qs[64], d, dmin
            const uint8_t *scales = b, *qs = b + 16;
            const float d = f16_at(b + 80), dmin = f16_at(b + 82);
            for (int i = 0; i < 256; ++i) {
                const int q = qs[i / 128 * 32 + i % 32] >> (i % 128 / 32 * 2) & 3;
                const float dl = d * static_cast<float>(scales[i / 16] & 15);
                const float ml = dmin * static_cast<float>(scales[i / 16] >> 4);
                out[i] = dl * static_cast<float>(q) - ml;
            }
            break;
        }
        case BlockType::Q3_K: {  // hmask[32], qs[64], scales[12] (6-bit, offset 32), d
            const uint8_t *hmask = b, *qs = b + 32, *s = b + 96;
            const float d = f16_at(b + 108);
            for (int i = 0; i < 256; ++i) {
                const int g = i / 16;
                const int scale = ((s[g % 8] >> (g / 8 * 4) & 15) | (s[8 + g % 4] >> (g / 4 * 2) & 3) << 4) - 32;
                const int low = qs[i / 128 * 32 + i % 32] >> (i % 128 / 32 * 2) & 3;
                const int high_clear = (hmask[i % 32] >> (i / 32) & 1) ^ 1;  // a clear bit subtracts 4
                out[i] = d * static_cast<float>(scale) * static_cast<float>(low - (high_clear << 2));
            }
            break;
        }
        case BlockType::Q4_K:
        case BlockType::Q5_K: {  // d, dmin, scales[12], (Q5_K: qh[32]), qs[128]
            const bool five = type == BlockType::Q5_K;
            const float d = f16_at(b), dmin = f16_at(b + 2);
            const uint8_t *s = b + 4, *qh = b + 16, *qs = b + (five ? 48 : 16);
            for (int i = 0; i < 256; ++i) {
                int scale, min;
                scale_and_min(s, i / 32, &scale, &min);
                int q = qs[i / 64 * 32 + i % 32] >> (i % 64 / 32 * 4) & 15;
                if (five) q |= (qh[i % 32] >> (i / 32) & 1) << 4;
                out[i] = d * static_cast<float>(scale) * static_cast<float>(q) - dmin * static_cast<float>(min);
            }
            break;
        }
        case BlockType::Q6_K: {  // ql[128], qh[64], scales[16] (int8), d
            const uint8_t *ql = b, *qh = b + 128;
            const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
            const float d = f16_at(b + 208);
            for (int i = 0; i < 256; ++i) {
                const int low = ql[i / 128 * 64 + i % 64] >> (i % 128 / 64 * 4) & 15;
                const int high = qh[i / 128 * 32 + i % 32] >> (i % 128 / 32 * 2) & 3;
                out[i] = d * static_cast<float>(scales[i / 16]) * static_cast<float>((low | high << 4) - 32);
            }
            break;
        }
        default:
            throw std::logic_error("not a K-quant type");
    }
}

}  // namespace

BlockLayout block_layout(BlockType type) {
    switch (type) {
        case BlockType::Q4_0: return {32, 18};
        case BlockType::Q4_1: return {32, 20};
        case BlockType::Q5_0: return {32, 22};
        case BlockType::Q5_1: return {32, 24};
        case BlockType::Q8_0: return {32, 34};
        case BlockType::Q2_K: return {kSuperBlock, 84};
        case BlockType::Q3_K: return {kSuperBlock, 110};
        case BlockType::Q4_K: return {kSuperBlock, 144};
        case BlockType::Q5_K: return {kSuperBlock, 176};
        case BlockType::Q6_K: return {kSuperBlock, 210};
    }
    throw std::invalid_argument("unknown block type");
}

BlockType block_type_named(const std::string& name) {
    static const struct { const char* name; BlockType type; } names[] = {
        {"Q4_0", BlockType::Q4_0}, {"Q4_1", BlockType::Q4_1}, {"Q5_0", BlockType::Q5_0}, {"Q5_1", BlockType::Q5_1},
        {"Q8_0", BlockType::Q8_0}, {"Q2_K", BlockType::Q2_K}, {"Q3_K", BlockType::Q3_K}, {"Q4_K", BlockType::Q4_K},
        {"Q5_K", BlockType::Q5_K}, {"Q6_K", BlockType::Q6_K}};
    for (const auto& n : names)
        if (name == n.name) return n.type;
    throw std::invalid_argument("unsupported block type " + name);
}

int64_t block_row_bytes(BlockType type, int64_t cols) {
    const BlockLayout layout = block_layout(type);
    if (cols <= 0 || cols % layout.weights != 0)
        throw std::invalid_argument("a row of " + std::to_string(cols) + " weights is not whole blocks of " +
                                    std::to_string(layout.weights));
    return cols / layout.weights * layout.bytes;
}

void dequantize_row(BlockType type, const uint8_t* row, int64_t cols, float* out) {
    const BlockLayout layout = block_layout(type);
    for (int64_t k = 0; k < cols / layout.weights; ++k) {
        const uint8_t* block = row + k * layout.bytes;
        if (layout.weights == kSuperBlock)
            super_block(type, block, out + k * kSuperBlock);
        else
            small_block(type, block, out + k * layout.weights);
    }
}

}  // namespace ternlm
