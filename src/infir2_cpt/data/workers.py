"""prepare-data's worker processes: one unit of input -> one shard of token ids (read, parse, tokenize with the
Hugging Face `tokenizers` library, one core per worker, and write the ids in the dataset's dtype), N workers taking
units one at a time from a queue that a reader thread in the parent fills (splitting compressed files into blocks
of lines as it goes), results handed back in input order; and the progress line."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_module
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, TextIO

import numpy as np

from ..errors import DataError, Problem, WorkerError
from .inputs import (COMPRESSED_KINDS, EXAMPLES_PER_REASON, FATAL_REASONS, SKIP_REASONS, FieldTally, WorkUnit,
                     check_text, compressed_blocks, lines_before, parquet_string_columns, parse_json_line, read_rows)

BATCH_CHARS = 1 << 20  # characters per tokenizer call at most (and DEFAULT_BATCH documents): memory stays small


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker needs besides the tokenizer; picklable."""

    text_key: str
    eod_id: int | None  # None: no EOD appended (--no-append-eod)
    dtype: str
    strict: bool
    batch_size: int  # documents per tokenizer call at most
    shard_dir: str


# where a worker's time goes: reading + JSON parsing, the tokenizer call, ids -> numpy, the shard writes
WORKER_PHASES = ("read_parse", "tokenize", "convert", "write")


@dataclass
class UnitResult:
    index: int
    path: str
    kind: str
    first_row: int  # as in WorkUnit
    shard_path: str  # the unit's token ids, back to back
    rows: int = 0
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0  # uncompressed input read
    max_token_id: int = -1
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # tokens per document
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[int, str, str]] = field(default_factory=list)  # (row in the unit, reason, detail)
    fields: FieldTally = field(default_factory=FieldTally)  # of the records without the text field
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(WORKER_PHASES, 0.0))
    cpu_s: float = 0.0  # CPU time of the worker on this unit: wall times above stretch when cores are shared

    def skip(self, row: int, reason: str, detail: str) -> None:
        count = self.skipped.get(reason, 0) + 1
        self.skipped[reason] = count
        if count <= EXAMPLES_PER_REASON:
            self.examples.append((row, reason, detail))


Report = Callable[[int, int, int], None]  # (documents, tokens, bytes) done since the last report


def _location(unit: WorkUnit, row: int) -> str:
    """file:line (1-based; the parquet row for parquet) of a row of a unit."""
    return f"{unit.path}:{lines_before(unit) + row}"


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


class _Shard:
    """One unit's output: documents tokenized a batch at a time and appended to the shard file."""

    def __init__(self, unit: WorkUnit, settings: WorkerSettings, tokenizer: Any, out: BinaryIO,
                 result: UnitResult) -> None:
        self.unit, self.settings, self.tokenizer, self.out, self.result = unit, settings, tokenizer, out, result
        self.dtype = np.dtype(settings.dtype)
        self.texts: list[str] = []
        self.rows: list[int] = []
        self.chars = 0
        self.lengths: list[np.ndarray] = []

    def add(self, text: str, row: int) -> None:
        self.texts.append(text)
        self.rows.append(row)
        self.chars += len(text)
        if len(self.texts) >= self.settings.batch_size or self.chars >= BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if not self.texts:
            return
        result, times, eod = self.result, self.result.times, self.settings.eod_id
        t0 = time.perf_counter()
        encoded = _tokenize(self.tokenizer, self.texts)
        t1 = time.perf_counter()
        flat: list[int] = []
        lengths: list[int] = []
        for ids, row in zip(encoded, self.rows):
            if ids is None:
                result.skip(row, "invalid_text", "")
                if self.settings.strict:
                    raise DataError([Problem(_location(self.unit, row), SKIP_REASONS["invalid_text"] + " [--strict]")])
            elif not ids:
                result.skip(row, "empty_document", "no tokens")
            else:
                flat += ids
                if eod is not None:
                    flat.append(eod)
                lengths.append(len(ids) + (eod is not None))
        try:
            tokens = np.array(flat, dtype=self.dtype)
        except OverflowError:  # numpy refuses an id that does not fit; never silently wrap it
            raise DataError([Problem("tokenizer", f"produced token id {max(flat)}, which does not fit the dataset's "
                                     f"{self.dtype.name} (chosen from its vocabulary size)")]) from None
        t2 = time.perf_counter()
        self.out.write(memoryview(tokens))
        t3 = time.perf_counter()
        if tokens.size:
            result.max_token_id = max(result.max_token_id, int(tokens.max()))
        self.lengths.append(np.array(lengths, dtype=np.int32))
        result.documents += len(lengths)
        result.tokens += int(tokens.size)
        times["tokenize"] += t1 - t0
        times["convert"] += t2 - t1
        times["write"] += t3 - t2
        self.texts, self.rows, self.chars = [], [], 0


def process_unit(unit: WorkUnit, settings: WorkerSettings, tokenizer: Any, report: Report) -> UnitResult:
    """Read, parse, tokenize and write one unit into its own shard (in a worker process)."""
    shard_path = os.path.join(settings.shard_dir, f"shard-{unit.index:06d}.bin")
    result = UnitResult(unit.index, unit.path, unit.kind, unit.first_row, shard_path)
    started, cpu_started = time.perf_counter(), time.process_time()
    parquet = unit.kind == "parquet"
    batches = read_rows(unit, settings.batch_size, settings.text_key)
    reported = (0, 0, 0)  # documents, tokens, bytes
    with open(shard_path, "wb") as out:
        shard = _Shard(unit, settings, tokenizer, out, result)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as exc:  # a file changed or damaged since it was planned: the rest is unreadable
                line = lines_before(unit) + result.rows
                raise DataError([Problem(unit.path, f"unreadable after line {line}, corrupt or truncated? "
                                         f"({type(exc).__name__}: {exc})")]) from None
            for payload in batch.payloads:
                result.rows += 1
                if parquet:  # a parquet row is the text column's value, a JSONL row a line to parse
                    (text, reason, detail), record = check_text(payload), None
                else:
                    text, reason, detail, record = parse_json_line(payload, settings.text_key)
                if reason is None:
                    assert text is not None  # a row is either a text or a skip reason
                    shard.add(text, result.rows)
                    continue
                result.skip(result.rows, reason, detail)
                if record is not None and reason == "missing_key":
                    result.fields.add(record, settings.text_key)
                if settings.strict and reason in FATAL_REASONS:
                    message = SKIP_REASONS[reason] + (f" ({detail})" if detail else "") + " [--strict]"
                    raise DataError([Problem(_location(unit, result.rows), message)])
            result.text_bytes += batch.text_bytes
            now = (result.documents, result.tokens, batch.done_bytes)
            report(now[0] - reported[0], now[1] - reported[1], now[2] - reported[2])
            reported = now
        shard.flush()
    if reported[:2] != (result.documents, result.tokens):
        report(result.documents - reported[0], result.tokens - reported[1], 0)
    if parquet and result.skipped.get("missing_key"):
        result.fields.add_columns(result.skipped["missing_key"], parquet_string_columns(unit.path, unit.start),
                                  settings.text_key)
    result.lengths = np.concatenate(shard.lengths) if shard.lengths else result.lengths
    times = result.times
    times["read_parse"] = time.perf_counter() - started - times["tokenize"] - times["convert"] - times["write"]
    result.cpu_s = time.process_time() - cpu_started
    return result


# --------------------------------------------------------------------------- worker processes


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _worker_main(settings: WorkerSettings, tokenizer: Any, tasks: Any, events: Any, parent_pid: int) -> None:
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


def _feed(units: Iterable[WorkUnit], block_bytes: int, tasks: Any, events: Any, workers: int,
          stop: threading.Event) -> None:
    """The reader thread: units into the task queue in input order, numbered as they go; a compressed file is
    read here and handed out as blocks of lines. Ends with ("planned", count) and one stop mark per worker."""

    def put(item: WorkUnit | None) -> bool:
        while not stop.is_set():
            try:
                tasks.put(item, timeout=0.5)
                return True
            except queue_module.Full:
                continue
        return False

    try:
        index = 0
        for unit in units:
            parts = compressed_blocks(unit, block_bytes) if unit.kind in COMPRESSED_KINDS else [unit]
            for part in parts:
                if not put(replace(part, index=index)):
                    return
                index += 1
        events.put(("planned", index))
        for _ in range(workers):
            if not put(None):
                return
    except DataError as exc:
        events.put(("error", exc))
    except BaseException:
        events.put(("crash", traceback.format_exc()))


def _mp_context() -> Any:
    # fork: the workers inherit the loaded tokenizer (spawn pickles it, as tokenizer.json, to each worker)
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _dead_worker_message(exitcode: int) -> str:
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"a worker process was killed by {name}{hint}"
    return f"a worker process exited with code {exitcode}"


def run_workers(units: list[WorkUnit], settings: WorkerSettings, tokenizer: Any, workers: int, block_bytes: int,
                progress: "Progress", consume: Callable[[UnitResult], None]) -> int:
    """Process every unit in `workers` processes; consume() gets each unit's result in input order, as soon as
    it and every earlier one are done. Returns the number of units (compressed files count by block)."""
    ctx = _mp_context()
    if not any(u.kind in COMPRESSED_KINDS for u in units):
        workers = min(workers, len(units))
    tasks, events = ctx.Queue(maxsize=2 * workers), ctx.Queue()
    processes = [ctx.Process(target=_worker_main, args=(settings, tokenizer, tasks, events, os.getpid()),
                             name=f"infir2-prepare-data-{i}", daemon=True)
                 for i in range(workers)]
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
    stop = threading.Event()
    feeder = threading.Thread(target=_feed, args=(units, block_bytes, tasks, events, workers, stop),
                              name="infir2-prepare-data-reader", daemon=True)
    feeder.start()  # after the forks: a worker must not inherit a thread in the middle of reading
    pending: dict[int, UnitResult] = {}
    planned: int | None = None
    next_index = 0
    try:
        while planned is None or next_index < planned:
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
                pending[payload[0].index] = payload[0]
                while next_index in pending:
                    consume(pending.pop(next_index))
                    next_index += 1
            elif kind == "planned":
                planned = payload[0]
            elif kind == "error":
                raise payload[0]
            else:
                raise WorkerError(f"a worker failed:\n{payload[0]}")
    finally:
        stop.set()
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=10)
        feeder.join(timeout=10)
        for q in (tasks, events):
            q.cancel_join_thread()  # never block on items nobody will read
            q.close()
    return next_index


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
