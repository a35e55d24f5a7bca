// The BitNet b1.58 forward pass (docs/design.md §1, §3) over the runtime layouts, with a KV cache.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "formats.h"
#include "ggml_blocks.h"
#include "kernels.h"
#include "kv_cache.h"
#include "threads.h"

namespace ternlm {

struct ModelShape {
    int64_t vocab = 0, hidden = 0, intermediate = 0, layers = 0;
    int64_t heads = 0, kv_heads = 0, head_dim = 0;
    float rms_norm_eps = 1e-5f;
    bool relu2 = true;       // relu(x)^2; otherwise SiLU
    bool sub_norms = true;   // attn_sub_norm before o_proj, ffn_sub_norm before down_proj
    std::vector<float> rope_inv_freq;  // [head_dim / 2]
};

// A ternary matrix in a runtime layout (formats.h) with its per-tensor scale (mean|W|, multiplies).
struct TernaryMatrix {
    std::vector<uint8_t> bytes;
    int64_t rows = 0, cols = 0;
    float scale = 0.0f;
    TernaryLayout layout = TernaryLayout::TwoBit;

    // Room for rows x cols in `layout`, to be filled by pack_row.
    static TernaryMatrix allocate(int64_t rows, int64_t cols, float scale, TernaryLayout layout);
    // ternary: int8 values in {-1, 0, 1}, row-major [rows, cols].
    static TernaryMatrix from_ternary(const int8_t* ternary, int64_t rows, int64_t cols, float scale,
                                      TernaryLayout layout = TernaryLayout::TwoBit);
    // Stores row r from its codes (w + 1), activation_cols() of them (the padding codes are 1).
    void pack_row(int64_t r, const uint8_t* codes);
    // The width of the int8 activation rows this matrix multiplies: its padded row.
    int64_t activation_cols() const { return layout == TernaryLayout::Trits ? trit_padded_cols(cols) : padded_cols(cols); }
    int64_t row_bytes() const { return layout == TernaryLayout::Trits ? activation_cols() / 5 : activation_cols() / 4; }
    TernaryView view() const { return {bytes.data(), rows, cols}; }      // the 2-bit layout
    TritView trit_view() const { return {bytes.data(), rows, cols}; }  // the 1.6-bit layout
    bool empty() const { return bytes.empty(); }
};

// The head's format: the float matrix as given, int8 rows with a scale each, or 4-bit groups.
enum class HeadFormat : int { Dense = 0, Int8 = 1, Q4 = 2 };

// The embedding or an untied head as the file stores it: floats, or ggml blocks (Q4_0 ... Q6_K)
// decoded a row at a time. Exactly one of the two is set.
struct StoredMatrix {
    DenseMatrix dense;
    BlockMatrix blocks;

    bool empty() const { return !dense.data && !blocks.data; }
    int64_t rows() const { return dense.data ? dense.rows : blocks.rows; }
    int64_t cols() const { return dense.data ? dense.cols : blocks.cols; }
    int64_t row_bytes() const;
    const uint8_t* row(int64_t r) const { return static_cast<const uint8_t*>(dense.data ? dense.data : blocks.data) + r * row_bytes(); }
    // Row bytes (as stored: from row(), or read from the file) to float32 [cols].
    void decode(const uint8_t* row, float* out) const;
};

struct Layer {
    std::vector<float> input_layernorm, post_attention_layernorm, attn_sub_norm, ffn_sub_norm;
    TernaryMatrix q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;
};

// T tokens of one sequence at positions start_pos.., appended to its cache.
struct Segment {
    KVCache* cache;
    const int32_t* tokens;
    int64_t T, start_pos;
    bool logits = true;  // whether the step returns this sequence's logits (a prompt chunk that does not end it needs none)
};

class Model {
public:
    // Ternary weights are stored in `layout`, whatever the layout they are given in.
    Model(ModelShape shape, int threads, TernaryLayout layout = TernaryLayout::TwoBit);

    const ModelShape& shape() const { return shape_; }
    TernaryLayout ternary_layout() const { return layout_; }
    int threads() const { return pool_->size(); }
    void set_threads(int threads) { pool_ = std::make_unique<ThreadPool>(threads); }

    // Setters validate shapes and throw std::invalid_argument naming the tensor.
    void set_norm(int64_t layer, const std::string& name, const float* values, int64_t n);
    void set_linear(int64_t layer, const std::string& name, const int8_t* ternary, int64_t rows,
                    int64_t cols, float scale);
    // The same from bytes in the 2-bit runtime layout (formats.h; cols a multiple of 128), e.g.
    // an I2_S tensor: checked that no 2-bit code is 3, then copied or re-encoded in the model's layout.
    void set_linear_packed(int64_t layer, const std::string& name, const uint8_t* bytes, int64_t rows,
                           int64_t cols, float scale);
    // The same from GGUF's TQ1_0 or TQ2_0 blocks (ggml's: 256 weights and an f16 scale each, through
    // the tensor as one flat sequence), decoded straight into the model's layout. Every block holding a nonzero
    // weight must carry the same scale, which becomes the tensor's.
    void set_linear_tq(int64_t layer, const std::string& name, const uint8_t* blocks, int64_t nbytes, bool tq1_0,
                       int64_t rows, int64_t cols);
    void set_final_norm(const float* values, int64_t n);
    void set_embedding(StoredMatrix embedding);
    // Lookups read each embedding row from this open file (the model keeps its own duplicate of
    // `fd`; the embedding's bytes start at `offset`, stored as set_embedding's) instead of
    // through the memory mapping. A page fault on a mapped file brings in the whole large folio
    // around the row (256 KB measured on ext4), so a prompt of random tokens would add tens of MB
    // to RSS; a read adds nothing.
    void read_embedding_from(int fd, int64_t offset);
    void set_head(StoredMatrix head);  // untied output matrix; without it the head is the embedding
    // Converts rows [begin, end) of the stored head to `format` (callers go in chunks, so the stored
    // rows need not all be resident at once); the head takes that format once every row is done.
    // Q4_0 blocks become the q4 format as they are (the same nibbles and scales); anything else is
    // decoded to float32 and quantized. A head stored in blocks must be converted before use.
    void quantize_head(HeadFormat format, int64_t begin, int64_t end);
    int64_t head_bytes() const;       // bytes a decode step reads for the head
    void check_complete() const;      // throws naming the first missing tensor

    int64_t weight_bytes() const;

    // Runs tokens [T] at positions start_pos.. through the model, appending to the cache.
    // logits: [T, vocab] when all_logits, else [1, vocab] for the last token.
    void forward(KVCache& cache, const int32_t* tokens, int64_t T, int64_t start_pos,
                 float* logits, bool all_logits);
    // One step over several sequences at once: their tokens share every matrix multiplication
    // (the GEMM path), while each attends only to its own cache. Each segment's cache must be a
    // different one. logits: [sum of T, vocab] when all_logits, else [segments, vocab], the last
    // token of each segment.
    void forward(const std::vector<Segment>& segments, float* logits, bool all_logits);

private:
    struct Scratch;
    // One matrix of a linear step: out [T, w->rows] = (w x) * scales, added to out if accumulate.
    struct LinearOutput {
        const TernaryMatrix* w;
        float* out;
        bool accumulate;
    };
    // The matrices share one quantized input xq [T, padded_cols] (with its sums and scales).
    void linear(std::initializer_list<LinearOutput> outputs, const int8_t* xq, const int32_t* sums,
                const float* act_scale, int64_t T);
    // Rows of a batch: which cache each belongs to and its position there.
    struct RowPlace {
        KVCache* cache;
        int64_t pos;
    };
    void attention(const std::vector<RowPlace>& rows, int64_t layer, const float* q, float* out);
    // logits [rows, vocab] of the final hidden states in scratch.normed [rows, hidden].
    void head_logits(Scratch& scratch, int64_t rows, float* logits);
    void read_embedding_rows(const std::vector<int32_t>& tokens, float* x) const;
    Layer& layer_at(int64_t layer);
    std::vector<float>* norm_slot(Layer& layer, const std::string& name, int64_t* expected);
    TernaryMatrix* linear_slot(Layer& layer, const std::string& name, int64_t* rows, int64_t* cols);

    // The width of the quantized activation rows for matrices of `cols` columns.
    int64_t activation_cols(int64_t cols) const {
        return layout_ == TernaryLayout::Trits ? trit_padded_cols(cols) : padded_cols(cols);
    }
    // Fills `slot` row by row, on every thread: codes_of(r, codes) writes row r's codes.
    template <typename CodesOf>
    void pack_rows(TernaryMatrix* slot, int64_t rows, int64_t cols, float scale, const CodesOf& codes_of);

    ModelShape shape_;
    TernaryLayout layout_;
    std::vector<Layer> layers_;
    std::vector<float> final_norm_;
    StoredMatrix embedding_, head_;
    struct OwnedFile {  // a file descriptor closed with the model
        int fd = -1;
        OwnedFile() = default;
        OwnedFile(const OwnedFile&) = delete;
        OwnedFile& operator=(const OwnedFile&) = delete;
        ~OwnedFile();
    };
    OwnedFile embedding_file_;
    int64_t embedding_offset_ = 0;
    HeadFormat head_format_ = HeadFormat::Dense;
    std::vector<uint8_t> head_q_;          // int8: [vocab, padded_cols(hidden)]; q4: half that
    std::vector<float> head_scales_;       // int8: one per row
    std::vector<uint16_t> head_q4_scales_; // q4: one f16 per 32-weight group
    std::unique_ptr<ThreadPool> pool_;
};

}  // namespace ternlm
