"""prepare-data's worker processes: one unit of input -> one shard of the indexed dataset (read, parse, tokenize
with the Hugging Face fast tokenizer's Rust backend, write with megatron.core's IndexedDatasetBuilder), N workers
taking units one at a time, and the progress line."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import os
import queue as queue_module
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, TextIO

import numpy as np

from ..errors import DataError, Problem, WorkerError
from .inputs import (EXAMPLES_PER_REASON, FATAL_REASONS, SKIP_REASONS, WorkUnit, check_text,
                     megatron_indexed_dataset, parse_json_line, read_batches)


@dataclass(frozen=True)
class WorkerSettings:
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


def process_unit(unit: WorkUnit, settings: WorkerSettings, tokenizer: Any, report: Report) -> UnitResult:
    """Read, parse, tokenize and write one unit into its own shard (in a worker process)."""
    indexed = megatron_indexed_dataset()
    dtype = np.dtype(settings.dtype)
    shard = os.path.join(settings.shard_dir, f"shard-{unit.index:06d}")
    builder = indexed.IndexedDatasetBuilder(shard + ".bin", dtype=dtype.type)
    result = UnitResult(unit.index, shard)
    times = result.times
    started, cpu_started = time.perf_counter(), time.process_time()
    reported_bytes = 0
    batches = read_batches(unit, settings.batch_size, settings.text_key)
    if unit.kind == "parquet":  # a parquet row is the text column's value, a JSONL row a line to parse
        check_row = check_text
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


def _tokenize_and_write(texts: list[str], rows: list[int], unit: WorkUnit, settings: WorkerSettings, tokenizer: Any,
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


def _worker_main(settings: WorkerSettings, tasks: Any, events: Any, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's terminate() must end us at once (fork copies
                                                   # the parent's SIGTERM handler)
    # run_workers forked us with these signals blocked: until the two lines above ran, a SIGTERM would
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


def run_workers(units: list[WorkUnit], settings: WorkerSettings, workers: int, progress: "Progress") -> list[UnitResult]:
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
def sigterm_as_interrupt() -> Iterator[None]:
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


def si_number(value: float) -> str:
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
        return (f"prepare-data {done:6.1%} | {self.documents:,} docs ({si_number(self.documents / elapsed)}/s) | "
                f"{si_number(self.tokens)} tokens ({si_number(self.tokens / elapsed)}/s) | {_clock(elapsed)}{eta}")

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
