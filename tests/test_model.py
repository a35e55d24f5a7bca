"""ternlm's logits and greedy tokens against transformers' BitNet implementation."""

from __future__ import annotations

import numpy as np
import pytest

import ternlm
from conftest import (PROMPT, assert_matches_oracle, load_transformers, random_bitnet, transformers_logits,
                      write_checkpoint)

BACKENDS = ["native", "reference"]
VARIANTS = {
    # name: (random_bitnet kwargs, write_checkpoint kwargs)
    "2b4t-packed-autobitlinear": ({}, {}),
    "packed-bitlinear-divides": ({}, {"linear_class": "bitlinear"}),
    "bf16-like-2b4t": ({"seed": 14}, {"dtype": "bfloat16"}),
    "masters-fp32": ({"seed": 2}, {"packed": False}),
    "masters-bf16": ({"seed": 8}, {"packed": False, "dtype": "bfloat16"}),
    "silu-untied-sharded": ({"hidden_act": "silu", "tie": False, "seed": 3}, {"shards": 3}),
    "llama-bitnet": ({"arch": "llama", "hidden_act": "silu", "seed": 4}, {}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory, tiny_tokenizer_json):
    model_kwargs, write_kwargs = VARIANTS[request.param]
    model = random_bitnet(**model_kwargs)
    directory = write_checkpoint(model, tmp_path_factory.mktemp(request.param), tiny_tokenizer_json,
                                 **write_kwargs)
    return directory, transformers_logits(directory, PROMPT)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(variant, backend):
    directory, oracle = variant
    model = ternlm.load(directory, backend=backend, kv_cache="f32")  # the exact arithmetic
    assert_matches_oracle(model.logits(PROMPT), oracle)


@pytest.mark.slow
def test_greedy_tokens_match_transformers(variant):
    """32 greedy tokens from the native engine (KV cache, one-token decode) equal transformers'
    argmax over the full sequence recomputed at every step."""
    directory, _ = variant
    import torch

    hf = load_transformers(directory)
    ids = list(PROMPT[:8])
    with torch.no_grad():
        for _ in range(32):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    model = ternlm.load(directory, kv_cache="f32")
    model.stop_ids = set()
    ours = list(model.stream_tokens(PROMPT[:8], max_tokens=32))
    assert ours == ids[8:]


@pytest.mark.slow
def test_older_bitnet_architecture_behaves_as_bitnet_silu(tmp_path, tiny_tokenizer_json):
    """`BitnetForCausalLM` (1bitLLM style) is a SiLU BitNet with sub-norms: behaviour from config only."""
    model = random_bitnet(hidden_act="silu", seed=5)
    new_style = write_checkpoint(model, tmp_path / "new", tiny_tokenizer_json)
    old_style = write_checkpoint(model, tmp_path / "old", tiny_tokenizer_json, architecture="BitnetForCausalLM")
    assert_matches_oracle(ternlm.load(old_style, kv_cache="f32").logits(PROMPT), transformers_logits(new_style, PROMPT))


def test_decode_with_cache_equals_full_recompute(tmp_path, tiny_tokenizer_json):
    """Prefill + one-token decode through the KV cache gives the logits of a full forward pass."""
    directory = write_checkpoint(random_bitnet(seed=6), tmp_path, tiny_tokenizer_json)
    for backend in BACKENDS:
        model = ternlm.load(directory, backend=backend)
        full = model.logits(PROMPT)
        cache = model.engine.new_cache(len(PROMPT))
        step = [model.engine.forward(cache, PROMPT[:10], 0)[-1]]
        for pos in range(10, len(PROMPT)):
            step.append(model.engine.forward(cache, [PROMPT[pos]], pos)[-1])
        np.testing.assert_allclose(np.stack(step), full[9:], rtol=0, atol=1e-4 * np.ptp(full))


def test_batched_step_equals_each_sequence_alone(tmp_path, tiny_tokenizer_json):
    """Sequences at different positions of their own caches, stepped together (the server's
    continuous batching), give exactly what the native engine gives for each one alone (the
    integer GEMM is exact per token and the float steps are per row), and what the reference
    computes for each one alone."""
    directory = write_checkpoint(random_bitnet(seed=13), tmp_path, tiny_tokenizer_json)
    prompts = [PROMPT[:7], PROMPT[3:15], PROMPT[5:7]]

    def alone(engine):
        logits = []
        for prompt in prompts:
            cache = engine.new_cache(32)
            engine.forward(cache, prompt[:-1], 0)
            logits.append(engine.forward(cache, prompt[-1:], len(prompt) - 1)[-1])
        return np.stack(logits)

    engine = ternlm.load(directory, kv_cache="f32").engine  # as the reference's
    caches = [engine.new_cache(32) for _ in prompts]
    first = engine.forward_batch([(c, p[:-1], 0) for c, p in zip(caches, prompts)], logits_for=[False, True, False])
    assert first.shape == (1, 320)  # only the sequence that asked for logits
    assert np.array_equal(first[0], engine.forward(engine.new_cache(32), prompts[1][:-1], 0)[-1])
    together = engine.forward_batch([(c, p[-1:], len(p) - 1) for c, p in zip(caches, prompts)])
    assert together.shape == (3, 320)
    assert np.array_equal(together, alone(engine))
    oracle = alone(ternlm.load(directory, backend="reference").engine)
    np.testing.assert_allclose(together, oracle, rtol=0, atol=1e-3 * np.ptp(oracle))
    cache = engine.new_cache(8)
    with pytest.raises(ValueError, match="share a KV cache"):
        engine.forward_batch([(cache, [1], 0), (cache, [2], 1)])
    with pytest.raises(ValueError, match="different model shape"):
        other = ternlm.load(write_checkpoint(random_bitnet(seed=1, layers=3), tmp_path / "other", tiny_tokenizer_json))
        engine.forward_batch([(other.engine.new_cache(8), [1], 0)])


@pytest.mark.parametrize("source", ["hf", "i2_s", "tq1_0", "tq2_0"])
def test_ternary_bits_give_identical_logits(source, tmp_path, tiny_tokenizer_json):
    """1.6-bit weights (a different layout, other kernels, and for 4 tokens or more an unpacking to
    the 2-bit layout) give exactly the logits of 2-bit ones: prompts, one-token steps and batches.
    Loaded from int8 weights (HF), from bytes already in the 2-bit layout (I2_S) and from GGUF's TQ
    blocks (decoded in the core; test_gguf.py checks those against transformers)."""
    from ternlm.weights.convert import convert_to_gguf

    directory = write_checkpoint(random_bitnet(seed=8, hidden_size=1280, intermediate_size=2560), tmp_path,
                                 tiny_tokenizer_json)
    path = directory if source == "hf" else convert_to_gguf(directory, tmp_path / "m.gguf", ternary=source, head="f16")
    two, trits = (ternlm.load(path, ternary_bits=bits).engine for bits in (2, 1.6))
    assert (two.ternary_bits, trits.ternary_bits) == (2, 1.6)
    assert trits.weight_bytes < two.weight_bytes
    for length in (1, 2, 3, 4, 5, 16):
        assert np.array_equal(two.forward(two.new_cache(16), PROMPT[:length], 0, True),
                              trits.forward(trits.new_cache(16), PROMPT[:length], 0, True))

    def step(engine):
        caches = [engine.new_cache(16) for _ in range(5)]
        return engine.forward_batch([(cache, PROMPT[i: i + 2], 0) for i, cache in enumerate(caches)])

    assert np.array_equal(step(two), step(trits))
    with pytest.raises(ValueError, match="2 or 1.6"):
        ternlm.load(path, ternary_bits=1)


def test_threads_give_identical_logits(tmp_path, tiny_tokenizer_json):
    directory = write_checkpoint(random_bitnet(seed=7), tmp_path, tiny_tokenizer_json)
    one = ternlm.load(directory, threads=1).logits(PROMPT)
    three = ternlm.load(directory, threads=3).logits(PROMPT)
    assert np.array_equal(one, three)


def test_int8_head_is_close_to_the_float_head(tmp_path, tiny_tokenizer_json):
    """The int8 head (per-row scales, int8 final hidden state) against a NumPy oracle built from the
    float head's inputs, and close to the exact head."""
    directory = write_checkpoint(random_bitnet(seed=9, vocab_size=320), tmp_path, tiny_tokenizer_json)
    exact = ternlm.load(directory, head="f32", kv_cache="f32").logits(PROMPT)
    int8 = ternlm.load(directory, head="int8", kv_cache="f32").logits(PROMPT)
    assert int8.shape == exact.shape
    rel = np.abs(int8 - exact).max(axis=1) / np.ptp(exact, axis=1)
    assert rel.max() < 0.02, rel
    assert np.mean(int8.argmax(1) == exact.argmax(1)) >= 0.9
    with pytest.raises(ValueError, match="head format"):
        ternlm.load(directory, head="q3")


@pytest.mark.parametrize("source", ["float32", "bfloat16", "gguf", "untied"])
def test_embedding_rows_read_from_the_file_match_the_mapping(source, tmp_path, tiny_tokenizer_json, monkeypatch):
    """When the embedding is only looked up (a quantized head, or an untied head) its rows are read
    at their file offset rather than through the mapping. The oracle is the mapping, with the reader
    told to hide the location; a location in a copy whose embedding is changed must change the
    logits (the reads really come from the file), and one in a truncated copy must raise."""
    from ternlm.weights.convert import convert_to_gguf
    from ternlm.weights.gguf import GGUFCheckpoint
    from ternlm.weights.hf import HFCheckpoint

    model = random_bitnet(seed=13, vocab_size=320, tie=source != "untied")
    directory = write_checkpoint(model, tmp_path / "hf", tiny_tokenizer_json,
                                 dtype="bfloat16" if source == "bfloat16" else "float32")
    path = convert_to_gguf(directory, tmp_path / "m.gguf", ternary="i2_s", head="f16") if source == "gguf" else directory
    head = None if source == "untied" else "int8"
    prompts = [PROMPT, [319, 0, 318, 1, 160]]  # the last rows of the file too
    read = ternlm.load(path, head=head)
    assert read.engine.embedding_read_from_file
    with monkeypatch.context() as patch:
        for reader in (HFCheckpoint, GGUFCheckpoint):
            patch.setattr(reader, "file_location", lambda self, name: None)
        mapped = ternlm.load(path, head=head)
    assert not mapped.engine.embedding_read_from_file
    for prompt in prompts:
        assert np.array_equal(read.logits(prompt), mapped.logits(prompt))

    reader = GGUFCheckpoint if source == "gguf" else HFCheckpoint
    _, offset = reader(path).file_location("model.embed_tokens.weight")
    data = (path if source == "gguf" else directory / "model.safetensors").read_bytes()
    (tmp_path / "changed").write_bytes(data[:offset] + bytes(64) + data[offset + 64:])  # row 0 starts with zeros
    (tmp_path / "truncated").write_bytes(data[:offset + 64])
    copies = {}
    for name in ("changed", "truncated"):
        with open(tmp_path / name, "rb") as copy, monkeypatch.context() as patch:
            patch.setattr(reader, "file_location", lambda self, tensor: (copy.fileno(), offset))
            copies[name] = ternlm.load(path, head=head)
    # both copies are closed by now: the models read through descriptors of their own
    assert not np.array_equal(copies["changed"].logits([0, 1]), mapped.logits([0, 1]))
    with pytest.raises(RuntimeError, match="embedding row of token 0 .* shorter than when it was loaded"):
        copies["truncated"].logits([0, 1])
    # the head as stored is the tied embedding itself, read whole every step: it stays mapped
    if source != "untied":
        assert not ternlm.load(path).engine.embedding_read_from_file


def test_f16_kv_cache_is_close_to_f32(tmp_path, tiny_tokenizer_json):
    directory = write_checkpoint(random_bitnet(seed=10), tmp_path, tiny_tokenizer_json)
    f32 = ternlm.load(directory, kv_cache="f32")
    f16 = ternlm.load(directory)  # the default
    assert f16.engine.new_cache(8).f16 and f16.engine.new_cache(8).nbytes * 2 == f32.engine.new_cache(8).nbytes
    a, b = f32.logits(PROMPT), f16.logits(PROMPT)
    assert np.abs(a - b).max() / np.ptp(a) < 0.02
    assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.9


def test_q4_head_is_close_to_the_float_head(tmp_path, tiny_tokenizer_json):
    directory = write_checkpoint(random_bitnet(seed=12, vocab_size=320), tmp_path, tiny_tokenizer_json)
    exact = ternlm.load(directory, head="f32", kv_cache="f32")
    q4 = ternlm.load(directory, head="q4", kv_cache="f32")
    assert q4.engine.head_bytes * 3 < exact.engine.head_bytes  # 4 bits + a float per 32 against 32 bits
    a, b = exact.logits(PROMPT), q4.logits(PROMPT)
    assert np.abs(a - b).max() / np.ptp(a) < 0.05
    assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.8
