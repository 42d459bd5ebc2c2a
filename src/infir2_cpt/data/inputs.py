"""prepare-data's inputs: what files are read (JSON Lines, optionally .gz/.zst, parquet, or folders of them), how
they are cut into work units (byte ranges of plain JSONL cut at line boundaries, blocks of lines of compressed
files, parquet row groups), how a unit is read and how a line or row is parsed; and a first look at the records
that catches a wrong --text-key before any work starts."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, Problem

# suffix -> how the file is read; .json files are read as JSON Lines, like Megatron's own preprocessing
INPUT_SUFFIXES: dict[str, str] = {
    ".jsonl": "jsonl", ".json": "jsonl",
    ".jsonl.gz": "gz", ".json.gz": "gz",
    ".jsonl.zst": "zst", ".json.zst": "zst",
    ".parquet": "parquet",
}
COMPRESSED_KINDS = frozenset({"gz", "zst"})
STATS_SUFFIX = ".stats.json"

# Why a line or row was skipped. The FATAL ones stop the run under strict=True and count towards the
# skipped share (max_skipped_percent); blank lines and empty documents are harmless and always just skipped.
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

DEFAULT_BATCH = 1000  # documents per tokenizer call at most
_MIN_UNIT_BYTES = 1 << 20
_MAX_UNIT_BYTES = 64 << 20
_UNITS_PER_WORKER = 16
_MAX_BLOCK_BYTES = 16 << 20  # a compressed file's block of lines travels through a queue: keep it small
_READ_BYTES = 4 << 20  # plain JSONL is read this much at a time
_SAMPLE_ROWS = 100  # rows per file the text-key check looks at


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
    """A piece of one input file that one worker turns into one shard. A compressed file is planned as one unit
    without data; the parent reads it and hands out its blocks of lines (units with data) to the workers."""

    index: int
    path: str
    kind: str       # jsonl | gz | zst | parquet
    start: int      # jsonl: first byte; parquet: row group; otherwise 0
    stop: int       # jsonl: end byte (exclusive); parquet: row group + 1; otherwise 0
    first_row: int  # rows of the file before this unit; for a jsonl range counted when needed (see lines_before)
    size: int       # bytes of the file on disk this unit covers, for the progress display
    data: bytes | None = None  # a compressed file's block: whole lines, decompressed


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


def unit_bytes_for(files: Sequence[Path], workers: int) -> int:
    """About a sixteenth of each worker's share, 1-64 MiB. Units take unequal times (documents differ), so the
    last ones finish unevenly: the idle tail is about half a unit per worker, up to an eighth of the run with 4 units
    per worker, a thirty-second with 16. A unit costs a shard file and a queue message, nothing more."""
    total = sum(p.stat().st_size for p in files if input_kind(p) != "parquet")
    return min(max(total // (workers * _UNITS_PER_WORKER), _MIN_UNIT_BYTES), _MAX_UNIT_BYTES)


def plan_units(files: Sequence[Path], unit_bytes: int) -> list[WorkUnit]:
    """Cut the inputs into units, in input order: plain JSONL into byte ranges (so that even a single big file
    keeps every worker busy), parquet by row group; a compressed file stays one unit, split into blocks of
    lines as it is read (compressed_blocks)."""
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


# --------------------------------------------------------------------------- reading


def _decompressed(raw: io.BufferedReader, kind: str) -> io.BufferedIOBase:
    if kind == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    import zstandard

    # read_across_frames: files made by concatenation or by parallel compressors have many frames
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))


def compressed_blocks(unit: WorkUnit, block_bytes: int) -> Iterator[WorkUnit]:
    """A compressed file's units: blocks of about block_bytes of whole lines (decompressed), each with the rows
    of the file before it and the compressed bytes it came from. Raises DataError for a corrupt file."""
    block_bytes = min(block_bytes, _MAX_BLOCK_BYTES)
    rows, consumed = 0, 0
    with open(unit.path, "rb") as raw:
        try:
            with _decompressed(raw, unit.kind) as stream:
                carry = b""
                while chunk := stream.read(block_bytes):
                    data = carry + chunk
                    cut = data.rfind(b"\n") + 1
                    if cut == 0:  # no line end yet: a line longer than a block
                        carry = data
                        continue
                    position = raw.tell()
                    yield WorkUnit(unit.index, unit.path, unit.kind, 0, 0, rows, position - consumed, data[:cut])
                    rows += data.count(b"\n", 0, cut)
                    consumed, carry = position, data[cut:]
                if carry:  # the last line has no line end
                    yield WorkUnit(unit.index, unit.path, unit.kind, 0, 0, rows, unit.size - consumed, carry)
        except DataError:
            raise
        except Exception as exc:  # gzip/zstandard raise EOFError, BadGzipFile, zlib.error, ZstdError, ...
            raise DataError([Problem(unit.path, f"unreadable after line {rows}, corrupt or truncated? "
                                     f"({type(exc).__name__}: {exc})")]) from None


@dataclass
class RowBatch:
    payloads: list[Any]  # JSONL: lines (bytes, without the line end); parquet: the text column's values
    text_bytes: int      # uncompressed bytes they came from
    done_bytes: int      # bytes of the unit's `size` read so far, for the progress display


def _split_lines(data: bytes, done_bytes: int) -> RowBatch:
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the block ends with a line end
        lines.pop()
    return RowBatch(lines, len(data), done_bytes)


def _plain_rows(unit: WorkUnit) -> Iterator[RowBatch]:
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        left, carry, done = unit.stop - unit.start, b"", 0
        while left > 0:
            chunk = f.read(min(left, _READ_BYTES))
            if not chunk:  # the file was cut short since it was planned
                break
            left -= len(chunk)
            done += len(chunk)
            data = carry + chunk
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if cut:
                yield _split_lines(data[:cut], done)
        if carry:  # the file's last line has no line end
            yield _split_lines(carry, done)


def _block_rows(unit: WorkUnit) -> Iterator[RowBatch]:
    assert unit.data is not None
    yield _split_lines(unit.data, unit.size)


def _parquet_rows(unit: WorkUnit, batch_size: int, text_key: str) -> Iterator[RowBatch]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(unit.path)
    group = parquet.metadata.row_group(unit.start)
    rows = max(group.num_rows, 1)
    if text_key not in parquet.schema_arrow.names:
        # every row lacks the field: report them like JSON records without the key
        for done in range(0, group.num_rows, batch_size):
            count = min(batch_size, group.num_rows - done)
            yield RowBatch([None] * count, 0, unit.size * (done + count) // rows)
        return
    done = 0
    for record_batch in parquet.iter_batches(batch_size=batch_size, row_groups=[unit.start], columns=[text_key]):
        values = record_batch.column(0).to_pylist()
        done += len(values)
        yield RowBatch(values, group.total_byte_size * len(values) // rows, unit.size * done // rows)


def read_rows(unit: WorkUnit, batch_size: int, text_key: str) -> Iterator[RowBatch]:
    if unit.kind == "jsonl":
        return _plain_rows(unit)
    if unit.kind == "parquet":
        return _parquet_rows(unit, batch_size, text_key)
    return _block_rows(unit)


def count_lines(path: str, end: int) -> int:
    """Newlines in the first `end` bytes of a file (the first line of a plain JSONL unit, when it is needed)."""
    count = 0
    with open(path, "rb") as f:
        while end > 0:
            chunk = f.read(min(end, 16 << 20))
            if not chunk:
                break
            count += chunk.count(b"\n")
            end -= len(chunk)
    return count


def lines_before(unit: WorkUnit) -> int:
    """Lines (parquet: rows) of the file before the unit's first one."""
    return count_lines(unit.path, unit.start) if unit.kind == "jsonl" else unit.first_row


# --------------------------------------------------------------------------- parsing


def check_text(value: Any) -> tuple[str | None, str | None, str]:
    """(text, None, "") for a usable document, else (None, reason, detail)."""
    if value is None:
        return None, "missing_key", ""
    if not isinstance(value, str):
        return None, "not_a_string", type(value).__name__
    if not value or value.isspace():
        return None, "empty_document", ""
    return value, None, ""


def parse_json_line(line: bytes, text_key: str) -> tuple[str | None, str | None, str, dict[str, Any] | None]:
    """One JSONL line -> (text, None, "", record) or (None, skip reason, detail, record or None)."""
    try:
        record = json.loads(line)
    except ValueError as exc:  # includes invalid UTF-8 (UnicodeDecodeError)
        if not line.strip():
            return None, "blank_line", "", None
        return None, "malformed_json", str(exc)[:200], None
    if not isinstance(record, dict):
        return None, "not_an_object", type(record).__name__, None
    return (*check_text(record.get(text_key)), record)


@dataclass
class FieldTally:
    """The fields of records that lack the text field, to name the one that most likely holds the text."""

    records: int = 0
    fields: dict[str, list[int]] = field(default_factory=dict)  # name -> [records with it, characters if text]

    LIMIT = 1000  # records looked at per unit

    def add(self, record: dict[str, Any], text_key: str) -> None:
        if self.records >= self.LIMIT:
            return
        self.records += 1
        for name, value in record.items():
            if name == text_key:  # present but null
                continue
            tally = self.fields.setdefault(str(name), [0, 0])
            tally[0] += 1
            tally[1] += len(value) if isinstance(value, str) else 0

    def add_columns(self, rows: int, columns: dict[str, int], text_key: str) -> None:
        """Parquet rows without text: the file's other columns, with the bytes of the string ones."""
        self.records += rows
        for name, size in columns.items():
            if name == text_key:  # present but null
                continue
            tally = self.fields.setdefault(name, [0, 0])
            tally[0] += rows
            tally[1] += size

    def merge(self, other: FieldTally) -> None:
        self.records += other.records
        for name, (count, chars) in other.fields.items():
            tally = self.fields.setdefault(name, [0, 0])
            tally[0] += count
            tally[1] += chars

    def likely_text_field(self) -> str | None:
        """The field with the most text in it."""
        best = max(self.fields.items(), key=lambda item: item[1][1], default=None)
        return best[0] if best is not None and best[1][1] > 0 else None

    def describe(self, limit: int = 8) -> str:
        ranked = sorted(self.fields.items(), key=lambda item: (-item[1][1], -item[1][0], item[0]))
        parts = [f"{name} ({count:,} record{'s' if count != 1 else ''}"
                 + (f", {chars // max(count, 1):,} characters on average" if chars else "") + ")"
                 for name, (count, chars) in ranked[:limit]]
        more = f" and {len(ranked) - limit} more" if len(ranked) > limit else ""
        return ", ".join(parts) + more if parts else "none"


def parquet_string_columns(path: str, row_group: int | None = None) -> dict[str, int]:
    """Every column of a parquet file -> uncompressed bytes in the row group (or the file) if it holds text,
    else 0."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    schema, meta = parquet.schema_arrow, parquet.metadata
    groups = [row_group] if row_group is not None else range(meta.num_row_groups)
    sizes: dict[str, int] = {name: 0 for name in schema.names}
    for g in groups:
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            name = column.path_in_schema
            if name in sizes and (pa.types.is_string(schema.field(name).type)
                                  or pa.types.is_large_string(schema.field(name).type)):
                sizes[name] += column.total_uncompressed_size
    return sizes


def text_key_problem(text_key: str, which: str, tally: FieldTally) -> Problem:
    """`which` records have no text field: name the fields they do have, and the likely one."""
    likely = tally.likely_text_field()
    hint = f"; the text looks to be in {likely!r}: --text-key {likely}" if likely else ""
    return Problem("text-key", f"{which} have no such field (or it is null); the fields they have: "
                   f"{tally.describe()}{hint}", text_key)


def _first_lines(path: Path, kind: str, count: int) -> list[bytes]:
    lines: list[bytes] = []
    with open(path, "rb") as raw:
        stream: io.BufferedIOBase = _decompressed(raw, kind) if kind in COMPRESSED_KINDS else raw
        with stream:
            while len(lines) < count and (line := stream.readline()):
                if line.strip():
                    lines.append(line)
    return lines


def check_text_key(files: Sequence[Path], text_key: str) -> None:
    """Before any work: if not one of the first records of any file has the text field, --text-key is wrong.
    (Whatever else is wrong with the records is counted as they are read, and judged at the end.)"""
    tally, records = FieldTally(), 0
    for path in files:
        kind = input_kind(path)
        if kind == "parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(str(path))
            if text_key in parquet.schema_arrow.names:
                return
            rows = min(parquet.metadata.num_rows, _SAMPLE_ROWS)
            columns = parquet_string_columns(str(path), 0) if parquet.metadata.num_row_groups else {}
            tally.add_columns(rows, columns, text_key)
            records += rows
            continue
        try:
            lines = _first_lines(path, str(kind), _SAMPLE_ROWS)
        except Exception:  # a corrupt file is reported, with its line, when it is read
            continue
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            if record.get(text_key) is not None:
                return
            records += 1
            tally.add(record, text_key)
    if records:
        raise DataError([text_key_problem(text_key, f"the first {records:,} records of the inputs", tally)])
