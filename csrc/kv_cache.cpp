#include "kv_cache.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "model.h"

namespace ternlm {

namespace {

int64_t blocks_for(int64_t positions) { return (positions + kKVBlock - 1) / kKVBlock; }

}  // namespace

KVBlockPool::KVBlockPool(const ModelShape& shape, int64_t blocks, bool f16)
    : layers_(shape.layers), width_(shape.kv_heads * shape.head_dim), f16_(f16), element_(f16 ? 2 : 4) {
    if (shape.layers <= 0 || shape.kv_heads <= 0 || shape.head_dim <= 0)
        throw std::invalid_argument("every model dimension must be positive");
    if (blocks <= 0) throw std::invalid_argument("a KV block pool needs at least one block");
    if (blocks > std::numeric_limits<int32_t>::max() ||
        blocks > std::numeric_limits<int64_t>::max() / 4 / kKVBlock / (layers_ * width_))
        throw std::invalid_argument("context length " + std::to_string(blocks * kKVBlock) + " is too large for a KV cache");
    const size_t n = static_cast<size_t>(blocks * layers_ * kKVBlock * width_) * element_;
    k_.reset(new uint8_t[n]);
    v_.reset(new uint8_t[n]);
    references_.assign(static_cast<size_t>(blocks), 0);
    for (int64_t b = blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));  // block 0 handed out first
}

bool KVBlockPool::fits(const ModelShape& shape) const {
    return layers_ == shape.layers && width_ == shape.kv_heads * shape.head_dim;
}

int64_t KVBlockPool::free_blocks() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(free_.size());
}

void KVBlockPool::check(int32_t block) const {
    if (block < 0 || block >= capacity()) throw std::invalid_argument("KV block " + std::to_string(block) + " is not in the pool");
}

int32_t KVBlockPool::allocate() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.empty()) throw std::runtime_error("the KV cache is full (all " + std::to_string(capacity()) + " blocks in use)");
    const int32_t block = free_.back();
    free_.pop_back();
    references_[static_cast<size_t>(block)] = 1;
    return block;
}

void KVBlockPool::retain(int32_t block) {
    check(block);
    std::lock_guard<std::mutex> lock(mutex_);
    if (references_[static_cast<size_t>(block)] == 0) throw std::invalid_argument("KV block " + std::to_string(block) + " is free");
    ++references_[static_cast<size_t>(block)];
}

void KVBlockPool::release(int32_t block) {
    check(block);
    std::lock_guard<std::mutex> lock(mutex_);
    int& count = references_[static_cast<size_t>(block)];
    if (count == 0) throw std::invalid_argument("KV block " + std::to_string(block) + " is already free");
    if (--count == 0) free_.push_back(block);
}

int KVBlockPool::references(int32_t block) const {
    check(block);
    std::lock_guard<std::mutex> lock(mutex_);
    return references_[static_cast<size_t>(block)];
}

void KVBlockPool::copy(int32_t from, int32_t to) {
    check(from);
    check(to);
    const size_t bytes = static_cast<size_t>(layers_ * kKVBlock * width_) * element_;  // a block's layers are adjacent
    std::memcpy(keys(to, 0), keys(from, 0), bytes);
    std::memcpy(values(to, 0), values(from, 0), bytes);
}

KVCache::KVCache(std::shared_ptr<KVBlockPool> pool, int64_t n_ctx) : pool_(std::move(pool)), n_ctx_(n_ctx) {
    if (n_ctx <= 0) throw std::invalid_argument("context length must be positive");
}

KVCache::KVCache(const ModelShape& shape, int64_t n_ctx, bool f16) : n_ctx_(n_ctx) {
    if (n_ctx <= 0) throw std::invalid_argument("context length must be positive");
    if (n_ctx > std::numeric_limits<int64_t>::max() - kKVBlock)
        throw std::invalid_argument("context length " + std::to_string(n_ctx) + " is too large for a KV cache");
    pool_ = std::make_shared<KVBlockPool>(shape, blocks_for(n_ctx), f16);
}

KVCache::~KVCache() { release_all(); }

void KVCache::release_all() {
    for (int32_t b : blocks_) pool_->release(b);
    blocks_.clear();
}

void KVCache::assign(const std::vector<int32_t>& blocks) {
    if (static_cast<int64_t>(blocks.size()) > blocks_for(n_ctx_))
        throw std::invalid_argument("more KV blocks than the context of " + std::to_string(n_ctx_) + " needs");
    size_t retained = 0;
    try {
        for (; retained < blocks.size(); ++retained) pool_->retain(blocks[retained]);
    } catch (...) {
        for (size_t i = 0; i < retained; ++i) pool_->release(blocks[i]);
        throw;
    }
    release_all();
    blocks_ = blocks;
}

void KVCache::truncate(int64_t positions) {
    if (positions < 0) throw std::invalid_argument("a KV cache cannot keep a negative number of positions");
    const size_t keep = static_cast<size_t>(blocks_for(positions));
    while (blocks_.size() > keep) {
        pool_->release(blocks_.back());
        blocks_.pop_back();
    }
}

void KVCache::share_prefix(const KVCache& other, int64_t positions) {
    if (other.pool_ != pool_) throw std::invalid_argument("only caches of one block pool can share blocks");
    if (positions < 0 || blocks_for(positions) > static_cast<int64_t>(other.blocks_.size()))
        throw std::invalid_argument("the other cache holds fewer than " + std::to_string(positions) + " positions");
    assign(std::vector<int32_t>(other.blocks_.begin(), other.blocks_.begin() + blocks_for(positions)));
}

void KVCache::prepare(int64_t start, int64_t end) {
    if (start < 0 || end > n_ctx_ || start >= end)
        throw std::invalid_argument("positions [" + std::to_string(start) + ", " + std::to_string(end) +
                                    ") are outside the context of " + std::to_string(n_ctx_));
    for (int64_t b = start / kKVBlock; b < static_cast<int64_t>(blocks_.size()) && b < blocks_for(end); ++b) {
        int32_t& block = blocks_[static_cast<size_t>(b)];
        if (pool_->references(block) > 1) {
            const int32_t own = pool_->allocate();
            pool_->copy(block, own);
            pool_->release(block);
            block = own;
        }
    }
    while (static_cast<int64_t>(blocks_.size()) < blocks_for(end)) blocks_.push_back(pool_->allocate());
}

namespace {

// Calls copy(block memory, offset in a [layers, positions, width] buffer, bytes) for each block's
// run of rows of each layer, keys and values alike.
template <typename Copy>
void over_rows(KVBlockPool& pool, const std::vector<int32_t>& blocks, int64_t positions, const Copy& copy) {
    const size_t element = pool.f16() ? 2 : 4, row = static_cast<size_t>(pool.width()) * element;
    for (int64_t layer = 0; layer < pool.layers(); ++layer)
        for (int64_t first = 0; first < positions; first += kKVBlock) {
            const int32_t block = blocks[static_cast<size_t>(first / kKVBlock)];
            const size_t at = static_cast<size_t>(layer * positions + first) * row;
            const size_t bytes = static_cast<size_t>(std::min(kKVBlock, positions - first)) * row;
            copy(pool.keys(block, layer), pool.values(block, layer), at, bytes);
        }
}

}  // namespace

void KVCache::export_rows(int64_t positions, void* keys, void* values) const {
    if (positions < 0 || blocks_for(positions) > static_cast<int64_t>(blocks_.size()))
        throw std::invalid_argument("the cache holds fewer than " + std::to_string(positions) + " positions");
    over_rows(*pool_, blocks_, positions, [&](void* k, void* v, size_t at, size_t bytes) {
        std::memcpy(static_cast<uint8_t*>(keys) + at, k, bytes);
        std::memcpy(static_cast<uint8_t*>(values) + at, v, bytes);
    });
}

void KVCache::import_rows(int64_t positions, const void* keys, const void* values) {
    if (positions <= 0) throw std::invalid_argument("nothing to import");
    prepare(0, positions);
    over_rows(*pool_, blocks_, positions, [&](void* k, void* v, size_t at, size_t bytes) {
        std::memcpy(k, static_cast<const uint8_t*>(keys) + at, bytes);
        std::memcpy(v, static_cast<const uint8_t*>(values) + at, bytes);
    });
}

void KVCache::store(int64_t layer, int64_t pos, const float* k, const float* v, F16StoreFn f16_store) {
    const int32_t block = blocks_[static_cast<size_t>(pos / kKVBlock)];
    const int64_t width = pool_->width(), row = pos % kKVBlock * width;
    if (pool_->f16()) {
        f16_store(k, width, static_cast<uint16_t*>(pool_->keys(block, layer)) + row);
        f16_store(v, width, static_cast<uint16_t*>(pool_->values(block, layer)) + row);
    } else {
        std::copy_n(k, width, static_cast<float*>(pool_->keys(block, layer)) + row);
        std::copy_n(v, width, static_cast<float*>(pool_->values(block, layer)) + row);
    }
}

}  // namespace ternlm
