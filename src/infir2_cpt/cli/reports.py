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
) -> None:
    """Table of an experiment's checkpoints: iteration, phase, learning rate, tokens seen, complete or partial, size.

    The schedule comes from exp/<EXP>/schedule.json and recipe.yaml (written at every launch; for a decay
    run decay_source.json names the stable checkpoint), or from --recipe. The checkpoint a re-run would
    resume from is marked, with the reason, and the tracker file's state is shown.

    Examples:

    
      infir2 checkpoints InfiR2_CPT_FP8_7B
      infir2 checkpoints tiny --decay-from 200
    """
    from ..layout import exp_root
    from ..reports.checkpoint_table import checkpoints_report

    print(checkpoints_report(exp, exp_root(os.environ), recipe=recipe, sets=sets or [], decay_from=decay_from))


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
