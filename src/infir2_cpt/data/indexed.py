"""Writing Megatron's indexed dataset (PREFIX.bin + PREFIX.idx) without importing megatron.core (and torch).

The format, as megatron.core.datasets.indexed_dataset reads it (version 1):
- PREFIX.bin: every document's token ids, back to back, in the token dtype, nothing else;
- PREFIX.idx: the header b"MMIDIDX\\x00\\x00", the version (<Q 1), the dtype code (<B), the sequence count (<Q),
  the document count plus one (<Q), then the sequence lengths (int32), the byte offset of every sequence in
  the .bin (int64) and the document boundaries in sequences (int64, starting at 0).

prepare-data writes one sequence per document, so the document boundaries are 0, 1, ..., N. The tests read the
output back with megatron.core's IndexedDataset and compare it, byte for byte, with what megatron.core's own
IndexedDatasetBuilder writes for the same documents.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# megatron.core's DType codes for the two token dtypes prepare-data writes
DTYPE_CODES: dict[str, int] = {"uint16": 8, "int32": 4}
_UINT16_LIMIT = 65500  # megatron.core's DType.optimal_dtype: uint16 below this vocabulary size, else int32
_CHUNK = 1 << 22  # sequences per write of the offsets, so that the index never needs 16 bytes per document at once


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype megatron.core picks for a vocabulary of this size (uint16 leaves a margin below 65536)."""
    return np.dtype(np.uint16 if vocab_size < _UINT16_LIMIT else np.int32)


def write_index(idx_path: str | Path, dtype: np.dtype, lengths: np.ndarray) -> None:
    """The .idx for documents of these lengths (in tokens), one sequence each, stored back to back in the .bin."""
    code = DTYPE_CODES[np.dtype(dtype).name]
    lengths = np.asarray(lengths, dtype=np.int32)
    count = int(lengths.size)
    with open(idx_path, "wb") as f:
        f.write(INDEX_HEADER + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", code))
        f.write(struct.pack("<Q", count) + struct.pack("<Q", count + 1))
        f.write(lengths.tobytes())
        offset = 0  # byte offset of the next sequence in the .bin
        for start in range(0, count, _CHUNK):
            ends = np.cumsum(lengths[start:start + _CHUNK], dtype=np.int64) * np.dtype(dtype).itemsize + offset
            f.write(np.concatenate(([offset], ends[:-1])).astype(np.int64).tobytes())
            offset = int(ends[-1])
        for start in range(0, count + 1, _CHUNK):
            f.write(np.arange(start, min(start + _CHUNK, count + 1), dtype=np.int64).tobytes())


def append_file(out: io.FileIO, path: str | Path) -> int:
    """Append a whole file to `out` (an unbuffered file opened "wb"), in the kernel where it can; returns the
    bytes appended."""
    with open(path, "rb", buffering=0) as src:
        size = os.fstat(src.fileno()).st_size
        copied = 0
        try:
            while copied < size and (n := os.copy_file_range(src.fileno(), out.fileno(), size - copied)):
                copied += n
        except (AttributeError, OSError):  # no copy_file_range (not Linux, or this filesystem): copy the rest here
            pass
        src.seek(copied)
        while chunk := src.read(16 << 20):
            view = memoryview(chunk)
            while view:
                view = view[out.write(view):]
            copied += len(chunk)
    return copied
