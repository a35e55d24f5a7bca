"""`ternlm bench` reports what it promises (speed itself is never asserted by tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def test_bench_json_on_a_synthetic_model():
    result = subprocess.run([sys.executable, "-m", "ternlm.cli", "bench", "--synthetic", "tiny", "-p", "8,16", "-n", "4",
                             "-t", "1,2", "-r", "2", "-o", "json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["test"], r["threads"]) for r in rows] == [("pp8", 1), ("pp16", 1), ("tg4", 1),
                                                         ("pp8", 2), ("pp16", 2), ("tg4", 2)]
    for r in rows:
        assert r["head"] == "f16" and r["t_s_median"] > 0 and r["t_s_min"] <= r["t_s_median"] <= r["t_s_max"]
        assert r["peak_rss_mb"] > 0
        assert (r["gb_s"] is not None) == r["test"].startswith("tg")
        if r["gb_s"] is not None:
            assert r["pct_of_bound"] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="getrusage's peak survives exec on Linux")
def test_peak_rss_is_the_process_own_not_its_parents():
    """A benchmark started by a large process (bench/llama_cpp_side_by_side.py holds the models it
    converted) reports its own peak: Linux hands ru_maxrss down through fork and exec."""
    held = np.ones(400_000_000, dtype=np.uint8)  # 400 MB resident in this process
    code = "from ternlm.bench import peak_rss_mb; print(peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert 0 < float(child.stdout) < 300 < held.nbytes / 1e6


def test_bench_markdown_and_bad_arguments():
    ok = subprocess.run([sys.executable, "-m", "ternlm.cli", "bench", "--synthetic", "tiny", "-p", "4", "-n", "2",
                         "-r", "1", "--head", "bf16"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "| pp4 |" in ok.stdout and "bf16" in ok.stdout and "GB/s" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "ternlm.cli", "bench", "--synthetic", "tiny", "-t", "x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "comma-separated" in bad.stderr


def test_bench_reports_sampled_decoding_beside_greedy():
    result = subprocess.run([sys.executable, "-m", "ternlm.cli", "bench", "--synthetic", "tiny", "-p", "0", "-n", "4,8",
                             "-t", "1", "-r", "2", "-o", "json", "--temperature", "0.8", "--top-p", "0.95"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["test"], r["sampling"]) for r in rows] == [("tg4", "greedy"), ("tg4", "temperature 0.8, top-p 0.95"),
                                                          ("tg8", "greedy"), ("tg8", "temperature 0.8, top-p 0.95")]
    bad = subprocess.run([sys.executable, "-m", "ternlm.cli", "bench", "--synthetic", "tiny", "--temperature", "1",
                          "--top-p", "2"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "top_p" in bad.stderr


def test_bench_compares_ternary_formats_interleaved():
    result = subprocess.run([sys.executable, "-m", "ternlm.cli", "bench", "--synthetic", "tiny", "-p", "4", "-n", "2",
                             "-t", "1", "-r", "2", "-o", "json", "--ternary-bits", "2,1.6"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["test"], r["ternary_bits"]) for r in rows] == [("pp4", 2), ("pp4", 1.6), ("tg2", 2), ("tg2", 1.6)]
    bad = subprocess.run([sys.executable, "-m", "ternlm.cli", "bench", "--synthetic", "tiny", "--ternary-bits", "1.5"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected 2 or 1.6" in bad.stderr


def _bench_peak_rss_mb(source: list[str], head: str) -> float:
    result = subprocess.run([sys.executable, "-m", "ternlm.cli", "bench", *source, "--head", head, "-p", "0", "-n", "4",
                             "-t", "1", "-r", "1", "-o", "json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)[0]["peak_rss_mb"]


@pytest.mark.slow
def test_synthetic_peak_rss_is_that_of_the_shape_loaded_from_a_file(tmp_path):
    """`--synthetic 2b4t` reports the peak RSS of a 2B4T-shaped model, not of drawing its random
    weights (which once made it 2.2 times that): within 5 % of the same model written as an HF
    directory and loaded (measured 2-4 %), with the float head (the embedding read whole every step)
    and with the q4 head (only its looked-up rows)."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(bench)!r}); "
                    "from pathlib import Path; from llama_cpp_side_by_side import write_synthetic_hf; "
                    f"write_synthetic_hf(Path({str(tmp_path / 'hf')!r}))"], check=True, timeout=600)
    for head in ("f16", "q4"):
        synthetic = _bench_peak_rss_mb(["--synthetic", "2b4t"], head)
        loaded = _bench_peak_rss_mb(["-m", str(tmp_path / "hf")], head)
        assert abs(synthetic / loaded - 1) < 0.05, (head, synthetic, loaded)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_synthetic_embedding_is_the_seeded_draw(monkeypatch, dtype):
    """Drawn and written a chunk of rows at a time, the embedding is still the one seeded draw of
    the whole matrix (so speeds stay comparable with earlier runs), rounded as the dtype says."""
    from ternlm.weights import synthetic

    monkeypatch.setattr(synthetic, "EMBEDDING_CHUNK_ROWS", 100)
    checkpoint = synthetic.SyntheticCheckpoint("tiny", dtype, seed=3)
    draw = np.random.default_rng(3).standard_normal((512, 256), dtype=np.float32) * np.float32(0.02)
    expected = draw.astype(np.float16) if dtype == "float16" else (draw.view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(checkpoint.dense("model.embed_tokens.weight").array, expected)
