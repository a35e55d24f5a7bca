"""`ternlm generate --prompt-cache FILE` (llama.cpp's flag): a prompt's keys and values on disk.

The file is safetensors: `keys` and `values` [layers, positions, kv width] as the KV cache stores them
(f16 bit patterns as uint16, or float32), and in its metadata the token ids they belong to and the
identity of the model and load options that computed them. A later run whose prompt starts with
those tokens puts them in the prompt cache instead of computing them. Any file that cannot be used
as it is (another model or options, another prompt, truncated, corrupt) is one line of warning:
the prompt is computed and the file written again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .prompt_cache import KV_BLOCK, blocks_for

FORMAT = "ternlm-prompt-cache-1"


def model_identity(model) -> str:
    """What decides the keys and values: the model's files and the options that change its arithmetic."""
    path = Path(model.path)
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"] if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        if f.exists():
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    engine = model.engine
    options = {"backend": model.backend, "kv_cache": getattr(engine, "kv_cache", "f32"),
               "head": getattr(engine, "head", None), "files": digest.hexdigest()}
    return json.dumps(options, sort_keys=True)


def load_prompt_file(model, path: Path, prompt: list[int]) -> str | None:
    """Puts the file's keys and values of the prompt's first tokens into the model's prompt cache.
    Returns None, or why the file could not be used."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        return None
    cache = model.prompt_cache
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                return "not a ternlm prompt cache"
            if meta.get("model") != model_identity(model):
                return "made by another model or other load options"
            tokens = json.loads(meta.get("tokens", "[]"))
            usable = len(tokens) // KV_BLOCK * KV_BLOCK
            if not usable or tokens[:usable] != prompt[:usable]:
                return "made for another prompt"
            keys, values = f.get_tensor("keys")[:, :usable], f.get_tensor("values")[:, :usable]
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        return f"unreadable ({e})"
    if keys.shape[1] != usable or values.shape != keys.shape:
        return "its tensors do not match its tokens"
    if not cache.make_room(blocks_for(usable)):
        return "no room in the prompt cache"
    sequence = model.engine.new_cache(usable, cache.pool)
    try:
        sequence.import_rows(np.ascontiguousarray(keys), np.ascontiguousarray(values))
    except ValueError as e:
        return str(e)
    cache.keep(tokens[:usable], sequence)
    return None


def save_prompt_file(model, path: Path, prompt: list[int]) -> None:
    """Writes the cached whole blocks of the prompt (written to a temporary file, then renamed)."""
    from safetensors.numpy import save_file

    cache = model.prompt_cache
    blocks = cache.lookup(prompt + [0])  # every whole block of the prompt, its last token included
    if not blocks:
        return
    sequence = model.engine.new_cache(len(blocks) * KV_BLOCK, cache.pool)
    sequence.assign(blocks)
    keys, values = sequence.export_rows(len(blocks) * KV_BLOCK)
    metadata = {"format": FORMAT, "model": model_identity(model), "tokens": json.dumps(prompt[:len(blocks) * KV_BLOCK])}
    partial = path.with_name(path.name + ".partial")
    save_file({"keys": keys, "values": values}, str(partial), metadata=metadata)
    os.replace(partial, path)
