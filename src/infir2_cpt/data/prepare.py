"""From a raw corpus to a Megatron indexed dataset (`PREFIX_text_document.bin/.idx`): `infir2 prepare-data`.

`prepare_data` runs in four steps:
1. plan (inputs.py): the inputs (JSONL, optionally .gz/.zst, parquet, or folders of them) become work units:
   byte ranges of plain JSONL files cut at line boundaries, parquet row groups, and blocks of lines of compressed
   files, which a reader thread decompresses as the workers need them;
2. N worker processes (workers.py) take units one at a time; each reads, parses, tokenizes (the `tokenizers`
   library, a batch of documents at a time, one core per worker) and writes the unit's token ids to its own shard;
3. the shards are appended to the output in input order as soon as they are done, so the output is the same
   whatever N is; the index (indexed.py) is written at the end;
4. everything is written in a temporary folder beside the output and renamed to its final name at the
   very end, .idx last: an interrupted or failed run leaves no final-named file (and no folder it created).

Bad records never reach the output: a line that is not JSON, a record without the text field, or an
empty document is skipped and counted with its file and line number (or made fatal with `strict`); more than
max_skipped_percent of bad records fails the run, naming the fields the records do have.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, Problem
from .indexed import append_file, token_dtype, write_index
from .inputs import (DEFAULT_BATCH, EXAMPLES_PER_REASON, FATAL_REASONS, SKIP_REASONS, STATS_SUFFIX, FieldTally,
                     check_text_key, expand_inputs, input_kind, plan_units, text_key_problem, unit_bytes_for)
from .tokenizer import LoadedTokenizer, load_tokenizer
from .workers import WORKER_PHASES, Progress, UnitResult, WorkerSettings, run_workers, si_number, sigterm_as_interrupt

DEFAULT_MAX_SKIPPED_PERCENT = 10.0


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


def process_age() -> float | None:
    """Seconds since this process started (Linux), so that a command's start-up can include the interpreter."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return None


def _check_arguments(output_prefix: str | Path, text_key: str, workers: int, batch_size: int,
                     max_skipped_percent: float) -> None:
    problems = []
    if not text_key:
        problems.append(Problem("text-key", "must not be empty"))
    if workers < 1:
        problems.append(Problem("workers", "must be >= 1", workers))
    if batch_size < 1:
        problems.append(Problem("batch-size", "must be >= 1", batch_size))
    if not 0 <= max_skipped_percent <= 100:
        problems.append(Problem("max-skipped-percent", "must be between 0 and 100", max_skipped_percent))
    prefix = str(output_prefix)
    if not prefix or prefix.endswith(("/", os.sep)) or Path(prefix).is_dir():
        problems.append(Problem("output-prefix", "must be a path prefix such as data/corpus, not a folder", prefix))
    if problems:
        raise DataError(problems)


def _check_output(final: list[Path], output_prefix: str | Path, force: bool) -> None:
    existing = [p.name for p in final if p.exists()]
    if existing and not force:
        raise DataError([Problem("output-prefix", f"its dataset exists ({', '.join(existing)} in {final[0].parent}); "
                                 "give --force to replace it, or another --output-prefix", str(output_prefix))])


def _make_folder(folder: Path, output_prefix: str | Path) -> list[Path]:
    """Create the output folder; returns the folders created, deepest first (removed again if the run fails)."""
    created, path = [], folder
    while not path.exists():
        created.append(path)
        path = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError([Problem("output-prefix", f"cannot create its folder: {exc}", str(output_prefix))]) from None
    return created


def _remove_folders(created: list[Path]) -> None:
    for path in created:
        try:
            path.rmdir()  # only if empty: never anything someone else put there meanwhile
        except OSError:
            return


class _Output:
    """The dataset's .bin, built from the units' shards in input order while the workers go on."""

    def __init__(self, bin_path: Path) -> None:
        self.file = open(bin_path, "wb", buffering=0)
        self.lengths: list[np.ndarray] = []
        self.results: list[UnitResult] = []
        self.append_s = 0.0

    def add(self, result: UnitResult) -> None:
        started = time.perf_counter()
        append_file(self.file, result.shard_path)
        Path(result.shard_path).unlink()  # free the disk as we go: peak use is output + shards in flight
        self.lengths.append(result.lengths)
        result.lengths = np.zeros(0, np.int32)
        self.results.append(result)
        self.append_s += time.perf_counter() - started

    def close(self) -> np.ndarray:
        self.file.close()
        return np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)


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


def _skip_stats(results: list[UnitResult]) -> dict[str, Any]:
    """Skip counts and the first locations per reason, with file-wide line numbers: a plain JSONL file's
    later units learn their first line from the line counts of the earlier ones."""
    by_reason: dict[str, int] = {}
    examples: list[dict[str, str]] = []
    kept: dict[str, int] = {}
    lines_before: dict[str, int] = {}
    for result in results:
        before = lines_before.get(result.path, 0) if result.kind == "jsonl" else result.first_row
        lines_before[result.path] = before + result.rows
        for reason, count in result.skipped.items():
            by_reason[reason] = by_reason.get(reason, 0) + count
        for row, reason, detail in sorted(result.examples):  # tokenizer rejections are found after parsing
            if kept.get(reason, 0) < EXAMPLES_PER_REASON:
                kept[reason] = kept.get(reason, 0) + 1
                examples.append({"location": f"{result.path}:{before + row}", "reason": reason,
                                 "detail": SKIP_REASONS[reason] + (f": {detail}" if detail else "")})
    return {"total": sum(by_reason.values()), "by_reason": dict(sorted(by_reason.items())),
            "examples": examples, "examples_kept_per_reason": EXAMPLES_PER_REASON}


def _check_skipped(results: list[UnitResult], skipped: dict[str, Any], text_key: str,
                   max_skipped_percent: float) -> None:
    """Refuse a dataset made from a small part of its records: a wrong --text-key, or inputs that are not what
    they seem. Blank lines and empty documents do not count; bad records (FATAL_REASONS) do."""
    by_reason = skipped["by_reason"]
    records = sum(r.rows for r in results) - by_reason.get("blank_line", 0)
    bad = {reason: n for reason, n in by_reason.items() if reason in FATAL_REASONS}
    documents = sum(r.documents for r in results)
    too_many = records > 0 and sum(bad.values()) * 100 > max_skipped_percent * records
    if not too_many and documents:
        return
    listed = ", ".join(f"{reason} {n:,}" for reason, n in by_reason.items())
    if too_many:
        share = sum(bad.values()) / records
        problems = [Problem("input", f"{sum(bad.values()):,} of {records:,} records ({share:.1%}) were skipped "
                            f"({listed}): more than --max-skipped-percent {max_skipped_percent:g}")]
    else:
        problems = [Problem("input", f"no document to write: all {skipped['total']:,} rows were skipped ({listed})")]
    if bad.get("missing_key"):
        tally = FieldTally()
        for result in results:
            tally.merge(result.fields)
        problems.append(text_key_problem(text_key, f"{bad['missing_key']:,} of {records:,} records", tally))
    problems += [Problem(e["location"], e["detail"]) for e in skipped["examples"][:3]]
    raise DataError(problems)


def _build_stats(*, prefix: str, files: list[Path], results: list[UnitResult], lengths: np.ndarray,
                 skipped: dict[str, Any], tokenizer: LoadedTokenizer, append_eod: bool, text_key: str, workers: int,
                 dtype: np.dtype, max_skipped_percent: float, times: dict[str, float]) -> dict[str, Any]:
    worker = {key: round(sum(r.times[key] for r in results), 3) for key in WORKER_PHASES}
    busy = sum(worker.values())
    cpu = sum(r.cpu_s for r in results)
    tokens, documents = int(lengths.sum()), int(lengths.size)
    wall, phase = times["wall_s"], max(times["tokenize_phase_s"], 1e-9)
    text_bytes = sum(r.text_bytes for r in results)
    return {
        "output": {"prefix": prefix, "bin": prefix + ".bin", "idx": prefix + ".idx", "dtype": dtype.name},
        "documents": documents,
        "tokens": tokens,
        "max_token_id": max((r.max_token_id for r in results), default=-1),  # with the EOD token when appended
        "rows_read": sum(r.rows for r in results),
        "skipped": skipped,
        "max_skipped_percent": max_skipped_percent,
        "lengths_in_tokens": _length_stats(lengths),  # with the EOD token when appended
        "inputs": [{"path": str(p), "kind": input_kind(p), "bytes": p.stat().st_size} for p in files],
        "input_bytes": sum(p.stat().st_size for p in files),  # on disk (compressed files compressed)
        "text_bytes": text_bytes,  # read, decompressed
        "tokenizer": tokenizer.record(),
        "text_key": text_key,
        "append_eod": append_eod,
        "workers": workers,
        "units": len(results),
        "time": {**{k: round(v, 3) for k, v in times.items()},
                 "worker_busy_s": round(busy, 3),
                 "worker_cpu_s": round(cpu, 3),
                 "worker_s": worker,
                 # tokenization's share of the workers' time, and of all the cores' wall time
                 "tokenize_share_of_worker_time": round(worker["tokenize"] / busy, 4) if busy else None,
                 "tokenize_share_of_wall": round(worker["tokenize"] / (phase * workers), 4)},
        # overall (start-up and index included) and while tokenizing (what scales with --workers); MB of text
        "throughput": {"documents_per_s": round(documents / wall, 1), "tokens_per_s": round(tokens / wall),
                       "input_mb_per_s": round(text_bytes / 1e6 / wall, 2)},
        "throughput_tokenize_phase": {"documents_per_s": round(documents / phase, 1),
                                      "tokens_per_s": round(tokens / phase),
                                      "input_mb_per_s": round(text_bytes / 1e6 / phase, 2)},
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
    batch_size: int = DEFAULT_BATCH,
    progress: bool = True,
    unit_bytes: int | None = None,
    max_skipped_percent: float = DEFAULT_MAX_SKIPPED_PERCENT,
    force: bool = False,
    clock_start: float | None = None,
) -> PrepareResult:
    """Tokenize the inputs into OUTPUT_PREFIX_<text_key>_document.bin/.idx plus a .stats.json beside them.

    batch_size: documents per tokenizer call at most. unit_bytes: how plain JSONL files are cut into work units
    and compressed files into blocks (default: about a quarter of the input per worker, 1-64 MiB); the output
    does not depend on it. max_skipped_percent: the most bad records (not JSON, no text field, ...) tolerated,
    in percent of the records read. force: replace an existing dataset at OUTPUT_PREFIX. clock_start: the
    time.perf_counter() value start-up is counted from (the command's process start; default: this call).
    Raises DataError (nothing final written) for bad arguments, inputs, tokenizer, existing output, too many
    skipped records or, with strict, the first bad record; WorkerError if a worker process dies. Ctrl-C and
    SIGTERM stop the workers and remove the temporary files; only a SIGKILL leaves a hidden
    .PREFIX_text_document.*.tmp folder behind (safe to delete), and the workers then stop after their
    current unit.
    """
    started = time.perf_counter()
    _check_arguments(output_prefix, text_key, workers, batch_size, max_skipped_percent)
    files = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_dir)
    if append_eod and tokenizer.eos_id is None:
        raise DataError([Problem("tokenizer", "has no EOS token to append as end of document; give a tokenizer "
                                 "with eos_token, or --no-append-eod", str(tokenizer_dir))])
    dtype = token_dtype(tokenizer.vocab_size)
    prefix = output_prefix_for(output_prefix, text_key)
    final = [Path(prefix + STATS_SUFFIX), Path(prefix + ".bin"), Path(prefix + ".idx")]
    _check_output(final, output_prefix, force)
    unit_bytes = unit_bytes if unit_bytes is not None else unit_bytes_for(files, workers)
    units = plan_units(files, unit_bytes)
    if not units:
        raise DataError([Problem("input", "every input file is empty", ", ".join(map(str, files)))])
    check_text_key(files, text_key)
    created = _make_folder(final[0].parent, output_prefix)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final[1].stem}.", suffix=".tmp", dir=final[0].parent))
    published = False
    try:
        with sigterm_as_interrupt():
            settings = WorkerSettings(text_key=text_key, eod_id=tokenizer.eos_id if append_eod else None,
                                      dtype=dtype.name, strict=strict, batch_size=batch_size,
                                      shard_dir=str(temporary))
            display = Progress(sum(u.size for u in units), enabled=progress)
            tmp_paths = [temporary / "output.stats.json", temporary / "output.bin", temporary / "output.idx"]
            output = _Output(tmp_paths[1])
            setup_done = time.perf_counter()
            count = run_workers(units, settings, tokenizer.tokenizer, workers, unit_bytes, display, output.add)
            display.close()
            processed = time.perf_counter()
            lengths = output.close()
            results = output.results
            skipped = _skip_stats(results)
            _check_skipped(results, skipped, text_key, max_skipped_percent)
            write_index(tmp_paths[2], dtype, lengths)
            indexed = time.perf_counter()
            origin = clock_start if clock_start is not None else started
            times = {"wall_s": indexed - origin, "setup_s": setup_done - started, "startup_s": setup_done - origin,
                     "tokenize_phase_s": processed - setup_done, "append_s": output.append_s,
                     "merge_s": indexed - processed}
            assert count == len(results)
            stats = _build_stats(prefix=prefix, files=files, results=results, lengths=lengths, skipped=skipped,
                                 tokenizer=tokenizer, append_eod=append_eod, text_key=text_key, workers=workers,
                                 dtype=dtype, max_skipped_percent=max_skipped_percent, times=times)
            tmp_paths[0].write_text(json.dumps(stats, indent=2) + "\n")
            _publish(tmp_paths, final)
            published = True
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        if not published:
            _remove_folders(created)
    return PrepareResult(prefix, str(final[1]), str(final[2]), str(final[0]), stats)


def _publish(temporary: list[Path], final: list[Path]) -> None:
    """Rename into place, the .idx (which readers open first) last. An old .idx goes first: a crash between
    two renames must never pair a new .bin with an old .idx."""
    final[-1].unlink(missing_ok=True)
    for src, dst in zip(temporary, final):
        os.replace(src, dst)


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
    per_worker = phase["tokens_per_s"] / s["workers"]
    lines += [
        f"  token ids up to {s['max_token_id']:,} (vocabulary {s['tokenizer']['vocab_size']:,} with "
        f"{s['tokenizer']['name']})",
        f"  {t['wall_s']:.1f} s (start-up {t['startup_s']:.1f} s, tokenizing {t['tokenize_phase_s']:.1f} s, index "
        f"{t['merge_s']:.1f} s) with {s['workers']} worker(s); while tokenizing {si_number(phase['tokens_per_s'])} "
        f"tokens/s ({si_number(per_worker)} per worker), {phase['input_mb_per_s']:,.1f} MB/s of text; "
        f"tokenizer {share:.0%} of worker time",
        f"  use it in a recipe: data.blend: [{{path: {result.prefix}, weight: 1.0}}]",
    ]
    return "\n".join(lines)
