"""The GGUF container: header, metadata and tensor table, read with every read bounds-checked, and
the tensor bytes memory-mapped.

The layout (GGUF versions 2 and 3, little-endian): "GGUF", version u32, tensor count u64, metadata
count u64; each metadata entry a key (u64 length + UTF-8), a value type u32 and the value (arrays:
element type u32, count u64, elements); each tensor a name, dimension count u32, dimensions u64
(fastest first), ggml type u32 and data offset u64; then, aligned to `general.alignment` (32 by
default), the tensor data.

ternlm reads the container itself rather than through gguf-py's GGUFReader: every count in a
hostile file must end in an error after at most a file's worth of steps, and ggml type ids 36-39
mean different things to bitnet.cpp (36 = I2_S) and upstream ggml, so the tensor types are ours to
interpret (gguf.py).
"""

from __future__ import annotations

import array
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FormatError
from .checkpoint import drop_pages

STRING, ARRAY = 8, 9
# value type -> (struct format, NumPy dtype) of the numeric and boolean types
SCALARS = {0: ("<B", "u1"), 1: ("<b", "i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
           5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
           12: ("<d", "<f8")}
MAX_ARRAY_NESTING = 4
MIN_METADATA_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, dimension count, one dimension, type, offset


class _PastEnd(Exception):
    pass


class _Cursor:
    """Reads the header front to back; a read past the end of the file raises _PastEnd."""

    def __init__(self, data: memoryview):
        self.data, self.position = data, 0

    def take(self, n: int) -> memoryview:
        end = self.position + n
        if n < 0 or end > len(self.data):
            raise _PastEnd(f"the header runs past the end of the file (needs byte {end}, file has {len(self.data)})")
        piece, self.position = self.data[self.position: end], end
        return piece

    def fits(self, count: int, least_bytes: int, what: str) -> None:
        """Refuses at once a count of entries that cannot fit in the rest of the file."""
        if count * least_bytes > len(self.data) - self.position:
            raise _PastEnd(f"{count} {what} run past the end of the file")

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        return bytes(self.take(self.scalar("<Q")))

    def value(self, value_type: int, depth: int = 0):
        """A metadata value, undecoded: strings stay bytes, numeric arrays NumPy views."""
        if value_type in SCALARS:
            return self.scalar(SCALARS[value_type][0])
        if value_type == STRING:
            return self.string()
        if value_type != ARRAY:
            raise ValueError(f"unknown metadata value type {value_type}")
        if depth >= MAX_ARRAY_NESTING:
            raise ValueError(f"arrays nested over {MAX_ARRAY_NESTING} deep")
        element_type, count = self.scalar("<I"), self.scalar("<Q")
        if element_type in SCALARS:
            dtype = np.dtype(SCALARS[element_type][1])
            self.fits(count, dtype.itemsize, "array values")
            return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype)
        self.fits(count, 8, "array values")  # a string or an array takes at least 8 bytes
        if element_type == STRING:
            return self._strings(count)
        return [self.value(element_type, depth + 1) for _ in range(count)]

    def _strings(self, count: int) -> StringArray:
        """An array of strings, where they lie (2B4T's file holds 128k tokens and 280k merges: a
        loop kept lean, decoded only when the value is asked for)."""
        data, position, size = self.data, self.position, len(self.data)
        starts, lengths = array.array("q"), array.array("q")
        for _ in range(count):
            if position + 8 > size:
                raise _PastEnd("a string array runs past the end of the file")
            (length,) = struct.unpack_from("<Q", data, position)
            if position + 8 + length > size:
                raise _PastEnd(f"a string of {length} bytes runs past the end of the file")
            starts.append(position + 8)
            lengths.append(length)
            position += 8 + length
        self.position = position
        return StringArray(data, starts, lengths)


class StringArray:
    """A metadata array of strings as offsets into the file: two machine integers a string rather
    than a Python object each (a memoryview apiece took 80 MB for 2B4T's vocabulary and merges)."""

    def __init__(self, data: memoryview, starts: array.array, lengths: array.array):
        self._data, self._starts, self._lengths = data, starts, lengths

    def __len__(self) -> int:
        return len(self._starts)

    def decode(self) -> list[str]:
        data = self._data
        return [bytes(data[start: start + length]).decode("utf-8") for start, length in zip(self._starts, self._lengths)]


@dataclass
class Metadata:
    """One metadata entry as stored: `value_type` and, for arrays, `element_type` as GGUF numbers."""
    value_type: int
    element_type: int | None
    raw: object  # bytes for strings, NumPy arrays for numeric arrays, StringArray, lists for other arrays

    def python(self):
        """The value as Python data: str, int, float, bool, or a list of them."""
        return _python(self.raw)


def _python(raw):
    if isinstance(raw, (bytes, memoryview)):
        return bytes(raw).decode("utf-8")
    if isinstance(raw, StringArray):
        return raw.decode()
    if isinstance(raw, np.ndarray):
        return raw.tolist()
    if isinstance(raw, list):
        return [_python(item) for item in raw]
    return raw


@dataclass
class TensorEntry:
    """A tensor as the table lists it, before its type is interpreted."""
    name: str
    shape: tuple[int, ...]  # NumPy order: slowest dimension first
    type_id: int
    offset: int  # absolute, in bytes


class GGUFContainer:
    """The parsed header of a GGUF file and its bytes, memory-mapped (`data`, uint8)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.handle = open(self.path, "rb")  # open as long as the mapping: callers hand out its descriptor
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise FormatError(self.path, f"cannot open: {e.strerror}") from None
        try:
            self.mapping = mmap.mmap(self.handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise FormatError(self.path, "not a valid GGUF file: the file is empty") from None
        self.data = np.frombuffer(self.mapping, dtype=np.uint8)
        try:
            self._parse(_Cursor(memoryview(self.mapping)))
        except FormatError:
            raise
        except (_PastEnd, ValueError) as e:
            raise FormatError(self.path, f"not a valid GGUF file: {e}") from None

    def _parse(self, cursor: _Cursor) -> None:
        if bytes(cursor.take(4)) != b"GGUF":
            raise ValueError("it does not start with 'GGUF'")
        version = cursor.scalar("<I")
        if version & 0xFFFF == 0 and version >> 24 in (2, 3):
            raise FormatError(self.path, "big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise ValueError(f"version {version} is not supported (ternlm reads versions 2 and 3)")
        tensor_count, metadata_count = cursor.scalar("<Q"), cursor.scalar("<Q")
        cursor.fits(metadata_count, MIN_METADATA_BYTES, "metadata entries")
        cursor.fits(tensor_count, MIN_TENSOR_INFO_BYTES, "tensor entries")
        self.metadata: dict[str, Metadata] = {}
        for _ in range(metadata_count):
            key = _text(cursor.string(), "a metadata key")
            value_type = cursor.scalar("<I")
            position = cursor.position
            raw = cursor.value(value_type)
            element_type = struct.unpack_from("<I", cursor.data, position)[0] if value_type == ARRAY else None
            self.metadata[key] = Metadata(value_type, element_type, raw)
        cursor.fits(tensor_count, MIN_TENSOR_INFO_BYTES, "tensor entries")
        entries = []
        for _ in range(tensor_count):
            name = _text(cursor.string(), "a tensor name")
            dimensions = cursor.scalar("<I")
            if not 1 <= dimensions <= 4:
                raise FormatError(self.path, f"tensor {name!r}: {dimensions} dimensions (1 to 4 allowed)")
            shape = tuple(reversed([cursor.scalar("<Q") for _ in range(dimensions)]))
            entries.append((name, shape, cursor.scalar("<I"), cursor.scalar("<Q")))
        alignment = self.metadata.get("general.alignment")
        self.alignment = 32 if alignment is None else alignment.python()
        if not isinstance(self.alignment, int) or isinstance(self.alignment, bool) or self.alignment <= 0 \
                or self.alignment & (self.alignment - 1):
            raise ValueError(f"general.alignment {self.alignment!r} is not a power of two")
        data_start = self.data_start = -(-cursor.position // self.alignment) * self.alignment
        self.tensors = [TensorEntry(name, shape, type_id, data_start + offset)
                        for name, shape, type_id, offset in entries]

    def release(self, start: int, end: int) -> None:
        """Drops the pages of bytes [start, end) from this process's resident set (see drop_pages)."""
        drop_pages(self.mapping, start, end)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8") from None
