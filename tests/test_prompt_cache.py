"""Prompt caching: the paged KV cache (kept, extended, truncated, shared) and the caches built on it."""

from __future__ import annotations

import numpy as np
import pytest

import ternlm
from ternlm import _core
from ternlm.reference import KV_BLOCK
from conftest import random_bitnet, write_checkpoint

PROMPT = [int(t) for t in np.random.default_rng(0).integers(2, 300, 56)]
PREFIXES = [1, KV_BLOCK - 1, KV_BLOCK, KV_BLOCK + 1, 2 * KV_BLOCK, 45]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_json):
    return write_checkpoint(random_bitnet(seed=21), tmp_path_factory.mktemp("cached"), tiny_tokenizer_json)


ENGINES = [("native", "f16"), ("native", "f32"), ("reference", "f16")]  # the reference keeps float32 whatever asked


def load_engine(model_dir, backend, kv_cache):
    return ternlm.load(model_dir, backend=backend, **({"kv_cache": kv_cache} if backend == "native" else {})).engine


def test_block_size_is_the_cores():
    assert KV_BLOCK == _core.KV_BLOCK


@pytest.mark.parametrize("backend,kv_cache", ENGINES)
def test_logits_after_a_shared_prefix_equal_recomputing_bit_for_bit(model_dir, backend, kv_cache):
    """A sequence that takes another's first k positions (its blocks, not a copy) and computes the
    rest gives exactly the logits of computing the whole prompt, at block boundaries and between;
    the sequence it shares with keeps its own keys and values (writes copy a shared block first)."""
    engine = load_engine(model_dir, backend, kv_cache)
    n_ctx = 64
    recomputed = engine.forward(engine.new_cache(n_ctx), PROMPT, 0)[-1]
    pool = engine.new_block_pool(16)
    for k in PREFIXES:
        first = engine.new_cache(n_ctx, pool)
        engine.forward(first, PROMPT[:k], 0)
        second = engine.new_cache(n_ctx, pool)
        second.share_prefix(first, k)
        assert second.blocks == first.blocks[:len(second.blocks)]
        assert np.array_equal(engine.forward(second, PROMPT[k:], k)[-1], recomputed), k
        other = [t + 1 for t in PROMPT[k:]]  # the first sequence goes on differently
        alone = engine.forward(engine.new_cache(n_ctx), PROMPT[:k] + other, 0)[-1]
        assert np.array_equal(engine.forward(first, other, k)[-1], alone), k
        next_step = engine.forward(engine.new_cache(n_ctx), PROMPT + [7], 0)[-1]
        assert np.array_equal(engine.forward(second, [7], len(PROMPT))[-1], next_step), k
        del first, second
        assert pool.free_blocks == pool.capacity


@pytest.mark.parametrize("backend,kv_cache", ENGINES)
def test_truncated_cache_goes_on_as_recomputing(model_dir, backend, kv_cache):
    engine = load_engine(model_dir, backend, kv_cache)
    cache = engine.new_cache(64)
    engine.forward(cache, PROMPT, 0)
    for k in reversed(PREFIXES):
        cache.truncate(k)
        assert len(cache.blocks) == -(-k // KV_BLOCK)
        suffix = [t + 3 for t in PROMPT[k:k + 5]]
        expected = engine.forward(engine.new_cache(64), PROMPT[:k] + suffix, 0)[-1]
        assert np.array_equal(engine.forward(cache, suffix, k)[-1], expected), k
        cache.truncate(k)  # the next round writes over the suffix again


@pytest.mark.parametrize("backend,kv_cache", ENGINES)
def test_block_pool_counts_references(model_dir, backend, kv_cache):
    engine = load_engine(model_dir, backend, kv_cache)
    pool = engine.new_block_pool(4)
    a, b = engine.new_cache(64, pool), engine.new_cache(64, pool)
    engine.forward(a, PROMPT[:2 * KV_BLOCK], 0)
    b.share_prefix(a, 2 * KV_BLOCK)
    assert pool.free_blocks == 2 and [pool.references(x) for x in a.blocks] == [2, 2]
    engine.forward(b, PROMPT[2 * KV_BLOCK:2 * KV_BLOCK + 1], 2 * KV_BLOCK)  # a third block, b's own
    assert pool.free_blocks == 1
    engine.forward(b, [5], KV_BLOCK)  # writing into a shared block copies it
    assert pool.free_blocks == 0 and pool.references(a.blocks[1]) == 1
    with pytest.raises(RuntimeError, match="KV cache is full"):
        engine.forward(a, PROMPT[2 * KV_BLOCK:2 * KV_BLOCK + 1], 2 * KV_BLOCK)
    b.truncate(0)
    assert pool.free_blocks == 2
    with pytest.raises(ValueError, match="more KV blocks"):
        engine.new_cache(KV_BLOCK, pool).assign(a.blocks)


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize("log2_block", [0, 1, 4])
def test_f16_attention_in_blocks_equals_contiguous(kernel, log2_block):
    """The kernels take positions in order whatever the blocks: bit-identical to one block."""
    rng = np.random.default_rng(log2_block)
    q = rng.standard_normal((4, 72)).astype(np.float32)
    keys = rng.standard_normal((37, 160)).astype(np.float16).view(np.uint16)
    values = rng.standard_normal((37, 160)).astype(np.float16).view(np.uint16)
    whole = _core.f16_attention(q, keys, values, 80, 0.1, kernel)
    assert np.array_equal(_core.f16_attention(q, keys, values, 80, 0.1, kernel, log2_block), whole)


# ---- the Python API ----

@pytest.mark.parametrize("backend", ["native", "reference"])
def test_api_reuses_the_longest_cached_prefix(model_dir, backend):
    """Greedy texts and logits are those of a model without a prompt cache; last_stats says how many
    prompt tokens came from the cache (whole blocks of the longest common prefix, never the last)."""
    cached = ternlm.load(model_dir, backend=backend)
    plain = ternlm.load(model_dir, backend=backend, prompt_cache_mb=0)
    assert plain.prompt_cache is None
    cached.stop_ids = plain.stop_ids = set()
    ids = PROMPT[:42]
    first = list(cached.stream_tokens(ids, max_tokens=6))
    assert first == list(plain.stream_tokens(ids, max_tokens=6))
    assert (cached.last_stats.prompt_tokens, cached.last_stats.cached_prompt_tokens) == (42, 0)
    # the answer's tokens were computed too, but for the last one (48 positions, 47 computed):
    # a prompt that goes on from them reuses 2 whole blocks
    longer = ids + first + [5, 6, 7]
    assert list(cached.stream_tokens(longer, max_tokens=6)) == list(plain.stream_tokens(longer, max_tokens=6))
    assert cached.last_stats.cached_prompt_tokens == 2 * KV_BLOCK
    assert list(cached.stream_tokens(longer + first, max_tokens=6)) == list(plain.stream_tokens(longer + first, max_tokens=6))
    assert cached.last_stats.cached_prompt_tokens == 3 * KV_BLOCK
    assert list(cached.stream_tokens(ids, max_tokens=6)) == first
    assert cached.last_stats.cached_prompt_tokens == 2 * KV_BLOCK
    assert np.array_equal(cached.logits(ids[:20]), plain.logits(ids[:20]))
    cached.reset_prompt_cache()
    list(cached.stream_tokens(ids, max_tokens=1))
    assert cached.last_stats.cached_prompt_tokens == 0


def test_prompt_cache_evicts_least_recently_used_within_its_budget(model_dir):
    model = ternlm.load(model_dir, prompt_cache_mb=1e-9)
    block_bytes = model.prompt_cache.pool.block_bytes
    model = ternlm.load(model_dir, prompt_cache_mb=4 * block_bytes / 2**20)  # room for 4 blocks
    cache = model.prompt_cache
    a, b = PROMPT[:33], [t + 1 for t in PROMPT[:33]]  # 2 whole blocks each
    model.logits(a)
    model.logits(b)
    assert cache.blocks == 4 and cache.nbytes == 4 * block_bytes
    model.logits(a)  # a is now the most recently used
    model.logits([t + 2 for t in PROMPT[:17]])  # one more block: b's last goes
    assert cache.blocks == 4 and cache.stats.evictions == 1
    assert len(cache.lookup(a, 33)) == 2 and len(cache.lookup(b, 33)) == 1
    assert cache.pool.free_blocks == cache.pool.capacity - 4  # nothing else is held
