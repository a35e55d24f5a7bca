// ggml's quantized block types, as GGUF files store embeddings and output matrices (llama.cpp's
// Q4_0 ... Q6_K), decoded a row at a time: a lookup needs only the rows of its tokens, and a head
// conversion a chunk of rows, never the whole matrix in floats.
#pragma once
#include <cstdint>
#include <string>

namespace ternlm {

// Values are ggml's type ids.
enum class BlockType : int { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12,
                             Q5_K = 13, Q6_K = 14 };

struct BlockLayout {
    int64_t weights, bytes;  // per block
};

BlockLayout block_layout(BlockType type);
// The type named as ggml names it ("Q4_0", "Q6_K", ...); throws std::invalid_argument otherwise.
BlockType block_type_named(const std::string& name);

// Bytes of a row of `cols` weights; throws std::invalid_argument unless cols is whole blocks.
int64_t block_row_bytes(BlockType type, int64_t cols);

// Decodes a row of `cols` weights (whole blocks) to float32 with ggml's arithmetic, in its order
// of float operations: the same floats as gguf-py's dequantize and llama.cpp's dequantize_row_*.
void dequantize_row(BlockType type, const uint8_t* row, int64_t cols, float* out);

// A [rows, cols] matrix of blocks whose memory belongs to someone else (a memory-mapped file).
struct BlockMatrix {
    const uint8_t* data = nullptr;
    BlockType type = BlockType::Q8_0;
    int64_t rows = 0, cols = 0;
};

}  // namespace ternlm
