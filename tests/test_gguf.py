"""GGUF: the same weights as HF packed, I2_S, TQ2_0 and TQ1_0; layouts against gguf.quants and the
I2_S spec; tokenizer from metadata against tokenizers; upstream llama.cpp side by side; bad files."""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, TokenType
from gguf import quants as gguf_quants

import ternlm
from conftest import (CORPUS, PROMPT, assert_matches_oracle, random_bitnet, ternarize, transformers_logits,
                      write_checkpoint)
from llama_cpp_oracle import llama_cpp_greedy
from test_tokenizer import TEXTS
from ternlm.chat import BITNET_2B4T_TEMPLATE, ChatTemplate, usable_template
from ternlm.cli import main as cli_main
from ternlm.weights.checkpoint import (ATTENTION_PROJECTIONS, MLP_PROJECTIONS, DenseTensor, float32_of, linear_name,
                                       linear_shape)
from ternlm.weights.convert import convert_to_gguf, convert_to_hf, quantize_q6_k
from ternlm.weights.gguf import GGUFCheckpoint, GGUFFile, _ternary_of_float
from ternlm.weights.gguf_ternary import (pack_i2_s, pack_tq1_0, pack_tq2_0, tensor_scale, unpack_i2_s, unpack_tq1_0,
                                         unpack_tq2_0)
from ternlm.weights.gguf_tokenizer import gguf_tokenizer
from ternlm.weights.hf import HFCheckpoint

FORMATS = ("i2_s", "tq2_0", "tq1_0")


def wide_random_model(arch: str = "bitnet", hidden_act: str = "relu2", tie: bool = True, seed: int = 0):
    """conftest.random_bitnet at the widths GGUF's ternary blocks need (rows of 256)."""
    return random_bitnet(arch, hidden_act, tie, seed, hidden_size=256, intermediate_size=512)


ARCHITECTURES = {
    # name: wide_random_model kwargs
    "bitnet-relu2-tied": {},
    "bitnet-silu-untied": {"hidden_act": "silu", "tie": False, "seed": 1},
    "llama-silu": {"arch": "llama", "hidden_act": "silu", "seed": 2},
}


def round_scales_to_f16(directory: Path) -> Path:
    """TQ blocks store f16 scales: with f16-exact scales every format holds the same model."""
    from safetensors.numpy import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    for name, tensor in tensors.items():
        if name.endswith("weight_scale"):
            tensors[name] = tensor.astype(np.float16).astype(tensor.dtype)
    save_file(tensors, str(path))
    return directory


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def converted(request, tmp_path_factory, tiny_tokenizer_json):
    """An HF packed checkpoint (scales f16-exact) and its three GGUF conversions."""
    directory = tmp_path_factory.mktemp(request.param)
    hf = round_scales_to_f16(write_checkpoint(wide_random_model(**ARCHITECTURES[request.param]), directory / "hf",
                                              tiny_tokenizer_json))
    files = {kind: convert_to_gguf(hf, directory / f"{kind}.gguf", ternary=kind, head="f32") for kind in FORMATS}
    return hf, files


@pytest.fixture(scope="module")
def oracle(converted):
    """transformers' logits for the HF checkpoint."""
    return transformers_logits(converted[0], PROMPT)


@pytest.mark.parametrize("kind", FORMATS)
def test_same_ternary_weights_as_hf(converted, kind):
    hf_dir, files = converted
    hf, gguf = HFCheckpoint(hf_dir), GGUFCheckpoint(files[kind])
    assert gguf.config.architecture == hf.config.architecture
    assert gguf.config.hidden_act == hf.config.hidden_act
    assert gguf.config.tie_word_embeddings == hf.config.tie_word_embeddings
    for layer in range(hf.config.num_hidden_layers):
        for projection in ATTENTION_PROJECTIONS + MLP_PROJECTIONS:
            name, shape = linear_name(layer, projection), linear_shape(hf.config, projection)
            (theirs, their_scale), (ours, our_scale) = hf.ternary(name, *shape), gguf.ternary(name, *shape)
            np.testing.assert_array_equal(ours, theirs)
            # I2_S stores the f32 scale; TQ blocks an f16 one
            expected = np.float32(their_scale) if kind == "i2_s" else np.float16(their_scale)
            assert our_scale == float(expected)


@pytest.mark.slow
@pytest.mark.parametrize("kind", FORMATS)
def test_logits_match_transformers(converted, oracle, kind):
    _, files = converted
    assert_matches_oracle(ternlm.load(files[kind], kv_cache="f32").logits(PROMPT), oracle)


@pytest.mark.slow
def test_tq_rounds_scales_to_f16_only(tmp_path, tiny_tokenizer_json):
    """With scales that f16 cannot hold, a TQ file differs from the HF checkpoint by that rounding
    alone: the same logits as transformers on the checkpoint with its scales rounded to f16."""
    hf = write_checkpoint(wide_random_model(seed=4), tmp_path / "hf", tiny_tokenizer_json)
    tq = convert_to_gguf(hf, tmp_path / "tq.gguf", ternary="tq1_0", head="f32")
    assert_matches_oracle(ternlm.load(tq, kv_cache="f32").logits(PROMPT),
                          transformers_logits(round_scales_to_f16(hf), PROMPT))


@pytest.mark.slow
def test_convert_from_bf16_masters(tmp_path, tiny_tokenizer_json):
    """Master weights (the -bf16 release's form) are quantized on the way in; a bf16 head stays bf16."""
    hf = write_checkpoint(wide_random_model(seed=6), tmp_path / "hf", tiny_tokenizer_json, packed=False, dtype="bfloat16")
    path = convert_to_gguf(hf, tmp_path / "m.gguf", ternary="i2_s", head="bf16")
    assert GGUFFile(path).tensors["token_embd.weight"].type_name == "BF16"
    assert_matches_oracle(ternlm.load(path, kv_cache="f32").logits(PROMPT), transformers_logits(hf, PROMPT))


def test_tokenizer_and_stop_ids_survive_conversion(converted):
    hf_dir, files = converted
    hf, gguf = ternlm.load(hf_dir, backend="reference"), ternlm.load(files["tq1_0"], backend="reference")
    for text in TEXTS:
        assert gguf.tokenizer.encode(text) == hf.tokenizer.encode(text)
    assert gguf.stop_ids == hf.stop_ids
    assert gguf.chat_template.render([{"role": "user", "content": "hi"}]) == \
        hf.chat_template.render([{"role": "user", "content": "hi"}])


def test_gguf_to_hf_round_trip(converted, tmp_path):
    _, files = converted
    back = convert_to_hf(files["tq2_0"], tmp_path / "back")
    np.testing.assert_array_equal(ternlm.load(back).logits(PROMPT), ternlm.load(files["tq2_0"]).logits(PROMPT))


@pytest.mark.slow
def test_transformers_reads_a_gguf_converted_to_hf(converted, oracle, tmp_path):
    back = convert_to_hf(converted[1]["tq2_0"], tmp_path / "back")
    assert_matches_oracle(transformers_logits(back, PROMPT), oracle)


# -- layouts ----------------------------------------------------------------------------------
def random_ternary(rows=6, cols=512, seed=0):
    ternary = np.random.default_rng(seed).integers(-1, 2, size=(rows, cols)).astype(np.int8)
    ternary[1, :256] = 0  # an all-zero block: llama.cpp gives it the scale 0
    return ternary


@pytest.mark.parametrize("qtype, pack, unpack", [(GGMLQuantizationType.TQ2_0, pack_tq2_0, unpack_tq2_0),
                                                 (GGMLQuantizationType.TQ1_0, pack_tq1_0, unpack_tq1_0)])
def test_tq_layouts_against_gguf_quants(qtype, pack, unpack):
    ternary, scale = random_ternary(), 0.0371
    # ours -> gguf.quants: byte for byte what llama.cpp's quantizer writes, and it decodes them
    reference = gguf_quants.quantize(ternary.astype(np.float32) * np.float32(scale), qtype)
    np.testing.assert_array_equal(pack(ternary, scale), reference.reshape(-1))
    decoded = gguf_quants.dequantize(pack(ternary, scale).reshape(ternary.shape[0], -1), qtype)
    np.testing.assert_array_equal(decoded, ternary * np.float32(np.float16(scale)))
    # gguf.quants -> ours
    values, block_scales = unpack(reference.reshape(-1), *ternary.shape)
    np.testing.assert_array_equal(values, ternary)
    assert tensor_scale(values, block_scales) == float(np.float16(scale))


def test_tq_block_scales_must_agree():
    ternary = random_ternary()
    values = ternary.astype(np.float32) * 0.5
    values[3, :256] *= 2  # one block with another scale: not a BitNet tensor
    packed = gguf_quants.quantize(values, GGMLQuantizationType.TQ2_0).reshape(-1)
    with pytest.raises(ValueError, match="different block scales"):
        tensor_scale(*unpack_tq2_0(packed, *ternary.shape))


def test_i2_s_layout_follows_the_spec():
    """Against the layout as docs/design.md §2 states it, one weight at a time."""
    ternary, scale = random_ternary(rows=2, cols=384, seed=1), 0.25
    expected = bytearray(ternary.size // 4 + 32)
    for i, value in enumerate(ternary.reshape(-1)):
        block, j = divmod(i, 128)
        group, position = divmod(j, 32)
        expected[block * 32 + position] |= (int(value) + 1) << (6 - 2 * group)
    expected[ternary.size // 4: ternary.size // 4 + 4] = struct.pack("<f", scale)
    assert pack_i2_s(ternary, scale).tobytes() == bytes(expected)
    values, decoded_scale = unpack_i2_s(np.frombuffer(bytes(expected), dtype=np.uint8), *ternary.shape)
    np.testing.assert_array_equal(values, ternary)
    assert decoded_scale == scale


# -- tokenizer from metadata ------------------------------------------------------------------
def write_gguf(path: Path, arch: str = "bitnet-b1.58", tensors=(), **metadata) -> Path:
    """A GGUF file written with gguf-py: metadata values typed by Python type, tensors as
    (name, array, raw ggml type or None)."""
    writer = GGUFWriter(path, arch)
    for key, value in metadata.items():
        key = key.replace("__", ".").replace("ARCH", arch)
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, array, raw_type in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tokenizer_metadata(tokenizer_json: dict, **extra) -> dict:
    """The gpt2 vocabulary keys, as llama.cpp's converter writes them for a tokenizer.json."""
    vocab = dict(tokenizer_json["model"]["vocab"])
    types = {}
    for added in tokenizer_json["added_tokens"]:
        vocab[added["content"]] = added["id"]
        types[added["id"]] = TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    return {"tokenizer__ggml__model": "gpt2", "tokenizer__ggml__tokens": tokens,
            "tokenizer__ggml__token_type": [int(types.get(i, TokenType.NORMAL)) for i in range(len(tokens))],
            "tokenizer__ggml__merges": merges, **extra}


@pytest.fixture(scope="module")
def llama3_json(llama3_dir):
    return json.loads((llama3_dir / "tokenizer.json").read_text(encoding="utf-8"))


def test_llama3_vocabulary_encodes_like_tokenizer_json(llama3_json, tmp_path):
    """2B4T's file has no tokenizer.ggml.pre: the LLaMA-3 pre-tokenizer must be used."""
    from tokenizers import Tokenizer as HFTokenizer

    path = write_gguf(tmp_path / "vocab.gguf", **tokenizer_metadata(
        llama3_json, tokenizer__ggml__bos_token_id=128000, tokenizer__ggml__eos_token_id=128001))
    ours = gguf_tokenizer(GGUFFile(path))
    theirs = HFTokenizer.from_str(json.dumps(llama3_json))
    assert ours.vocab_size == 128256 and ours.bos_id == 128000 and ours.eos_id == 128001
    for text in TEXTS:
        assert ours.encode(text, add_bos=False) == theirs.encode(text, add_special_tokens=False).ids, text
        ids = ours.encode(text, add_bos=False)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)


def test_sentencepiece_vocabulary_encodes_like_its_bpe(tmp_path):
    """A `llama` (SentencePiece) vocabulary stores pieces and scores, no merges: rebuilt from the
    scores, it must split text as the BPE whose pieces they are (trained here with tokenizers,
    SentencePiece-style: "▁" for spaces, byte fallback; a piece's score ranks its merge)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, trainers

    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.train_from_iterator(CORPUS + TEXTS, trainers.BpeTrainer(vocab_size=600, special_tokens=special))
    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * (len(tokens) - len(types))
    scores = [0.0] * len(special) + [-float(i) for i in range(len(special), len(tokens))]
    path = write_gguf(tmp_path / "sp.gguf", tokenizer__ggml__model="llama", tokenizer__ggml__tokens=tokens,
                      tokenizer__ggml__token_type=[int(t) for t in types], tokenizer__ggml__scores=scores,
                      tokenizer__ggml__bos_token_id=1, tokenizer__ggml__eos_token_id=2)
    ours = gguf_tokenizer(GGUFFile(path))
    for text in TEXTS + ["A sea of troubles, nobler still"]:
        assert ours.encode(text, add_bos=False) == bpe.encode(text).ids, text
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("x")[0] == 1


def test_chat_template_from_metadata(tiny_tokenizer_json, tmp_path):
    tok = json.loads(tiny_tokenizer_json.read_text(encoding="utf-8"))
    broken = ("{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
              "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")
    custom = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|eot_id|>{% endfor %}"
    # the template of 2B4T's tokenizer_config.json: the official format, so kept
    official = ("{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
                "{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}"
                "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
    for template, expected in ((broken, None), (custom, custom), (None, None), (official, official)):
        extra = {"tokenizer__chat_template": template} if template else {}
        path = write_gguf(tmp_path / "t.gguf", **tokenizer_metadata(tok, **extra))
        ours = gguf_tokenizer(GGUFFile(path))
        assert ours.chat_template == template  # the reader returns what the file says
        has_eot = ours.token_to_id("<|eot_id|>") is not None
        assert usable_template(ours.chat_template, "<s>", "</s>", has_eot) == expected
    # None means the built-in 2B4T template
    assert ChatTemplate(None).source == BITNET_2B4T_TEMPLATE


def test_add_bos_false_is_honoured(tiny_tokenizer_json, tmp_path):
    tok = json.loads(tiny_tokenizer_json.read_text(encoding="utf-8"))
    path = write_gguf(tmp_path / "t.gguf", **tokenizer_metadata(
        tok, tokenizer__ggml__bos_token_id=0, tokenizer__ggml__add_bos_token=False))
    assert gguf_tokenizer(GGUFFile(path)).encode("To be") == gguf_tokenizer(GGUFFile(path)).encode("To be", add_bos=False)


# -- dense types ------------------------------------------------------------------------------
MODEL_KEYS = dict(ARCH__block_count=1, ARCH__embedding_length=256, ARCH__feed_forward_length=512,
                  ARCH__attention__head_count=4, ARCH__attention__layer_norm_rms_epsilon=1e-5,
                  ARCH__context_length=64)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q4_K", "BF16"])
def test_dense_types_are_dequantized_like_gguf_quants(qtype, tmp_path):
    """Quantized embeddings come back as float16 (the engine's dense formats), BF16 as stored."""
    qtype = GGMLQuantizationType[qtype]
    rng = np.random.default_rng(3)
    if qtype in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.BF16):
        raw = gguf_quants.quantize(rng.normal(size=(320, 256)).astype(np.float32), qtype).view(np.uint8)
    else:  # gguf-py cannot quantize K types: random blocks with sane f16 scales are valid data
        raw = rng.integers(0, 256, size=(320, 210 if qtype == GGMLQuantizationType.Q6_K else 144), dtype=np.uint8)
        f16 = lambda x: np.frombuffer(np.float16(x).tobytes(), dtype=np.uint8)  # noqa: E731
        if qtype == GGMLQuantizationType.Q6_K:
            raw[:, 208:210] = f16(0.01)  # d
        else:
            raw[:, 0:2], raw[:, 2:4] = f16(0.01), f16(0.002)  # d, dmin
    path = write_gguf(tmp_path / "dense.gguf", tensors=[("token_embd.weight", raw, qtype)], **MODEL_KEYS)
    dense = GGUFCheckpoint(path).dense("model.embed_tokens.weight")
    expected = gguf_quants.dequantize(raw, qtype)
    if qtype != GGMLQuantizationType.BF16:
        assert dense.dtype == "float16"
        expected = expected.astype(np.float16)
    np.testing.assert_array_equal(float32_of(dense), expected.astype(np.float32))


def test_q6_k_head_decodes_with_gguf_quants():
    """Our Q6_K writer (gguf-py has none) against gguf-py's decoder: the error of 6-bit codes."""
    values = np.random.default_rng(4).normal(size=(64, 512)).astype(np.float32)
    values[3, :256] = 0
    decoded = gguf_quants.dequantize(quantize_q6_k(values), GGMLQuantizationType.Q6_K)
    assert np.sqrt(np.mean((decoded - values) ** 2)) < 0.02 * np.sqrt(np.mean(values ** 2))
    assert np.all(decoded[3, :256] == 0)


# -- quantized embeddings and heads, used in place -----------------------------------------------
BLOCK_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
EMBEDDING = "model.embed_tokens.weight"


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_block_rows_decode_like_gguf_quants(qtype):
    """The core's row decoder (embedding lookups, head conversion) against gguf-py's dequantize,
    bit for bit, on random bytes: every pattern of codes, scales and minimums."""
    from gguf import GGML_QUANT_SIZES

    from ternlm import _core

    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    raw = np.random.default_rng(block_bytes).integers(0, 256, size=(6, 512 // block * block_bytes), dtype=np.uint8)
    with np.errstate(all="ignore"):  # random f16 scales include infinities and NaNs
        expected = gguf_quants.dequantize(raw, GGMLQuantizationType[qtype])
    got = _core.kernels.dequantize_rows(raw, qtype, 512)
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    finite = ~np.isnan(expected)
    assert np.array_equal(got[finite].view(np.uint32), expected[finite].view(np.uint32))


@pytest.fixture(scope="module")
def block_head_models(tmp_path_factory, tiny_tokenizer_json):
    """One tied and one untied model (f16-exact scales), and their TQ2_0 GGUFs by embedding type."""
    directory = tmp_path_factory.mktemp("block-heads")
    files = {}
    for tie in (True, False):
        hf = round_scales_to_f16(write_checkpoint(wide_random_model(tie=tie, seed=21), directory / f"hf-{tie}",
                                                  tiny_tokenizer_json))
        for head in ("q4_0", "q8_0", "q6_k", "q5_1"):
            files[tie, head] = convert_to_gguf(hf, directory / f"{head}-{tie}.gguf", ternary="tq2_0", head=head)
    return files


@contextlib.contextmanager
def _dequantized_floats(monkeypatch):
    """GGUF files read as if their quantized tensors were stored as gguf-py's float32 dequantization."""
    stored_blocks, stored_dense = GGUFCheckpoint.blocks, GGUFCheckpoint.dense

    def dense(self, name):
        blocks = stored_blocks(self, name)
        if blocks is None:
            return stored_dense(self, name)
        return DenseTensor(gguf_quants.dequantize(blocks.blocks, GGMLQuantizationType[blocks.type]), "float32")

    with monkeypatch.context() as patch:
        patch.setattr(GGUFCheckpoint, "blocks", lambda self, name: None)
        patch.setattr(GGUFCheckpoint, "dense", dense)
        patch.setattr(GGUFCheckpoint, "file_location", lambda self, name: None)
        yield


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("head", ["q4_0", "q8_0", "q6_k", "q5_1"])
def test_quantized_embedding_rows_are_gguf_quants_rows(block_head_models, monkeypatch, tie, head):
    """Embedding rows decoded from the file's blocks as a prompt needs them (read from the file,
    never all mapped) give the same logits, bit for bit, as the whole matrix dequantized by gguf-py
    to float32 up front; so does the int8 head converted from the blocks."""
    path = block_head_models[tie, head]
    in_place = ternlm.load(path, head="int8")
    assert in_place.engine.embedding_read_from_file and in_place.engine.head == "int8"
    with _dequantized_floats(monkeypatch):
        oracle = ternlm.load(path, head="int8")
    prompt = PROMPT + [319, 318]  # the file's last rows too
    assert np.array_equal(in_place.logits(prompt), oracle.logits(prompt))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_q4_0_head_is_used_as_stored(block_head_models, tie):
    """A Q4_0 head becomes the q4 head without a float copy, with or without --head q4: its
    logits are gguf-py's dequantization of the file's blocks times the int8-quantized final
    hidden state (the NumPy reference's, read through an identity head), in float64."""
    from ternlm.reference import ReferenceModel, quantize_activations

    path = block_head_models[tie, "q4_0"]
    model = ternlm.load(path, head="q4", kv_cache="f32")  # f32 like the reference's
    assert model.engine.head == "q4" and model.engine.head_origin == "the file's Q4_0 blocks as they are"
    checkpoint = GGUFCheckpoint(path)
    config = checkpoint.config
    head = gguf_quants.dequantize(checkpoint.blocks(checkpoint.head_name()).blocks, GGMLQuantizationType.Q4_0)
    reference = ReferenceModel(checkpoint)
    reference.embed = gguf_quants.dequantize(checkpoint.blocks(EMBEDDING).blocks, GGMLQuantizationType.Q4_0)
    reference.head = np.eye(config.vocab_size, config.hidden_size, dtype=np.float32)
    hidden = reference.forward(reference.new_cache(len(PROMPT)), PROMPT, 0, all_logits=True)[:, :config.hidden_size]
    xq, a = quantize_activations(hidden)
    expected = (xq.astype(np.float64) @ head.T.astype(np.float64)) / a
    assert_matches_oracle(model.logits(PROMPT), expected)
    assert np.array_equal(ternlm.load(path, kv_cache="f32").logits(PROMPT), model.logits(PROMPT))
    assert model.engine.head_bytes == config.vocab_size * config.hidden_size * 18 // 32


def test_q4_0_head_in_place_equals_requantizing_its_f16_values(block_head_models, monkeypatch):
    """What the head was before it was used in place: dequantized to float16, then quantized to q4
    (the core's llama.cpp Q4_0 quantizer). A group's value of largest magnitude is -8 d, exact in
    f16, so that gives back the same d and codes: the same logits, bit for bit."""
    path = block_head_models[False, "q4_0"]
    in_place = ternlm.load(path, head="q4")
    stored_blocks = GGUFCheckpoint.blocks
    monkeypatch.setattr(GGUFCheckpoint, "blocks",
                        lambda self, name: None if name == "lm_head.weight" else stored_blocks(self, name))
    requantized = ternlm.load(path, head="q4")
    assert requantized.engine.head_origin == "quantized from f16 at load"
    assert np.array_equal(in_place.logits(PROMPT), requantized.logits(PROMPT))


@pytest.mark.parametrize("head, expected", [("q4_0", "q4"), ("q8_0", "int8"), ("q6_k", "int8"), ("q5_1", "int8")])
def test_quantized_heads_never_make_a_float_copy(block_head_models, monkeypatch, head, expected):
    """Without --head a quantized head becomes q4 (Q4_0 as stored) or int8 (wider types), and
    neither it nor a quantized embedding is ever dequantized whole: dense() is not called."""
    def refuse(self, name):
        assert name.endswith("norm.weight"), f"{name} dequantized whole"
        return original(self, name)

    original = GGUFCheckpoint.dense
    monkeypatch.setattr(GGUFCheckpoint, "dense", refuse)
    for tie in (True, False):
        for asked in (None, "q4", "int8"):
            engine = ternlm.load(block_head_models[tie, head], head=asked).engine
            assert engine.head == (asked or expected)


@pytest.mark.slow
def test_float_ternary_weights_keep_their_scale():
    """llama.cpp's BitNet converter stores f16 t * scale: read back exactly, not re-quantized
    (absmean of t * scale is not the scale). A master weight is quantized as at training."""
    import torch

    ternary = random_ternary()
    stored = DenseTensor(ternary.astype(np.float16) * np.float16(0.0371), "float16")
    values, scale = _ternary_of_float(stored)
    np.testing.assert_array_equal(values, ternary)
    assert scale == float(np.float16(0.0371))
    master = np.random.default_rng(5).normal(size=(8, 256)).astype(np.float32)
    expected, expected_scale = ternarize(torch.from_numpy(master))
    values, scale = _ternary_of_float(DenseTensor(master, "float32"))
    np.testing.assert_array_equal(values, expected)
    assert scale == pytest.approx(expected_scale, rel=1e-6)


# -- the command line -------------------------------------------------------------------------
def test_cli_convert_both_ways(converted, tmp_path, monkeypatch):
    hf_dir, _ = converted
    oracle = ternlm.load(hf_dir, backend="reference").logits(PROMPT)
    out = tmp_path / "m.gguf"
    assert cli_main(["convert", str(hf_dir), str(out), "--type", "tq1_0", "--head", "q8_0"]) == 0
    head = GGUFFile(out).tensors["output.weight" if "output.weight" in GGUFFile(out).tensors else "token_embd.weight"]
    assert head.type_name == "Q8_0"
    assert ternlm.load(out).engine.head == "int8"  # requantized from Q8_0 (docs/gguf.md)
    with monkeypatch.context() as patch:  # read as the conversions below write it: dequantized to f16
        patch.setattr(GGUFCheckpoint, "blocks", lambda self, name: None)
        patch.setattr(GGUFCheckpoint, "file_location", lambda self, name: None)
        logits = ternlm.load(out, head="f16").logits(PROMPT)
    assert np.abs(logits - oracle).max() < 2e-2 * np.ptp(oracle)  # an 8-bit head: close, not exact
    assert cli_main(["convert", str(out), str(tmp_path / "again.gguf"), "--type", "i2_s", "--head", "f32"]) == 0
    np.testing.assert_array_equal(ternlm.load(tmp_path / "again.gguf").logits(PROMPT), logits)
    assert cli_main(["convert", str(out), str(tmp_path / "hf"), "--to", "hf"]) == 0
    np.testing.assert_array_equal(ternlm.load(tmp_path / "hf").logits(PROMPT), logits)


# -- bad files --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory, tiny_tokenizer_json):
    directory = tmp_path_factory.mktemp("good")
    hf = write_checkpoint(wide_random_model(seed=5), directory / "hf", tiny_tokenizer_json)
    return convert_to_gguf(hf, directory / "good.gguf", ternary="tq2_0")


def corrupt(good: Path, tmp_path: Path, at: int, value: bytes) -> Path:
    data = bytearray(good.read_bytes())
    data[at: at + len(value)] = value
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    return path


def tensor_field_offset(path: Path, tensor: str, part: int) -> int:
    """Where part `part` (3 dims, 4 type, 5 offset) of a tensor's info sits in the file, by gguf-py's reader."""
    field = next(t.field for t in GGUFReader(path).tensors if t.name == tensor)
    return field.offset + sum(int(p.nbytes) for p in field.parts[:part])


@pytest.mark.parametrize("keep", [3, 10, 23, 200, 5000, 0.5, 0.999])
def test_truncated_files(good_gguf, tmp_path, keep):
    data = good_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(ternlm.FormatError, match=str(path)):
        ternlm.load(path)


@pytest.mark.parametrize("at, count", [(8, 1 << 63), (16, 1 << 62), (24, 1 << 60)])
def test_hostile_counts(good_gguf, tmp_path, at, count):
    """tensor count, metadata count, the first key's length."""
    with pytest.raises(ternlm.FormatError, match="past the end"):
        ternlm.load(corrupt(good_gguf, tmp_path, at, struct.pack("<Q", count)))


def test_hostile_array_length(good_gguf, tmp_path):
    field = GGUFReader(good_gguf).fields["tokenizer.ggml.merges"]
    at = field.offset + 8 + len("tokenizer.ggml.merges") + 4 + 4
    with pytest.raises(ternlm.FormatError, match="past the end"):
        ternlm.load(corrupt(good_gguf, tmp_path, at, struct.pack("<Q", 1 << 61)))


def test_tensor_offset_outside_the_file(good_gguf, tmp_path):
    at = tensor_field_offset(good_gguf, "blk.1.ffn_down.weight", 5)
    with pytest.raises(ternlm.FormatError, match="blk.1.ffn_down.weight.*(past the end|overlaps)"):
        ternlm.load(corrupt(good_gguf, tmp_path, at, struct.pack("<Q", 1 << 40)))


@pytest.mark.parametrize("type_id, message", [(39, "MXFP4"), (38, "TL1"), (200, "unknown GGML type id 200"),
                                              (36, "occupies .* not the .* of I2_S")])
def test_unknown_or_clashing_type_ids(good_gguf, tmp_path, type_id, message):
    at = tensor_field_offset(good_gguf, "blk.0.attn_q.weight", 4)
    with pytest.raises(ternlm.FormatError, match=message):
        ternlm.load(corrupt(good_gguf, tmp_path, at, struct.pack("<I", type_id)))


def test_unknown_architecture(tmp_path):
    with pytest.raises(ternlm.FormatError, match="unsupported architecture 'mamba'"):
        ternlm.load(write_gguf(tmp_path / "m.gguf", arch="mamba"))


@pytest.mark.parametrize("damage", ["nan scale", "inf minimum", "short rows"])
def test_bad_quantized_heads(block_head_models, tmp_path, damage):
    """A quantized head or embedding with a non-finite f16 field, or rows of the wrong width, is
    refused at load, naming the tensor."""
    source = block_head_models[False, "q5_1" if damage == "inf minimum" else "q8_0"]
    info = GGUFFile(source).tensors["output.weight"]
    if damage == "short rows":  # output.weight claims a row of 224 weights, the embedding 256
        field = tensor_field_offset(source, "output.weight", 3)
        path = corrupt(source, tmp_path, field, struct.pack("<Q", 224))
        message = "'lm_head.weight' \\(Q8_0\\): Q8_0 rows of 256 weights must be"
    else:  # block 5's scale d (Q8_0), or its minimum m (Q5_1: d, then m at byte 2)
        at = info.offset + 5 * (34 if damage == "nan scale" else 24) + (0 if damage == "nan scale" else 2)
        path = corrupt(source, tmp_path, at, np.float16(np.nan if damage == "nan scale" else np.inf).tobytes())
        message = "'output.weight' has a block scale that is infinite or NaN"
    with pytest.raises(ternlm.FormatError, match=message):
        ternlm.load(path)


def test_differing_block_scales_are_not_bitnet(good_gguf, tmp_path):
    info = GGUFFile(good_gguf).tensors["blk.0.ffn_up.weight"]
    with pytest.raises(ternlm.FormatError, match="ffn_up.*different block scales"):
        ternlm.load(corrupt(good_gguf, tmp_path, info.offset + 64, np.float16(0.123).tobytes()))


# -- side by side with upstream llama.cpp (in a child process: llama_cpp_oracle.py) ------------
@pytest.mark.slow
@pytest.mark.parametrize("arch, head", [("bitnet", "f16"), ("llama", "q6_k")])
def test_llama_cpp_agrees(arch, head, tmp_path, tiny_tokenizer_json):
    """llama.cpp computes the same model: SiLU `bitnet` (its BitNet graph) and a ternary `llama`
    (q/k rows in its RoPE order, and our Q6_K head), TQ2_0. It quantizes activations per
    256-block (Q8_K), we per token: the same for rows of 256, not for down_proj's 512, so logits
    are close, not equal (measured: 7.5e-3 and 2.1e-3 of the range at most)."""
    hf = write_checkpoint(wide_random_model(arch=arch, hidden_act="silu", seed=7), tmp_path / "hf", tiny_tokenizer_json)
    path = convert_to_gguf(hf, tmp_path / "m.gguf", ternary="tq2_0", head=head)
    ours = ternlm.load(path)
    their_logits, their_tokens = llama_cpp_greedy(path, PROMPT, continuation=16)
    our_logits = ours.logits(PROMPT)
    assert np.abs(our_logits - their_logits).max() < 1.5e-2 * np.ptp(our_logits)
    ours.stop_ids = set()
    assert list(ours.stream_tokens(PROMPT, max_tokens=16)) == their_tokens


@pytest.mark.slow
def test_llama_cpp_computes_silu_for_bitnet(tmp_path, tiny_tokenizer_json):
    """What the README says: llama.cpp's `bitnet` graph ignores relu2 (logits off by ~0.17 of the
    range on this model), while ternlm follows the file's ternlm.hidden_act and matches transformers."""
    hf = write_checkpoint(wide_random_model(hidden_act="relu2", seed=7), tmp_path / "hf", tiny_tokenizer_json)
    path = convert_to_gguf(hf, tmp_path / "m.gguf", ternary="tq2_0", head="f16")
    their_logits, _ = llama_cpp_greedy(path, PROMPT)
    our_logits = ternlm.load(path).logits(PROMPT)
    assert np.abs(our_logits - their_logits).max() > 5e-2 * np.ptp(our_logits)


ISOLATION_TESTS = """
import signal, sys
sys.path.insert(0, {tests!r})
from llama_cpp_oracle import llama_cpp_greedy

def test_oracle_crashes():
    llama_cpp_greedy({gguf!r}, [0, 1, 2], crash_with=signal.SIGSEGV)

def test_after_the_crash():
    assert llama_cpp_greedy({gguf!r}, [0, 1, 2])[0].shape[0] == 3
"""


@pytest.mark.slow
def test_a_crashing_llama_cpp_fails_one_test_and_the_run_goes_on(tmp_path, tiny_tokenizer_json):
    """Issue #17: llama.cpp's AMX matmul segfaulted inside a test and took pytest down with it. A
    pytest run whose llama.cpp child dies of SIGSEGV reports that test as failed, naming the oracle
    and the signal, and still runs and passes the next test."""
    pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python")
    hf = write_checkpoint(wide_random_model(seed=3), tmp_path / "hf", tiny_tokenizer_json)
    gguf = convert_to_gguf(hf, tmp_path / "m.gguf", ternary="tq2_0", head="f16")
    tests = tmp_path / "test_isolation.py"
    tests.write_text(ISOLATION_TESTS.format(tests=str(Path(__file__).parent), gguf=str(gguf)))
    run = subprocess.run([sys.executable, "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert "1 failed, 1 passed" in run.stdout, run.stdout + run.stderr
    assert "llama.cpp oracle (llama-cpp-python) was killed by SIGSEGV (signal 11)" in run.stdout


def test_i2_s_bytes_used_in_place_are_still_checked(tmp_path, tiny_tokenizer_json, monkeypatch):
    """I2_S tensors go to the engine byte for byte (same block layout): the logits equal those of
    unpacking to ternary values first, and a 2-bit code 3 is still a FormatError naming the tensor."""
    from ternlm.weights.gguf import GGUFCheckpoint, GGUFFile

    hf = write_checkpoint(wide_random_model(seed=6), tmp_path / "hf", tiny_tokenizer_json)
    good = convert_to_gguf(hf, tmp_path / "good.gguf", ternary="i2_s")
    ids = [0, 5, 17, 250, 3]
    in_place = ternlm.load(good).logits(ids)
    with monkeypatch.context() as m:
        m.setattr(GGUFCheckpoint, "runtime_packed", lambda self, name, rows, cols: None)
        unpacked = ternlm.load(good).logits(ids)
    assert np.array_equal(in_place, unpacked)
    info = GGUFFile(good).tensors["blk.1.ffn_up.weight"]
    bad = corrupt(good, tmp_path, info.offset + 7, b"\xff")
    with pytest.raises(ternlm.FormatError, match="ffn_up.*code 3|up_proj.*code 3"):
        ternlm.load(bad)
