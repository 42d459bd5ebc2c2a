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
    from .locking import LockError
    try:
        launcher.execute(plan)
    except LockError as exc:  # another launch writes this experiment
        fail(exc.problems)


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

DecayFromOpt = Annotated[Optional[int], typer.Option(
    "--decay-from", metavar="K",
    help="Show the run of `infir2 decay --load iter_K`: train_iters K + decay_iters, no warmup, anneal from K.")]


@app.command("checkpoints")
def checkpoints_cmd(
    exp: Annotated[str, typer.Argument(
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
    """
    from . import reports

    try:
        text = reports.checkpoints_report(exp, recipe=recipe, sets=sets or [], decay_from=decay_from)
    except RecipeError as exc:
        fail(exc.problems, f"infir2: invalid recipe {exc.source}")
    except reports.ReportError as exc:
        fail(exc.problems, "infir2: cannot report checkpoints")
    print(text)


@app.command("schedule")
def schedule_cmd(
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
    """
    from pathlib import Path

    from . import reports

    try:
        curve = reports.recipe_curve(recipe, sets or [], decay_from)
    except RecipeError as exc:
        fail(exc.problems, f"infir2: invalid recipe {exc.source}")
    except reports.ReportError as exc:
        fail(exc.problems, "infir2: cannot draw the schedule")
    print(reports.schedule_report(curve, points))
    if png:
        try:
            written = reports.plot_png(curve, Path(png))
        except (OSError, ValueError) as exc:
            fail([Problem("--png", str(exc), png)], "infir2: cannot write the plot")
        print(f"wrote {written}")



# --- data commands (issue 5) ---

@app.command("prepare-data")
def prepare_data_cmd(
    tokenizer: Annotated[str, typer.Option(
        "--tokenizer", "-t", help="Local Hugging Face tokenizer folder (a fast tokenizer: tokenizer.json).",
        show_default=False)],
    output_prefix: Annotated[str, typer.Option(
        "--output-prefix", "-o", help="Writes OUTPUT_PREFIX_<text-key>_document.bin, .idx and .stats.json.",
        show_default=False)],
    inputs: Annotated[Optional[list[str]], typer.Option(
        "--input", "-i", help="A .jsonl/.json file (also .gz or .zst compressed), a .parquet file, or a folder of "
        "them (searched recursively); repeatable.", show_default=False)] = None,
    text_key: Annotated[str, typer.Option("--text-key", help="The record field (parquet column) holding the text.")] = "text",
    workers: Annotated[int, typer.Option("--workers", "-w", help="Tokenizer processes, one CPU core each.")] = 1,
    append_eod: Annotated[bool, typer.Option(
        "--append-eod/--no-append-eod", help="End every document with the tokenizer's EOS token, which Megatron's "
        "GPT dataset uses to separate documents packed into one sample.")] = True,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Stop at the first malformed line or record without the text field, instead of skipping "
        "and counting it.")] = False,
    more_inputs: Annotated[Optional[list[str]], typer.Argument(
        help="More inputs, so that a shell glob works: --input data/*.jsonl.", show_default=False)] = None,
) -> None:
    """Tokenize a raw corpus into a Megatron indexed dataset: OUTPUT_PREFIX_text_document.bin/.idx.

    Reads JSON Lines and parquet files or folders of them, tokenizes each record's --text-key field with the
    local tokenizer in --workers processes, and writes the dataset plus a .stats.json beside it (documents,
    tokens, skipped lines with file:line and reason, length histogram, time split). Put
    OUTPUT_PREFIX_text_document in a recipe's data.blend.

    Malformed lines and records without the text field are skipped and counted (--strict: fatal); empty
    documents are skipped. Files are written under temporary names and renamed at the end, so a failed or
    interrupted run leaves no final-named file. Progress (documents/s, tokens/s) goes to stderr.
    """
    from . import data

    try:
        result = data.prepare_data([*(inputs or []), *(more_inputs or [])], tokenizer, output_prefix,
                                   text_key=text_key, workers=workers, append_eod=append_eod, strict=strict)
    except data.DataError as exc:
        fail(exc.problems, "infir2: cannot prepare data (nothing written)")
    except data.WorkerError as exc:
        print(f"infir2: prepare-data failed (nothing written): {exc}", file=sys.stderr)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        print("\ninfir2: prepare-data interrupted (nothing written)", file=sys.stderr)
        raise typer.Exit(130)
    print(data.format_prepare_report(result))


@app.command("inspect-data")
def inspect_data_cmd(
    prefix: Annotated[str, typer.Argument(
        help="PREFIX_text_document (or the PREFIX given to prepare-data, or the .bin/.idx path).", show_default=False)],
    tokenizer: Annotated[Optional[str], typer.Option(
        "--tokenizer", "-t", help="Tokenizer folder, to show the documents as text instead of token ids.",
        show_default=False)] = None,
    n: Annotated[int, typer.Option("--n", "-n", help="How many documents to show, from the first.")] = 3,
) -> None:
    """Show an indexed dataset: documents, tokens, token dtype, length range and its first documents.

    Also checks that the .bin holds exactly the tokens its .idx describes.
    """
    from . import data

    try:
        summary = data.inspect_data(prefix, tokenizer, n)
    except data.DataError as exc:
        fail(exc.problems, "infir2: cannot inspect data")
    print(data.format_summary(summary))



# --- conversion commands (issue 6) ---


# --- benchmark commands (issue 7) ---


# --- slurm commands (issue 9) ---

@app.command("sbatch")
def sbatch_cmd(
    recipe: RecipeOpt,
    nodes: Annotated[int, typer.Option("--nodes", "-N", help="Nodes to allocate; `infir2 train` runs once on each.")],
    partition: Annotated[Optional[str], typer.Option("--partition", "-p", help="Slurm partition.")] = None,
    time_limit: Annotated[Optional[str], typer.Option(
        "--time", "-t", help="Time limit, HH:MM:SS or D-HH:MM:SS (default: the partition's).")] = None,
    gpus_per_node: Annotated[Optional[int], typer.Option(
        "--gpus-per-node", help="GPUs (training processes) per node (default: the recipe's launch.nproc_per_node).")] = None,
    sets: SetOpt = None,
    exp: ExpOpt = None,
    port: Annotated[int, typer.Option("--port", help="Rendezvous port on the first node.")] = 29400,
    signal_seconds: Annotated[int, typer.Option(
        "--signal-seconds", help="Seconds before the time limit at which the job saves a checkpoint and requeues itself.")] = 300,
    exclusive: Annotated[bool, typer.Option(
        "--exclusive/--no-exclusive", help="Ask for whole nodes (all their CPUs for the data loaders).")] = True,
    sbatch_options: Annotated[Optional[list[str]], typer.Option(
        "--sbatch-option", metavar="KEY=VALUE",
        help="Another #SBATCH option, e.g. --sbatch-option account=proj --sbatch-option qos=high (repeatable).")] = None,
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", metavar="FILE", help="Write the script to FILE (made executable) instead of stdout.")] = None,
    extra: ExtraArg = None,
) -> None:
    """Print a Slurm batch script that runs `infir2 train` on every node and requeues itself until done.

    `infir2 sbatch --recipe 7b --nodes 4 -p gpu -t 24:00:00 > job.sh && sbatch job.sh`. The rendezvous is
    the allocation's first node, port 29400; each node logs to exp/<name>/logs/slurm-<jobid>-<node>.log.
    SIGUSR1 comes --signal-seconds before the time limit: every node saves a checkpoint and exits, the job
    requeues itself and resumes from that checkpoint (`scancel --batch --signal=USR1 JOBID` does the same
    by hand; plain `scancel` stops for good). The recipe is validated for nodes x GPUs first, exit 2 on problems.
    """
    from . import slurm

    req = slurm.SbatchRequest(
        recipe=recipe, nodes=nodes, sets=sets or [], extra_args=extra or [], partition=partition,
        time=time_limit, gpus_per_node=gpus_per_node, exp=exp, port=port, signal_seconds=signal_seconds,
        exclusive=exclusive, sbatch_options=sbatch_options or [])
    try:
        script = slurm.emit(req, output)
    except RecipeError as exc:
        fail(exc.problems, f"infir2: invalid recipe {exc.source}")
    except slurm.SlurmError as exc:
        fail(exc.problems, exc.title)
    for warning in script.warnings:
        print(f"warning (on this host; the compute nodes may differ): {warning}", file=sys.stderr)
    if output is None:
        print(script.text, end="")
    else:
        print(f"wrote {output}: submit it with `sbatch {output}`", file=sys.stderr)



def main() -> None:
    app()


if __name__ == "__main__":
    main()
