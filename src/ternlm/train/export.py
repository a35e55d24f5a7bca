"""HF BitNet directories: export a trained model, and load one as a starting point (`--from`).

Exported layout (as microsoft/bitnet-b1.58-2B-4T): every BitLinear weight packed to uint8
[out/4, in] plus `weight_scale` [1] = mean|W| that multiplies (`linear_class = autobitlinear`);
embeddings and norms in `export_dtype`; tied head, so no `lm_head`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from ..config import BitNetConfig
from ..errors import FormatError
from ..weights.packing import pack_ternary_hf, quantize_ternary, unpack_ternary_hf
from .data import BOS, EOS, EOT, special_ids
from .model import BitNet

QUANTIZATION_CONFIG = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# 2B4T's format: BOS, then `Role: content<|eot_id|>` per message, then `Assistant: `.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def is_bitlinear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEAR_NAMES


def config_json(config: BitNetConfig, tokenizer: Tokenizer, dtype: str) -> dict:
    ids = special_ids(tokenizer)
    raw = config.to_dict()
    raw.pop("rope_scaling")
    raw.update(
        architectures=["BitNetForCausalLM"], model_type="bitnet", hidden_act="relu2", tie_word_embeddings=True,
        vocab_size=tokenizer.get_vocab_size(), bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[EOT]],
        quantization_config=QUANTIZATION_CONFIG, torch_dtype=dtype,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )
    return raw


def export_hf(model: BitNet, tokenizer: Tokenizer, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Writes an HF directory that `transformers.BitNetForCausalLM.from_pretrained` loads."""
    if not model.quantize:
        raise ValueError("only a ternary (quantize=True) model can be exported as packed BitNet weights")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, param in model.state_dict().items():
        w = param.detach().float().cpu()
        if is_bitlinear(name):
            ternary, scale = quantize_ternary(w.numpy())
            tensors[name] = torch.from_numpy(pack_ternary_hf(ternary))              # (out/4, in) uint8
            tensors[name + "_scale"] = torch.tensor([scale], dtype=DTYPES[dtype])    # (1,)
        else:
            tensors[name] = w.to(DTYPES[dtype]).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    ids = special_ids(tokenizer)
    config = config_json(model.config, tokenizer, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[EOT]]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "model_max_length": model.config.max_position_embeddings, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out


def load_hf(model_dir: str | Path) -> tuple[BitNetConfig, dict[str, torch.Tensor]]:
    """An HF BitNet directory -> (config, float32 state dict for `BitNet`).

    A packed weight becomes ternary * (s / mean|ternary|): its absmean quantization is again
    exactly (ternary, s), so training starts from the same function. Unpacked (bf16 master)
    weights are used as they are.
    """
    model_dir = Path(model_dir)
    config = BitNetConfig.from_file(model_dir / "config.json")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FormatError(model_dir, "no *.safetensors files")
    raw = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                raw[name] = f.get_tensor(name)
    state = {}
    for name, tensor in raw.items():
        if name.endswith("weight_scale") or name == "lm_head.weight":
            continue
        if tensor.dtype == torch.uint8:
            ternary = unpack_ternary_hf(tensor.numpy()).astype(np.float32)              # (out, in)
            stored = raw[name + "_scale"].float().reshape(-1)[0].item()
            scale = 1.0 / stored if config.weight_scale_divides else stored
            density = max(float(np.abs(ternary).mean()), 1e-8)
            state[name] = torch.from_numpy(ternary * np.float32(scale / density))
        else:
            state[name] = tensor.float()
    return config, state
