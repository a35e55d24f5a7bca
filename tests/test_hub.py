"""`ternlm pull` and `ternlm list` without the network: a closed loopback port as the Hub, and an
HF cache laid out by hand (blobs, refs, snapshots of symlinks) the way huggingface_hub writes it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ternlm.hub import default_model_path, resolve_model_path
from ternlm.errors import HubError
from ternlm.hub import SAFETENSORS_FILES, files_to_download


def run(args: list[str], hf_home: Path, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environment.update(HF_HOME=str(hf_home), **env)
    return subprocess.run([sys.executable, "-m", "ternlm.cli", *args], capture_output=True, text=True,
                          timeout=120, env=environment)


def closed_port() -> int:
    with socket.socket() as s:  # bound, then released: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pull_offline_fails_at_once_with_one_line(tmp_path):
    result = run(["pull", "microsoft/bitnet-b1.58-2B-4T"], tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("ternlm: error: microsoft/bitnet-b1.58-2B-4T: cannot reach the Hugging Face Hub")
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.safetensors"))


def test_pull_with_hf_hub_offline_set(tmp_path):
    result = run(["pull", "microsoft/bitnet-b1.58-2B-4T"], tmp_path, HF_HUB_OFFLINE="1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_only_the_needed_files_are_chosen():
    release = ["README.md", "config.json", "model.safetensors", "tokenizer.json", "data/train.parquet", "x.gguf"]
    assert files_to_download(release) == SAFETENSORS_FILES
    ggufs = ["README.md", "ggml-model-i2_s.gguf", "ggml-model-tq2_0.gguf"]
    assert files_to_download(ggufs, gguf="*i2_s*") == ["ggml-model-i2_s.gguf"]
    assert files_to_download(["README.md", "only.gguf"]) == ["only.gguf"]
    with pytest.raises(HubError, match="several GGUF files; choose one with --gguf"):
        files_to_download(ggufs)
    with pytest.raises(HubError, match="no GGUF file matches 'q8'"):
        files_to_download(ggufs, gguf="q8")
    with pytest.raises(HubError, match="neither safetensors nor GGUF"):
        files_to_download(["README.md"])


def cache_repo(hf_home: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Puts files into the HF cache as huggingface_hub does; returns the snapshot folder."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for i, (name, source) in enumerate(files.items()):
        blob = repo / "blobs" / f"{i:040d}"
        blob.write_bytes(source.read_bytes())
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_a_cached_model_is_listed_and_resolves_by_repo_id(tmp_path, monkeypatch):
    default = default_model_path()
    files = {p.name: p for p in default.iterdir() if p.is_file()}
    snapshot = cache_repo(tmp_path, "someone/tiny-bitnet", files)
    cache_repo(tmp_path, "someone/tiny-gguf", {"model.gguf": default / "config.json"})  # contents do not matter here

    listed = run(["list"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "someone/tiny-bitnet" in listed.stdout and "someone/tiny-gguf" in listed.stdout
    size_gb = sum(p.stat().st_size for p in files.values()) / 1e9
    assert f"{size_gb:.2f} GB" in listed.stdout and "main" in listed.stdout

    generated = run(["generate", "ROMEO:", "-m", "someone/tiny-bitnet", "-n", "4", "-t", "1"], tmp_path,
                    HF_HUB_OFFLINE="1")
    assert generated.returncode == 0, generated.stderr
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read when each call is made
    assert resolve_model_path("someone/tiny-bitnet") == snapshot
    assert resolve_model_path("someone/tiny-gguf").name == "model.gguf"  # a GGUF-only snapshot: its file


def test_list_with_an_empty_cache(tmp_path):
    result = run(["list"], tmp_path)
    assert result.returncode == 0 and "no models in the Hugging Face cache" in result.stdout
    missing = run(["generate", "x", "-m", "someone/not-here"], tmp_path, HF_HUB_OFFLINE="1")
    assert missing.returncode == 1 and "not in the local HF cache (download it with ternlm pull)" in missing.stderr
