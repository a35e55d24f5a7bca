"""Checkpoint readers and writers: HF directories (hf.py) and GGUF files (gguf.py), each a Checkpoint
(checkpoint.py) that hands out one tensor at a time in HF names; convert.py writes both."""

from __future__ import annotations

from pathlib import Path

from ..errors import FormatError
from .checkpoint import Checkpoint


def open_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at `path`: an HF model directory or a GGUF file."""
    if path.is_dir():
        from .hf import HFCheckpoint

        return HFCheckpoint(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from .gguf import GGUFCheckpoint  # here: the gguf package adds a few MB to a process's RSS

        return GGUFCheckpoint(path)
    raise FormatError(path, "not a model directory (expected config.json and safetensors files) or GGUF file")
