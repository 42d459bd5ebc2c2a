"""Launching: `infir2 train`, `infir2 decay`, `infir2 stop`, `infir2 sbatch`, and the recipe commands `recipes` and
`show`."""

from __future__ import annotations

import os
import socket
import sys
from typing import Annotated

import typer

from ..errors import Infir2Error, RecipeError
from ..launch import execute
from ..launch.plan import LaunchRequest, plan_run
from ..launch.slurm import SbatchRequest, emit
from ..recipe.load import load_recipe, recipe_to_yaml, resolve, shipped_recipe_names
from .options import RecipeOpt, SetOpt


def _launch(req: LaunchRequest) -> None:
    plan = plan_run(req)
    if req.dry_run:
        for warning in plan.findings.machine:
            print(f"warning: {warning}", file=sys.stderr)
        print(execute.describe(plan))
        print(execute.format_command(plan))
        return
    execute.execute(plan)


def train(req: LaunchRequest) -> None:
    """Run a recipe's whole warmup -> stable -> decay pipeline; re-run the same command to resume.

    Resumes from the newest complete checkpoint in exp/<name>/checkpoints (a partial or garbled one is
    skipped, and the reason printed). Without one, starts from checkpoint.pretrained, or from random
    weights if that is unset. On several hosts run the same command on each with --nnodes and
    --rdzv-endpoint FIRST_HOST:PORT.

    Examples:

    
      infir2 train --recipe tiny
      infir2 train --recipe 7b --nnodes 4 --rdzv-endpoint node01:29400 --dry-run
      infir2 train --recipe 7b --set checkpoint.pretrained=ckpt/qwen2.5-7b -- --manual-gc
    """
    _launch(req)


def decay(req: LaunchRequest) -> None:
    """Anneal from a stable-phase checkpoint: lr -> min_lr over schedule.decay_iters, into its own experiment.

    `--recipe 7b` uses the shipped 7b-decay recipe (exp/InfiR2_CPT_FP8_7B_decay). Loading iteration k
    trains until k + decay_iters with warmup 0 and --override-opt_param-scheduler; weights and optimizer
    state come from the checkpoint. Re-running the same command resumes the decay from its own latest
    checkpoint, never from the stable checkpoint again.

    Examples:

    
      infir2 decay --recipe 7b --load iter_0035000
      infir2 decay --recipe tiny --load 200 --stable-exp my-run --exp my-run-decay200
    """
    _launch(req)


def stop(
    exp: Annotated[str, typer.Argument(metavar="EXP",
        help="Experiment name (a folder of exp/, or of $INFIR2_EXP_ROOT), or the path of an experiment folder.")],
) -> None:
    """Ask a running launch to save a checkpoint and stop, on every node, as SIGTERM to each launcher would.

    Writes exp/<EXP>/.infir2.stop. Every node's launcher looks for it every 2 s, sends SIGTERM to its
    workers (only to them: their checkpoint writers must live on), waits for the checkpoint of the
    current iteration (at most launch.stop_grace_seconds) and exits 0. Run the training command again to
    resume. Works from any host that sees the experiment folder; a request older than a launch is ignored
    by it.

    Examples:

    
      infir2 stop InfiR2_CPT_FP8_7B
    """
    from ..launch.locking import lock_status
    from ..layout import exp_root, write_stop_request
    from ..reports.checkpoint_table import resolve_experiment

    try:
        paths = resolve_experiment(exp, exp_root(os.environ))
    except Infir2Error as exc:
        raise Infir2Error(exc.problems, "infir2: cannot stop") from None
    path = write_stop_request(paths.root, f"infir2 stop on {socket.gethostname()} (pid {os.getpid()})")
    print(f"stop requested: {path}")
    print(lock_status(paths) or "no lock in the experiment folder: no launch of it is running on the rendezvous "
          "host (the request stays until the next launch, which ignores it)")


def sbatch(req: SbatchRequest) -> None:
    """Print a Slurm batch script that runs `infir2 train` on every node and requeues itself until done.

    `infir2 sbatch --recipe 7b --nodes 4 -p gpu -t 24:00:00 > job.sh && sbatch job.sh`. The rendezvous is
    the allocation's first node, port 29400; each node logs to exp/<name>/logs/slurm-<jobid>-<node>.log.
    SIGUSR1 comes --signal-seconds before the time limit: every node saves a checkpoint and exits, the job
    requeues itself and resumes from that checkpoint (`scancel --batch --signal=USR1 JOBID` does the same
    by hand; plain `scancel` stops for good). The recipe is validated for nodes x GPUs first, exit 2 on problems.

    Examples:

    
      infir2 sbatch --recipe 7b --nodes 4 --partition gpu --time 24:00:00 > job.sh
    """
    script = emit(req)
    for warning in script.warnings:
        print(f"warning (on this host; the compute nodes may differ): {warning}", file=sys.stderr)
    if req.output is None:
        print(script.text, end="")
    else:
        print(f"wrote {req.output}: submit it with `sbatch {req.output}`", file=sys.stderr)


def list_recipes() -> None:
    """List the shipped recipes with a one-line description each.

    Examples:

    
      infir2 recipes
    """
    names = shipped_recipe_names()
    width = max(len(n) for n in names) if names else 0
    for name in names:
        try:
            description = resolve(name).recipe.description
        except RecipeError as exc:  # listed with the others, marked
            description = f"(invalid: {exc.problems[0]})"
        print(f"{name:<{width}}  {description}")


def show(recipe: RecipeOpt, sets: SetOpt = None) -> None:
    """Print the resolved recipe (extends merged, --set applied) as YAML.

    Examples:

    
      infir2 show --recipe 1.5b --set parallel.tensor_parallel=1
    """
    print(recipe_to_yaml(load_recipe(recipe, sets or []).recipe), end="")
