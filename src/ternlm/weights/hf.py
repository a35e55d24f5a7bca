"""HF checkpoints: `config.json` + safetensors (single file or sharded), memory-mapped.

The safetensors header is parsed here rather than by the `safetensors` package because we need
zero-copy views of bf16 tensors, which its NumPy frontend cannot give. Every offset and size in
the header is checked against the file before any byte is touched.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

import numpy as np

from ..config import BitNetConfig
from ..errors import FormatError
from ..jsonfile import parse_json, read_json_object
from ..tokenizer import Tokenizer
from .checkpoint import Checkpoint, DenseTensor, drop_pages, float32_of
from .packing import quantize_ternary, unpack_ternary_hf

# safetensors dtype -> (NumPy storage dtype, our dtype label)
_DTYPES = {
    "F32": (np.float32, "float32"),
    "F16": (np.float16, "float16"),
    "BF16": (np.uint16, "bfloat16"),
    "F64": (np.float64, "float64"),
    "U8": (np.uint8, "uint8"),
    "I8": (np.int8, "int8"),
    "I32": (np.int32, "int32"),
    "I64": (np.int64, "int64"),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFile:
    """A memory-mapped safetensors file: validated header, zero-copy tensor views."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            raise FormatError(self.path, "file not found") from None
        except IsADirectoryError:
            raise FormatError(self.path, "is a directory, expected a safetensors file") from None
        self._handle = f  # open as long as the mapping: file_location hands out its descriptor
        size = f.seek(0, 2)
        if size < 8:
            raise FormatError(self.path, "truncated safetensors file (no header length)")
        f.seek(0)
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise FormatError(self.path, f"safetensors header length {header_len} exceeds the file")
        header_bytes = f.read(header_len)
        self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        header = parse_json(header_bytes, f"{self.path} (safetensors header)")
        if not isinstance(header, dict):
            raise FormatError(self.path, "safetensors header is not a JSON object")
        self.size = size
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            self.tensors[name] = self._check_entry(name, info, data_size)

    def _check_entry(self, name: str, info, data_size: int):
        def fail(problem: str):
            raise FormatError(self.path, f"tensor {name!r}: {problem}")

        if not isinstance(info, dict):
            fail("header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPES:
            fail(f"unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            fail(f"invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            fail(f"invalid data_offsets {offsets!r}")
        start, end = offsets
        if not 0 <= start <= end:
            fail(f"invalid data_offsets {offsets!r}")
        if end > data_size:
            fail(f"data ends at byte {end} but the file holds only {data_size} data bytes (truncated file?)")
        expected = math.prod(shape) * np.dtype(_DTYPES[dtype][0]).itemsize  # Python ints: no overflow
        if end - start != expected:
            fail(f"{end - start} bytes for shape {shape} of {dtype}, expected {expected}")
        return dtype, tuple(shape), start, end

    def dtype(self, name: str) -> str:
        return _DTYPES[self.tensors[name][0]][1]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def release(self, name: str, first_row: int = 0, end_row: int | None = None) -> None:
        """Drop the pages of the tensor (or of its rows [first_row, end_row)) from this process's
        resident set once a copy has been made (the kernel keeps them in its page cache): otherwise
        the file and the runtime layout would both count in RSS. Reading again faults them back in."""
        dtype, shape, start, end = self.tensors[name]
        if end_row is not None or first_row:
            row_bytes = (end - start) // max(shape[0], 1)
            start, end = start + first_row * row_bytes, start + (shape[0] if end_row is None else end_row) * row_bytes
        drop_pages(self._map, self._data_start + start, self._data_start + end)

    def fileno(self) -> int:
        return self._handle.fileno()

    def offset(self, name: str) -> int:
        """The byte in the file where the tensor's data starts."""
        return self._data_start + self.tensors[name][2]

    def get(self, name: str) -> np.ndarray:
        """A read-only view into the mapped file (bf16 comes back as uint16 bit patterns)."""
        dtype, shape, start, end = self.tensors[name]
        storage = _DTYPES[dtype][0]
        count = (end - start) // np.dtype(storage).itemsize
        array = np.frombuffer(self._map, dtype=storage, count=count, offset=self._data_start + start)
        return array.reshape(shape)


class HFCheckpoint(Checkpoint):
    """An HF model directory: config.json plus model.safetensors or a sharded index."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.source = str(self.directory)
        self.config = BitNetConfig.from_file(self.directory / "config.json")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index.exists():
            self._open_shards(index)
        elif single.exists():
            shard = self._files[single.name] = SafetensorsFile(single)
            self._where = {name: shard for name in shard.tensors}
        else:
            raise FormatError(self.directory, "no model.safetensors or model.safetensors.index.json")
        self.file_bytes = sum(f.size for f in self._files.values())

    def _open_shards(self, index: Path) -> None:
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise FormatError(index, "not a safetensors index (expected a JSON object with weight_map)")
        for name, filename in weight_map.items():
            if not isinstance(filename, str) or Path(filename).name != filename:
                raise FormatError(index, f"invalid shard file name {filename!r}")
            if filename not in self._files:
                self._files[filename] = SafetensorsFile(self.directory / filename)
            shard = self._files[filename]
            if name not in shard.tensors:
                raise FormatError(shard.path, f"tensor {name!r} listed in the index is missing")
            self._where[name] = shard

    # -- Checkpoint interface ------------------------------------------------------------------
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_directory(self.directory, self.config.bos_token_id)

    def stop_ids(self, tokenizer: Tokenizer) -> set[int]:
        """Adds the eos ids of generation_config.json to the config's."""
        stop = super().stop_ids(tokenizer)
        path = self.directory / "generation_config.json"
        if path.exists():
            eos = read_json_object(path).get("eos_token_id")
            vocab = self.config.vocab_size
            stop.update(t for t in (eos if isinstance(eos, list) else [eos])
                        if isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab)
        return stop

    def generation_defaults(self) -> dict:
        """generation_config.json's sampling fields as transformers applies them: greedy unless
        do_sample is true, and then temperature 1, top_k 50 and top_p 1 where the file is silent; the
        repetition penalty in either case."""
        path = self.directory / "generation_config.json"
        if not path.exists():
            return {}
        raw = read_json_object(path)

        def number(key: str, default: float, kind=float):
            value = raw.get(key)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise FormatError(path, f"{key} must be a number, got {value!r}")
            return kind(value)

        defaults = {"repetition_penalty": number("repetition_penalty", 1.0)}
        if raw.get("do_sample") is True:
            defaults.update(temperature=number("temperature", 1.0), top_k=number("top_k", 50, int),
                            top_p=number("top_p", 1.0), min_p=number("min_p", 0.0))
        else:
            defaults["temperature"] = 0.0
        return defaults

    def has(self, name: str) -> bool:
        return name in self._where

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._where[name]
        except KeyError:
            raise FormatError(self.directory, f"missing tensor {name!r}") from None

    def dense(self, name: str) -> DenseTensor:
        f = self._file(name)
        dtype = f.dtype(name)
        if dtype not in ("float32", "float16", "bfloat16"):
            raise FormatError(f.path, f"tensor {name!r} has dtype {dtype}, expected a float type")
        return DenseTensor(f.get(name), dtype)

    def file_location(self, name: str) -> tuple[int, int] | None:
        f = self._file(name)
        if f.dtype(name) not in ("float32", "float16", "bfloat16"):
            return None
        return f.fileno(), f.offset(name)

    def ternary(self, name: str, rows: int, cols: int) -> tuple[np.ndarray, float]:
        f = self._file(name)
        shape, dtype = f.shape(name), f.dtype(name)
        if dtype == "uint8":
            if shape != (rows // 4, cols) or rows % 4:
                raise FormatError(f.path, f"packed tensor {name!r} has shape {list(shape)}, "
                                          f"expected {[rows // 4, cols]} for a [{rows}, {cols}] weight")
            try:
                ternary = unpack_ternary_hf(f.get(name))
            except ValueError as e:
                raise FormatError(f.path, f"tensor {name!r}: {e}") from None
            f.release(name)
            return ternary, self._packed_scale(name)
        if dtype in ("float32", "float16", "bfloat16", "float64"):
            if shape != (rows, cols):
                raise FormatError(f.path, f"tensor {name!r} has shape {list(shape)}, expected {[rows, cols]}")
            result = quantize_ternary(float32_of(DenseTensor(f.get(name), dtype)))
            f.release(name)
            return result
        raise FormatError(f.path, f"tensor {name!r} has dtype {dtype}, expected uint8 (packed) or a float type")

    def release(self, name: str, first_row: int = 0, end_row: int | None = None) -> None:
        self._file(name).release(name, first_row, end_row)

    def _packed_scale(self, weight_name: str) -> float:
        scale_name = weight_name[: -len("weight")] + "weight_scale"
        f = self._file(scale_name)
        values = float32_of(DenseTensor(f.get(scale_name), f.dtype(scale_name))).reshape(-1)
        if values.size != 1:
            raise FormatError(f.path, f"{scale_name!r} must hold one value, has {values.size}")
        value = float(values[0])
        if not np.isfinite(value) or value <= 0:
            raise FormatError(f.path, f"{scale_name!r} = {value} is not a positive number")
        return 1.0 / value if self.config.weight_scale_divides else value
