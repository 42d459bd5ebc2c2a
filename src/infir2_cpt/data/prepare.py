"""From a raw corpus to a Megatron indexed dataset (`PREFIX_text_document.bin/.idx`): `infir2 prepare-data`.

`prepare_data` runs in four steps:
1. plan (inputs.py): the inputs (JSONL, optionally .gz/.zst, parquet, or folders of them) become work units:
   byte ranges of plain JSONL files cut at line boundaries, whole compressed files, parquet row groups;
2. N worker processes (workers.py) take units one at a time; each reads, parses, tokenizes (the Hugging Face fast
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

import gc
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
from .inputs import (DEFAULT_BATCH, EXAMPLES_PER_REASON, SKIP_REASONS, STATS_SUFFIX, WorkUnit, expand_inputs,
                     input_kind, load_tokenizer, megatron_indexed_dataset, plan_units, quiet_megatron)
from .workers import WORKER_PHASES, Progress, UnitResult, WorkerSettings, run_workers, si_number, sigterm_as_interrupt


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
    builder = megatron_indexed_dataset().IndexedDatasetBuilder(str(bin_path), dtype=dtype)
    # add_index runs gc.collect() for every shard: a quarter of a second each with torch and transformers
    # loaded. Freezing the objects that exist now keeps those collections to the few new ones.
    gc.freeze()
    try:
        with quiet_megatron():
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
    batch_size: int = DEFAULT_BATCH,
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
    indexed = megatron_indexed_dataset()
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
        with sigterm_as_interrupt():
            settings = WorkerSettings(**settings_base, shard_dir=str(temporary))
            display = Progress(sum(u.size for u in units), enabled=progress)
            setup_done = time.perf_counter()
            results = run_workers(units, settings, workers, display)
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
        f"{t['merge_s']:.1f} s) with {s['workers']} worker(s); while tokenizing {si_number(phase['tokens_per_s'])} tokens/s, "
        f"{phase['documents_per_s']:,.0f} documents/s; tokenizer {share:.0%} of worker time",
        f"  use it in a recipe: data.blend: [{{path: {result.prefix}, weight: 1.0}}]",
    ]
    return "\n".join(lines)
