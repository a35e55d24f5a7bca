"""JSON from model files (config.json, tokenizer_config.json, safetensors headers and indexes).

These files come from strangers: every way one can be malformed, including nesting deep enough to
exhaust Python's recursion limit, ends in a FormatError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import FormatError


def parse_json(data: str | bytes, source: str | Path):
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(source, f"not valid JSON: {e}") from None
    except RecursionError:
        raise FormatError(source, "not valid JSON: nested too deeply") from None


def read_json_object(path: Path) -> dict:
    try:
        data = parse_json(path.read_bytes(), path)
    except FileNotFoundError:
        raise FormatError(path, "file not found") from None
    except IsADirectoryError:
        raise FormatError(path, "is a directory, expected a JSON file") from None
    if not isinstance(data, dict):
        raise FormatError(path, "expected a JSON object")
    return data
