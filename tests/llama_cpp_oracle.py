"""Upstream llama.cpp (through llama-cpp-python) as an oracle, always in a child process.

llama.cpp is code we do not control: built for a CPU with AMX, its AMX matmul has crashed with a
segmentation fault on a small Q6_K model (issue #17). In-process, such a crash would end the whole
pytest run with no summary. Here a crash, a hang or an error fails the one test that asked, naming
the oracle and the signal, and the run goes on.

The child loads the model with llama.cpp's "extra buffer types" off (bench/llama_cpp_side_by_side.py's
load_llama_cpp with repack=False): the weights stay in plain CPU buffers, so no repacking backend —
AMX among them — runs, and the comparison is the same on every CPU.

Run as a script, this file is the child: `python llama_cpp_oracle.py REQUEST.json`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

TIMEOUT_SECONDS = 600
REPOSITORY = Path(__file__).resolve().parents[1]


def llama_cpp_greedy(gguf: str | Path, prompt: list[int], continuation: int = 0,
                     crash_with: int | None = None) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits for every prompt position, float32 [len(prompt), vocab], and its greedy
    continuation of `continuation` tokens, one at a time through its KV cache.

    Skips the test when llama-cpp-python is not installed; fails it, naming the signal, when the
    child dies. crash_with: a signal the child sends itself once llama.cpp has loaded the model (the
    test of this isolation uses it)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("pip install llama-cpp-python")
    gguf = Path(gguf)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-oracle-") as work:
        request, result = Path(work) / "request.json", Path(work) / "result.npz"
        request.write_text(json.dumps({"gguf": str(gguf), "prompt": [int(i) for i in prompt],
                                       "continuation": continuation, "crash_with": crash_with,
                                       "result": str(result)}))
        # the child imports bench/ from the repository's root, as pytest's pythonpath lets the tests do
        path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
        try:
            child = subprocess.run([sys.executable, __file__, str(request)], capture_output=True, text=True,
                                   timeout=TIMEOUT_SECONDS, env={**os.environ, "PYTHONPATH": path})
        except subprocess.TimeoutExpired:
            pytest.fail(f"the llama.cpp oracle (llama-cpp-python) did not finish within {TIMEOUT_SECONDS} s "
                        f"on {gguf.name}", pytrace=False)
        if child.returncode != 0:
            pytest.fail(f"the llama.cpp oracle (llama-cpp-python) {_how_it_ended(child.returncode)} on "
                        f"{gguf.name}; its last output:\n{_tail(child.stderr or child.stdout)}", pytrace=False)
        with np.load(result) as arrays:
            return arrays["logits"], arrays["tokens"].tolist()


def _how_it_ended(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        return f"was killed by {name} (signal {-returncode})"
    return f"exited with status {returncode}"


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(nothing)"


def _child(request_path: str) -> None:
    from bench.llama_cpp_side_by_side import load_llama_cpp

    request = json.loads(Path(request_path).read_text())
    prompt = request["prompt"]
    model = load_llama_cpp(request["gguf"], repack=False, n_ctx=max(64, len(prompt) + request["continuation"]),
                           logits_all=True, verbose=False, n_threads=2)
    if request["crash_with"] is not None:
        os.kill(os.getpid(), request["crash_with"])
    model.eval(prompt)
    logits = np.array(model.scores[: len(prompt)], dtype=np.float32)
    tokens = []
    for _ in range(request["continuation"]):
        tokens.append(int(np.argmax(model.scores[model.n_tokens - 1])))
        model.eval([tokens[-1]])
    np.savez(request["result"], logits=logits, tokens=np.array(tokens, dtype=np.int64))


if __name__ == "__main__":
    _child(sys.argv[1])
