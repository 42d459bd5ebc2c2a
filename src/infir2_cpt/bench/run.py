"""Running a planned bench: probe the GPU once, run each variant as its own `infir2 train` child process (the
real launcher and entry), read its figures, and write the results after every variant."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import BenchError, Problem
from ..reports.runlog import parse_log
from .memory import snapshot_breakdown
from .metrics import (FIDELITY_TARGET, THROUGHPUT_KEY, GpuPeak, VariantResult, apply_baseline, gpu_peak,
                      noise_warning, padded_vocab_from_log, peak_for, seed_summaries, variant_metrics)
from .plan import MEMORY_SNAPSHOT_FILE, TRACE_GLOB, BenchPlan, BenchRequest, VariantPlan, child_command
from .report import (BREAKDOWN_PLOT_FILE, PLOT_FILE, RESULTS_FILE, TABLE_FILE, format_breakdowns,
                     format_memory_breakdowns, format_seed_table, format_table, plot_breakdowns, plot_fidelity,
                     plot_speed, results_json, write_json)
from .trace import trace_breakdown


def gpu_check(checks: list[dict[str, Any]], timeout: float = 180.0) -> tuple[Optional[str], list[Problem]]:
    """Device name and infir2's GPU preflight for each (nproc, fp8), from the probe (runtime/gpu_probe.py) in a
    short child process, so that this process, which outlives every run, never holds a CUDA context."""
    cmd = [sys.executable, "-m", "infir2_cpt.runtime.gpu_probe", json.dumps(checks)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError, OSError) as exc:
        return None, [Problem("gpu", f"cannot probe the GPU: {exc}")]
    problems = [Problem(p["key"], p["message"], p.get("value")) for p in report.get("problems", [])]
    return report.get("name"), problems


@dataclass
class VariantRun:
    name: str
    command: list[str]
    exit_code: Optional[int]
    console: str
    timed_out: bool = False
    seconds: float = 0.0


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 20000  # rendezvous ports are drawn from here up to the kernel's ephemeral range


def ephemeral_low(range_file: Path = EPHEMERAL_RANGE_FILE) -> int:
    """The first port the kernel hands out for outgoing connections and bind(0) (Linux's default: 32768)."""
    try:
        return int(range_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(rng: random.Random | None = None, range_file: Path = EPHEMERAL_RANGE_FILE) -> int:
    """A free port for a run's rendezvous store, below the kernel's ephemeral range. A port from bind(0) is an
    ephemeral one: until torchrun binds it, another process's connection can take it as its local end, and
    torchrun, unable to host the store, then waits for it as a client until it times out."""
    rng = rng or random.Random()
    high = ephemeral_low(range_file)
    if high - LOWEST_PORT >= 100:
        for _ in range(200):
            port = rng.randrange(LOWEST_PORT, high)
            if _bindable(port):
                return port
    with socket.socket() as s:  # no room below the ephemeral range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PROGRESS_RE = re.compile(r"iteration\s+\d+/\s*\d+\s*\|")


def _progress_line(name: str, line: str) -> Optional[str]:
    """A compact echo of Megatron's iteration lines (and errors) while a variant runs."""
    if _PROGRESS_RE.search(line):
        log = parse_log(line)
        if log.iterations:
            it = log.iterations[0]
            parts = [f"iteration {it.iteration}/{it.train_iters}"]
            if it.iter_ms is not None:
                parts.append(f"{it.iter_ms:.1f} ms")
            if "throughput per GPU (TFLOP/s/GPU)" in it.values:
                parts.append(f"{it.values['throughput per GPU (TFLOP/s/GPU)']:.1f} TFLOP/s/GPU")
            if it.loss is not None:
                parts.append(f"loss {it.loss:.4f}")
            return f"[{name}] " + " | ".join(parts)
    if re.search(r"Traceback|Error|error:|OutOfMemory|problem\(s\)", line):
        return f"[{name}] {line.rstrip()}"
    return None


def run_variant(req: BenchRequest, plan: BenchPlan, vp: VariantPlan,
                echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> VariantRun:
    """Run one variant as `infir2 train` in a child process; its console goes to <variant>/bench-console.log."""
    folder = plan.root / vp.name
    folder.mkdir(parents=True, exist_ok=True)
    cmd = child_command(req, vp, free_port())
    env = dict(os.environ)
    env["INFIR2_EXP_ROOT"] = str(plan.root)
    env.setdefault("PYTHONUNBUFFERED", "1")
    console_path = folder / "bench-console.log"
    lines: list[str] = []
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, text=True, errors="replace", bufsize=1)

    def pump() -> None:
        assert proc.stdout is not None
        with open(console_path, "w") as console:
            for line in proc.stdout:
                console.write(line)
                console.flush()
                lines.append(line)
                shown = line.rstrip() if req.verbose else _progress_line(vp.name, line)
                if shown:
                    echo(shown if not req.verbose else f"[{vp.name}] {shown}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    limit = req.timeout_minutes * 60 if req.timeout_minutes else None
    try:
        proc.wait(timeout=limit)
    except KeyboardInterrupt:  # Ctrl-C reached the child too (same process group): let it stop cleanly
        try:
            proc.wait(timeout=120)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
        raise
    except subprocess.TimeoutExpired:
        timed_out = True
        echo(f"[{vp.name}] over {req.timeout_minutes} min: stopping it (SIGTERM, then SIGKILL after 120 s)")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join(timeout=60)  # the console tee exits once the last worker has closed the pipe
    return VariantRun(name=vp.name, command=cmd, exit_code=proc.returncode, console="".join(lines),
                      timed_out=timed_out, seconds=time.monotonic() - started)


def collect_result(plan: BenchPlan, vp: VariantPlan, run: VariantRun, peak: Optional[GpuPeak]) -> VariantResult:
    """Parse one run's console (Megatron's own lines, through infir2's tee) into a VariantResult."""
    log = parse_log(run.console)
    shape = vp.shape
    vocab = padded_vocab_from_log(run.console)
    if vocab is not None and vp.launch.recipe.model.padded_vocab_size is None:
        shape = replace(shape, padded_vocab_size=vocab)
    flops = shape.flops_per_iteration(vp.launch.recipe.parallel.global_batch_size)
    metrics = variant_metrics(log, plan.request.warmup_steps if plan.mode == "speed" else 0,
                              vp.tokens_per_iteration, vp.world_size, flops, peak_for(peak, vp.fp8),
                              plan.request.loss_window)
    per_sequence = shape.flops_per_sequence()
    metrics.flops_share = {k: v / sum(per_sequence.values()) for k, v in per_sequence.items()}
    complete = bool(log.iterations) and log.iterations[-1].iteration >= plan.train_iters
    if run.timed_out and not complete:
        status = "timed out"
    elif run.exit_code != 0 and not run.timed_out:  # a complete run stopped while exiting has no exit code of its own
        status = f"failed (exit {run.exit_code})"
    elif metrics.step_ms is None:
        status = "no timed iterations"
    else:
        status = "ok"
    result = VariantResult(
        name=vp.name, description=vp.variant.description, sets=list(vp.sets), extra_args=list(vp.extra_args),
        command=run.command, fp8=vp.fp8, status=status, exit_code=run.exit_code, seconds=round(run.seconds, 1),
        metrics=metrics,
        iterations=[{"iteration": it.iteration, "loss": it.loss, "iter_ms": it.iter_ms,
                     "tflops": it.values.get(THROUGHPUT_KEY)} for it in log.iterations],
        console_tail=run.console.splitlines()[-40:] if status != "ok" else [])
    if plan.mode == "speed" and (warning := noise_warning(vp.name, metrics)):
        result.warnings.append(warning)
    if run.timed_out and complete:  # its figures are whole: the timeout struck while it was exiting
        result.warnings.append(f"{vp.name}: stopped by --timeout-minutes after its last iteration ({plan.train_iters})")
    if plan.profile_window is not None:
        traces = sorted((plan.root / vp.name).glob(TRACE_GLOB))
        if traces:
            try:
                result.breakdown = trace_breakdown(traces[0])
            except (OSError, ValueError) as exc:
                result.breakdown = {"trace": str(traces[0]), "error": str(exc)}
        else:
            result.breakdown = {"error": f"no trace under {plan.root / vp.name / 'torch_profile'}"}
    if plan.request.memory_snapshot:
        result.memory = _memory_result(plan.root / vp.name / MEMORY_SNAPSHOT_FILE)
    return result


def _memory_result(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"error": f"no memory snapshot at {path}"}
    try:
        return snapshot_breakdown(path)
    except (OSError, ValueError, KeyError) as exc:
        return {"snapshot": str(path), "error": f"{type(exc).__name__}: {exc}"}


@dataclass
class BenchReport:
    plan: BenchPlan
    results: list[VariantResult]
    table: str
    written: list[Path]

    @property
    def all_ok(self) -> bool:
        return all(r.status == "ok" for r in self.results) and len(self.results) == len(self.plan.variants)


def run_bench(plan: BenchPlan, gpu_name: Optional[str] = None,
              echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> BenchReport:
    """Run every variant in turn, then write bench.json, table.md and bench.png (+ breakdown.png)."""
    req = plan.request
    peak = gpu_peak(gpu_name)
    plan.root.mkdir(parents=True, exist_ok=True)
    results: list[VariantResult] = []
    written: list[Path] = []
    order = {vp.name: i for i, vp in enumerate(plan.variants)}

    def record(vp: VariantPlan, run: VariantRun) -> None:
        result = collect_result(plan, vp, run, peak)
        results.append(result)
        results.sort(key=lambda r: order[r.name])  # plan order, whatever order parallel runs end in
        echo(f"[bench] {vp.name}: {result.status} after {result.seconds:.0f} s")
        for warning in result.warnings:
            echo(f"[bench] WARNING {warning}")
        if result.status != "ok":
            for line in result.console_tail[-15:]:
                echo(f"[{vp.name}]   {line}")
        apply_baseline(results, req.baseline, plan.mode == "fidelity", req.also_against)
        write_json(plan.root / RESULTS_FILE, results_json(plan, results, gpu_name, peak))

    def start(i: int, vp: VariantPlan) -> VariantRun:
        echo(f"[bench] variant {i}/{len(plan.variants)}: {vp.name} ({vp.variant.description})")
        return run_variant(req, plan, vp, echo)

    if req.parallel > 1:
        with ThreadPoolExecutor(max_workers=req.parallel) as pool:
            running = {pool.submit(start, i, vp): vp for i, vp in enumerate(plan.variants, 1)}
            for done in as_completed(running):
                record(running[done], done.result())
    else:
        for i, vp in enumerate(plan.variants, 1):
            run = start(i, vp)
            record(vp, run)
            if run.exit_code == 2 and not results[-1].iterations:
                echo(f"[bench] {vp.name}: infir2 refused the launch (exit 2); not running the remaining variants")
                break
    gpu_label = peak.label if peak else "unknown GPU"
    table = format_table(results, req.baseline, gpu_label, fidelity=plan.mode == "fidelity", others=req.also_against)
    summaries = seed_summaries(results, req.baseline)
    if summaries:
        table += (f"\n\nAcross seeds {', '.join(req.seeds)} (final loss: mean of the last {req.loss_window} iterations "
                  "of each run, then the mean over the seeds):\n\n" + format_seed_table(summaries, req.baseline))
    breakdown = "\n\n".join(part for part in (format_breakdowns(results), format_memory_breakdowns(results)) if part)
    written.append(plan.root / RESULTS_FILE)  # written after every variant, the last time with all of them
    header = (f"infir2 bench {plan.mode}: recipe {req.recipe}, GPU {gpu_name or 'unknown GPU'} "
              f"({'dense peaks BF16 %g / FP8 %s TFLOP/s' % (peak.bf16_tflops, peak.fp8_tflops) if peak else 'no known peak: no MFU'})")
    full_table = header + "\n\n" + table + ("\n\n" + breakdown if breakdown else "")
    (plan.root / TABLE_FILE).write_text(full_table + "\n")
    written.append(plan.root / TABLE_FILE)
    title = f"{req.recipe} on {gpu_name or 'unknown GPU'} ({plan.root.name})"
    with contextlib.suppress(ImportError):
        if plan.mode == "fidelity":
            written.append(plot_fidelity(results, req.baseline, plan.root / PLOT_FILE, title))
        else:
            written.append(plot_speed(results, req.baseline, plan.root / PLOT_FILE, title))
        extra = plot_breakdowns(results, plan.root / BREAKDOWN_PLOT_FILE, title)
        if extra:
            written.append(extra)
    return BenchReport(plan=plan, results=results, table=full_table, written=written)


def execute(plan: BenchPlan, echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> BenchReport:
    """Probe the GPU once (name for the peak table, infir2's GPU preflight for every variant; skipped with
    $INFIR2_GPU_CHECK=0, as in the CPU tests), then run the benchmark. Raises BenchError when the machine cannot
    run it, before anything is launched."""
    req = plan.request
    gpu_name = req.gpu_name
    if plan.gpu_check:
        checks = [{"nproc": req.nproc_per_node, "fp8": vp.fp8} for vp in plan.variants]
        detected, problems = gpu_check(checks)
        if problems:
            raise BenchError(problems, "infir2: cannot run the benchmark on this machine")
        gpu_name = gpu_name or detected
    return run_bench(plan, gpu_name, echo)


def summary(report: BenchReport) -> str:
    """What `infir2 bench` prints at the end: the table, the fidelity verdict, the files written."""
    lines = [report.table, ""]
    summaries = seed_summaries(report.results, report.plan.request.baseline)
    for s in summaries:
        if s.variant != report.plan.request.baseline and s.gap is not None:
            verdict = "within" if s.within_target else "NOT within"
            beyond = {True: "larger than", False: "within", None: "against an unknown"}[s.beyond_baseline_spread]
            lines.append(f"{s.variant}: mean final loss over {s.seeds_ok} seed(s) {s.gap * 100:+.2f} % against "
                         f"{report.plan.request.baseline}: {verdict} {FIDELITY_TARGET * 100:g} %; {beyond} "
                         f"{report.plan.request.baseline}'s own spread across seeds")
    if report.plan.mode == "fidelity" and not summaries:
        for r in report.results:
            if r.name != report.plan.request.baseline and r.fidelity and r.fidelity.relative_gap is not None:
                verdict = "within" if r.fidelity.within_target else "NOT within"
                lines.append(f"{r.name}: final loss {r.fidelity.relative_gap * 100:+.2f} % against "
                             f"{report.plan.request.baseline} (mean of the last {r.metrics.loss_window} "
                             f"iterations): {verdict} {FIDELITY_TARGET * 100:g} %")
    failed = [r for r in report.results if r.status != "ok"]
    for r in failed:
        lines.append(f"{r.name}: {r.status}; console: {report.plan.root / r.name / 'bench-console.log'}")
    lines += [f"WARNING {w}" for r in report.results for w in r.warnings]
    lines += [f"wrote {p}" for p in report.written]
    return "\n".join(lines)
