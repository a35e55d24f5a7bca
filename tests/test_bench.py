"""`ternlm bench` reports what it promises (speed itself is never asserted by tests)."""

from __future__ import annotations

import json
import subprocess
import sys


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
