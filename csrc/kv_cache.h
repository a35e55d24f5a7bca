// The paged KV cache: keys and values live in blocks of kKVBlock positions in a pool, and each
// sequence holds a table of blocks. Blocks are reference-counted, so sequences that start with the
// same tokens can hold the same blocks (a shared system prompt is stored once), a prompt cache can
// keep a finished sequence's blocks, and a sequence can be truncated or extended without copying.
// A block is copied only when a sequence writes into one that someone else also holds.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "kernels.h"

namespace ternlm {

struct ModelShape;

constexpr int kKVLog2Block = 4;
constexpr int64_t kKVBlock = int64_t{1} << kKVLog2Block;  // positions per block

// Blocks of keys and values for every layer: block b of layer l holds kKVBlock rows of
// kv_heads * head_dim elements, f16 (default) or f32. Thread-safe.
class KVBlockPool {
public:
    KVBlockPool(const ModelShape& shape, int64_t blocks, bool f16);
    int64_t capacity() const { return static_cast<int64_t>(references_.size()); }
    int64_t free_blocks() const;
    bool f16() const { return f16_; }
    int64_t width() const { return width_; }  // elements of one position's keys (or values) in a layer
    int64_t layers() const { return layers_; }
    bool fits(const ModelShape& shape) const;
    int64_t block_bytes() const { return 2 * layers_ * kKVBlock * width_ * static_cast<int64_t>(element_); }

    // A block nobody holds, now with one reference; throws std::runtime_error when none is free.
    int32_t allocate();
    void retain(int32_t block);
    void release(int32_t block);
    int references(int32_t block) const;
    void copy(int32_t from, int32_t to);  // every layer's keys and values

    void* keys(int32_t block, int64_t layer) { return k_.get() + offset(block, layer); }
    void* values(int32_t block, int64_t layer) { return v_.get() + offset(block, layer); }

private:
    void check(int32_t block) const;
    size_t offset(int32_t block, int64_t layer) const {
        return static_cast<size_t>((block * layers_ + layer) * kKVBlock * width_) * element_;
    }

    int64_t layers_, width_;
    bool f16_;
    size_t element_;
    // Not zeroed: the pages of blocks never used are never touched, so a large pool costs only
    // what its sequences fill.
    std::unique_ptr<uint8_t[]> k_, v_;
    mutable std::mutex mutex_;
    std::vector<int> references_;
    std::vector<int32_t> free_;
};

// One sequence's keys and values: a table of blocks of a pool, position p in block p / kKVBlock.
class KVCache {
public:
    // A sequence in a shared pool, of at most n_ctx positions.
    KVCache(std::shared_ptr<KVBlockPool> pool, int64_t n_ctx);
    // A sequence with a pool of its own, just large enough for n_ctx positions.
    KVCache(const ModelShape& shape, int64_t n_ctx, bool f16 = true);
    ~KVCache();
    KVCache(const KVCache&) = delete;
    KVCache& operator=(const KVCache&) = delete;

    int64_t n_ctx() const { return n_ctx_; }
    bool fits(const ModelShape& shape) const { return pool_->fits(shape); }
    bool f16() const { return pool_->f16(); }
    const std::shared_ptr<KVBlockPool>& pool() const { return pool_; }
    const std::vector<int32_t>& blocks() const { return blocks_; }
    int64_t bytes() const { return static_cast<int64_t>(blocks_.size()) * pool_->block_bytes(); }

    // Holds `blocks` (of this cache's pool, each retained) instead of its own.
    void assign(const std::vector<int32_t>& blocks);
    // Keeps the blocks of the first `positions` positions, drops the rest.
    void truncate(int64_t positions);
    // Holds the blocks of `other`'s first `positions` positions (same pool): no copy.
    void share_prefix(const KVCache& other, int64_t positions);
    // Before positions [start, end) are written: blocks up to `end`, and the ones written into held
    // by this sequence alone (a shared block is copied first, so the others keep what they had).
    void prepare(int64_t start, int64_t end);

    // Rows of `layer` for attention: one pointer per block plus the column of a KV head.
    template <typename Element>
    void block_rows(int64_t layer, int64_t column, bool values, std::vector<const Element*>& out) const {
        out.clear();
        for (int32_t b : blocks_)
            out.push_back(static_cast<const Element*>(values ? pool_->values(b, layer) : pool_->keys(b, layer)) + column);
    }
    // Copies the raw keys and values (f16 bit patterns or f32) of positions [0, positions) out to,
    // or in from, buffers of [layers, positions, kv_heads * head_dim] elements each.
    void export_rows(int64_t positions, void* keys, void* values) const;
    void import_rows(int64_t positions, const void* keys, const void* values);
    // Stores one position's keys and values (kv_heads * head_dim floats each), rounding to f16 if
    // that is the cache's type. The position's block must have been prepared.
    void store(int64_t layer, int64_t pos, const float* k, const float* v, F16StoreFn f16_store);

private:
    void release_all();

    std::shared_ptr<KVBlockPool> pool_;
    int64_t n_ctx_;
    std::vector<int32_t> blocks_;
};

}  // namespace ternlm
