"""`infir2 prepare-data` throughput on this machine's CPUs, against the tokenizer's own speed, in one go.

    python3 benchmarks/scripts/prepare_data_speed.py --input /tmp/text/train.jsonl \
        --tokenizer /path/to/qwen-tokenizer [--workers 1,4,8,12,16] [--per-worker-mb 12] [--out /tmp/pds]

1. the raw rate: this process calls `tokenizers.Tokenizer.encode` on every document of the 1-worker input, one
   core (and `encode_batch_fast` on ~1 MB batches, for reference);
2. `infir2 prepare-data --workers W` for each W, on W x per-worker-mb of the input: documents taken evenly
   through the whole file, so that every run sees the same mix and the larger runs do not take longer;
3. the largest run again from .gz and .zst copies of its input, whose output must be byte-identical.

Prints a table and writes OUT/prepare_data_speed.json. "per worker" is the tokens/s while tokenizing divided
by W; "ratio" is that over the raw encode rate; "scaling" is the tokens/s over the 1-worker run's, divided by W
(1.0: perfect). "cpu ratio" compares tokens per CPU second, which holds when other jobs share the cores;
"others cpu" is the CPU time the rest of the machine used during the run (--quiet-window waits for a quiet
moment before each measurement, on a shared machine). Needs the package (infir2_cpt) and
`tokenizers`, `zstandard` importable by this Python; no GPU, no network.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    import tokenizers

    siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "python": platform.python_version(),
            "tokenizers": tokenizers.__version__, "load_average": os.getloadavg(),
            # "0,16": cpu0 shares its core with cpu16 (two hardware threads per core)
            "cpu0_thread_siblings": siblings.read_text().strip() if siblings.exists() else None}


def cpu_fields() -> list[int]:
    """The machine-wide line of /proc/stat: user nice system idle iowait irq softirq steal ... (clock ticks)."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    fields = cpu_fields()
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def steal_cpu_s() -> float:
    """CPU seconds the hypervisor gave to other guests while this one's vCPUs wanted to run (a VM's lost time)."""
    fields = cpu_fields()
    return (fields[7] if len(fields) > 7 else 0) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(window_s: float, max_wait_s: float) -> float:
    """On a shared machine: wait (up to max_wait_s) for window_s seconds in which the machine used under a third
    of a core; returns the seconds waited."""
    started = time.perf_counter()
    while window_s > 0 and time.perf_counter() - started < max_wait_s:
        busy = busy_cpu_s()
        time.sleep(window_s)
        if busy_cpu_s() - busy < window_s / 3:
            break
    return time.perf_counter() - started


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def subset(lines: list[bytes], target_bytes: int) -> list[bytes]:
    """Lines taken evenly through the file, about target_bytes of them, in file order."""
    total = sum(map(len, lines))
    if target_bytes >= total:
        return lines
    keep = max(1, round(len(lines) * target_bytes / total))
    return [lines[i * len(lines) // keep] for i in range(keep)]


def raw_rates(tokenizer_dir: Path, lines: list[bytes]) -> dict[str, float]:
    """Single-process tokens/s (wall and per CPU second) of Tokenizer.encode, one document at a time, and of
    encode_batch_fast on ~1 MB batches."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts = [json.loads(line)["text"] for line in lines]
    rates: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rates.update(encode_tokens=tokens, encode_wall_s=wall, encode_per_s=tokens / wall, encode_per_cpu_s=tokens / cpu)
    batches, batch, size = [], [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= 1 << 20:
            batches.append(batch)
            batch, size = [], 0
    batches += [batch] if batch else []
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = sum(len(e.ids) for b in batches for e in tokenizer.encode_batch_fast(b, add_special_tokens=False))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rates.update(batch_per_s=tokens / wall, batch_per_cpu_s=tokens / cpu)
    return rates


def _encode_share(tokenizer_dir: Path, lines: list[bytes], barrier: Any, results: Any) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts = [json.loads(line)["text"] for line in lines]
    barrier.wait()
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts)
    results.put((tokens, time.perf_counter() - wall, time.process_time() - cpu))


def raw_parallel(tokenizer_dir: Path, lines: list[bytes], workers: int) -> dict[str, float]:
    """W independent processes, each calling Tokenizer.encode on every W-th document, started together: what this
    machine's cores reach side by side with no infir2 code at all (all-core clocks, shared hardware threads, memory),
    the ceiling W workers of prepare-data can reach."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_encode_share, args=(tokenizer_dir, lines[i::workers], barrier, results))
             for i in range(workers)]
    steal = steal_cpu_s()
    for proc in procs:
        proc.start()
    done = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    tokens, wall = sum(d[0] for d in done), max(d[1] for d in done)
    return {"workers": workers, "tokens_per_s": tokens / wall, "per_worker": tokens / wall / workers,
            "per_cpu_s": tokens / sum(d[2] for d in done), "steal_s": steal_cpu_s() - steal}


def prepare(src: Path, tokenizer_dir: Path, prefix: Path, workers: int, quiet: tuple[float, float]) -> dict[str, Any]:
    """One `infir2 prepare-data` run as its own process; its stats plus what was measured around it."""
    for old in prefix.parent.glob(prefix.name + "_text_document*"):
        old.unlink()
    command = [sys.executable, "-m", "infir2_cpt.cli", "prepare-data", "--input", str(src), "--tokenizer",
               str(tokenizer_dir), "--output-prefix", str(prefix), "--workers", str(workers)]
    waited = wait_for_quiet(*quiet)
    busy, ours, steal = busy_cpu_s(), children_cpu_s(), steal_cpu_s()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    others = (busy_cpu_s() - busy) - (children_cpu_s() - ours)
    steal = steal_cpu_s() - steal
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stdout}{done.stderr}")
    stats = json.loads(Path(f"{prefix}_text_document.stats.json").read_text())
    t = stats["time"]
    tokens, phase = stats["tokens"], t["tokenize_phase_s"]
    return {"workers": workers, "input": str(src), "input_mb": src.stat().st_size / 1e6, "tokens": tokens,
            "units": stats["units"], "wall_s": wall, "tokenize_s": phase, "tokens_per_s": tokens / phase,
            "per_worker": tokens / phase / workers,
            "per_worker_cpu_s": stats["throughput_per_worker_cpu_s"]["tokens"],
            # start-up as the command reports it (older versions: inside prepare_data only), and everything
            # outside tokenizing and the index as the clock here sees it (interpreter start and exit included)
            "startup_s": t.get("startup_s", t["setup_s"]),
            "outside_s": wall - phase - t["merge_s"], "others_cpu_s": max(others, 0.0), "steal_s": steal,
            "waited_s": waited,
            "text_mb_per_s": stats.get("text_bytes", stats["input_bytes"]) / 1e6 / phase,
            "bin": f"{prefix}_text_document.bin"}


def same_output(a: dict[str, Any], b: dict[str, Any]) -> bool:
    pairs = [(a["bin"], b["bin"]), (a["bin"][:-4] + ".idx", b["bin"][:-4] + ".idx")]
    return all(Path(x).read_bytes() == Path(y).read_bytes() for x, y in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="JSONL with a 'text' field per line")
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json")
    parser.add_argument("--workers", default="", help="comma-separated; default 1,4,8,12,16 and nproc, up to nproc")
    parser.add_argument("--per-worker-mb", type=float, default=12.0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/prepare_data_speed"))
    parser.add_argument("--quiet-window", type=float, default=0.0,
                        help="shared machine: before each measurement wait for this many seconds of idle CPU")
    parser.add_argument("--max-wait", type=float, default=120.0, help="... but no longer than this")
    args = parser.parse_args()
    quiet = (args.quiet_window, args.max_wait)
    nproc = len(os.sched_getaffinity(0))
    counts = sorted({int(w) for w in args.workers.split(",") if w} or
                    {w for w in (1, 4, 8, 12, 16, nproc) if w <= nproc})
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"machine: {info}", flush=True)
    lines = [line for line in args.input.read_bytes().splitlines(keepends=True) if line.strip()]
    inputs: dict[int, Path] = {}
    for w in counts:
        inputs[w] = args.out / f"w{w}.jsonl"
        inputs[w].write_bytes(b"".join(subset(lines, int(w * args.per_worker_mb * 1e6))))
    del lines
    wait_for_quiet(*quiet)
    raw = raw_rates(args.tokenizer, inputs[counts[0]].read_bytes().splitlines())
    print(f"raw, one process, {inputs[counts[0]].stat().st_size / 1e6:.1f} MB: Tokenizer.encode "
          f"{raw['encode_per_s'] / 1e3:.0f}k tokens/s ({raw['encode_per_cpu_s'] / 1e3:.0f}k per CPU s); "
          f"encode_batch_fast {raw['batch_per_s'] / 1e3:.0f}k tokens/s", flush=True)
    runs = []
    for w in counts:
        runs.append(prepare(inputs[w], args.tokenizer, args.out / f"out-w{w}", w, quiet))
        wait_for_quiet(*quiet)
        runs[-1]["raw_parallel"] = raw_parallel(args.tokenizer, inputs[w].read_bytes().splitlines(), w)
        print(f"  workers {w}: {runs[-1]['tokens_per_s'] / 1e3:.0f}k tokens/s; {w} plain encode processes "
              f"{runs[-1]['raw_parallel']['tokens_per_s'] / 1e3:.0f}k tokens/s", flush=True)
    largest = runs[-1]
    compressed = []
    data = inputs[largest["workers"]].read_bytes()
    gz, zst = args.out / f"w{largest['workers']}.jsonl.gz", args.out / f"w{largest['workers']}.jsonl.zst"
    gz.write_bytes(gzip.compress(data, compresslevel=6))
    import zstandard

    zst.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    del data
    for path in (gz, zst):
        compressed.append(prepare(path, args.tokenizer, args.out / f"out-{path.suffix[1:]}", largest["workers"],
                                  quiet))
        compressed[-1]["identical_to_plain"] = same_output(compressed[-1], largest)
        print(f"  {path.name}: {compressed[-1]['tokens_per_s'] / 1e3:.0f}k tokens/s", flush=True)

    base = runs[0]["tokens_per_s"] / runs[0]["workers"]
    print(f"\nraw single-process rate: Tokenizer.encode {raw['encode_per_s'] / 1e3:.0f}k tokens/s "
          f"({raw['encode_per_cpu_s'] / 1e3:.0f}k per CPU s), encode_batch_fast {raw['batch_per_s'] / 1e3:.0f}k "
          f"tokens/s ({raw['batch_per_cpu_s'] / 1e3:.0f}k per CPU s); nproc {nproc}, {info['cpu']}\n")
    # "plain W" is W plain encode processes side by side (per process, over the one-process rate): how far the
    # machine itself scales; "vs plain W" is prepare-data's per-worker rate over theirs
    print("| input | workers | MB | units | tokens | tokenizing s | tokens/s | per worker | ratio | cpu ratio | "
          "scaling | plain W | vs plain W | start-up s | outside s | text MB/s | others cpu s | steal s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs + compressed:
        name = Path(r["input"]).name
        ratio = r["per_worker"] / raw["encode_per_s"]
        cpu_ratio = (r["per_worker_cpu_s"] or 0) / raw["encode_per_cpu_s"]
        scaling = r["tokens_per_s"] / (base * r["workers"])
        plain = next(p["raw_parallel"] for p in runs if p["workers"] == r["workers"])
        print(f"| {name} | {r['workers']} | {r['input_mb']:.0f} | {r['units']} | {r['tokens']:,} | "
              f"{r['tokenize_s']:.1f} | {r['tokens_per_s'] / 1e3:,.0f}k | {r['per_worker'] / 1e3:.0f}k | "
              f"{ratio:.2f} | {cpu_ratio:.2f} | {scaling:.2f} | {plain['per_worker'] / raw['encode_per_s']:.2f} | "
              f"{r['per_worker'] / plain['per_worker']:.2f} | {r['startup_s']:.2f} | {r['outside_s']:.2f} | "
              f"{r['text_mb_per_s']:.1f} | {r['others_cpu_s']:.0f} | {r['steal_s']:.1f} |")
    for r in compressed:
        print(f"{Path(r['input']).name}: output identical to the plain input's: {r['identical_to_plain']}")
    report = {"machine": info, "raw": raw, "runs": runs, "compressed": compressed,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (args.out / "prepare_data_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out / 'prepare_data_speed.json'}")
    for path in [*inputs.values(), gz, zst]:
        path.unlink(missing_ok=True)
    for path in args.out.glob("out-*"):
        path.unlink(missing_ok=True) if path.is_file() else shutil.rmtree(path)
    return 0 if all(r["identical_to_plain"] for r in compressed) else 1


if __name__ == "__main__":
    sys.exit(main())
