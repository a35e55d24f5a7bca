"""Model configuration: one dataclass whose fields carry the names of HF `config.json`.

Every behaviour switch (activation, sub-norms, weight-scale convention, tied head) is derived
from these fields, never from file or directory names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FormatError
from .jsonfile import read_json_object

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

    def weight_count(self) -> int:
        """Weights of the embedding, the head (when untied) and every layer's matrices."""
        q_width, kv_width = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        per_layer = self.hidden_size * (2 * q_width + 2 * kv_width + 3 * self.intermediate_size)
        matrices = 1 if self.tie_word_embeddings else 2
        return matrices * self.vocab_size * self.hidden_size + self.num_hidden_layers * per_layer

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
        if not isinstance(rope_parameters, dict):
            raise FormatError(source, f"`rope_parameters` must be an object, got {rope_parameters!r}")
        if "rope_theta" in rope_parameters and "rope_theta" not in raw:
            raw["rope_theta"] = rope_parameters["rope_theta"]
        if rope_parameters.get("rope_type", "default") != "default" and "rope_scaling" not in raw:
            raw["rope_scaling"] = rope_parameters
        model_type = raw.get("model_type")
        if not raw.get("architectures") and isinstance(model_type, str) and model_type in MODEL_TYPES:
            raw["architectures"] = [MODEL_TYPES[model_type]]
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            config = cls(**{k: v for k, v in raw.items() if k in known})
        except (TypeError, ZeroDivisionError) as e:  # __post_init__ derives head_dim from the raw values
            raise FormatError(source, f"invalid config: {e}") from None
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "BitNetConfig":
        path = Path(path)
        return cls.from_dict(read_json_object(path), str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, source: str = "config.json") -> None:
        def fail(problem: str):
            raise FormatError(source, problem)

        if not (isinstance(self.architectures, list) and self.architectures
                and all(isinstance(a, str) for a in self.architectures)):
            fail("`architectures` must be a non-empty list of names")
        for name in ("quantization_config", "rope_scaling"):
            if not isinstance(getattr(self, name), (dict, type(None))):
                fail(f"`{name}` must be an object, got {getattr(self, name)!r}")
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
        if not _positive_number(self.rope_theta):
            fail(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not _positive_number(self.rms_norm_eps):
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
        if kind == "llama3":
            if "factor" not in scaling:
                fail("llama3 rope scaling needs a `factor`")
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key in scaling and not _positive_number(scaling[key]):
                    fail(f"llama3 rope scaling needs a positive number `{key}`, got {scaling[key]!r}")
            if scaling.get("high_freq_factor", 4.0) == scaling.get("low_freq_factor", 1.0):
                fail("llama3 rope scaling needs high_freq_factor != low_freq_factor")
        if not isinstance(self.eos_token_id, (int, list, type(None))):
            fail(f"eos_token_id must be a token id or a list of them, got {self.eos_token_id!r}")
        for token in self.eos_token_ids + ([] if self.bos_token_id is None else [self.bos_token_id]):
            if not _token_id(token, self.vocab_size):
                fail(f"token id {token!r} (bos_token_id or eos_token_id) is outside the vocabulary")


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _token_id(value, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


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
