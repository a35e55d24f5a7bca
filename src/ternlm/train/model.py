"""BitNet b1.58 in PyTorch for quantization-aware training, nanoGPT style.

The forward pass applies exactly the inference arithmetic (docs/design.md §1) as fake quantization:
absmean ternary weights per tensor and absmax int8 activations per token, each with a
straight-through estimator, on fp32 master weights. Module and parameter names are those of
HF `BitNetForCausalLM`, so `state_dict()` keys are checkpoint names. `quantize=False` gives the
same network with plain linears: the fp32 baseline.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import BitNetConfig


class _StraightThrough(torch.autograd.Function):
    """Forward: a rounding function; backward: the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _ternary(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().mean().clamp(min=1e-5)
    return (w * (1.0 / scale)).round().clamp(-1, 1) * scale


def _int8(x: torch.Tensor) -> torch.Tensor:
    a = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * a).round().clamp(-128, 127) / a


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """absmean ternary fake quantization: clamp(round(W * (1/s)), -1, 1) * s with s = mean|W|."""
    return _StraightThrough.apply(w, _ternary)


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """absmax int8 fake quantization per token (last dim): clamp(round(x * a), -128, 127) / a."""
    return _StraightThrough.apply(x, _int8)


class BitLinear(nn.Linear):
    """A bias-free linear layer whose forward pass sees ternary weights and int8 activations."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        # The fake quantization runs in fp32 even under bf16 autocast, so it rounds as inference does.
        with torch.autocast(x.device.type, enabled=False):
            xq = quantize_activation(x.float())
            wq = quantize_weight(self.weight.float())
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            return F.linear(xq.to(dtype), wq.to(dtype))
        return F.linear(xq, wq)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: BitNetConfig, linear):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.n_kv_head = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = linear(hidden, self.n_head * self.head_dim)
        self.k_proj = linear(hidden, self.n_kv_head * self.head_dim)
        self.v_proj = linear(hidden, self.n_kv_head * self.head_dim)
        self.o_proj = linear(self.n_head * self.head_dim, hidden)
        self.attn_sub_norm = RMSNorm(hidden, config.rms_norm_eps)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)      # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)   # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)   # (B, nkv, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)               # (B, T, nh*hd)
        return self.o_proj(self.attn_sub_norm(y))


class MLP(nn.Module):
    def __init__(self, config: BitNetConfig, linear):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = linear(hidden, inner)
        self.up_proj = linear(hidden, inner)
        self.down_proj = linear(inner, hidden)
        self.ffn_sub_norm = RMSNorm(inner, config.rms_norm_eps)

    def forward(self, x):
        return self.down_proj(self.ffn_sub_norm(F.relu(self.gate_proj(x)).square() * self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: BitNetConfig, linear):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, linear)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, linear)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Holds the names under `model.` in HF checkpoints."""

    def __init__(self, config: BitNetConfig, linear):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, linear) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class BitNet(nn.Module):
    def __init__(self, config: BitNetConfig, quantize: bool = True):
        super().__init__()
        if config.hidden_act != "relu2" or not config.has_sub_norms or not config.tie_word_embeddings:
            raise ValueError("training supports BitNetForCausalLM with relu2, sub-norms and a tied head")
        self.config = config
        self.quantize = quantize
        linear = BitLinear if quantize else (lambda i, o: nn.Linear(i, o, bias=False))
        self.model = Decoder(config, linear)
        inv_freq = torch.from_numpy(config.rope_inv_freq())                           # (hd/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def rope(self, T: int, device):
        pos = torch.arange(T, device=device, dtype=torch.float32)                      # (T,)
        freqs = torch.outer(pos, self.inv_freq.float())                               # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)                                        # (T, hd)
        return emb.cos(), emb.sin()

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> logits (B, T, vocab); with targets (B, T) also the mean loss."""
        B, T = idx.shape
        cos, sin = self.rope(T, idx.device)
        x = self.model.embed_tokens(idx)                                               # (B, T, C)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.model.norm(x)
        logits = F.linear(x, self.model.embed_tokens.weight)                           # (B, T, vocab)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
