"""HF ⇄ GGUF tensor names (llama.cpp's names, which bitnet.cpp shares).

    model.embed_tokens.weight                  token_embd.weight
    model.norm.weight                          output_norm.weight
    lm_head.weight                             output.weight
    model.layers.N.input_layernorm.weight      blk.N.attn_norm.weight
    model.layers.N.self_attn.q_proj.weight     blk.N.attn_q.weight      (k, v likewise)
    model.layers.N.self_attn.o_proj.weight     blk.N.attn_output.weight
    model.layers.N.self_attn.attn_sub_norm.weight  blk.N.attn_sub_norm.weight
    model.layers.N.post_attention_layernorm.weight blk.N.ffn_norm.weight
    model.layers.N.mlp.gate_proj.weight        blk.N.ffn_gate.weight    (up, down likewise)
    model.layers.N.mlp.ffn_sub_norm.weight     blk.N.ffn_sub_norm.weight
"""

from __future__ import annotations

import re

_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# the part after `model.layers.N.` -> the part after `blk.N.`
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.attn_sub_norm.weight": "attn_sub_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.ffn_sub_norm.weight": "ffn_sub_norm.weight",
}

_GLOBAL_BACK = {v: k for k, v in _GLOBAL.items()}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name of an HF tensor, or None when GGUF has no such tensor."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    match = _HF_LAYER.fullmatch(hf_name)
    if match and match.group(2) in _LAYER:
        return f"blk.{match.group(1)}.{_LAYER[match.group(2)]}"
    return None


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None when we have no use for it."""
    if gguf_name in _GLOBAL_BACK:
        return _GLOBAL_BACK[gguf_name]
    match = _GGUF_LAYER.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_BACK:
        return f"model.layers.{match.group(1)}.{_LAYER_BACK[match.group(2)]}"
    return None


# llama.cpp's `llama` graph rotates dimension pairs (2i, 2i+1) of a head, HF's (i, i + head_dim/2),
# so llama.cpp's converter reorders the rows of q_proj and k_proj of `llama` files. A row
# permutation keeps the weights ternary and the per-tensor scale unchanged.
def permute_rope_rows(weight, heads: int):
    """HF rows -> llama.cpp `llama` rows: within each head, (half, i) -> (i, half)."""
    return weight.reshape(heads, 2, -1, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rope_rows(weight, heads: int):
    """llama.cpp `llama` rows -> HF rows (the inverse of permute_rope_rows)."""
    return weight.reshape(heads, -1, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
