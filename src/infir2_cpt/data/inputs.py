"""prepare-data's inputs: what files are read (JSON Lines, optionally .gz/.zst, parquet, or folders of them), how
they are cut into work units (byte ranges of plain JSONL cut at line boundaries, whole compressed files, parquet
row groups), how a unit is read in batches and how a line or row is parsed; and the tokenizer."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import DataError, Problem

# suffix -> how the file is read; .json files are read as JSON Lines, like Megatron's own preprocessing
INPUT_SUFFIXES: dict[str, str] = {
    ".jsonl": "jsonl", ".json": "jsonl",
    ".jsonl.gz": "gz", ".json.gz": "gz",
    ".jsonl.zst": "zst", ".json.zst": "zst",
    ".parquet": "parquet",
}
STATS_SUFFIX = ".stats.json"

# Why a line or row was skipped. The FATAL ones stop the run under strict=True; blank lines and empty
# documents are harmless and always just skipped.
SKIP_REASONS: dict[str, str] = {
    "malformed_json": "not valid JSON",
    "not_an_object": "not a JSON object",
    "missing_key": "has no text field (or it is null)",
    "not_a_string": "text field is not a string",
    "invalid_text": "text cannot be tokenized (invalid Unicode)",
    "empty_document": "empty document",
    "blank_line": "blank line",
}
FATAL_REASONS = frozenset({"malformed_json", "not_an_object", "missing_key", "not_a_string", "invalid_text"})
EXAMPLES_PER_REASON = 100  # locations kept per skip reason in the stats (counts are always exact)

DEFAULT_BATCH = 1000
_MIN_UNIT_BYTES = 1 << 20
_MAX_UNIT_BYTES = 64 << 20






# --------------------------------------------------------------------------- imports with side effects


@contextlib.contextmanager
def quiet_megatron() -> Iterator[None]:
    """Silence megatron.core's import- and rank-related warnings: on a host without CUDA, Transformer Engine
    or torch.distributed they say nothing about data preparation."""
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_logger.setLevel(level)


def megatron_indexed_dataset() -> ModuleType:
    """megatron.core's indexed_dataset module (IndexedDatasetBuilder, IndexedDataset, DType)."""
    try:
        with quiet_megatron():
            from megatron.core.datasets import indexed_dataset
    except ImportError as exc:
        problem = Problem("megatron-core", f"cannot be imported ({exc}); install infir2-cpt[megatron]")
        raise DataError([problem]) from None
    return indexed_dataset


def load_tokenizer(tokenizer_dir: str | Path) -> Any:
    """The local Hugging Face tokenizer (a fast one: prepare-data tokenizes with its Rust backend)."""
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise DataError([Problem("tokenizer", "is not a directory", str(path))])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds; all mean "this is not a usable tokenizer"
        problem = Problem("tokenizer", f"cannot load a Hugging Face tokenizer from it: {exc}", str(path))
        raise DataError([problem]) from None
    if not getattr(tokenizer, "is_fast", False):
        raise DataError([Problem("tokenizer", "is not a fast tokenizer (needs tokenizer.json)", str(path))])
    return tokenizer


# --------------------------------------------------------------------------- inputs and work units


def input_kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((kind for suffix, kind in INPUT_SUFFIXES.items() if name.endswith(suffix)), None)


def _is_our_stats_file(path: Path) -> bool:
    """A stats JSON written by prepare-data (it sits next to its .idx): never an input."""
    return path.name.endswith(STATS_SUFFIX) and path.with_name(path.name[: -len(STATS_SUFFIX)] + ".idx").exists()


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded recursively (sorted; hidden files and folders skipped)."""
    files: list[Path] = []
    problems: list[Problem] = []
    if not inputs:
        problems.append(Problem("input", "give at least one file or folder"))
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and input_kind(p)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts)
                           and not _is_our_stats_file(p))
            if not found:
                problems.append(Problem("input", f"folder holds no {', '.join(INPUT_SUFFIXES)} file", str(path)))
            files += found
        elif path.is_file():
            if input_kind(path) is None:
                problems.append(Problem("input", f"unsupported file type; expected {', '.join(INPUT_SUFFIXES)}",
                                        str(path)))
            else:
                files.append(path)
        else:
            problems.append(Problem("input", "no such file or folder", str(path)))
    if problems:
        raise DataError(problems)
    return list(dict.fromkeys(files))


@dataclass(frozen=True)
class WorkUnit:
    """A piece of one input file that one worker turns into one shard."""

    index: int
    path: str
    kind: str       # jsonl | gz | zst | parquet
    start: int      # jsonl: first byte; parquet: row group; otherwise 0
    stop: int       # jsonl: end byte (exclusive); parquet: row group + 1; otherwise 0
    first_row: int  # parquet: rows in the file before this row group; otherwise 0 (see _skip_stats)
    size: int       # bytes this unit covers, for the progress display


def _next_line_start(f: io.BufferedReader, offset: int, size: int) -> int:
    """The first line start at or after offset."""
    if offset <= 0:
        return 0
    f.seek(offset - 1)
    f.readline()  # ends the line that holds byte offset-1 (just that byte if it is the newline)
    return min(f.tell(), size)


def _check_not_json_array(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        raise DataError([Problem("input", "is a JSON array; prepare-data reads JSON Lines (one object per line)",
                                 str(path))])


def _plain_units(path: Path, unit_bytes: int, first_index: int) -> list[WorkUnit]:
    size = path.stat().st_size
    if path.name.lower().endswith(".json"):
        _check_not_json_array(path)
    cuts = [0]
    with open(path, "rb") as f:
        for offset in range(unit_bytes, size, unit_bytes):
            cut = _next_line_start(f, offset, size)
            if cut > cuts[-1]:
                cuts.append(cut)
    cuts.append(size)
    return [WorkUnit(first_index + i, str(path), "jsonl", a, b, 0, b - a)
            for i, (a, b) in enumerate(zip(cuts, cuts[1:])) if b > a]


def _parquet_units(path: Path, first_index: int) -> list[WorkUnit]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(str(path)).metadata
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError([Problem("input", f"cannot read parquet metadata: {exc}", str(path))]) from None
    units, row = [], 0
    for group in range(meta.num_row_groups):
        info = meta.row_group(group)
        units.append(WorkUnit(first_index + len(units), str(path), "parquet", group, group + 1, row,
                              max(info.total_byte_size, 1)))
        row += info.num_rows
    return units


def plan_units(files: Sequence[Path], workers: int, unit_bytes: int | None = None) -> list[WorkUnit]:
    """Cut the inputs into units, in input order. Plain JSONL is cut into pieces so that even a single
    big file keeps every worker busy; compressed files cannot be split and parquet splits by row group."""
    if unit_bytes is None:
        plain = sum(p.stat().st_size for p in files if input_kind(p) == "jsonl")
        unit_bytes = min(max(plain // (workers * 4), _MIN_UNIT_BYTES), _MAX_UNIT_BYTES)
    units: list[WorkUnit] = []
    for path in files:
        kind = input_kind(path)
        if kind == "jsonl":
            units += _plain_units(path, unit_bytes, len(units))
        elif kind == "parquet":
            units += _parquet_units(path, len(units))
        elif path.stat().st_size > 0:
            units.append(WorkUnit(len(units), str(path), str(kind), 0, 0, 0, path.stat().st_size))
    return units


# --------------------------------------------------------------------------- reading and parsing


Batches = Iterator[tuple[list[Any], int]]  # (payloads, bytes of the unit consumed so far)


def _plain_batches(unit: WorkUnit, batch_size: int) -> Batches:
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        position, batch = unit.start, []
        while position < unit.stop:
            line = f.readline()
            if not line:
                break
            position += len(line)
            batch.append(line)
            if len(batch) == batch_size:
                yield batch, position - unit.start
                batch = []
        if batch:
            yield batch, position - unit.start


def _compressed_batches(unit: WorkUnit, batch_size: int) -> Batches:
    with open(unit.path, "rb") as raw:
        if unit.kind == "gz":
            stream: io.BufferedIOBase = gzip.GzipFile(fileobj=raw, mode="rb")
        else:
            import zstandard

            # read_across_frames: files made by concatenation or by parallel compressors have many frames
            stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        with stream:
            batch: list[bytes] = []
            for line in stream:
                batch.append(line)
                if len(batch) == batch_size:
                    yield batch, raw.tell()
                    batch = []
            if batch:
                yield batch, raw.tell()


def _parquet_batches(unit: WorkUnit, batch_size: int, text_key: str) -> Batches:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(unit.path)
    rows = parquet.metadata.row_group(unit.start).num_rows
    if text_key not in parquet.schema_arrow.names:
        # every row lacks the field: report them like JSON records without the key
        for done in range(0, rows, batch_size):
            count = min(batch_size, rows - done)
            yield [None] * count, unit.size * (done + count) // max(rows, 1)
        return
    done = 0
    for record_batch in parquet.iter_batches(batch_size=batch_size, row_groups=[unit.start], columns=[text_key]):
        values = record_batch.column(0).to_pylist()
        done += len(values)
        yield values, unit.size * done // max(rows, 1)


def read_batches(unit: WorkUnit, batch_size: int, text_key: str) -> Batches:
    if unit.kind == "jsonl":
        return _plain_batches(unit, batch_size)
    if unit.kind == "parquet":
        return _parquet_batches(unit, batch_size, text_key)
    return _compressed_batches(unit, batch_size)


def check_text(value: Any) -> tuple[str | None, str | None, str]:
    """(text, None, "") for a usable document, else (None, reason, detail)."""
    if value is None:
        return None, "missing_key", ""
    if not isinstance(value, str):
        return None, "not_a_string", type(value).__name__
    if not value or value.isspace():
        return None, "empty_document", ""
    return value, None, ""


def parse_json_line(line: bytes, text_key: str) -> tuple[str | None, str | None, str]:
    """One JSONL line -> (text, None, "") or (None, skip reason, detail)."""
    try:
        record = json.loads(line)
    except ValueError as exc:  # includes invalid UTF-8 (UnicodeDecodeError)
        if not line.strip():
            return None, "blank_line", ""
        return None, "malformed_json", str(exc)[:200]
    if not isinstance(record, dict):
        return None, "not_an_object", type(record).__name__
    return check_text(record.get(text_key))
