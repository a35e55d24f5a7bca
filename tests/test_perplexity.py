"""`ternlm perplexity` against NumPy computations from `m.logits` (the shipped default model, held-out
Hamlet), KL divergence against NumPy from two heads, plots, and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ternlm
from conftest import numpy_log_probs
from ternlm import perplexity

HELDOUT = Path(__file__).parent / "data" / "hamlet_heldout.txt"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def ternlm_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ternlm.cli", *args], capture_output=True, text=True, timeout=timeout)


def assert_clean_error(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ternlm: error:") and words in lines[0], result.stderr


def numpy_windows(model, text: str, n_ctx: int) -> list[list[int]]:
    """llama.cpp's windows written out plainly: BOS + the text's tokens, cut every n_ctx, BOS first in each."""
    ids = model.tokenizer.encode(text, add_bos=True)
    bos = model.tokenizer.bos_id
    return [[bos] + ids[start + 1:start + n_ctx] for start in range(0, len(ids) - n_ctx + 1, n_ctx)]


def test_perplexity_equals_numpy_from_logits(default_model):
    model = default_model
    n_ctx = model.n_ctx  # 256, the default model's context; --batch 50 splits every half window
    result = ternlm_cli("perplexity", "-f", str(HELDOUT), "-t", "1", "--batch", "50", "-o", "json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)

    first = n_ctx // 2
    nll, scored_bytes = [], 0
    for window in numpy_windows(model, HELDOUT.read_text(encoding="utf-8"), n_ctx):
        log_probs = numpy_log_probs(model, window)
        nll += [-log_probs[j, window[j + 1]] for j in range(first, n_ctx - 1)]
        scored_bytes += len(model.tokenizer.decode(window[first + 1:]).encode("utf-8"))  # the text is ASCII
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    stderr = ppl * math.sqrt((np.mean(nll ** 2) - nll.mean() ** 2) / (len(nll) - 1))

    assert got["tokens"] == len(nll) == got["windows"] * (n_ctx - 1 - first)
    assert got["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert got["stderr"] == pytest.approx(stderr, rel=1e-4)
    assert got["bytes"] == scored_bytes
    assert got["bits_per_byte"] == pytest.approx(nll.sum() / scored_bytes / math.log(2), rel=1e-5)
    assert 1.0 < got["bits_per_byte"] < 3.0  # a trained model: uniform over 4096 tokens is far above


def test_scored_bytes_count_multibyte_text_exactly(default_model):
    model = default_model
    text = "Æsop’s fables — naïve café, 世界 😀; " * 40
    windows = perplexity.token_windows(model.tokenizer, text, 16)
    first = 8
    for tokens, text_bytes in zip(windows.tokens, windows.text_bytes):
        decoded = model.tokenizer.decode(tokens[first + 1:].tolist())
        if "\ufffd" not in decoded:  # the window's scored half starts and ends on whole characters
            assert text_bytes == len(decoded.encode("utf-8"))
    assert windows.text_bytes.sum() <= len(text.encode("utf-8"))


def test_kl_divergence_equals_numpy_from_two_heads(default_model, tmp_path):
    model = default_model
    base_file = tmp_path / "base.npz"
    common = ["-f", str(HELDOUT), "-t", "1", "--ctx", "64", "--chunks", "6", "-o", "json"]
    base = ternlm_cli("perplexity", *common, "--kl-divergence-base", str(base_file), "--kl-top-k", "4096")
    assert base.returncode == 0, base.stderr
    exact = ternlm_cli("perplexity", *common, "--head", "int8", "--kl-divergence-base", str(base_file),
                       "--kl-divergence")
    assert exact.returncode == 0, exact.stderr
    base, exact = json.loads(base.stdout), json.loads(exact.stdout)

    int8 = ternlm.load(threads=1, head="int8")
    kl, same = [], []
    for window in numpy_windows(model, HELDOUT.read_text(encoding="utf-8"), 64)[:6]:
        p, q = numpy_log_probs(model, window)[32:63], numpy_log_probs(int8, window)[32:63]
        kl += list(np.sum(np.exp(p) * (p - q), axis=1))
        same += list(p.argmax(axis=1) == q.argmax(axis=1))
    kl = np.array(kl)
    assert exact["base_perplexity"] == pytest.approx(base["perplexity"], rel=1e-9)
    assert exact["kl_divergence"] == pytest.approx(kl.mean(), rel=1e-4)
    assert exact["kl_divergence_stderr"] == pytest.approx(math.sqrt(kl.var() / (len(kl) - 1)), rel=1e-3)
    assert exact["same_top"] == pytest.approx(np.mean(same))
    assert 0 < exact["kl_divergence"] < 0.05  # a small, real change: int8 head rows

    # a base file with fewer tokens per position merges the rest into one bucket: a lower bound
    ternlm_cli("perplexity", *common, "--kl-divergence-base", str(base_file), "--kl-top-k", "8")
    coarse = json.loads(ternlm_cli("perplexity", *common, "--head", "int8", "--kl-divergence-base", str(base_file),
                                   "--kl-divergence").stdout)
    assert 0 < coarse["kl_divergence"] <= exact["kl_divergence"] * (1 + 1e-9)


def test_plots_are_png_files(tmp_path):
    pytest.importorskip("matplotlib", reason="pip install 'ternlm[plot]'")
    ppl_png, bench_png = tmp_path / "windows.png", tmp_path / "bench.png"
    result = ternlm_cli("perplexity", "-f", str(HELDOUT), "-t", "1", "--ctx", "64", "--plot", str(ppl_png))
    assert result.returncode == 0, result.stderr
    result = ternlm_cli("bench", "--synthetic", "tiny", "-p", "8,16", "-n", "4", "-t", "1,2", "-r", "1",
                        "--plot", str(bench_png))
    assert result.returncode == 0, result.stderr
    import matplotlib.pyplot as plt

    for png in (ppl_png, bench_png):
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        image = plt.imread(png)
        assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0  # drawn, not blank


def test_a_missing_matplotlib_is_a_clear_error(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from ternlm.cli import main; "
            f"sys.exit(main(['perplexity', '-f', {str(HELDOUT)!r}, '--plot', {str(tmp_path / 'x.png')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert_clean_error(result, "pip install 'ternlm[plot]'")


@pytest.mark.parametrize("case, words", [
    ("missing", "no such file"),
    ("empty", "the file is empty"),
    ("short", "fewer than one window of 256"),
    ("binary", "not UTF-8 text"),
    ("ctx", "n_ctx must be between 1 and the model's 256"),
    ("kl-without-base", "--kl-divergence-base FILE"),
    ("kl-missing-base", "no such file"),
    ("kl-bad-base", "not a version-1 base logits file"),
    ("kl-other-ctx", "the base run used --ctx"),
])
def test_bad_input_is_one_clear_line(tmp_path, case, words):
    files = {"empty": "  \n", "short": "To be, or not to be.\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00 not text")
    np.savez(tmp_path / "bad.npz", tokens=np.zeros((1, 8), np.int32))
    base = tmp_path / "base.npz"
    if case == "kl-other-ctx":
        assert ternlm_cli("perplexity", "-f", str(HELDOUT), "--ctx", "64", "--chunks", "1",
                          "--kl-divergence-base", str(base)).returncode == 0
    args = {
        "missing": ["-f", str(tmp_path / "nothing.txt")],
        "empty": ["-f", str(tmp_path / "empty")],
        "short": ["-f", str(tmp_path / "short")],
        "binary": ["-f", str(tmp_path / "binary")],
        "ctx": ["-f", str(HELDOUT), "--ctx", "512"],
        "kl-without-base": ["-f", str(HELDOUT), "--kl-divergence"],
        "kl-missing-base": ["--kl-divergence", "--kl-divergence-base", str(tmp_path / "none.npz")],
        "kl-bad-base": ["--kl-divergence", "--kl-divergence-base", str(tmp_path / "bad.npz")],
        "kl-other-ctx": ["--kl-divergence", "--kl-divergence-base", str(base), "--ctx", "128"],
    }[case]
    assert_clean_error(ternlm_cli("perplexity", *args, timeout=120), words)
