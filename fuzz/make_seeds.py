"""Writes the seed corpus, fuzz/seeds/TARGET/: one tiny valid model (byte-level BPE tokenizer of
about 300 tokens, one layer, hidden size 128), its files one per HF target, the same model as
GGUF files, and a few chat templates. Run it again only to change the seeds:

    python -m fuzz.make_seeds
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from fuzz.targets import SEEDS
from ternlm.chat import BITNET_2B4T_TEMPLATE
from ternlm.weights.convert import convert_to_gguf
from ternlm.weights.packing import pack_ternary_hf

CORPUS = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
          "def main():\n    return 42  # héllo wörld, 世界 😀"]
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=64, max_position_embeddings=64)
# A LLaMA-3-like template: system message handling, loop variables, raise_exception.
LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set offset = 1 %}{% else %}{% set offset = 0 %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == offset) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
FILTERS_TEMPLATE = (
    "{% macro turn(m) %}[{{ m.role|upper }}] {{ m.content|replace('\\n', ' ')|truncate(200) }}{% endmacro %}"
    "{% for m in messages|selectattr('role', 'ne', 'system') %}{{ turn(m) }}{{ '\\n' if not loop.last }}{% endfor %}"
    "{{ messages|map(attribute='content')|join('|')|length }} {{ '%d messages' % messages|length }} "
    "{{ strftime_now('%Y') }}")


def train_tokenizer(lines: list[str], path: Path) -> int:
    """A byte-level BPE tokenizer of about 300 tokens with LLaMA-3's special tokens first, trained on
    `lines` and saved as `path`; returns its vocabulary size. (tests/conftest.py uses it too.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    tok.save(str(path))
    return tok.get_vocab_size()


def write_model(directory: Path) -> None:
    from safetensors.numpy import save_file

    vocab = train_tokenizer(CORPUS, directory / "tokenizer.json")
    config = dict(architectures=["BitNetForCausalLM"], model_type="bitnet", vocab_size=vocab, hidden_act="relu2",
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=0,
                  eos_token_id=[1, 2], quantization_config={"quant_method": "bitnet", "linear_class": "autobitlinear"},
                  **SHAPE)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "chat_template": BITNET_2B4T_TEMPLATE}))
    rng = np.random.default_rng(0)
    hidden, inner, head_dim = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["head_dim"]
    q_width, kv_width = SHAPE["num_attention_heads"] * head_dim, SHAPE["num_key_value_heads"] * head_dim
    shapes = {"self_attn.q_proj": (q_width, hidden), "self_attn.k_proj": (kv_width, hidden),
              "self_attn.v_proj": (kv_width, hidden), "self_attn.o_proj": (hidden, q_width),
              "mlp.gate_proj": (inner, hidden), "mlp.up_proj": (inner, hidden), "mlp.down_proj": (hidden, inner)}
    tensors = {"model.embed_tokens.weight": (rng.standard_normal((vocab, hidden)) * 0.5).astype(np.float16),
               "model.norm.weight": np.ones(hidden, np.float32)}
    prefix = "model.layers.0."
    for name, shape in shapes.items():
        tensors[prefix + name + ".weight"] = pack_ternary_hf(rng.integers(-1, 2, size=shape, dtype=np.int8))
        tensors[prefix + name + ".weight_scale"] = np.array([0.05], np.float32)
    for norm, size in (("input_layernorm", hidden), ("post_attention_layernorm", hidden),
                       ("self_attn.attn_sub_norm", q_width), ("mlp.ffn_sub_norm", inner)):
        tensors[prefix + norm + ".weight"] = (1 + 0.1 * rng.standard_normal(size)).astype(np.float32)
    save_file(tensors, str(directory / "model.safetensors"))


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        model = Path(scratch)
        write_model(model)
        for target, filename in (("config", "config.json"), ("safetensors", "model.safetensors"),
                                 ("tokenizer", "tokenizer.json"), ("tokenizer_config", "tokenizer_config.json")):
            (SEEDS / target).mkdir(parents=True, exist_ok=True)
            shutil.copy(model / filename, SEEDS / target / filename)
        (SEEDS / "gguf").mkdir(exist_ok=True)
        convert_to_gguf(model, SEEDS / "gguf" / "i2_s-q8_0.gguf", "i2_s", "q8_0")
        convert_to_gguf(model, SEEDS / "gguf" / "i2_s-f16.gguf", "i2_s", "f16")
    (SEEDS / "chat_template").mkdir(exist_ok=True)
    for name, template in (("bitnet_2b4t", BITNET_2B4T_TEMPLATE), ("llama3_style", LLAMA3_STYLE_TEMPLATE),
                           ("filters", FILTERS_TEMPLATE)):
        (SEEDS / "chat_template" / f"{name}.jinja").write_text(template, encoding="utf-8")
    for path in sorted(SEEDS.rglob("*.*")):
        print(f"{path.relative_to(SEEDS.parent)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
