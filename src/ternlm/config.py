"""Model configuration: one dataclass whose fields carry the names of HF `config.json`.

Every behaviour switch (activation, sub-norms, weight-scale convention, tied head) is derived
from these fields, never from file or directory names.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FormatError

# Architectures whose decoder layers carry `attn_sub_norm` and `ffn_sub_norm` (BitNet's SubLN).
SUB_NORM_ARCHITECTURES = ("BitNetForCausalLM", "BitnetForCausalLM")
PLAIN_ARCHITECTURES = ("LlamaForCausalLM",)
ACTIVATIONS = ("relu2", "silu")
MODEL_TYPES = {"bitnet": "BitNetForCausalLM", "llama": "LlamaForCausalLM"}  # when `architectures` is absent


@dataclass
class BitNetConfig:
    architectures: list[str] = field(default_factory=lambda: ["BitNetForCausalLM"])
    model_type: str = "bitnet"
    vocab_size: int = 128256
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 30
    num_attention_heads: int = 20
    num_key_value_heads: int = 5
    head_dim: int | None = None
    hidden_act: str = "relu2"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    pad_token_id: int | None = None
    quantization_config: dict | None = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    # -- derived behaviour ------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return self.architectures[0]

    @property
    def has_sub_norms(self) -> bool:
        return self.architecture in SUB_NORM_ARCHITECTURES

    @property
    def weight_scale_divides(self) -> bool:
        """`bitlinear` checkpoints store 1/mean|W| (divide); `autobitlinear` store mean|W| (multiply)."""
        linear_class = (self.quantization_config or {}).get("linear_class", "bitlinear")
        return linear_class != "autobitlinear"

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies for rotate_half RoPE over the full head_dim, float32 [head_dim/2]."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "llama3":
            inv_freq = _llama3_scaled(inv_freq, scaling)
        return inv_freq.astype(np.float32)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "BitNetConfig":
        raw = dict(raw)
        rope_parameters = raw.pop("rope_parameters", None) or {}
        if "rope_theta" in rope_parameters and "rope_theta" not in raw:
            raw["rope_theta"] = rope_parameters["rope_theta"]
        if rope_parameters.get("rope_type", "default") != "default" and "rope_scaling" not in raw:
            raw["rope_scaling"] = rope_parameters
        if not raw.get("architectures") and raw.get("model_type") in MODEL_TYPES:
            raw["architectures"] = [MODEL_TYPES[raw["model_type"]]]
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            config = cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as e:
            raise FormatError(source, f"invalid config: {e}") from None
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "BitNetConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FormatError(path, "file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(path, f"not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise FormatError(path, "expected a JSON object")
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, source: str = "config.json") -> None:
        def fail(problem: str):
            raise FormatError(source, problem)

        if not isinstance(self.architectures, list) or not self.architectures:
            fail("`architectures` must be a non-empty list")
        arch = self.architecture
        if arch in PLAIN_ARCHITECTURES:
            if (self.quantization_config or {}).get("quant_method") != "bitnet":
                fail(f"{arch} without quantization_config.quant_method = 'bitnet' is not a ternary model")
        elif arch not in SUB_NORM_ARCHITECTURES:
            fail(f"unknown architecture {arch!r}; supported: "
                 f"{', '.join(SUB_NORM_ARCHITECTURES + PLAIN_ARCHITECTURES)}")
        if self.hidden_act not in ACTIVATIONS:
            fail(f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"`{name}` must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            fail("head_dim must be even for RoPE")
        if self.attention_bias:
            fail("attention_bias = true is not supported (BitNet models have no biases)")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            fail(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            fail(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        quant = self.quantization_config or {}
        if quant.get("use_rms_norm"):
            fail("quantization_config.use_rms_norm (an RMSNorm inside every BitLinear) is not supported")
        if quant.get("linear_class", "bitlinear") not in ("bitlinear", "autobitlinear"):
            fail(f"unknown quantization_config.linear_class {quant.get('linear_class')!r}")
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "llama3"):
            fail(f"unsupported rope scaling {kind!r}")
        for token in self.eos_token_ids:
            if not isinstance(token, int) or not 0 <= token < self.vocab_size:
                fail(f"eos_token_id {token!r} is outside the vocabulary")


def _llama3_scaled(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """LLaMA-3.1 frequency scaling: long wavelengths slowed by `factor`, a smooth ramp between."""
    factor = scaling["factor"]
    low = scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    between = (wavelen <= old_context / low) & (wavelen >= old_context / high)
    return np.where(between, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
