"""Bad input raises ternlm.FormatError naming the file and the problem; never a crash."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import ternlm
from conftest import random_bitnet, write_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_tokenizer_json):
    return write_checkpoint(random_bitnet(seed=11), tmp_path_factory.mktemp("good"), tiny_tokenizer_json)


@pytest.fixture
def copy(good, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(good, target)
    return target


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_format_error_is_a_value_error():
    assert issubclass(ternlm.FormatError, ValueError)


def test_missing_directory(tmp_path):
    with pytest.raises(ternlm.FormatError, match="no such file"):
        ternlm.load(tmp_path / "nope")


def test_missing_config(copy):
    (copy / "config.json").unlink()
    with pytest.raises(ternlm.FormatError, match=r"config\.json.*not found"):
        ternlm.load(copy)


def test_missing_weights(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(ternlm.FormatError, match="no model.safetensors"):
        ternlm.load(copy)


def test_unknown_architecture(copy):
    edit_config(copy, architectures=["MambaForCausalLM"])
    with pytest.raises(ternlm.FormatError, match="unknown architecture 'MambaForCausalLM'"):
        ternlm.load(copy)


def test_llama_without_bitnet_quantization(copy):
    edit_config(copy, architectures=["LlamaForCausalLM"], quantization_config=None)
    with pytest.raises(ternlm.FormatError, match="not a ternary model"):
        ternlm.load(copy)


def test_unknown_activation(copy):
    edit_config(copy, hidden_act="gelu")
    with pytest.raises(ternlm.FormatError, match="hidden_act 'gelu'"):
        ternlm.load(copy)


def test_invalid_json_config(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(ternlm.FormatError, match="not valid JSON"):
        ternlm.load(copy)


def test_wrong_shape(copy):
    edit_config(copy, intermediate_size=128)  # the file holds 96-wide FFN weights
    with pytest.raises(ternlm.FormatError, match=r"model\.safetensors|gate_proj"):
        ternlm.load(copy)


@pytest.mark.parametrize("keep", [0, 5, 100, -1000, -1])
def test_truncated_safetensors(copy, keep):
    path = copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(ternlm.FormatError, match="model.safetensors"):
        ternlm.load(copy)


def test_hostile_header_length(copy):
    path = copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = (2**63).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ternlm.FormatError, match="header length"):
        ternlm.load(copy)


def test_missing_tensor_in_shard_index(copy, tiny_tokenizer_json, tmp_path):
    sharded = write_checkpoint(random_bitnet(seed=12), tmp_path / "sharded", tiny_tokenizer_json, shards=2)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    index["weight_map"]["model.layers.0.mlp.gate_proj.weight"] = "model-00002-of-00002.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ternlm.FormatError, match="listed in the index is missing"):
        ternlm.load(sharded)


def test_invalid_ternary_code(copy):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(copy / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] = 0xFF
    save_file(tensors, str(copy / "model.safetensors"))
    with pytest.raises(ternlm.FormatError, match="k_proj.*code 3"):
        ternlm.load(copy)


def test_missing_tokenizer(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ternlm.FormatError, match="no tokenizer.json"):
        ternlm.load(copy)


def test_broken_chat_template(copy):
    (copy / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ternlm.FormatError, match="invalid chat template"):
        ternlm.load(copy)


def test_gguf_is_named_not_guessed(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(ternlm.FormatError, match="GGUF"):
        ternlm.load(path)


def test_tensors_are_views_of_the_mapped_file(good):
    """Dense tensors come straight from the mapped file, not from a copy in memory."""
    import mmap

    from ternlm.weights.hf import HFCheckpoint

    array = HFCheckpoint(good).dense("model.embed_tokens.weight").array
    assert not array.flags.owndata and not array.flags.writeable
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)
