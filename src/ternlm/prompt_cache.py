"""Prompt caching: the keys and values of tokens already computed, kept for the next prompt that
starts with the same tokens (a conversation's next turn, a shared system prompt).

The KV cache is paged (csrc/kv_cache.h): blocks of KV_BLOCK positions in a pool, reference-counted.
The prompt cache holds one reference on each full block it keeps, indexed as vLLM does by a hash
of every token from the start of the sequence to the block's end, so a block is found only after
the same tokens at the same positions. A new sequence starts holding the blocks of the longest
cached prefix of its prompt, without copying them, and computes the rest. Keys and values of a
prefix do not depend on what follows, so its logits are those of recomputing, bit for bit.

Blocks leave least recently used first once the cache is over its budget, and never while a
sequence holds them. A block is indexed only after the step that computed it has finished, so a
failed or abandoned computation leaves nothing a later prompt could match.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

from . import _core

KV_BLOCK = _core.KV_BLOCK


def blocks_for(positions: int) -> int:
    return -(-positions // KV_BLOCK)


def block_bytes(engine) -> int:
    """Bytes of one block of the engine's KV cache."""
    return engine.new_block_pool(1).block_bytes


def block_keys(tokens: list[int]) -> list[bytes]:
    """One key per full block of `tokens`: a digest of every token up to the block's end."""
    keys, digest = [], hashlib.blake2b(digest_size=16)
    for end in range(KV_BLOCK, len(tokens) + 1, KV_BLOCK):
        digest.update(b"".join(t.to_bytes(4, "little") for t in tokens[end - KV_BLOCK:end]))
        keys.append(digest.copy().digest())
    return keys


@dataclass
class PromptCacheStats:
    hits: int = 0            # sequences that took blocks from the cache
    cached_tokens: int = 0   # prompt tokens taken from the cache rather than computed
    evictions: int = 0       # blocks dropped to stay within the budget or to make room


class PromptCache:
    """Full KV blocks of computed tokens in `pool`, at most `budget_blocks` of them."""

    def __init__(self, engine, pool, budget_blocks: int):
        self.engine, self.pool, self.budget_blocks = engine, pool, budget_blocks
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> block, least recently used first
        self._lock = threading.Lock()  # the API's streams may run in different threads
        self.stats = PromptCacheStats()

    @classmethod
    def for_engine(cls, engine, budget_bytes: int, running_positions: int) -> PromptCache:
        """A cache of `budget_bytes` in a pool that also holds `running_positions` of sequences
        being computed."""
        budget = budget_bytes // block_bytes(engine)
        return cls(engine, engine.new_block_pool(budget + blocks_for(running_positions)), budget)

    @property
    def blocks(self) -> int:
        return len(self._index)

    @property
    def nbytes(self) -> int:
        return self.blocks * self.pool.block_bytes

    def lookup(self, tokens: list[int]) -> list[int]:
        """The blocks of the longest cached prefix of the tokens but the last (which is computed
        for its logits), whole blocks only; they are now the most recently used."""
        found = []
        with self._lock:
            for key in block_keys(tokens[:-1]):
                block = self._index.get(key)
                if block is None:
                    break
                found.append((key, block))
            # the prefix's first block most recent, its last the least: eviction takes a chain's
            # tail before its head, which every later block needs
            for key, _ in reversed(found):
                self._index.move_to_end(key)
        return [block for _, block in found]

    def share(self, cache, tokens: list[int], held: int = 0) -> int:
        """Lets `cache`, whose first `held` positions hold tokens[:held], hold the cached blocks of
        the longest cached prefix of `tokens` instead of its own where they go further; returns how
        many positions of `tokens` it now holds."""
        blocks = self.lookup(tokens)
        if len(blocks) * KV_BLOCK <= held:
            return held
        cache.assign(blocks + list(cache.blocks[len(blocks):]))
        with self._lock:
            self.stats.hits += int(held == 0)
            self.stats.cached_tokens += len(blocks) * KV_BLOCK - held
        return len(blocks) * KV_BLOCK

    def start(self, tokens: list[int], n_positions: int):
        """A KV cache for a sequence of at most n_positions that begins with `tokens`, and how many
        of them it already holds."""
        cache = self.engine.new_cache(n_positions, self.pool)
        held = self.share(cache, tokens)
        if not self.make_room(blocks_for(n_positions) - len(cache.blocks)):
            return self.engine.new_cache(n_positions), 0  # the pool is taken by other sequences: one of its own
        return cache, held

    def new_cache(self, n_positions: int):
        """An empty KV cache in the pool, or of its own while other sequences take the pool."""
        if self.make_room(blocks_for(n_positions)):
            return self.engine.new_cache(n_positions, self.pool)
        return self.engine.new_cache(n_positions)

    def keep(self, tokens: list[int], cache) -> None:
        """Indexes the full blocks of `cache`, whose first len(tokens) positions hold `tokens`."""
        if cache.pool is not self.pool:
            return
        with self._lock:
            for key, block in reversed(list(zip(block_keys(tokens), cache.blocks))):  # as in lookup: the head last
                if key in self._index:
                    self._index.move_to_end(key)
                else:
                    self.pool.retain(block)
                    self._index[key] = block
            self._evict(lambda: len(self._index) > self.budget_blocks)

    def make_room(self, blocks: int) -> bool:
        """Evicts until the pool has `blocks` free, if it can; returns whether it has."""
        with self._lock:
            self._evict(lambda: self.pool.free_blocks < blocks)
            return self.pool.free_blocks >= blocks

    def clear(self) -> None:
        with self._lock:
            for block in self._index.values():
                self.pool.release(block)
            self._index.clear()

    def _evict(self, needed) -> None:
        """Drops least recently used blocks that only the cache holds while needed()."""
        for key in [k for k, b in self._index.items() if self.pool.references(b) == 1]:
            if not needed():
                return
            self.pool.release(self._index.pop(key))
            self.stats.evictions += 1
