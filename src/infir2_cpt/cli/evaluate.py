"""`infir2 eval`: held-out loss of an experiment's checkpoints (and of its decays), through Megatron's evaluation."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..launch.evaluate import EvalRequest, plan_eval, run_eval
from ..launch.execute import flag_lines


def eval_checkpoints(req: EvalRequest) -> None:
    """Held-out loss and perplexity of checkpoints: all complete ones of EXP and of its decays, or --iterations.

    One launch evaluates them all: Megatron's training loop with --skip-train loads the first checkpoint and
    validates, then infir2's evaluation entry loads each next one (Megatron's load_checkpoint) and runs
    Megatron's evaluate on the same samples. The data is --data, else the recipe's data.valid_blend, else the
    validation share of data.blend. Results go beside the checkpoints, exp/<name>/eval/<label>/iter_N.json
    (kept when retention removes the checkpoint); `infir2 checkpoints EXP` shows them as columns. Checkpoints
    already evaluated on the same data are skipped (--redo). Retention leaves the checkpoints alone while they
    are evaluated.
    """
    from ..reports.heldout import plot_png, run_and_decays, summary

    plan = plan_eval(req)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if req.dry_run:
        print("\n".join(f"# {note}" for note in plan.notes))
        print("\n".join(f"export {name}={shlex.quote(value)}" for name, value in plan.env.items()))
        rendered = flag_lines(plan.command, prefix="-")
        print("\n".join(("    " if i else "") + text + (" \\" if i < len(rendered) - 1 else "")
                        for i, text in enumerate(rendered)))
        return
    for note in plan.notes:
        print(f"# {note}", file=sys.stderr, flush=True)
    run_eval(plan)
    names = {exp.name for exp in plan.experiments}
    series = [s for s in run_and_decays(plan.paths, plan.label) if s.name in names]
    print("\n".join(summary(series, plan.label)))
    if req.png:
        print(f"wrote {plot_png(series, plan.label, Path(req.png))}")
