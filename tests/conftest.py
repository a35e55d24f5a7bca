"""Tiny random checkpoints written the way real ones are, loaded by transformers as the oracle."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' BitNet unpacking is @torch.compile

import numpy as np
import pytest
from safetensors.numpy import save_file

from ternlm.weights.packing import pack_ternary_hf

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
CORPUS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die—to sleep,",
    "def main():\n    return 42  # héllo wörld, 世界 😀",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_json(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with LLaMA-3's special tokens, trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


def random_bitnet(arch: str = "bitnet", hidden_act: str = "relu2", tie: bool = True, seed: int = 0,
                  vocab_size: int = 320, layers: int = 2):
    """A float32 transformers model with random weights (plain linears: the master weights)."""
    import torch
    from transformers import BitNetConfig, BitNetForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1,
                  hidden_act=hidden_act, rope_theta=10000.0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = BitNetForCausalLM(BitNetConfig(**common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.5 if "embed" in name or "lm_head" in name else 0.05)
    return model.float().eval()


def ternarize(weight):
    """absmean ternary quantization in torch, as BitNet's training code does it."""
    import torch

    w = weight.detach().float()
    scale = w.abs().mean().clamp(min=1e-5)
    ternary = torch.clamp(torch.round(w * (1.0 / scale)), -1, 1)
    return ternary.to(torch.int8).numpy(), float(scale)


LINEAR_SUFFIXES = tuple(f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def write_checkpoint(model, directory: Path, tokenizer_json: Path, *, packed: bool = True,
                     linear_class: str = "autobitlinear", shards: int = 1, scale_dtype=np.float32,
                     architecture: str | None = None) -> Path:
    """Writes an HF directory. packed: uint8 [out/4, in] + weight_scale; else float32 masters."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in model.state_dict().items():
        if "rotary" in name or (name == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        if packed and name.endswith(LINEAR_SUFFIXES):
            ternary, scale = ternarize(p)
            tensors[name] = pack_ternary_hf(ternary)
            stored = scale if linear_class == "autobitlinear" else 1.0 / scale
            tensors[name[: -len("weight")] + "weight_scale"] = np.array([stored], dtype=scale_dtype)
        else:
            tensors[name] = p.detach().float().numpy().copy()
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            filename = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(directory / filename))
            weight_map.update({n: filename for n in part})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "bitnet",
        "linear_class": linear_class,
        "quantization_mode": "offline" if packed else "online",
    }
    config["torch_dtype"] = "float32"
    config["rope_theta"] = 10000.0
    config["architectures"] = [architecture or type(model).__name__]
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    (directory / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    return directory


def transformers_logits(directory: Path, ids: list[int]) -> np.ndarray:
    """Logits from transformers' own BitNet loading of the directory, computed in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory))
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.dtype != torch.uint8:
                setattr(module, name, buf.float())
        module.to(torch.float32) if not any(b.dtype == torch.uint8 for b in module.buffers(recurse=False)) else None
        if hasattr(module, "dtype") and isinstance(getattr(module, "dtype"), torch.dtype):
            module.dtype = torch.float32
    model = model.float().eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture
def tokenizer_json(tiny_tokenizer_json):
    return tiny_tokenizer_json
