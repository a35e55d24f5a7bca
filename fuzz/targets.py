"""The fuzz targets: what each one feeds to ternlm, and what counts as a bug.

A target takes the fuzzer's bytes as one model file, puts it in a directory whose other files are
the valid seeds (fuzz/seeds/), and loads it as `ternlm.load` does, then tokenizes, renders the chat
template and runs the model on a few tokens. The only exception allowed out is ternlm.FormatError,
and, from rendering a chat template, the ValueError that ChatTemplate.render documents. Anything
else is a bug: another exception, a crash, a hang (the harness's per-input timeout), or more Python
memory (numpy arrays included, through tracemalloc) than MEMORY_BASE + MEMORY_PER_BYTE per input byte.
"""

from __future__ import annotations

import shutil
import tempfile
import tracemalloc
from pathlib import Path

import ternlm
from ternlm.chat import ChatTemplate

SEEDS = Path(__file__).resolve().parent / "seeds"
HF_FILES = {"config": "config.json", "safetensors": "model.safetensors", "tokenizer": "tokenizer.json",
            "tokenizer_config": "tokenizer_config.json"}
TARGETS = (*HF_FILES, "gguf", "chat_template")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"},
            {"role": "assistant", "content": "A ghost."}, {"role": "user", "content": "<|eot_id|> ünïcode 世界"}]
MEMORY_BASE = 64 << 20
MEMORY_PER_BYTE = 64


class MemoryOverrun(AssertionError):
    """An input made the loader hold far more memory than its size justifies."""


def seed_files(target: str) -> list[Path]:
    return sorted(p for p in (SEEDS / target).iterdir() if p.is_file())


class Workspace:
    """A directory (made inside `parent`) holding the seed model's files; a target overwrites one
    of them with its input."""

    def __init__(self, parent: str | Path | None = None):
        self.directory = Path(tempfile.mkdtemp(prefix="ternlm-fuzz-", dir=parent))
        self.model = self.directory / "model"
        self.model.mkdir()
        for target, filename in HF_FILES.items():
            shutil.copy(seed_files(target)[0], self.model / filename)
        self.originals = {target: seed_files(target)[0].read_bytes() for target in HF_FILES}

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def load_hf_with(self, target: str, data: bytes) -> str:
        path = self.model / HF_FILES[target]
        path.write_bytes(data)
        try:
            return exercise(self.model)
        finally:
            path.write_bytes(self.originals[target])

    def load_gguf(self, data: bytes) -> str:
        path = self.directory / "model.gguf"
        path.write_bytes(data)
        return exercise(path)


def exercise(path: Path) -> str:
    """Loads the model and uses every part of it once; returns "loaded"."""
    model = ternlm.load(path, threads=1)
    ids = model.tokenizer.encode("To be, or not to be: ünïcode 世界 <|eot_id|>", add_bos=True)[: model.n_ctx]
    model.tokenizer.decode(ids)
    model.logits(ids or [0])
    render_chat(model.chat_template)
    return "loaded"


def render_chat(template: ChatTemplate) -> None:
    try:
        template.render(MESSAGES)
    except ValueError as e:
        if type(e) is not ValueError:  # FormatError or another subclass: not what render documents
            raise


def render_template(data: bytes) -> str:
    render_chat(ChatTemplate(data.decode("utf-8", errors="replace")))
    return "loaded"


def run(target: str, data: bytes, workspace: Workspace) -> str:
    """Runs one input; returns "loaded", or "refused: <message>" for a FormatError. Anything else raises."""
    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        if target in HF_FILES:
            outcome = workspace.load_hf_with(target, data)
        elif target == "gguf":
            outcome = workspace.load_gguf(data)
        else:
            outcome = render_template(data)
    except ternlm.FormatError as e:
        outcome = f"refused: {e}"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        if started_here:
            tracemalloc.stop()
    allowed = MEMORY_BASE + MEMORY_PER_BYTE * len(data)
    if peak > allowed:
        raise MemoryOverrun(f"{target}: an input of {len(data)} bytes took {peak} bytes of memory (allowed {allowed})")
    return outcome
