"""Training: the torch model against independent oracles (NumPy arithmetic, transformers),
exact resume, data parallelism, export, and bad input. Tiny models, a few steps each."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # PyTorch and transformers
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ternlm.config import BitNetConfig  # noqa: E402
from ternlm.errors import FormatError  # noqa: E402
from ternlm.perplexity import bits_per_byte  # noqa: E402
from ternlm.train import data as D  # noqa: E402
from ternlm.train import main  # noqa: E402
from ternlm.train.config import TrainConfig, from_args  # noqa: E402
from ternlm.train.export import export_hf, load_hf  # noqa: E402
from ternlm.train.loop import evaluate, learning_rate, load_checkpoint, train  # noqa: E402
from ternlm.train.model import BitLinear, BitNet  # noqa: E402
from ternlm.weights.packing import quantize_ternary  # noqa: E402

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

TEXT = """\
HAMLET:
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life.
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two small files: a Hamlet speech repeated, and a line-shuffled variant with non-ASCII."""
    folder = tmp_path_factory.mktemp("corpus")
    lines = TEXT.splitlines(keepends=True)
    rng = np.random.default_rng(0)
    (folder / "a.txt").write_text(TEXT * 12, encoding="utf-8")
    shuffled = ["".join(rng.permutation(lines)) for _ in range(12)]
    (folder / "b.md").write_text("Æsop’s — " + "".join(shuffled), encoding="utf-8")
    return folder


def tiny_config(corpus: Path, out_dir: Path, **overrides) -> TrainConfig:
    config = from_args(["--preset", "tiny"])
    settings = dict(data=[str(corpus)], out_dir=str(out_dir), vocab_size=300, context=32, batch_size=8,
                    micro_batch=4, steps=8, warmup=2, lr=3e-3, min_lr=3e-4, log_every=2, eval_every=4,
                    threads=1, heldout_fraction=0.1)
    for key, value in {**settings, **overrides}.items():
        setattr(config, key, value)
    config.validate()
    return config


def random_model(vocab: int = 300, quantize: bool = True, seed: int = 0) -> BitNet:
    config = BitNetConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          rope_theta=10000.0, bos_token_id=0, eos_token_id=[1, 2])
    torch.manual_seed(seed)
    model = BitNet(config, quantize=quantize).eval()
    with torch.no_grad():  # a trained model's logit range (tens), not the near-zero one of a fresh init
        model.model.embed_tokens.weight.normal_(0, 1.0)
    return model


def hf_logits(model_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    hf = transformers.BitNetForCausalLM.from_pretrained(str(model_dir))
    for tensor in list(hf.parameters()) + list(hf.buffers()):
        if tensor.dtype != torch.uint8:
            tensor.data = tensor.data.float()
    with torch.no_grad():
        return hf.eval()(tokens).logits.float()


# -- the model ------------------------------------------------------------------------------
def test_bitlinear_is_the_inference_arithmetic():
    """y = (xq . Wt^T) * s / a, computed with integers in NumPy, against the fake-quantized layer."""
    torch.manual_seed(1)
    layer = BitLinear(48, 20)
    x = torch.randn(5, 48) * 3
    w = layer.weight.detach().numpy()
    ternary, s = quantize_ternary(w)
    xs = x.numpy().astype(np.float32)
    a = np.float32(127) / np.maximum(np.abs(xs).max(-1, keepdims=True), np.float32(1e-5))
    xq = np.clip(np.round(xs * a), -128, 127).astype(np.int64)
    expected = (xq @ ternary.T.astype(np.int64)).astype(np.float64) * s / a
    got = layer(x).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # straight-through: the weight gradient is that of a linear layer seeing the quantized input
    x.requires_grad_(True)
    layer(x).sum().backward()
    xq_dequant = torch.from_numpy((xq / a).astype(np.float32))
    np.testing.assert_allclose(layer.weight.grad.numpy(), np.ones((20, 5), np.float32) @ xq_dequant.numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), np.ones((5, 20), np.float32) @ (ternary * s), rtol=1e-5, atol=1e-6)


def test_fp32_baseline_is_transformers_bitnet_without_quantization():
    """The architecture itself (norms, RoPE, GQA, sub-norms, relu2, tied head) against transformers."""
    model = random_model(quantize=False)
    hf_config = transformers.BitNetConfig(**{k: v for k, v in model.config.to_dict().items()
                                             if k not in ("quantization_config", "rope_scaling")})
    hf = transformers.BitNetForCausalLM(hf_config).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    hf.tie_weights()
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ours, theirs = model(tokens)[0], hf(tokens).logits
    assert (ours - theirs).abs().max() < 1e-4 * (ours.max() - ours.min())


def test_export_gives_transformers_the_same_logits(tmp_path):
    model = random_model()
    tokenizer = D.train_tokenizer([TEXT * 4], 300)
    out = export_hf(model, tokenizer, tmp_path / "model", "float32")
    tokens = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        ours = model(tokens)[0]
    theirs = hf_logits(out, tokens)
    assert (ours - theirs).abs().max() < 1e-3 * (ours.max() - ours.min())
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["linear_class"] == "autobitlinear"
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 10000.0
    assert BitNetConfig.from_file(out / "config.json").has_sub_norms


def test_from_checkpoint_reproduces_the_packed_model(tmp_path):
    """--from: packed weights -> masters whose quantization is the same ternary x scale (bf16 export)."""
    tokenizer = D.train_tokenizer([TEXT * 4], 300)
    out = export_hf(random_model(seed=3), tokenizer, tmp_path / "model", "bfloat16")
    config, state = load_hf(out)
    model = BitNet(config).eval()
    model.load_state_dict(state)
    tokens = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        ours = model(tokens)[0]
    theirs = hf_logits(out, tokens)
    assert (ours - theirs).abs().max() < 1e-3 * (ours.max() - ours.min())


def test_tokenizer_and_chat_template(tmp_path):
    tokenizer = D.train_tokenizer([TEXT], 300)
    assert [tokenizer.token_to_id(t) for t in D.SPECIAL_TOKENS] == [0, 1, 2]
    assert tokenizer.decode(tokenizer.encode("To be, or not — to be").ids) == "To be, or not — to be"
    assert tokenizer.encode("To be").ids[0] == 0  # BOS added, as LLaMA-3 does
    out = export_hf(random_model(), tokenizer, tmp_path / "model")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    text = hf_tokenizer.apply_chat_template([{"role": "user", "content": "Who's there?"}], tokenize=False,
                                            add_generation_prompt=True)
    assert text == "<|begin_of_text|>User: Who's there?<|eot_id|>Assistant: "
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 2]


# -- data -----------------------------------------------------------------------------------
def test_heldout_split_is_the_tail_at_a_line_boundary():
    text = "first line\nsecond line\nthird — line\nfourth line\n"
    train_part, heldout = D.split_text(text, 0.3)
    assert train_part + heldout == text
    assert train_part.endswith("\n") and heldout == "fourth line\n"
    assert D.split_text(text, 0.0) == (text, "")


def test_heldout_windows_score_every_token_once():
    tokenizer = D.train_tokenizer([TEXT], 300)
    heldout = D.heldout_windows(tokenizer, [TEXT, TEXT[:50]], context=16)
    n_text_tokens = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) for t in (TEXT, TEXT[:50]))
    assert heldout.n_tokens == n_text_tokens
    assert heldout.n_bytes == len(TEXT.encode()) + len(TEXT[:50].encode())


def test_bits_per_byte_against_transformers(tmp_path, corpus):
    """evaluate() = transformers' summed cross-entropy over the held-out windows / bytes / ln 2."""
    model = random_model()
    tokenizer = D.train_tokenizer([TEXT], 300)
    _, heldout_texts = D.read_corpus([corpus], 0.1)
    heldout = D.heldout_windows(tokenizer, heldout_texts, 32)
    result = evaluate(model, heldout, micro_batch=4)
    out = export_hf(model, tokenizer, tmp_path / "model")
    logits = hf_logits(out, torch.from_numpy(heldout.inputs))
    targets = torch.from_numpy(heldout.targets)
    nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                             reduction="sum").item()
    assert result["bpb"] == pytest.approx(nats / heldout.n_bytes / math.log(2), rel=1e-4)


def test_learning_rate_schedule():
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup=10, steps=110)
    assert learning_rate(0, c) == pytest.approx(0.1)
    assert learning_rate(9, c) == pytest.approx(1.0)
    assert learning_rate(60, c) == pytest.approx(0.55)
    assert learning_rate(110, c) == pytest.approx(0.1)


def test_a_warmup_longer_than_the_run_is_capped_and_the_rate_decays(capsys):
    """The default warmup (100) on a 60-step run rose for all 60 steps and never decayed."""
    c = from_args(["--data", "x", "--preset", "tiny", "--steps", "60"])
    assert c.warmup == 6 and "warming up for 6 steps" in capsys.readouterr().err
    rates = [learning_rate(step, c) for step in range(60)]
    assert max(rates) == pytest.approx(c.lr) and rates.index(max(rates)) == 5
    assert rates[-1] < 0.01 * c.lr + c.min_lr
    assert from_args(["--data", "x", "--steps", "60", "--warmup", "5"]).warmup == 5


def test_train_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "linear warmup steps (default: 100)" in text and "peak learning rate (default: 0.002)" in text


# -- the loop -------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_writes_everything(tmp_path, corpus):
    config = tiny_config(corpus, tmp_path / "run", steps=30, eval_every=15)
    history = train(config)
    assert history["heldout"][-1][1] < min(history["heldout"][0][1], math.log(300) - 1.0)
    assert history["losses"][-1] < history["losses"][0] - 1.0
    run = tmp_path / "run"
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert {p.name for p in (run / "model").iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json",
                                                          "tokenizer_config.json", "generation_config.json"}
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 30


def test_resume_continues_exactly(tmp_path, corpus):
    straight = train(tiny_config(corpus, tmp_path / "straight"))
    train(tiny_config(corpus, tmp_path / "halves", until_step=4))
    assert load_checkpoint(tmp_path / "halves" / "checkpoint.pt")["step"] == 4
    assert main(["--out-dir", str(tmp_path / "halves"), "--resume"]) == 0
    resumed = json.loads((tmp_path / "halves" / "history.json").read_text())
    assert len(resumed["losses"]) == 8
    assert resumed["losses"] == straight["losses"]
    assert [list(h) for h in straight["heldout"]] == resumed["heldout"]


def test_fp32_switch_and_fine_tune_from_an_export(tmp_path, corpus):
    baseline = train(tiny_config(corpus, tmp_path / "fp32", quantize=False, steps=4))
    ternary = train(tiny_config(corpus, tmp_path / "ternary", steps=4))
    assert baseline["losses"] != ternary["losses"]
    assert not (tmp_path / "fp32" / "model").exists()
    # fine-tuning starts from the exported model: its first loss is the export's loss on that batch
    tuned = train(tiny_config(corpus, tmp_path / "tuned", init_from=str(tmp_path / "ternary" / "model"), steps=2))
    config, state = load_hf(tmp_path / "ternary" / "model")
    model = BitNet(config)
    model.load_state_dict(state)
    c = tiny_config(corpus, tmp_path / "x")
    train_texts, _ = D.read_corpus(c.data, c.heldout_fraction)
    tokenizer = D.load_or_train_tokenizer(tmp_path / "tuned" / "tokenizer.json", [], 0)
    stream = D.train_stream(tokenizer, train_texts)
    offsets = D.batch_offsets(c.seed, 0, c.batch_size, len(stream), c.context)
    x, y = D.windows(stream, offsets, c.context)
    with torch.no_grad():
        _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
    assert tuned["losses"][0] == pytest.approx(loss.item(), rel=1e-5)
    assert tuned["losses"][0] < baseline["losses"][0]


def test_two_processes_match_one(tmp_path, corpus):
    args = ["--preset", "tiny", "--data", str(corpus), "--vocab-size", "300", "--context", "32",
            "--batch-size", "8", "--micro-batch", "4", "--steps", "4", "--warmup", "2", "--threads", "1",
            "--eval-every", "2", "--heldout-fraction", "0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the installed ternlm, as users run it
    assert main(args + ["--out-dir", str(tmp_path / "one")]) == 0
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                    "-m", "ternlm.train", *args, "--out-dir", str(tmp_path / "two")],
                   env=env, check=True, capture_output=True, timeout=300)
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4)
    np.testing.assert_allclose([h[1] for h in two["heldout"]], [h[1] for h in one["heldout"]], rtol=1e-4)


# -- bad input ------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors(tmp_path, corpus, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--data", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "a")]) == 1
    assert "no text files" in capsys.readouterr().err
    assert main(["--data", str(corpus), "--batch-size", "6", "--micro-batch", "4",
                 "--out-dir", str(tmp_path / "b")]) == 1
    assert "not a multiple" in capsys.readouterr().err
    bad = tmp_path / "c"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(FormatError, match="corrupt"):
        load_checkpoint(bad / "checkpoint.pt")
    assert main(["--out-dir", str(bad), "--resume"]) == 1
    assert "corrupt" in capsys.readouterr().err
    assert main(["--preset", "nonesuch", "--data", str(corpus)]) == 1
    assert "presets:" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_export_gives_ternlm_load_the_same_logits(tmp_path, backend):
    import ternlm

    model = random_model(seed=5)
    out = export_hf(model, D.train_tokenizer([TEXT * 4], 300), tmp_path / "model")
    try:
        engine = ternlm.load(out, threads=1, backend=backend)
    except ImportError as e:
        pytest.skip(f"the {backend} backend is not built: {e}")
    tokens = torch.randint(0, 300, (1, 48))
    with torch.no_grad():
        ours = model(tokens)[0][0].numpy()
    theirs = engine.logits(tokens[0].tolist())
    assert np.abs(ours - theirs).max() < 1e-3 * (ours.max() - ours.min())


def engine_bits_per_byte(engine, heldout: D.HeldOut) -> float:
    """The held-out protocol of data.py, scored with the inference engine's logits."""
    total = 0.0
    for x, y in zip(heldout.inputs, heldout.targets):
        n = int((y >= 0).sum())
        logits = torch.from_numpy(np.asarray(engine.logits(x[:n].tolist()), dtype=np.float32))  # (n, vocab)
        total += torch.nn.functional.cross_entropy(logits, torch.from_numpy(y[:n]), reduction="sum").item()
    return bits_per_byte(total, heldout.n_bytes)


def test_shipped_model_engine_perplexity_equals_training_code():
    """On held-out Shakespeare (the tail of Hamlet, never trained on): within 0.5 %."""
    import ternlm
    from ternlm.hub import default_model_path
    from tokenizers import Tokenizer

    model_dir = default_model_path()
    if not (model_dir / "config.json").exists():
        pytest.skip("no shipped default model in this checkout")
    config, state = load_hf(model_dir)
    model = BitNet(config)
    model.load_state_dict(state)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = (Path(__file__).parent / "data" / "hamlet_heldout.txt").read_text(encoding="utf-8")
    heldout = D.heldout_windows(tokenizer, [text], config.max_position_embeddings)
    ours = evaluate(model, heldout, micro_batch=8)["bpb"]
    theirs = engine_bits_per_byte(ternlm.load(model_dir, threads=1), heldout)
    assert theirs == pytest.approx(ours, rel=0.005)
    assert ours < 3.0  # a trained model, not noise (uniform over 4096 tokens is ~4 bits per byte)


def test_a_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, corpus, monkeypatch, capsys):
    run = tmp_path / "run"
    train(tiny_config(corpus, run, until_step=2))
    before = (run / "checkpoint.pt").read_bytes()

    def no_space(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    assert main(["--out-dir", str(run), "--resume"]) == 1
    assert "cannot write the checkpoint" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not (run / "checkpoint.tmp").exists()
