"""The `infir2` command line. It only parses and delegates; each command's docstring is its --help."""

from __future__ import annotations

import sys
from typing import Annotated, NoReturn, Optional

import typer

from . import launch as launcher
from .recipes import Problem, RecipeError, load_recipe, recipe_to_yaml, shipped_recipe_names, load_raw

app = typer.Typer(
    name="infir2",
    help="FP8 continual pre-training of Qwen2.5 on Megatron: recipes, validation, launch, resume, decay.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_CONFIG = 2

RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Shipped recipe name (see `infir2 recipes`) or a YAML path.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="Override a recipe key: --set section.key=value (repeatable), e.g. --set parallel.tensor_parallel=2.")]
NnodesOpt = Annotated[Optional[int], typer.Option("--nnodes", help="Number of hosts (run the same command on each).")]
NprocOpt = Annotated[Optional[int], typer.Option("--nproc-per-node", "--nproc_per_node", help="GPUs per host.")]
EndpointOpt = Annotated[Optional[str], typer.Option(
    "--rdzv-endpoint", "--rdzv_endpoint", help="HOST:PORT of the c10d rendezvous, the same on every host.")]
RdzvIdOpt = Annotated[Optional[str], typer.Option(
    "--rdzv-id", "--rdzv_id", help="Rendezvous id (default: derived from the experiment name).")]
ExpOpt = Annotated[Optional[str], typer.Option("--exp", help="Experiment name: outputs in exp/<name>/ (default: the recipe's name).")]
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="Print the environment and the full command, then exit; touches no GPU and nothing under exp/.")]
ExtraArg = Annotated[Optional[list[str]], typer.Argument(
    help="Megatron flags after `--`, appended last (last one wins).", show_default=False)]


def fail(problems: list[Problem], title: str = "infir2: cannot launch") -> NoReturn:
    print(f"{title}: {len(problems)} problem(s)", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)
    raise typer.Exit(EXIT_CONFIG)


def _run(req: launcher.LaunchRequest) -> None:
    try:
        plan = launcher.plan_run(req)
    except RecipeError as exc:
        fail(exc.problems, f"infir2: invalid recipe {exc.source}")
    except launcher.LaunchError as exc:
        fail(exc.problems)
    if req.dry_run:
        for warning in plan.findings.machine:
            print(f"warning: {warning}", file=sys.stderr)
        print(launcher.describe(plan))
        print(launcher.format_command(plan))
        return
    launcher.execute(plan)


@app.command()
def train(
    recipe: RecipeOpt,
    sets: SetOpt = None,
    nnodes: NnodesOpt = None,
    nproc_per_node: NprocOpt = None,
    rdzv_endpoint: EndpointOpt = None,
    rdzv_id: RdzvIdOpt = None,
    exp: ExpOpt = None,
    dry_run: DryRunOpt = False,
    extra: ExtraArg = None,
) -> None:
    """Run a recipe's whole warmup -> stable -> decay pipeline; re-run the same command to resume.

    Resumes from the newest complete checkpoint in exp/<name>/checkpoints (a partial or garbled one is
    skipped, and the reason printed). Without one, starts from checkpoint.pretrained, or from random
    weights if that is unset. On several hosts run the same command on each with --nnodes and
    --rdzv-endpoint FIRST_HOST:PORT.
    """
    _run(launcher.LaunchRequest(recipe=recipe, sets=sets or [], extra_args=extra or [], nnodes=nnodes,
                                nproc_per_node=nproc_per_node, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id,
                                exp=exp, dry_run=dry_run))


@app.command()
def decay(
    recipe: RecipeOpt,
    load: Annotated[str, typer.Option(
        "--load", help="Stable-phase checkpoint: iter_0035000 (in the stable run's checkpoints), or a path to an iter_* folder.")],
    sets: SetOpt = None,
    nnodes: NnodesOpt = None,
    nproc_per_node: NprocOpt = None,
    rdzv_endpoint: EndpointOpt = None,
    rdzv_id: RdzvIdOpt = None,
    exp: ExpOpt = None,
    dry_run: DryRunOpt = False,
    extra: ExtraArg = None,
) -> None:
    """Anneal from a stable-phase checkpoint: lr -> min_lr over schedule.decay_iters, into its own experiment.

    `--recipe 7b` uses the shipped 7b-decay recipe (exp/InfiR2_CPT_FP8_7B_decay). Loading iteration k
    trains until k + decay_iters with warmup 0 and --override-opt_param-scheduler; weights and optimizer
    state come from the checkpoint. Re-running the same command resumes the decay from its own latest
    checkpoint, never from the stable checkpoint again.
    """
    _run(launcher.LaunchRequest(recipe=recipe, sets=sets or [], extra_args=extra or [], nnodes=nnodes,
                                nproc_per_node=nproc_per_node, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id,
                                exp=exp, dry_run=dry_run, decay_load=load))


@app.command("recipes")
def list_recipes() -> None:
    """List the shipped recipes with a one-line description each."""
    names = shipped_recipe_names()
    width = max(len(n) for n in names) if names else 0
    for name in names:
        try:
            description = load_raw(name).get("description", "")
        except RecipeError as exc:
            description = f"(invalid: {exc.problems[0]})"
        print(f"{name:<{width}}  {description}")


@app.command()
def show(recipe: RecipeOpt, sets: SetOpt = None) -> None:
    """Print the resolved recipe (extends merged, --set applied) as YAML."""
    try:
        loaded = load_recipe(recipe, sets or [])
    except RecipeError as exc:
        fail(exc.problems, f"infir2: invalid recipe {exc.source}")
    print(recipe_to_yaml(loaded.recipe), end="")


# --- checkpoint and schedule commands (issue 4) ---


# --- data commands (issue 5) ---


# --- conversion commands (issue 6) ---


# --- benchmark commands (issue 7) ---


# --- slurm commands (issue 9) ---


def main() -> None:
    app()


if __name__ == "__main__":
    main()
