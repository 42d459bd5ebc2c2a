"""Reading a run back: `infir2 checkpoints` and `infir2 schedule`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import DecayFromOpt, RecipeOpt, SetOpt


def checkpoints(
    exp: Annotated[str, typer.Argument(metavar="EXP",
        help="Experiment name (a folder of exp/, or of $INFIR2_EXP_ROOT), or the path of an experiment folder.")],
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", "-r", help="Take the schedule from this recipe instead of the experiment's recorded "
        "recipe.yaml and schedule.json (for runs launched without infir2).")] = None,
    sets: SetOpt = None,
    decay_from: DecayFromOpt = None,
    prune: Annotated[bool, typer.Option(
        "--prune", help="Apply the retention policy now: remove the complete checkpoints it does not keep.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="With --prune: show what would be removed, and why, without removing anything.")] = False,
    keep_last: Annotated[Optional[int], typer.Option(
        "--keep-last", metavar="N", help="With --prune: keep the newest N complete checkpoints (default: the "
        "recipe's checkpoint.keep_last).")] = None,
    keep_every: Annotated[Optional[int], typer.Option(
        "--keep-every", metavar="N", help="With --prune: also keep every multiple of N (default: the recipe's "
        "checkpoint.keep_every).")] = None,
) -> None:
    """Table of an experiment's checkpoints: iteration, phase, learning rate, tokens seen, complete or partial, size,
    held-out loss and perplexity (`infir2 eval`), and what the retention policy keeps.

    The schedule comes from exp/<EXP>/schedule.json and recipe.yaml (written at every launch; for a decay
    run decay_source.json names the stable checkpoint), or from --recipe. The checkpoint a re-run would
    resume from is marked, with the reason, and the tracker file's state is shown. With --prune the
    retention policy (checkpoint.keep_last / keep_every, or --keep-last / --keep-every) is applied now, as the
    launcher applies it after each new checkpoint; partial checkpoints, the newest complete one, the tracker's,
    decay sources and checkpoints being evaluated always stay. Removals are logged in exp/<EXP>/logs/retention.log.

    Examples:

    
      infir2 checkpoints InfiR2_CPT_FP8_7B
      infir2 checkpoints tiny --decay-from 200
      infir2 checkpoints InfiR2_CPT_FP8_7B --prune --dry-run
    """
    from ..errors import Problem, ReportError
    from ..layout import exp_root
    from ..reports.checkpoint_table import checkpoints_report, prune_report

    root = exp_root(os.environ)
    if prune:
        print(prune_report(exp, root, recipe=recipe, sets=sets or [], keep_last=keep_last, keep_every=keep_every,
                           dry_run=dry_run))
        return
    given = [flag for flag, value in (("--dry-run", dry_run), ("--keep-last", keep_last is not None),
                                      ("--keep-every", keep_every is not None)) if value]
    if given:
        raise ReportError([Problem(flag, "only with --prune") for flag in given])
    print(checkpoints_report(exp, root, recipe=recipe, sets=sets or [], decay_from=decay_from))


def schedule(
    recipe: RecipeOpt,
    sets: SetOpt = None,
    png: Annotated[Optional[str], typer.Option(
        "--png", metavar="FILE", help="Also write the curve, phases shaded, as a PNG plot.")] = None,
    points: Annotated[int, typer.Option(
        "--points", metavar="N", min=0, help="Also list the learning rate at N evenly spaced iterations.")] = 0,
    decay_from: DecayFromOpt = None,
) -> None:
    """The learning-rate curve of a recipe: a text plot and its phase boundaries (warmup, stable, decay).

    The learning rate at iteration i is what Megatron's scheduler sets after i optimizer steps (the value
    a checkpoint at i resumes with, and the one logged at iteration i). With --decay-from K it is the
    curve of `infir2 decay --recipe RECIPE --load iter_K`, with the stable run's part before K.

    Examples:

    
      infir2 schedule --recipe 7b --png lr.png
    """
    from ..reports.curve import recipe_curve
    from ..reports.schedule_plot import plot_png, schedule_report

    curve = recipe_curve(recipe, sets or [], decay_from)
    print(schedule_report(curve, points))
    if png:
        print(f"wrote {plot_png(curve, Path(png))}")
