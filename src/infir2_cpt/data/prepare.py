"""From a raw corpus to a Megatron indexed dataset (`PREFIX_text_document.bin/.idx`), and a look inside one.

`prepare_data` runs in four steps:
1. plan: the inputs (JSONL, optionally .gz/.zst, parquet, or folders of them) become work units: byte
   ranges of plain JSONL files cut at line boundaries, whole compressed files, parquet row groups;
2. N worker processes take units one at a time; each reads, parses, tokenizes (the Hugging Face fast
   tokenizer's Rust backend, a batch at a time, one core per worker) and writes the unit's own shard with
   megatron.core's IndexedDatasetBuilder;
3. the shards are merged in input order (IndexedDatasetBuilder.add_index), so the output is the same
   whatever N is;
4. everything is written in a temporary folder beside the output and renamed to its final name at the
   very end, .idx last: an interrupted or failed run leaves no final-named file.

Bad records never reach the output: a line that is not JSON, a record without the text field, or an
empty document is skipped and counted with its file and line number (or made fatal with `strict`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import gzip
import io
import json
import logging
import multiprocessing as mp
import os
import queue as queue_module
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import numpy as np

from ..errors import DataError, Problem, WorkerError

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

_DEFAULT_BATCH = 1000
_MIN_UNIT_BYTES = 1 << 20
_MAX_UNIT_BYTES = 64 << 20






# --------------------------------------------------------------------------- imports with side effects


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
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


def _indexed_dataset() -> ModuleType:
    """megatron.core's indexed_dataset module (IndexedDatasetBuilder, IndexedDataset, DType)."""
    try:
        with _quiet():
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


def _batches(unit: WorkUnit, batch_size: int, text_key: str) -> Batches:
    if unit.kind == "jsonl":
        return _plain_batches(unit, batch_size)
    if unit.kind == "parquet":
        return _parquet_batches(unit, batch_size, text_key)
    return _compressed_batches(unit, batch_size)


def _check_text(value: Any) -> tuple[str | None, str | None, str]:
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
    return _check_text(record.get(text_key))


# --------------------------------------------------------------------------- one unit -> one shard


@dataclass(frozen=True)
class _Settings:
    """What every worker needs; picklable."""

    tokenizer_json: str  # the backend tokenizer, serialized: workers need neither transformers nor the folder
    text_key: str
    eod_id: int | None  # None: no EOD appended (--no-append-eod)
    dtype: str
    strict: bool
    batch_size: int
    shard_dir: str


# where a worker's time goes: reading + JSON parsing, the tokenizer call, ids -> numpy, the shard writes
WORKER_PHASES = ("read_parse", "tokenize", "convert", "write")


@dataclass
class UnitResult:
    index: int
    shard_prefix: str
    rows: int = 0
    documents: int = 0
    tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[int, str, str]] = field(default_factory=list)  # (row in the unit, reason, detail)
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(WORKER_PHASES, 0.0))
    cpu_s: float = 0.0  # CPU time of the worker on this unit: wall times above stretch when cores are shared

    def skip(self, row: int, reason: str, detail: str) -> None:
        count = self.skipped.get(reason, 0) + 1
        self.skipped[reason] = count
        if count <= EXAMPLES_PER_REASON:
            self.examples.append((row, reason, detail))


Report = Callable[[int, int, int], None]  # (documents, tokens, bytes) done since the last report


def _count_lines(path: str, end: int) -> int:
    """Newlines in the first `end` bytes of a file (only on the strict error path)."""
    count = 0
    with open(path, "rb") as f:
        while end > 0:
            chunk = f.read(min(end, 16 << 20))
            if not chunk:
                break
            count += chunk.count(b"\n")
            end -= len(chunk)
    return count


def _lines_before(unit: WorkUnit) -> int:
    """Lines (parquet: rows) of the file before the unit's first one, computed inside the worker."""
    return _count_lines(unit.path, unit.start) if unit.kind == "jsonl" else unit.first_row


def _location(unit: WorkUnit, row: int) -> str:
    """file:line (1-based; the parquet row for parquet) of a row of a unit."""
    return f"{unit.path}:{_lines_before(unit) + row}"


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int] | None]:
    """Token ids per text; None for a text the tokenizer rejects (such as one with a lone surrogate)."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast: no offsets (tokenizers>=0.20)
    try:
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    except Exception:  # one bad text fails the whole batch: find it by encoding one at a time
        ids: list[list[int] | None] = []
        for text in texts:
            try:
                ids.append(tokenizer.encode(text, add_special_tokens=False).ids)
            except Exception:
                ids.append(None)
        return ids


def _write(builder: Any, documents: list[list[int]], dtype: np.dtype) -> int:
    """Append documents to the shard: one numpy conversion for the batch, one add_document per document.
    Returns the tokens written."""
    lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
    tokens = int(lengths.sum())
    flat = np.fromiter(chain.from_iterable(documents), dtype=dtype, count=tokens)
    ends = np.cumsum(lengths)
    for start, end in zip((ends - lengths).tolist(), ends.tolist()):
        builder.add_document(flat[start:end], [end - start])
    return tokens


def process_unit(unit: WorkUnit, settings: _Settings, tokenizer: Any, report: Report) -> UnitResult:
    """Read, parse, tokenize and write one unit into its own shard (in a worker process)."""
    indexed = _indexed_dataset()
    dtype = np.dtype(settings.dtype)
    shard = os.path.join(settings.shard_dir, f"shard-{unit.index:06d}")
    builder = indexed.IndexedDatasetBuilder(shard + ".bin", dtype=dtype.type)
    result = UnitResult(unit.index, shard)
    times = result.times
    started, cpu_started = time.perf_counter(), time.process_time()
    reported_bytes = 0
    batches = _batches(unit, settings.batch_size, settings.text_key)
    if unit.kind == "parquet":  # a parquet row is the text column's value, a JSONL row a line to parse
        check_row = _check_text
    else:
        check_row = functools.partial(parse_json_line, text_key=settings.text_key)
    while True:
        try:
            payloads, position = next(batches)
        except StopIteration:
            break
        except Exception as exc:  # a corrupt or truncated file: fatal, since the rest of it is unreadable
            line = _lines_before(unit) + result.rows
            raise DataError([Problem(unit.path, f"unreadable after line {line}, corrupt or truncated? "
                                     f"({type(exc).__name__}: {exc})")]) from None
        texts, rows = [], []
        for payload in payloads:
            result.rows += 1
            text, reason, detail = check_row(payload)
            if reason is None:
                texts.append(text)
                rows.append(result.rows)
                continue
            result.skip(result.rows, reason, detail)
            if settings.strict and reason in FATAL_REASONS:
                message = SKIP_REASONS[reason] + (f" ({detail})" if detail else "") + " [--strict]"
                raise DataError([Problem(_location(unit, result.rows), message)])
        docs_before, tokens_before = result.documents, result.tokens
        if texts:
            _tokenize_and_write(texts, rows, unit, settings, tokenizer, builder, dtype, result)
        report(result.documents - docs_before, result.tokens - tokens_before, position - reported_bytes)
        reported_bytes = position
    t0 = time.perf_counter()
    builder.finalize(shard + ".idx")
    times["write"] += time.perf_counter() - t0
    times["read_parse"] = time.perf_counter() - started - times["tokenize"] - times["convert"] - times["write"]
    result.cpu_s = time.process_time() - cpu_started
    return result


def _tokenize_and_write(texts: list[str], rows: list[int], unit: WorkUnit, settings: _Settings, tokenizer: Any,
                        builder: Any, dtype: np.dtype, result: UnitResult) -> None:
    t0 = time.perf_counter()
    encoded = _tokenize(tokenizer, texts)
    t1 = time.perf_counter()
    documents: list[list[int]] = []
    for ids, row in zip(encoded, rows):
        if ids is None:
            result.skip(row, "invalid_text", "")
            if settings.strict:
                raise DataError([Problem(_location(unit, row), SKIP_REASONS["invalid_text"] + " [--strict]")])
        elif not ids:
            result.skip(row, "empty_document", "no tokens")
        else:
            if settings.eod_id is not None:
                ids.append(settings.eod_id)
            documents.append(ids)
    t2 = time.perf_counter()
    tokens = _write(builder, documents, dtype)
    t3 = time.perf_counter()
    result.documents += len(documents)
    result.tokens += tokens
    result.times["tokenize"] += t1 - t0
    result.times["convert"] += t2 - t1
    result.times["write"] += t3 - t2


# --------------------------------------------------------------------------- worker processes


def _backend_tokenizer(tokenizer_json: str) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    # a tokenizer.json may carry truncation or padding settings, which would silently cut documents
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _worker_main(settings: _Settings, tasks: Any, events: Any, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's terminate() must end us at once (fork copies
                                                   # the parent's SIGTERM handler)
    # _run_workers forked us with these signals blocked: until the two lines above ran, a SIGTERM would
    # have run the parent's handler here, raising KeyboardInterrupt into a copy of the parent's stack
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    # one core per worker: --workers is the parallelism, the tokenizer's own threads would oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    try:
        tokenizer = _backend_tokenizer(settings.tokenizer_json)
        while True:
            if os.getppid() != parent_pid:  # the parent was killed without stopping us: stop after this unit
                events.cancel_join_thread()  # nobody reads the events any more; do not wait to flush them
                return
            try:
                unit = tasks.get(timeout=1.0)
            except queue_module.Empty:
                continue
            if unit is None:
                return
            result = process_unit(unit, settings, tokenizer,
                                  lambda docs, tokens, nbytes: events.put(("progress", docs, tokens, nbytes)))
            events.put(("done", result))
    except DataError as exc:
        events.put(("error", exc))
    except BaseException:
        events.put(("crash", traceback.format_exc()))


def _mp_context() -> Any:
    # fork: workers inherit the imported megatron.core and torch (seconds to import again under spawn)
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _dead_worker_message(exitcode: int) -> str:
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"a worker process was killed by {name}{hint}"
    return f"a worker process exited with code {exitcode}"


def _run_workers(units: list[WorkUnit], settings: _Settings, workers: int, progress: "Progress") -> list[UnitResult]:
    ctx = _mp_context()
    tasks, events = ctx.Queue(), ctx.Queue()
    for unit in units:
        tasks.put(unit)
    processes = [ctx.Process(target=_worker_main, args=(settings, tasks, events, os.getpid()),
                             name=f"infir2-prepare-data-{i}", daemon=True)
                 for i in range(min(workers, len(units)))]
    for _ in processes:
        tasks.put(None)
    with warnings.catch_warnings():
        # Python warns about forking a multi-threaded process; the only other thread here is the idle
        # OpenBLAS pool that importing numpy starts, and OpenBLAS makes itself fork-safe
        warnings.filterwarnings("ignore", message=".*multi-threaded, use of fork", category=DeprecationWarning)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)  # see _worker_main
        try:
            for process in processes:
                process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    results: dict[int, UnitResult] = {}
    try:
        while len(results) < len(units):
            try:
                kind, *payload = events.get(timeout=0.5)
            except queue_module.Empty:
                progress.tick()
                dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise WorkerError(_dead_worker_message(dead[0]))
                if all(p.exitcode == 0 for p in processes):
                    raise WorkerError("the worker processes exited before finishing every unit")
                continue
            if kind == "progress":
                progress.add(*payload)
            elif kind == "done":
                results[payload[0].index] = payload[0]
            elif kind == "error":
                raise payload[0]
            else:
                raise WorkerError(f"a worker failed:\n{payload[0]}")
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=10)
        for q in (tasks, events):
            q.cancel_join_thread()  # never block on items nobody will read
            q.close()
    return [results[u.index] for u in units]


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's time limit, `kill`) runs the same cleanup as Ctrl-C: workers stopped,
    temporary files removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- progress display


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


class Progress:
    """One status line on stderr: share of input done, documents/s, tokens/s, ETA. Redrawn in place on a
    terminal, a new line every 30 s otherwise (logs)."""

    def __init__(self, total_bytes: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.5 if self.tty else 30.0
        self.total = max(total_bytes, 1)
        self.documents = self.tokens = self.bytes = 0
        self.started = self.last = time.perf_counter()

    def add(self, documents: int, tokens: int, nbytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += nbytes
        self.tick()

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        done = min(self.bytes / self.total, 1.0)
        eta = f", ETA {_clock(elapsed * (1 - done) / done)}" if 0 < done < 1 else ""
        return (f"prepare-data {done:6.1%} | {self.documents:,} docs ({_si(self.documents / elapsed)}/s) | "
                f"{_si(self.tokens)} tokens ({_si(self.tokens / elapsed)}/s) | {_clock(elapsed)}{eta}")

    def tick(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.interval):
            return
        self.last = now
        self.stream.write(("\r\033[K" if self.tty else "") + self.line() + ("" if self.tty else "\n"))
        self.stream.flush()

    def close(self) -> None:
        self.tick(force=True)
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- prepare_data


@dataclass(frozen=True)
class PrepareResult:
    prefix: str  # what data.blend[].path and --data-path take
    bin_path: str
    idx_path: str
    stats_path: str
    stats: dict[str, Any]


def output_prefix_for(output_prefix: str | Path, text_key: str) -> str:
    """PREFIX -> PREFIX_<text_key>_document (Megatron's naming); a prefix that already ends so is kept."""
    prefix = str(output_prefix)
    suffix = f"_{text_key}_document"
    return prefix if prefix.endswith(suffix) else prefix + suffix


def _check_arguments(output_prefix: str | Path, text_key: str, workers: int, batch_size: int) -> None:
    problems = []
    if not text_key:
        problems.append(Problem("text-key", "must not be empty"))
    if workers < 1:
        problems.append(Problem("workers", "must be >= 1", workers))
    if batch_size < 1:
        problems.append(Problem("batch-size", "must be >= 1", batch_size))
    prefix = str(output_prefix)
    if not prefix or prefix.endswith(("/", os.sep)) or Path(prefix).is_dir():
        problems.append(Problem("output-prefix", "must be a path prefix such as data/corpus, not a folder", prefix))
    if problems:
        raise DataError(problems)


def _merge(results: list[UnitResult], bin_path: Path, idx_path: Path, dtype: Any) -> np.ndarray:
    """Concatenate the shards in unit order into one dataset; returns the document lengths."""
    builder = _indexed_dataset().IndexedDatasetBuilder(str(bin_path), dtype=dtype)
    # add_index runs gc.collect() for every shard: a quarter of a second each with torch and transformers
    # loaded. Freezing the objects that exist now keeps those collections to the few new ones.
    gc.freeze()
    try:
        with _quiet():
            for result in results:
                if result.documents:
                    builder.add_index(result.shard_prefix)
                for suffix in (".bin", ".idx"):  # free the disk as we go: peak use is output + one shard
                    Path(result.shard_prefix + suffix).unlink(missing_ok=True)
            builder.finalize(str(idx_path))
    finally:
        gc.unfreeze()
    return np.asarray(builder.sequence_lengths, dtype=np.int64)


def _publish(temporary: list[Path], final: list[Path]) -> None:
    """Rename into place, the .idx (which readers open first) last. An old .idx goes first: a crash between
    two renames must never pair a new .bin with an old .idx."""
    final[-1].unlink(missing_ok=True)
    for src, dst in zip(temporary, final):
        os.replace(src, dst)


def _length_stats(lengths: np.ndarray) -> dict[str, Any]:
    if lengths.size == 0:
        return {}
    # power-of-two buckets, "16-31": documents with 16 to 31 tokens
    buckets = np.floor(np.log2(lengths)).astype(np.int64)
    histogram = {f"{1 << int(b)}-{(2 << int(b)) - 1}": int(n)
                 for b, n in zip(*np.unique(buckets, return_counts=True))}
    p50, p90, p99 = (int(v) for v in np.percentile(lengths, [50, 90, 99], method="lower"))
    return {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 2), "p50": p50, "p90": p90, "p99": p99,
            "max": int(lengths.max()), "histogram": histogram}


def _skip_stats(units: list[WorkUnit], results: list[UnitResult]) -> dict[str, Any]:
    """Skip counts and the first locations per reason, with file-wide line numbers: a plain JSONL file's
    later units learn their first line from the line counts of the earlier ones."""
    by_reason: dict[str, int] = {}
    examples: list[dict[str, str]] = []
    kept: dict[str, int] = {}
    lines_before: dict[str, int] = {}
    for unit, result in zip(units, results):
        before = lines_before.get(unit.path, 0) if unit.kind == "jsonl" else unit.first_row
        lines_before[unit.path] = before + result.rows
        for reason, count in result.skipped.items():
            by_reason[reason] = by_reason.get(reason, 0) + count
        for row, reason, detail in sorted(result.examples):  # tokenizer rejections are found after parsing
            if kept.get(reason, 0) < EXAMPLES_PER_REASON:
                kept[reason] = kept.get(reason, 0) + 1
                examples.append({"location": f"{unit.path}:{before + row}", "reason": reason,
                                 "detail": SKIP_REASONS[reason] + (f": {detail}" if detail else "")})
    return {"total": sum(by_reason.values()), "by_reason": dict(sorted(by_reason.items())),
            "examples": examples, "examples_kept_per_reason": EXAMPLES_PER_REASON}


def _build_stats(*, prefix: str, files: list[Path], units: list[WorkUnit], results: list[UnitResult],
                 lengths: np.ndarray, tokenizer_dir: str | Path, vocab_size: int, eod_id: int | None,
                 append_eod: bool, text_key: str, workers: int, dtype: Any,
                 times: dict[str, float]) -> dict[str, Any]:
    worker = {key: round(sum(r.times[key] for r in results), 3) for key in WORKER_PHASES}
    busy = sum(worker.values())
    cpu = sum(r.cpu_s for r in results)
    tokens, documents = int(lengths.sum()), int(lengths.size)
    wall, phase = times["wall_s"], max(times["tokenize_phase_s"], 1e-9)
    input_bytes = sum(u.size for u in units)
    return {
        "output": {"prefix": prefix, "bin": prefix + ".bin", "idx": prefix + ".idx", "dtype": np.dtype(dtype).name},
        "documents": documents,
        "tokens": tokens,
        "rows_read": sum(r.rows for r in results),
        "skipped": _skip_stats(units, results),
        "lengths_in_tokens": _length_stats(lengths),  # with the EOD token when appended
        "inputs": [{"path": str(p), "kind": input_kind(p), "bytes": p.stat().st_size} for p in files],
        "input_bytes": input_bytes,
        "tokenizer": {"path": str(tokenizer_dir), "vocab_size": vocab_size, "eod_id": eod_id},
        "text_key": text_key,
        "append_eod": append_eod,
        "workers": workers,
        "units": len(units),
        "time": {**{k: round(v, 3) for k, v in times.items()},
                 "worker_busy_s": round(busy, 3),
                 "worker_cpu_s": round(cpu, 3),
                 "worker_s": worker,
                 # tokenization's share of the workers' time, and of all the cores' wall time
                 "tokenize_share_of_worker_time": round(worker["tokenize"] / busy, 4) if busy else None,
                 "tokenize_share_of_wall": round(worker["tokenize"] / (wall * workers), 4) if wall else None},
        # overall (start-up and merge included) and while tokenizing (what scales with --workers)
        "throughput": {"documents_per_s": round(documents / wall, 1), "tokens_per_s": round(tokens / wall),
                       "input_mb_per_s": round(input_bytes / 1e6 / wall, 2)},
        "throughput_tokenize_phase": {"documents_per_s": round(documents / phase, 1),
                                      "tokens_per_s": round(tokens / phase),
                                      "input_mb_per_s": round(input_bytes / 1e6 / phase, 2)},
        # per core, whatever else the machine was running
        "throughput_per_worker_cpu_s": {"documents": round(documents / cpu, 1) if cpu else None,
                                        "tokens": round(tokens / cpu) if cpu else None},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepare_data(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    output_prefix: str | Path,
    text_key: str = "text",
    workers: int = 1,
    append_eod: bool = True,
    strict: bool = False,
    batch_size: int = _DEFAULT_BATCH,
    progress: bool = True,
    unit_bytes: int | None = None,
) -> PrepareResult:
    """Tokenize the inputs into OUTPUT_PREFIX_<text_key>_document.bin/.idx plus a .stats.json beside them.

    batch_size: documents per tokenizer call. unit_bytes: how plain JSONL files are cut into work units
    (default: about a quarter of the plain input per worker, 1-64 MiB); the output does not depend on it.
    Raises DataError (nothing final written) for bad arguments, inputs, tokenizer, or, with strict, the
    first bad record; WorkerError if a worker process dies. Ctrl-C and SIGTERM stop the workers and remove
    the temporary files; only a SIGKILL leaves a hidden .PREFIX_text_document.*.tmp folder behind (safe to
    delete), and the workers then stop after their current unit.
    """
    started = time.perf_counter()
    _check_arguments(output_prefix, text_key, workers, batch_size)
    files = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_dir)
    eod_id = tokenizer.eos_token_id
    if append_eod and eod_id is None:
        raise DataError([Problem("tokenizer", "has no EOS token to append as end of document; give a tokenizer "
                                 "with eos_token, or --no-append-eod", str(tokenizer_dir))])
    vocab_size = len(tokenizer)
    indexed = _indexed_dataset()
    dtype = indexed.DType.optimal_dtype(vocab_size)
    prefix = output_prefix_for(output_prefix, text_key)
    final = [Path(prefix + STATS_SUFFIX), Path(prefix + ".bin"), Path(prefix + ".idx")]
    try:
        final[0].parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError([Problem("output-prefix", f"cannot create its folder: {exc}", str(output_prefix))]) from None
    units = plan_units(files, workers, unit_bytes)
    if not units:
        raise DataError([Problem("input", "every input file is empty", ", ".join(map(str, files)))])
    settings_base = dict(tokenizer_json=tokenizer.backend_tokenizer.to_str(), text_key=text_key,
                         eod_id=eod_id if append_eod else None,
                         dtype=np.dtype(dtype).name, strict=strict, batch_size=batch_size)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final[1].stem}.", suffix=".tmp", dir=final[0].parent))
    try:
        with _sigterm_as_interrupt():
            settings = _Settings(**settings_base, shard_dir=str(temporary))
            display = Progress(sum(u.size for u in units), enabled=progress)
            setup_done = time.perf_counter()
            results = _run_workers(units, settings, workers, display)
            display.close()
            processed = time.perf_counter()
            if not any(r.documents for r in results):
                skipped = _skip_stats(units, results)
                raise DataError([Problem("input", f"no document to write: all {skipped['total']} rows were "
                                         f"skipped {skipped['by_reason']}")])
            tmp_paths = [temporary / "output.stats.json", temporary / "output.bin", temporary / "output.idx"]
            lengths = _merge(results, tmp_paths[1], tmp_paths[2], dtype)
            merged = time.perf_counter()
            times = {"wall_s": merged - started, "setup_s": setup_done - started,
                     "tokenize_phase_s": processed - setup_done, "merge_s": merged - processed}
            stats = _build_stats(prefix=prefix, files=files, units=units, results=results, lengths=lengths,
                                 tokenizer_dir=tokenizer_dir, vocab_size=vocab_size, eod_id=eod_id,
                                 append_eod=append_eod, text_key=text_key, workers=workers, dtype=dtype, times=times)
            tmp_paths[0].write_text(json.dumps(stats, indent=2) + "\n")
            _publish(tmp_paths, final)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return PrepareResult(prefix, str(final[1]), str(final[2]), str(final[0]), stats)


def format_prepare_report(result: PrepareResult, examples: int = 5) -> str:
    s = result.stats
    t = s["time"]
    skipped = s["skipped"]
    lines = [
        f"wrote {result.bin_path} and .idx ({s['output']['dtype']}), stats in {result.stats_path}",
        f"  documents {s['documents']:,}, tokens {s['tokens']:,}, skipped {skipped['total']:,}"
        + (f" ({', '.join(f'{k} {v:,}' for k, v in skipped['by_reason'].items())})" if skipped["total"] else ""),
    ]
    lines += [f"  skipped {e['location']}: {e['detail']}" for e in skipped["examples"][:examples]]
    if len(skipped["examples"]) > examples:
        lines.append(f"  ... the stats file lists up to {EXAMPLES_PER_REASON} locations per reason")
    share = t["tokenize_share_of_worker_time"] or 0.0
    phase = s["throughput_tokenize_phase"]
    lines += [
        f"  {t['wall_s']:.1f} s (start-up {t['setup_s']:.1f} s, tokenizing {t['tokenize_phase_s']:.1f} s, merge "
        f"{t['merge_s']:.1f} s) with {s['workers']} worker(s); while tokenizing {_si(phase['tokens_per_s'])} tokens/s, "
        f"{phase['documents_per_s']:,.0f} documents/s; tokenizer {share:.0%} of worker time",
        f"  use it in a recipe: data.blend: [{{path: {result.prefix}, weight: 1.0}}]",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- inspect_data


@dataclass(frozen=True)
class DocumentPreview:
    index: int
    tokens: int
    ids: list[int]
    text: str | None  # decoded, when a tokenizer was given


@dataclass(frozen=True)
class DatasetSummary:
    prefix: str
    documents: int
    sequences: int
    tokens: int
    dtype: str
    min_tokens: int
    mean_tokens: float
    max_tokens: int
    previews: list[DocumentPreview]
    stats_path: str | None


def resolve_prefix(prefix: str | Path) -> str:
    """Accept PREFIX_text_document, its .bin or .idx path, or the PREFIX given to prepare-data."""
    text = str(prefix)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
    if not Path(text + ".idx").is_file() and Path(text + "_text_document.idx").is_file():
        text += "_text_document"
    missing = [text + s for s in (".bin", ".idx") if not Path(text + s).is_file()]
    if missing:
        raise DataError([Problem("prefix", f"missing {' and '.join(missing)}", str(prefix))])
    return text


def inspect_data(prefix: str | Path, tokenizer_dir: str | Path | None = None, n: int = 3) -> DatasetSummary:
    """Documents, tokens, dtype and the first n documents (decoded when a tokenizer is given). Raises DataError."""
    try:
        return _summarize(prefix, tokenizer_dir, n)
    except DataError as exc:  # the same checks as prepare-data's, reported under this command's title
        raise DataError(exc.problems, "infir2: cannot inspect data") from None


def _summarize(prefix: str | Path, tokenizer_dir: str | Path | None, n: int) -> DatasetSummary:
    if n < 0:
        raise DataError([Problem("n", "must be >= 0", n)])
    path = resolve_prefix(prefix)
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    indexed = _indexed_dataset()
    try:
        with _quiet():
            dataset = indexed.IndexedDataset(path)
    except Exception as exc:  # Megatron asserts on a bad header or version
        raise DataError([Problem("prefix", f"not a readable indexed dataset: {exc!r}", path)]) from None
    lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
    doc_index = np.asarray(dataset.document_indices, dtype=np.int64)
    dtype = np.dtype(dataset.index.dtype)
    expected = int(lengths.sum()) * dtype.itemsize
    actual = Path(path + ".bin").stat().st_size
    if actual != expected:
        raise DataError([Problem("prefix", f"{path}.bin holds {actual:,} bytes but its .idx describes {expected:,}; "
                                 "the dataset is truncated or its files come from different runs", path)])
    documents = len(doc_index) - 1
    doc_lengths = np.add.reduceat(lengths, doc_index[:-1]) if documents and lengths.size else np.zeros(0, np.int64)
    previews = []
    for d in range(min(n, documents)):
        ids = np.concatenate([dataset[s] for s in range(doc_index[d], doc_index[d + 1])]).tolist()
        text = tokenizer.decode(ids, skip_special_tokens=False) if tokenizer is not None else None
        previews.append(DocumentPreview(d, len(ids), ids, text))
    stats = Path(path + STATS_SUFFIX)
    return DatasetSummary(
        prefix=path, documents=documents, sequences=int(lengths.size), tokens=int(lengths.sum()), dtype=dtype.name,
        min_tokens=int(doc_lengths.min()) if doc_lengths.size else 0,
        mean_tokens=float(doc_lengths.mean()) if doc_lengths.size else 0.0,
        max_tokens=int(doc_lengths.max()) if doc_lengths.size else 0,
        previews=previews, stats_path=str(stats) if stats.is_file() else None)


def format_summary(summary: DatasetSummary, max_chars: int = 1000, max_ids: int = 64) -> str:
    lines = [
        f"prefix     {summary.prefix}",
        f"documents  {summary.documents:,}" + (f" ({summary.sequences:,} sequences)"
                                               if summary.sequences != summary.documents else ""),
        f"tokens     {summary.tokens:,} ({summary.dtype})",
        f"lengths    min {summary.min_tokens:,}, mean {summary.mean_tokens:,.1f}, max {summary.max_tokens:,} tokens",
    ]
    if summary.stats_path:
        lines.append(f"stats      {summary.stats_path}")
    for p in summary.previews:
        lines.append(f"--- document {p.index}: {p.tokens:,} tokens ---")
        if p.text is not None:
            lines.append(p.text if len(p.text) <= max_chars else p.text[:max_chars] + f" [... {len(p.text):,} chars]")
        else:
            shown = " ".join(map(str, p.ids[:max_ids]))
            lines.append(shown + (f" ... (give --tokenizer to decode)" if len(p.ids) > max_ids else
                                  " (give --tokenizer to decode)"))
    return "\n".join(lines)
