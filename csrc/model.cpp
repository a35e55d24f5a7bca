#include "model.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include <unistd.h>

#include "dispatch.h"

namespace ternlm {

namespace {

// When many tokens meet the head (every position of a perplexity window, a step of many sequences),
// a block of rows stays in cache while every tile of tokens passes over it, so the head is read
// from memory once. Left to themselves, the kernels take every token for each row (or group of
// rows), and past a few tokens those activations no longer fit in cache. (256 positions of the
// 2B4T shape: 6-7 % faster.)
constexpr int64_t kHeadBlockBytes = 64 * 1024;
constexpr int64_t kHeadTokenTile = 8;

// Calls kernel(row_begin, row_end, first_token, tokens) over [begin, end) x [0, tokens).
template <typename Kernel>
void over_head_blocks(int64_t begin, int64_t end, int64_t tokens, int64_t row_bytes, const Kernel& kernel) {
    if (tokens <= kHeadTokenTile) return kernel(begin, end, int64_t{0}, tokens);
    const int64_t block = std::max<int64_t>(4, kHeadBlockBytes / row_bytes / 4 * 4);  // whole groups of the float kernel's 4 rows
    for (int64_t r0 = begin; r0 < end; r0 += block)
        for (int64_t t0 = 0; t0 < tokens; t0 += kHeadTokenTile)
            kernel(r0, std::min(end, r0 + block), t0, std::min(kHeadTokenTile, tokens - t0));
}

void rms_norm(const float* x, const float* weight, int64_t n, float eps, float* out) {
    double sum_sq = 0.0;
    for (int64_t i = 0; i < n; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(sum_sq / n) + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inv);
}

// rotate_half RoPE: pairs (j, j + head_dim/2) rotate by pos * inv_freq[j].
void apply_rope(float* head, int64_t head_dim, const float* cos_, const float* sin_) {
    const int64_t half = head_dim / 2;
    for (int64_t j = 0; j < half; ++j) {
        const float a = head[j], b = head[j + half];
        head[j] = a * cos_[j] - b * sin_[j];
        head[j + half] = b * cos_[j] + a * sin_[j];
    }
}

std::invalid_argument shape_error(const std::string& what) { return std::invalid_argument(what); }

// Checked before any buffer is sized from the shape.
const ModelShape& positive_dimensions(const ModelShape& s) {
    for (int64_t d : {s.vocab, s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim})
        if (d <= 0) throw shape_error("every model dimension must be positive");
    return s;
}

}  // namespace

TernaryMatrix TernaryMatrix::allocate(int64_t rows, int64_t cols, float scale, TernaryLayout layout) {
    TernaryMatrix m;
    m.rows = rows;
    m.cols = cols;
    m.scale = scale;
    m.layout = layout;
    m.bytes.resize(static_cast<size_t>(rows * m.row_bytes()));
    return m;
}

void TernaryMatrix::pack_row(int64_t r, const uint8_t* codes) {
    uint8_t* row = bytes.data() + r * row_bytes();
    if (layout == TernaryLayout::Trits) {
        for (int64_t b = 0; b < activation_cols() / kTritBlock; ++b)
            pack_trit_block(codes + b * kTritBlock, row + b * kTritBlockBytes);
    } else {
        for (int64_t b = 0; b < activation_cols() / kTernaryBlock; ++b)
            pack_ternary_block(codes + b * kTernaryBlock, row + b * kTernaryBlockBytes);
    }
}

// The codes (w + 1) of a row of int8 ternary weights, padded with 1 (weight 0); false if a
// weight is not -1, 0 or 1.
static bool codes_of_ternary(const int8_t* ternary, int64_t cols, std::vector<uint8_t>& codes) {
    uint8_t invalid = 0;
    for (int64_t k = 0; k < cols; ++k) {
        const uint8_t code = static_cast<uint8_t>(ternary[k] + 1);
        invalid |= code > 2;
        codes[k] = code;
    }
    return !invalid;
}

TernaryMatrix TernaryMatrix::from_ternary(const int8_t* ternary, int64_t rows, int64_t cols, float scale,
                                          TernaryLayout layout) {
    TernaryMatrix m = allocate(rows, cols, scale, layout);
    std::vector<uint8_t> codes(static_cast<size_t>(m.activation_cols()), 1);
    for (int64_t r = 0; r < rows; ++r) {
        if (!codes_of_ternary(ternary + r * cols, cols, codes)) throw shape_error("ternary weights must be -1, 0 or 1");
        m.pack_row(r, codes.data());
    }
    return m;
}

Model::Model(ModelShape shape, int threads, TernaryLayout layout)
    : shape_(positive_dimensions(shape)), layout_(layout), layers_(static_cast<size_t>(shape_.layers)),
      pool_(std::make_unique<ThreadPool>(threads)) {
    if (shape_.heads % shape_.kv_heads != 0) throw shape_error("heads must be a multiple of kv_heads");
    if (static_cast<int64_t>(shape_.rope_inv_freq.size()) != shape_.head_dim / 2)
        throw shape_error("rope_inv_freq must have head_dim / 2 entries");
    active_kernels();  // an impossible TERNLM_KERNELS fails here, at load, not inside a worker
}

Layer& Model::layer_at(int64_t layer) {
    if (layer < 0 || layer >= shape_.layers) throw shape_error("layer index out of range");
    return layers_[static_cast<size_t>(layer)];
}

std::vector<float>* Model::norm_slot(Layer& l, const std::string& name, int64_t* expected) {
    *expected = shape_.hidden;
    if (name == "input_layernorm") return &l.input_layernorm;
    if (name == "post_attention_layernorm") return &l.post_attention_layernorm;
    if (name == "attn_sub_norm") {
        *expected = shape_.heads * shape_.head_dim;
        return &l.attn_sub_norm;
    }
    if (name == "ffn_sub_norm") {
        *expected = shape_.intermediate;
        return &l.ffn_sub_norm;
    }
    throw shape_error("unknown norm " + name);
}

TernaryMatrix* Model::linear_slot(Layer& l, const std::string& name, int64_t* rows, int64_t* cols) {
    const int64_t q_width = shape_.heads * shape_.head_dim, kv_width = shape_.kv_heads * shape_.head_dim;
    struct Slot { const char* name; TernaryMatrix Layer::*member; int64_t rows, cols; };
    const Slot slots[] = {
        {"q_proj", &Layer::q_proj, q_width, shape_.hidden},
        {"k_proj", &Layer::k_proj, kv_width, shape_.hidden},
        {"v_proj", &Layer::v_proj, kv_width, shape_.hidden},
        {"o_proj", &Layer::o_proj, shape_.hidden, q_width},
        {"gate_proj", &Layer::gate_proj, shape_.intermediate, shape_.hidden},
        {"up_proj", &Layer::up_proj, shape_.intermediate, shape_.hidden},
        {"down_proj", &Layer::down_proj, shape_.hidden, shape_.intermediate},
    };
    for (const Slot& s : slots) {
        if (name == s.name) {
            *rows = s.rows;
            *cols = s.cols;
            return &(l.*(s.member));
        }
    }
    throw shape_error("unknown linear " + name);
}

void Model::set_norm(int64_t layer, const std::string& name, const float* values, int64_t n) {
    int64_t expected = 0;
    std::vector<float>* slot = norm_slot(layer_at(layer), name, &expected);
    if (n != expected)
        throw shape_error(name + " has " + std::to_string(n) + " values, expected " + std::to_string(expected));
    slot->assign(values, values + n);
}

template <typename CodesOf>
void Model::pack_rows(TernaryMatrix* slot, int64_t rows, int64_t cols, float scale, const CodesOf& codes_of) {
    *slot = TernaryMatrix::allocate(rows, cols, scale, layout_);
    pool_->parallel_for(rows, 64, [&](int64_t begin, int64_t end) {
        std::vector<uint8_t> codes(static_cast<size_t>(slot->activation_cols()), 1);
        for (int64_t r = begin; r < end; ++r) {
            codes_of(r, codes);
            slot->pack_row(r, codes.data());
        }
    });
}

void Model::set_linear(int64_t layer, const std::string& name, const int8_t* ternary, int64_t rows,
                       int64_t cols, float scale) {
    int64_t want_rows = 0, want_cols = 0;
    TernaryMatrix* slot = linear_slot(layer_at(layer), name, &want_rows, &want_cols);
    if (rows != want_rows || cols != want_cols)
        throw shape_error(name + " has shape [" + std::to_string(rows) + ", " + std::to_string(cols) +
                          "], expected [" + std::to_string(want_rows) + ", " + std::to_string(want_cols) + "]");
    if (!std::isfinite(scale)) throw shape_error(name + " has a non-finite weight scale");
    std::atomic<bool> invalid{false};
    pack_rows(slot, rows, cols, scale, [&](int64_t r, std::vector<uint8_t>& codes) {
        if (!codes_of_ternary(ternary + r * cols, cols, codes)) invalid = true;
    });
    if (invalid) {
        *slot = TernaryMatrix();
        throw shape_error("ternary weights must be -1, 0 or 1");
    }
}

void Model::set_linear_packed(int64_t layer, const std::string& name, const uint8_t* bytes, int64_t rows,
                              int64_t cols, float scale) {
    int64_t want_rows = 0, want_cols = 0;
    TernaryMatrix* slot = linear_slot(layer_at(layer), name, &want_rows, &want_cols);
    if (rows != want_rows || cols != want_cols || cols % kTernaryBlock != 0)
        throw shape_error(name + ": packed bytes need shape [" + std::to_string(want_rows) + ", " +
                          std::to_string(want_cols) + "] with a multiple of 128 columns");
    if (!std::isfinite(scale)) throw shape_error(name + " has a non-finite weight scale");
    const size_t n = static_cast<size_t>(rows * cols / 4);
    uint8_t code_three = 0;  // a 2-bit field 0b11 has both its bits set
    for (size_t i = 0; i < n; ++i) code_three |= bytes[i] & (bytes[i] >> 1) & 0x55;
    if (code_three) throw shape_error(name + " contains the invalid 2-bit code 3");
    if (layout_ == TernaryLayout::TwoBit) {
        *slot = TernaryMatrix::allocate(rows, cols, scale, layout_);
        slot->bytes.assign(bytes, bytes + n);
        return;
    }
    pack_rows(slot, rows, cols, scale, [&](int64_t r, std::vector<uint8_t>& codes) {
        const uint8_t* row = bytes + r * (cols / 4);
        for (int64_t b = 0; b < cols / kTernaryBlock; ++b)
            unpack_ternary_block(row + b * kTernaryBlockBytes, codes.data() + b * kTernaryBlock);
    });
}

namespace {

constexpr int kTqBlock = 256;

// The codes of one TQ2_0 block (64 bytes of 2-bit codes, then the scale): byte 32h + m holds
// weights 128h + 32k + m in bits 2k+1:2k. Returns false on the invalid code 3.
bool tq2_0_codes(const uint8_t* block, uint8_t* codes) {
    uint8_t code_three = 0;
    for (int h = 0; h < 2; ++h)
        for (int k = 0; k < 4; ++k)
            for (int m = 0; m < 32; ++m) {
                const uint8_t code = (block[32 * h + m] >> (2 * k)) & 3;
                code_three |= code == 3;
                codes[128 * h + 32 * k + m] = code;
            }
    return !code_three;
}

// The codes of one TQ1_0 block (48 + 4 bytes of base-3 digits, then the scale): digit k of byte m
// is weight 32k + m (bytes 0..31, five digits), 160 + 16k + m (bytes 32..47) and 240 + 4k + m
// (bytes 48..51, four digits). The digits decode as the 1.6-bit layout's (formats.h).
void tq1_0_codes(const uint8_t* block, uint8_t* codes) {
    struct Digits {  // every byte's five digits, decoded once: loading decodes two billion of them for 2B4T
        uint8_t of[256][kTritDigits];
        Digits() {
            for (int byte = 0; byte < 256; ++byte)
                for (int k = 0; k < kTritDigits; ++k) of[byte][k] = decode_trit(static_cast<uint8_t>(byte), k);
        }
    };
    static const Digits digits;
    for (int m = 0; m < 32; ++m)
        for (int k = 0; k < kTritDigits; ++k) codes[32 * k + m] = digits.of[block[m]][k];
    for (int m = 0; m < 16; ++m)
        for (int k = 0; k < kTritDigits; ++k) codes[160 + 16 * k + m] = digits.of[block[32 + m]][k];
    for (int m = 0; m < 4; ++m)
        for (int k = 0; k < 4; ++k) codes[240 + 4 * k + m] = digits.of[block[48 + m]][k];
}

// The one scale of a tensor's blocks: every block with a nonzero weight carries it.
class BlockScales {
public:
    void add(const uint8_t* codes, uint16_t scale) {
        if (scale == first_ || std::all_of(codes, codes + kTqBlock, [](uint8_t c) { return c == 1; })) return;
        if (first_ == kNone) first_ = scale;
        else other_ = scale;
    }
    void merge(const BlockScales& o) {
        for (uint32_t s : {o.first_, o.other_})
            if (s != kNone && s != first_) (first_ == kNone ? first_ : other_) = s;
    }
    // The tensor's scale (1 for an all-zero matrix: any scale gives the same zeros).
    float scale(const std::string& name) const {
        if (other_ != kNone)
            throw shape_error(name + " has different block scales (e.g. " + std::to_string(f16_to_f32(first_)) +
                              ", " + std::to_string(f16_to_f32(other_)) + "); a BitNet weight has one scale per tensor");
        return first_ == kNone ? 1.0f : f16_to_f32(first_);
    }

private:
    static constexpr uint32_t kNone = 0x10000;  // no f16 has these bits
    uint32_t first_ = kNone, other_ = kNone;
};

}  // namespace

void Model::set_linear_tq(int64_t layer, const std::string& name, const uint8_t* blocks, int64_t nbytes, bool tq1_0,
                          int64_t rows, int64_t cols) {
    int64_t want_rows = 0, want_cols = 0;
    TernaryMatrix* slot = linear_slot(layer_at(layer), name, &want_rows, &want_cols);
    const int64_t block_bytes = tq1_0 ? 54 : 66;
    if (rows != want_rows || cols != want_cols || rows * cols % kTqBlock != 0 ||
        nbytes != rows * cols / kTqBlock * block_bytes)
        throw shape_error(name + ": TQ blocks need shape [" + std::to_string(want_rows) + ", " + std::to_string(want_cols) +
                          "] in whole blocks of 256 weights, " + std::to_string(block_bytes) + " bytes each");
    std::mutex merging;
    BlockScales scales;
    std::atomic<bool> code_three{false};
    // Blocks run through the tensor as one flat sequence, so a block may hold the end of one row
    // and the start of the next; the row holding a block's first weight checks its scale.
    pack_rows(slot, rows, cols, 0.0f, [&](int64_t r, std::vector<uint8_t>& codes) {
        BlockScales row_scales;
        uint8_t partial[kTqBlock];
        const int64_t first = r * cols, end = first + cols;
        for (int64_t b = first / kTqBlock; b * kTqBlock < end; ++b) {
            const int64_t start = b * kTqBlock;
            const bool whole = start >= first && start + kTqBlock <= end;
            uint8_t* block_codes = whole ? codes.data() + (start - first) : partial;
            const uint8_t* block = blocks + b * block_bytes;
            if (tq1_0) tq1_0_codes(block, block_codes);
            else if (!tq2_0_codes(block, block_codes)) code_three = true;
            if (start >= first) {
                uint16_t scale;
                std::memcpy(&scale, block + block_bytes - 2, 2);
                row_scales.add(block_codes, scale);
            }
            if (!whole) {
                const int64_t from = std::max(first, start), to = std::min(end, start + kTqBlock);
                std::memcpy(codes.data() + (from - first), partial + (from - start), static_cast<size_t>(to - from));
            }
        }
        const std::lock_guard<std::mutex> lock(merging);
        scales.merge(row_scales);
    });
    try {
        if (code_three) throw shape_error(name + " contains the invalid 2-bit code 3");
        slot->scale = scales.scale(name);
        if (!(std::isfinite(slot->scale) && slot->scale > 0))
            throw shape_error(name + " has the scale " + std::to_string(slot->scale) + ", not a positive number");
    } catch (...) {
        *slot = TernaryMatrix();
        throw;
    }
}

void Model::set_final_norm(const float* values, int64_t n) {
    if (n != shape_.hidden) throw shape_error("final norm has the wrong length");
    final_norm_.assign(values, values + n);
}

int64_t StoredMatrix::row_bytes() const {
    return dense.data ? dense.cols * dtype_bytes(dense.dtype) : block_row_bytes(blocks.type, blocks.cols);
}

void StoredMatrix::decode(const uint8_t* row, float* out) const {
    if (dense.data)
        load_elements(row, dense.dtype, 0, dense.cols, out);
    else
        dequantize_row(blocks.type, row, blocks.cols, out);
}

// Checks a matrix for set_embedding / set_head: [vocab, hidden], one storage, whole blocks.
static StoredMatrix checked(const StoredMatrix& m, const ModelShape& s, const std::string& what) {
    if (m.dense.data && m.blocks.data) throw shape_error(what + " must be floats or blocks, not both");
    if (m.empty() || m.rows() != s.vocab || m.cols() != s.hidden)
        throw shape_error(what + " must be [vocab_size, hidden_size]");
    m.row_bytes();  // throws unless the rows are whole blocks
    return m;
}

void Model::set_embedding(StoredMatrix embedding) { embedding_ = checked(embedding, shape_, "embedding"); }

Model::OwnedFile::~OwnedFile() {
    if (fd >= 0) close(fd);
}

void Model::read_embedding_from(int fd, int64_t offset) {
    static_assert(sizeof(off_t) == 8, "file offsets must be 64-bit");
    if (embedding_.empty()) throw shape_error("set the embedding before reading it from a file");
    if (offset < 0) throw std::invalid_argument("embedding file: negative offset");
    const int own = dup(fd);
    if (own < 0) throw std::invalid_argument(std::string("embedding file: ") + std::strerror(errno));
    if (embedding_file_.fd >= 0) close(embedding_file_.fd);
    embedding_file_.fd = own;
    embedding_offset_ = offset;
}

// In the calling thread, so that a failed read can throw (the pool's workers cannot).
void Model::read_embedding_rows(const std::vector<int32_t>& tokens, float* x) const {
    const int64_t H = shape_.hidden;
    const int64_t row_bytes = embedding_.row_bytes();
    std::vector<uint8_t> row(static_cast<size_t>(row_bytes));
    for (size_t t = 0; t < tokens.size(); ++t) {
        const int64_t start = embedding_offset_ + int64_t{tokens[t]} * row_bytes;
        int64_t done = 0;
        while (done < row_bytes) {
            const ssize_t n = pread(embedding_file_.fd, row.data() + done, static_cast<size_t>(row_bytes - done),
                                    static_cast<off_t>(start + done));
            const int error = errno;
            if (n < 0 && error == EINTR) continue;
            if (n <= 0)
                throw std::runtime_error("reading the embedding row of token " + std::to_string(tokens[t]) + " from "
                                         "the model file failed: " + (n < 0 ? std::strerror(error) : "the file is "
                                         "shorter than when it was loaded"));
            done += n;
        }
        embedding_.decode(row.data(), x + static_cast<int64_t>(t) * H);
    }
}

void Model::set_head(StoredMatrix head) { head_ = checked(head, shape_, "lm_head"); }

void Model::quantize_head(HeadFormat format, int64_t begin, int64_t end) {
    const StoredMatrix& head = head_.empty() ? embedding_ : head_;
    if (head.empty()) throw shape_error("set the embedding before quantizing the head");
    if (format == HeadFormat::Dense) throw shape_error("quantize_head needs int8 or q4");
    if (begin < 0 || end > shape_.vocab || begin >= end) throw shape_error("head rows out of range");
    const int64_t H = shape_.hidden, padded = padded_cols(H);
    const int64_t row_bytes = format == HeadFormat::Int8 ? padded : padded / 2;
    const int64_t row_scales = padded / kQ4Group;
    if (begin == 0) {
        head_q_.assign(static_cast<size_t>(shape_.vocab * row_bytes), 0);
        head_scales_.assign(format == HeadFormat::Int8 ? static_cast<size_t>(shape_.vocab) : 0, 0.0f);
        head_q4_scales_.assign(format == HeadFormat::Q4 ? static_cast<size_t>(shape_.vocab * row_scales) : 0, 0);
    }
    // A Q4_0 block is an f16 scale then the q4 format's 16 bytes of nibbles.
    const bool q4_as_stored = format == HeadFormat::Q4 && head.blocks.data && head.blocks.type == BlockType::Q4_0;
    pool_->parallel_for(end - begin, 256, [&](int64_t first, int64_t last) {
        std::vector<float> row(static_cast<size_t>(H));
        for (int64_t r = begin + first; r < begin + last; ++r) {
            if (q4_as_stored) {
                const uint8_t* block = head.row(r);
                for (int64_t g = 0; g < H / kQ4Group; ++g, block += 2 + kQ4Group / 2) {
                    std::memcpy(&head_q4_scales_[r * row_scales + g], block, 2);
                    std::memcpy(&head_q_[r * row_bytes + g * kQ4Group / 2], block + 2, kQ4Group / 2);
                }
                continue;
            }
            head.decode(head.row(r), row.data());
            if (format == HeadFormat::Int8)
                head_scales_[r] = quantize_row_symmetric(row.data(), H, reinterpret_cast<int8_t*>(&head_q_[r * row_bytes]));
            else
                quantize_row_q4(row.data(), H, &head_q_[r * row_bytes], &head_q4_scales_[r * row_scales]);
        }
    });
    if (end == shape_.vocab) head_format_ = format;
}

int64_t Model::head_bytes() const {
    if (head_format_ != HeadFormat::Dense)
        return static_cast<int64_t>(head_q_.size() + 4 * head_scales_.size() + 2 * head_q4_scales_.size());
    const StoredMatrix& head = head_.empty() ? embedding_ : head_;
    return head.rows() * head.row_bytes();
}

void Model::check_complete() const {
    if (embedding_.empty()) throw shape_error("missing embed_tokens");
    if (head_format_ == HeadFormat::Dense && (head_.empty() ? embedding_ : head_).blocks.data)
        throw shape_error("a head stored in quantized blocks must be converted to int8 or q4");
    if (final_norm_.empty()) throw shape_error("missing final norm");
    for (int64_t i = 0; i < shape_.layers; ++i) {
        const Layer& l = layers_[static_cast<size_t>(i)];
        const std::string at = " in layer " + std::to_string(i);
        if (l.input_layernorm.empty() || l.post_attention_layernorm.empty())
            throw shape_error("missing layer norm" + at);
        if (shape_.sub_norms && (l.attn_sub_norm.empty() || l.ffn_sub_norm.empty()))
            throw shape_error("missing sub-norm" + at);
        for (const TernaryMatrix* m : {&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj,
                                       &l.up_proj, &l.down_proj})
            if (m->empty()) throw shape_error("missing projection weight" + at);
    }
}

int64_t Model::weight_bytes() const {
    int64_t total = 0;
    for (const Layer& l : layers_)
        for (const TernaryMatrix* m : {&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj,
                                       &l.up_proj, &l.down_proj})
            total += static_cast<int64_t>(m->bytes.size());
    return total;
}

// Per-call activation buffers, sized for T tokens.
struct Model::Scratch {
    Scratch(const ModelShape& s, int64_t T)
        : x(T * s.hidden), normed(T * std::max(s.hidden, s.heads * s.head_dim)),
          q(T * s.heads * s.head_dim), k(T * s.kv_heads * s.head_dim), v(T * s.kv_heads * s.head_dim),
          attn(T * s.heads * s.head_dim), gate(T * s.intermediate), up(T * s.intermediate),
          xq(T * trit_padded_cols(std::max({s.hidden, s.intermediate, s.heads * s.head_dim}))),
          act_scale(T), xq_sums(T) {}
    std::vector<float> x, normed, q, k, v, attn, gate, up;
    std::vector<int8_t> xq;
    std::vector<float> act_scale;
    std::vector<int32_t> xq_sums;

    // Quantizes T rows of width cols (optionally RMS-normalised first) into xq / act_scale / xq_sums,
    // rows `padded` apart and zero beyond cols.
    void quantize(ThreadPool& pool, const float* rows, int64_t T, int64_t cols, int64_t padded, const float* norm_weight,
                  float eps) {
        pool.parallel_for(T, 1, [&](int64_t begin, int64_t end) {
            std::vector<float> normed(static_cast<size_t>(norm_weight ? cols : 0));
            for (int64_t t = begin; t < end; ++t) {
                const float* src = rows + t * cols;
                if (norm_weight) {
                    rms_norm(src, norm_weight, cols, eps, normed.data());
                    src = normed.data();
                }
                int8_t* row = xq.data() + t * padded;
                act_scale[t] = active_kernels().quantize_row(src, cols, row, &xq_sums[t]);
                std::fill(row + padded_cols(cols), row + padded, int8_t{0});
            }
        });
    }
};

// Tokens from which a 1.6-bit matrix is unpacked, a tile of rows at a time, to the 2-bit layout
// and multiplied there: the unpacking is then shared by every token, while the 2-bit GEMM's tiles
// do more products per instruction than decoding base-3 digits allows. (AMX's trit_gemm takes the
// 1.6-bit bytes into its tiles as they are, whatever the token count: gemms_tile_themselves.)
constexpr int64_t kTritUnpackTokens = 4;
constexpr int64_t kTritTileRows = 64;  // 110 KB of 2-bit codes at 2B4T's widest rows: stays in L2

// products [T, n] = rows [first, first + n) of w times the T activation rows xq.
static void multiply_rows(const TernaryMatrix& w, int64_t first, int64_t n, const int8_t* xq, const int32_t* sums,
                          int64_t T, int32_t* products) {
    const KernelSet& kernels = active_kernels();
    const uint8_t* rows = w.bytes.data() + first * w.row_bytes();
    if (w.layout == TernaryLayout::TwoBit) return kernels.ternary_gemm({rows, n, w.cols}, 0, n, xq, sums, T, products, n);
    if (T < kTritUnpackTokens || kernels.gemms_tile_themselves)
        return kernels.trit_gemm({rows, n, w.cols}, 0, n, xq, sums, T, products, n);
    const int64_t width = w.activation_cols();
    std::vector<uint8_t> tile(static_cast<size_t>(std::min(n, kTritTileRows) * width / 4));
    for (int64_t r0 = 0; r0 < n; r0 += kTritTileRows) {
        const int64_t m = std::min(n - r0, kTritTileRows);
        kernels.trits_to_two_bit(rows + r0 * w.row_bytes(), m * width / kTritRowMultiple, tile.data());
        kernels.ternary_gemm({tile.data(), m, width}, 0, m, xq, sums, T, products + r0, n);
    }
}

void Model::linear(std::initializer_list<LinearOutput> outputs, const int8_t* xq, const int32_t* sums,
                   const float* act_scale, int64_t T) {
    // All matrices that read the same quantized input are one job: their rows are split across
    // the threads together, which saves a synchronisation per matrix.
    int64_t total_rows = 0;
    for (const LinearOutput& o : outputs) total_rows += o.w->rows;
    pool_->parallel_for(total_rows, 8, [&](int64_t begin, int64_t end) {
        // Integer sums for this range of rows only: [T, rows of the range], every entry written.
        const std::unique_ptr<int32_t[]> products(new int32_t[static_cast<size_t>(T * (end - begin))]);
        int64_t first_row = 0;  // of the current matrix, in the joint row space
        for (const LinearOutput& o : outputs) {
            const TernaryMatrix& w = *o.w;
            const int64_t lo = std::max(begin, first_row) - first_row;
            const int64_t hi = std::min(end, first_row + w.rows) - first_row, n = hi - lo;
            first_row += w.rows;
            if (n <= 0) continue;
            multiply_rows(w, lo, n, xq, sums, T, products.get());
            for (int64_t t = 0; t < T; ++t) {
                const float scale = w.scale / act_scale[t];
                const int32_t* sums_t = products.get() + t * n;
                float* out = o.out + t * w.rows + lo;
                if (o.accumulate) {
                    for (int64_t r = 0; r < n; ++r) out[r] += static_cast<float>(sums_t[r]) * scale;
                } else {
                    for (int64_t r = 0; r < n; ++r) out[r] = static_cast<float>(sums_t[r]) * scale;
                }
            }
        }
    });
}

void Model::attention(const std::vector<RowPlace>& rows, int64_t layer, const float* q, float* out) {
    const int64_t hd = shape_.head_dim, group = shape_.heads / shape_.kv_heads;
    const int64_t q_width = shape_.heads * hd, kv_width = shape_.kv_heads * hd;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const F16AttentionFn f16_attention = active_kernels().f16_attention;
    // Rows of one sequence are consecutive positions: they go to the kernel together, up to
    // kQueriesPerRun at a time, so that a multi-query kernel (AVX-512) converts each key once for all
    // of them.
    constexpr int64_t kQueriesPerRun = 32;
    struct Run {
        int64_t first_row, queries;
    };
    std::vector<Run> runs;
    const int64_t N = static_cast<int64_t>(rows.size());
    for (int64_t n = 0; n < N;) {
        int64_t end = n + 1;
        while (end < N && end - n < kQueriesPerRun && rows[end].cache == rows[n].cache && rows[end].pos == rows[end - 1].pos + 1)
            ++end;
        runs.push_back({n, end - n});
        n = end;
    }
    const int64_t R = static_cast<int64_t>(runs.size());
    // A job is a run's query heads that share a KV head, so each cached key and value is read (and
    // converted from f16) once for all of them; only a step with fewer such jobs than threads splits
    // them by head. (Measured on the Xeon, 2B4T, decode at 2048 positions, 2 threads: its 5 jobs
    // 21.0 t/s against 17.1 for 20 jobs of one head; the AVX2 kernels 17.3 against 14.4.)
    const int64_t heads_per_job = R * shape_.kv_heads >= pool_->size() ? group : 1;
    const int64_t jobs_per_run = shape_.heads / heads_per_job;
    pool_->parallel_for(R * jobs_per_run, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch;
        std::vector<const uint16_t*> f16_keys, f16_values;
        std::vector<const float*> f32_keys, f32_values;
        for (int64_t job = begin; job < end; ++job) {
            // Later runs of a prompt attend to more positions: they go first, so that the threads
            // that claim the last, short jobs finish together.
            const Run& r = runs[static_cast<size_t>(R - 1 - job / jobs_per_run)];
            const int64_t h = job % jobs_per_run * heads_per_job;
            const RowPlace& first = rows[static_cast<size_t>(r.first_row)];
            const QueryRun run{q + r.first_row * q_width + h * hd, out + r.first_row * q_width + h * hd, r.queries,
                               q_width, heads_per_job, hd, first.pos + 1};
            const int64_t kv_offset = (h / group) * hd;
            scratch.resize(std::max(scratch.size(), static_cast<size_t>(attention_scratch_floats(run))));
            if (first.cache->f16()) {
                first.cache->block_rows(layer, kv_offset, false, f16_keys);
                first.cache->block_rows(layer, kv_offset, true, f16_values);
                f16_attention(run, {f16_keys.data(), kKVLog2Block, kv_width}, {f16_values.data(), kKVLog2Block, kv_width},
                              scale, scratch.data());
            } else {
                first.cache->block_rows(layer, kv_offset, false, f32_keys);
                first.cache->block_rows(layer, kv_offset, true, f32_values);
                f32_attention_ref(run, {f32_keys.data(), kKVLog2Block, kv_width}, {f32_values.data(), kKVLog2Block, kv_width},
                                  scale, scratch.data());
            }
        }
    });
}

void Model::forward(KVCache& cache, const int32_t* tokens, int64_t T, int64_t start_pos,
                    float* logits, bool all_logits) {
    forward({Segment{&cache, tokens, T, start_pos}}, logits, all_logits);
}

void Model::forward(const std::vector<Segment>& segments, float* logits, bool all_logits) {
    const ModelShape& s = shape_;
    if (segments.empty()) throw shape_error("forward needs at least one sequence");
    std::vector<RowPlace> places;
    std::vector<int32_t> tokens;
    for (const Segment& seg : segments) {
        if (seg.T <= 0) throw shape_error("forward needs at least one token per sequence");
        if (!seg.cache->fits(s)) throw shape_error("the KV cache was made for a different model shape");
        if (seg.start_pos < 0 || seg.start_pos + seg.T > seg.cache->n_ctx())
            throw shape_error("sequence of " + std::to_string(seg.start_pos + seg.T) +
                              " tokens exceeds the context of " + std::to_string(seg.cache->n_ctx()));
        for (const Segment& other : segments)
            if (&other != &seg && other.cache == seg.cache)
                throw shape_error("two sequences of one batch share a KV cache");
        for (int64_t t = 0; t < seg.T; ++t) {
            if (seg.tokens[t] < 0 || seg.tokens[t] >= s.vocab)
                throw shape_error("token id " + std::to_string(seg.tokens[t]) + " is outside the vocabulary");
            places.push_back({seg.cache, seg.start_pos + t});
            tokens.push_back(seg.tokens[t]);
        }
    }
    for (const Segment& seg : segments) seg.cache->prepare(seg.start_pos, seg.start_pos + seg.T);
    const int64_t T = static_cast<int64_t>(tokens.size());  // rows of the batch, all sequences together

    const int64_t H = s.hidden, I = s.intermediate, hd = s.head_dim;
    const int64_t q_width = s.heads * hd, kv_width = s.kv_heads * hd;
    Scratch b(s, T);
    ThreadPool& pool = *pool_;
    // The steps between matrix products are per token: in parallel over tokens when there are several.
    const auto for_each_token = [&](const std::function<void(int64_t)>& step) {
        pool.parallel_for(T, 1, [&](int64_t begin, int64_t end) {
            for (int64_t t = begin; t < end; ++t) step(t);
        });
    };
    if (embedding_file_.fd >= 0)
        read_embedding_rows(tokens, b.x.data());
    else
        for_each_token([&](int64_t t) { embedding_.decode(embedding_.row(tokens[t]), &b.x[t * H]); });

    std::vector<float> cos_(static_cast<size_t>(T * hd / 2)), sin_(static_cast<size_t>(T * hd / 2));
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < hd / 2; ++j) {
            const float angle = static_cast<float>(places[t].pos) * s.rope_inv_freq[j];
            cos_[t * hd / 2 + j] = std::cos(angle);
            sin_[t * hd / 2 + j] = std::sin(angle);
        }

    for (int64_t li = 0; li < s.layers; ++li) {
        Layer& l = layers_[static_cast<size_t>(li)];
        // Attention block: one quantized input shared by q, k and v.
        b.quantize(pool, b.x.data(), T, H, activation_cols(H), l.input_layernorm.data(), s.rms_norm_eps);
        linear({{&l.q_proj, b.q.data(), false}, {&l.k_proj, b.k.data(), false}, {&l.v_proj, b.v.data(), false}},
               b.xq.data(), b.xq_sums.data(), b.act_scale.data(), T);
        for_each_token([&](int64_t t) {
            for (int64_t h = 0; h < s.heads; ++h)
                apply_rope(&b.q[t * q_width + h * hd], hd, &cos_[t * hd / 2], &sin_[t * hd / 2]);
            for (int64_t h = 0; h < s.kv_heads; ++h)
                apply_rope(&b.k[t * kv_width + h * hd], hd, &cos_[t * hd / 2], &sin_[t * hd / 2]);
            places[t].cache->store(li, places[t].pos, &b.k[t * kv_width], &b.v[t * kv_width], active_kernels().f16_store);
        });
        attention(places, li, b.q.data(), b.attn.data());
        b.quantize(pool, b.attn.data(), T, q_width, activation_cols(q_width), s.sub_norms ? l.attn_sub_norm.data() : nullptr, s.rms_norm_eps);
        linear({{&l.o_proj, b.x.data(), true}}, b.xq.data(), b.xq_sums.data(), b.act_scale.data(), T);

        // Feed-forward block: one quantized input shared by gate and up.
        b.quantize(pool, b.x.data(), T, H, activation_cols(H), l.post_attention_layernorm.data(), s.rms_norm_eps);
        linear({{&l.gate_proj, b.gate.data(), false}, {&l.up_proj, b.up.data(), false}},
               b.xq.data(), b.xq_sums.data(), b.act_scale.data(), T);
        for_each_token([&](int64_t t) {
            float* gate = b.gate.data() + t * I;
            const float* up = b.up.data() + t * I;
            if (s.relu2) {
                for (int64_t i = 0; i < I; ++i) {
                    const float positive = gate[i] > 0.0f ? gate[i] : 0.0f;
                    gate[i] = positive * positive * up[i];
                }
            } else {
                for (int64_t i = 0; i < I; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
            }
        });
        b.quantize(pool, b.gate.data(), T, I, activation_cols(I), s.sub_norms ? l.ffn_sub_norm.data() : nullptr, s.rms_norm_eps);
        linear({{&l.down_proj, b.x.data(), true}}, b.xq.data(), b.xq_sums.data(), b.act_scale.data(), T);
    }

    // Final norm and head, for every token or only the last of each sequence.
    std::vector<int64_t> outputs;
    int64_t end = 0;
    for (const Segment& seg : segments) {
        if (seg.logits)
            for (int64_t t = all_logits ? 0 : seg.T - 1; t < seg.T; ++t) outputs.push_back(end + t);
        end += seg.T;
    }
    const int64_t rows = static_cast<int64_t>(outputs.size());
    if (rows == 0) return;
    for (int64_t t = 0; t < rows; ++t)
        rms_norm(&b.x[outputs[t] * H], final_norm_.data(), H, s.rms_norm_eps, &b.normed[t * H]);
    head_logits(b, rows, logits);
}

// One pass over the head's rows, whatever its format: each thread takes a range of rows and meets
// every output token with them (over_head_blocks), then scales its own logits.
void Model::head_logits(Scratch& b, int64_t rows, float* logits) {
    const ModelShape& s = shape_;
    const int64_t H = s.hidden, V = s.vocab, padded = padded_cols(H);
    const KernelSet& kernels = active_kernels();
    const bool quantized = head_format_ != HeadFormat::Dense;
    if (quantized)  // quantized heads meet the final hidden state quantized like a BitLinear input
        for (int64_t t = 0; t < rows; ++t)
            b.act_scale[t] = kernels.quantize_row(&b.normed[t * H], H, b.xq.data() + t * padded, &b.xq_sums[t]);
    const DenseMatrix& dense = (head_.empty() ? embedding_ : head_).dense;
    const Int8RowsView int8{reinterpret_cast<const int8_t*>(head_q_.data()), V, H};
    const Q4RowsView q4{head_q_.data(), head_q4_scales_.data(), V, H};
    const int64_t row_bytes = head_format_ == HeadFormat::Int8 ? padded
                              : head_format_ == HeadFormat::Q4 ? padded / 2
                                                               : H * dtype_bytes(dense.dtype);
    std::vector<int32_t> sums(head_format_ == HeadFormat::Int8 ? static_cast<size_t>(rows * V) : 0);
    pool_->parallel_for(V, quantized ? 256 : 64, [&](int64_t begin, int64_t end) {
        const auto multiply = [&](int64_t r0, int64_t r1, int64_t t0, int64_t n) {
            if (head_format_ == HeadFormat::Int8)
                kernels.int8_gemm(int8, r0, r1, b.xq.data() + t0 * padded, n, sums.data() + t0 * V, V);
            else if (head_format_ == HeadFormat::Q4)
                kernels.q4_gemm(q4, r0, r1, b.xq.data() + t0 * padded, n, logits + t0 * V, V);
            else
                kernels.dense_gemm(dense, r0, r1, b.normed.data() + t0 * H, n, logits + t0 * V, V);
        };
        if (kernels.gemms_tile_themselves && head_format_ == HeadFormat::Int8)
            multiply(begin, end, 0, rows);
        else
            over_head_blocks(begin, end, rows, row_bytes, multiply);
        for (int64_t t = 0; quantized && t < rows; ++t)
            for (int64_t r = begin; r < end; ++r) {
                float& logit = logits[t * V + r];
                logit = head_format_ == HeadFormat::Int8 ? static_cast<float>(sums[t * V + r]) * (head_scales_[r] / b.act_scale[t])
                                                         : logit / b.act_scale[t];
            }
    });
}

}  // namespace ternlm
