"""The NumPy reference forward pass: slow, written straight from the formulas, the oracle for tests.

    h = rmsnorm(x);  q, k, v = BitLinear(h);  rope(q, k);  a = attention(q, k, v)
    a = rmsnorm(a, attn_sub_norm);  x = x + BitLinear_o(a)           (sub-norm only for BitNet)
    h = rmsnorm(x);  g = act(BitLinear_gate(h)) * BitLinear_up(h)
    g = rmsnorm(g, ffn_sub_norm);   x = x + BitLinear_down(g)
    logits = rmsnorm(x) @ head.T

BitLinear: int8 per-token absmax activations times ternary weights, an exact integer product,
then one multiply by weight_scale / activation_scale.
"""

from __future__ import annotations

import numpy as np

from .config import BitNetConfig
from .weights.checkpoint import (ATTENTION_PROJECTIONS, MLP_PROJECTIONS, Checkpoint, float32_of,
                                 layer_norms, linear_name, linear_shape, norm_name)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float32)
    variance = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True).astype(np.float32)
    return weight * (x * (np.float32(1.0) / np.sqrt(variance + np.float32(eps))))


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token absmax int8: returns (xq int8 [..., K], a float32 [..., 1]) with x ≈ xq / a."""
    max_abs = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-5))
    a = (np.float32(127.0) / max_abs).astype(np.float32)
    xq = np.clip(np.round(x * a), -128, 127).astype(np.int8)  # np.round: half to even, as torch
    return xq, a


def integer_matmul(xq: np.ndarray, ternary: np.ndarray) -> np.ndarray:
    """Exact xq [T, K] . ternary [N, K]^T as int32 (float32 products are exact: |sum| < 2^24)."""
    return (xq.astype(np.float32) @ ternary.T.astype(np.float32)).astype(np.int32)


def bit_linear(x: np.ndarray, ternary: np.ndarray, scale: float) -> np.ndarray:
    xq, a = quantize_activations(x)
    return integer_matmul(xq, ternary).astype(np.float32) * (np.float32(scale) / a)


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """rotate_half RoPE. x: [T, heads, head_dim]; pairs (j, j + head_dim/2)."""
    angles = positions[:, None].astype(np.float32) * inv_freq[None, :]  # [T, head_dim/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def relu2(x: np.ndarray) -> np.ndarray:
    return np.square(np.maximum(x, 0))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start_pos: int) -> np.ndarray:
    """Causal GQA. q: [T, heads, hd]; keys/values: [start_pos + T, kv_heads, hd]. Each query row is
    computed over exactly the positions it sees, so its result does not depend on how the sequence
    was split into calls (a cached prefix gives the logits of recomputing it, bit for bit)."""
    T, heads, hd = q.shape
    group = heads // keys.shape[1]
    out = np.empty((T, heads * hd), np.float32)
    for t in range(T):
        seen = start_pos + t + 1
        k = np.repeat(keys[:seen], group, axis=1)  # [seen, heads, hd]
        v = np.repeat(values[:seen], group, axis=1)
        scores = np.einsum("hd,shd->hs", q[t], k) / np.float32(np.sqrt(hd))
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        out[t] = np.einsum("hs,shd->hd", probs, v).reshape(heads * hd)
    return out


KV_BLOCK = 16  # positions per block, as the native core's


class ReferenceBlockPool:
    """The native KVBlockPool in NumPy: float32 keys and values in reference-counted blocks of
    KV_BLOCK positions, [block, layer, position in block, kv_heads, head_dim]."""

    def __init__(self, config: BitNetConfig, blocks: int):
        if blocks <= 0:
            raise ValueError("a KV block pool needs at least one block")
        shape = (blocks, config.num_hidden_layers, KV_BLOCK, config.num_key_value_heads, config.head_dim)
        self.keys, self.values = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        self.block_bytes = 2 * self.keys[0].nbytes
        self.capacity = blocks
        self.f16 = False
        self._references = [0] * blocks
        self._free = list(range(blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"the KV cache is full (all {self.capacity} blocks in use)")
        block = self._free.pop()
        self._references[block] = 1
        return block

    def retain(self, block: int) -> None:
        if self._references[block] == 0:
            raise ValueError(f"KV block {block} is free")
        self._references[block] += 1

    def release(self, block: int) -> None:
        if self._references[block] == 0:
            raise ValueError(f"KV block {block} is already free")
        self._references[block] -= 1
        if self._references[block] == 0:
            self._free.append(block)

    def references(self, block: int) -> int:
        return self._references[block]


class ReferenceCache:
    """One sequence's table of blocks in a ReferenceBlockPool (the native KVCache's twin)."""

    def __init__(self, config: BitNetConfig, n_ctx: int, pool: ReferenceBlockPool | None = None):
        if n_ctx <= 0:
            raise ValueError("context length must be positive")
        self.n_ctx = n_ctx
        self.pool = pool or ReferenceBlockPool(config, _blocks_for(n_ctx))
        self.blocks: list[int] = []

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks the sequence holds."""
        return len(self.blocks) * self.pool.block_bytes

    def __del__(self):
        for block in getattr(self, "blocks", ()):
            self.pool.release(block)

    def assign(self, blocks: list[int]) -> None:
        if len(blocks) > _blocks_for(self.n_ctx):
            raise ValueError(f"more KV blocks than the context of {self.n_ctx} needs")
        for block in blocks:
            self.pool.retain(block)
        for block in self.blocks:
            self.pool.release(block)
        self.blocks = list(blocks)

    def truncate(self, positions: int) -> None:
        while len(self.blocks) > _blocks_for(positions):
            self.pool.release(self.blocks.pop())

    def share_prefix(self, other: ReferenceCache, positions: int) -> None:
        if other.pool is not self.pool:
            raise ValueError("only caches of one block pool can share blocks")
        self.assign(other.blocks[:_blocks_for(positions)])

    def prepare(self, start: int, end: int) -> None:
        """Blocks up to `end`; a block written into that others also hold is copied first."""
        for b in range(start // KV_BLOCK, min(len(self.blocks), _blocks_for(end))):
            if self.pool.references(self.blocks[b]) > 1:
                own = self.pool.allocate()
                self.pool.keys[own], self.pool.values[own] = self.pool.keys[self.blocks[b]], self.pool.values[self.blocks[b]]
                self.pool.release(self.blocks[b])
                self.blocks[b] = own
        while len(self.blocks) < _blocks_for(end):
            self.blocks.append(self.pool.allocate())

    def store(self, layer: int, start: int, keys: np.ndarray, values: np.ndarray) -> None:
        for i in range(len(keys)):
            block, row = divmod(start + i, KV_BLOCK)
            self.pool.keys[self.blocks[block], layer, row] = keys[i]
            self.pool.values[self.blocks[block], layer, row] = values[i]

    def read(self, layer: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values [positions, kv_heads, head_dim] of one layer."""
        table = self.blocks[:_blocks_for(positions)]
        width = self.pool.keys.shape[3:]
        return (self.pool.keys[table, layer].reshape(-1, *width)[:positions],
                self.pool.values[table, layer].reshape(-1, *width)[:positions])


def _blocks_for(positions: int) -> int:
    return -(-positions // KV_BLOCK)


class ReferenceModel:
    threads = 1

    def __init__(self, checkpoint: Checkpoint, progress=None):
        c = self.config = checkpoint.config
        self.inv_freq = c.rope_inv_freq()
        self.embed = float32_of(checkpoint.dense("model.embed_tokens.weight"))
        head_name = checkpoint.head_name()
        self.head = self.embed if head_name == "model.embed_tokens.weight" else float32_of(checkpoint.dense(head_name))
        self.final_norm = checkpoint.norm("model.norm.weight", c.hidden_size)
        self.layers = []
        for i in range(c.num_hidden_layers):
            layer = {}
            for proj in ATTENTION_PROJECTIONS + MLP_PROJECTIONS:
                layer[proj] = checkpoint.ternary(linear_name(i, proj), *linear_shape(c, proj))
            for norm in layer_norms(c):
                size = c.intermediate_size if norm == "ffn_sub_norm" else c.hidden_size
                layer[norm] = checkpoint.norm(norm_name(i, norm), size)
            self.layers.append(layer)
            if progress:
                progress(i + 1, c.num_hidden_layers)

    def new_block_pool(self, blocks: int) -> ReferenceBlockPool:
        return ReferenceBlockPool(self.config, blocks)

    def new_cache(self, n_ctx: int, pool: ReferenceBlockPool | None = None) -> ReferenceCache:
        return ReferenceCache(self.config, n_ctx, pool)

    def forward_batch(self, segments, logits_for=None) -> np.ndarray:
        """Each (cache, tokens, start_pos) on its own: the oracle for the native batched step."""
        flags = [True] * len(segments) if logits_for is None else logits_for
        rows = [self.forward(cache, tokens, pos)[-1] for (cache, tokens, pos), wanted in zip(segments, flags)]
        return np.stack([row for row, wanted in zip(rows, flags) if wanted]) if any(flags) \
            else np.zeros((0, self.config.vocab_size), np.float32)

    def forward(self, cache: ReferenceCache, tokens: np.ndarray, start_pos: int,
                all_logits: bool = False) -> np.ndarray:
        c = self.config
        T = len(tokens)
        if start_pos + T > cache.n_ctx:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds the context of {cache.n_ctx}")
        cache.prepare(start_pos, start_pos + T)
        positions = np.arange(start_pos, start_pos + T)
        act = relu2 if c.hidden_act == "relu2" else silu
        eps = c.rms_norm_eps
        x = self.embed[np.asarray(tokens)]  # [T, hidden]
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer["input_layernorm"], eps)
            q = bit_linear(h, *layer["q_proj"]).reshape(T, c.num_attention_heads, c.head_dim)
            k = bit_linear(h, *layer["k_proj"]).reshape(T, c.num_key_value_heads, c.head_dim)
            v = bit_linear(h, *layer["v_proj"]).reshape(T, c.num_key_value_heads, c.head_dim)
            q, k = rope(q, positions, self.inv_freq), rope(k, positions, self.inv_freq)
            cache.store(i, start_pos, k, v)
            a = attention(q, *cache.read(i, start_pos + T), start_pos)  # [T, heads * head_dim]
            if c.has_sub_norms:
                a = rms_norm(a, layer["attn_sub_norm"], eps)
            x = x + bit_linear(a, *layer["o_proj"])
            h = rms_norm(x, layer["post_attention_layernorm"], eps)
            g = act(bit_linear(h, *layer["gate_proj"])) * bit_linear(h, *layer["up_proj"])
            if c.has_sub_norms:
                g = rms_norm(g, layer["ffn_sub_norm"], eps)
            x = x + bit_linear(g, *layer["down_proj"])
        x = x if all_logits else x[-1:]
        return rms_norm(x, self.final_norm, eps) @ self.head.T
