"""`infir2 bench` (FP8 against BF16 through the real launcher), and the three look-ups beside it:
`bench-variants`, `trace-breakdown TRACE...`, `memory-breakdown SNAPSHOT...`."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..bench.plan import BenchRequest


def bench(req: BenchRequest) -> None:
    """FP8 against BF16 on this machine: step time, tokens/s, TFLOP/s, MFU and peak memory per variant.

    Each variant runs as its own `infir2 train` (the real launcher and entry, on mock data, no checkpoints)
    under exp/bench-<date>-<time>/<variant>, one after the other (fidelity runs: --parallel at a time); the
    figures come from Megatron's own log lines after --warmup-steps. Prints a table with ratios to --baseline
    and writes bench.json, table.md and bench.png there. `infir2 bench --recipe 7b --layers 8 --seq 8192`
    compares the precisions on one GPU. --set applies to every variant; Megatron flags after `--` too. Exit 2:
    invalid request (nothing run); exit 1: a variant failed.

    Examples:

    
      infir2 bench --recipe 7b --layers 8 --seq 8192
      infir2 bench --recipe tiny --fidelity --data data/corpus_text_document --tokenizer /models/Qwen2.5-7B
      infir2 bench --recipe tiny --fidelity --data data/corpus_text_document --tokenizer /models/Qwen2.5-7B \\
        --seeds 1236,1237,1238 --parallel 4
    """
    from ..bench import plan as bench_plan
    from ..bench import run as bench_run
    from ..bench.report import RESULTS_FILE

    plan = None
    try:
        plan = bench_plan.plan_bench(req)
        if req.dry_run:
            print(bench_plan.describe_plan(plan))
            return
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        report = bench_run.execute(plan)
    except KeyboardInterrupt:  # also while planning, before any result exists
        where = f"; results so far: {plan.root / RESULTS_FILE}" if plan is not None else ""
        print(f"\ninfir2: bench interrupted{where}", file=sys.stderr)
        raise typer.Exit(130)
    print(bench_run.summary(report))
    if not report.all_ok:
        raise typer.Exit(1)


def bench_variants() -> None:
    """List the built-in bench variants: what each one sets (infir2 bench --variants NAME,...).

    Examples:

    
      infir2 bench-variants
    """
    from ..bench.variants import list_variants

    print(list_variants())


def trace_breakdown(traces: Annotated[list[Path], typer.Argument(
        metavar="TRACE...", help="PyTorch-profiler traces (.json or .json.gz), as `infir2 bench --profile` writes.",
        show_default=False)]) -> None:
    """GPU time per step by kernel category (FP8 and BF16 GEMMs, attention, casts, optimizer, communication).

    Examples:

    
      infir2 trace-breakdown exp/bench-x/fp8-blockwise/torch_profile/*.json.gz
    """
    from ..bench.trace import trace_file_report

    for trace in traces:
        print(trace_file_report(trace))


def memory_breakdown(snapshots: Annotated[list[Path], typer.Argument(
        metavar="SNAPSHOT...", help="CUDA memory snapshots (.pickle), as written by `infir2 bench --memory-snapshot` "
        "or Megatron's --record-memory-history.", show_default=False)]) -> None:
    """What is live at the peak of a CUDA memory snapshot, by training phase and call site.

    Examples:

    
      infir2 memory-breakdown exp/bench-x/fp8-blockwise/memory_snapshot.pickle
    """
    from ..bench.memory import snapshot_file_report

    for snapshot in snapshots:
        print(snapshot_file_report(snapshot))


# `infir2 bench --list-variants / --breakdown TRACE / --memory-breakdown SNAPSHOT` are the commands above, kept as
# hidden options of `bench` so that older command lines still work: each acts, then exits, before a bench is planned.

def _then_exit(action: Any) -> Any:
    def callback(value: Any) -> None:
        if value:
            action(value)
            raise typer.Exit()
    return callback


def _eager(name: str, annotation: Any, decls: str, action: Any, default: Any = None) -> inspect.Parameter:
    option = typer.Option(decls, hidden=True, is_eager=True, expose_value=True, callback=_then_exit(action))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, option])


COMPATIBILITY_OPTIONS = [
    _eager("list_variants", bool, "--list-variants", lambda _: bench_variants(), default=False),
    _eager("breakdown", Optional[list[Path]], "--breakdown", lambda paths: trace_breakdown(paths)),
    _eager("memory_breakdown", Optional[list[Path]], "--memory-breakdown", lambda paths: memory_breakdown(paths)),
]
