"""The `infir2` command line. It only parses and delegates; each command's docstring is its --help."""

from __future__ import annotations

import sys
from typing import Annotated, Any, Callable, Optional

import typer
from typer.core import TyperGroup

from ..launch import plan as launcher
from ..errors import BenchError, Infir2Error, Problem, RecipeError
from ..recipe.load import load_recipe, recipe_to_yaml, resolve, shipped_recipe_names

class _ReportingGroup(TyperGroup):
    """The one place where a refusal becomes output: every Infir2Error a command raises is printed as its title
    and its problems (key, bad value, what would be valid) on stderr, and the command exits with its status."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Infir2Error as exc:
            print(exc, file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=_ReportingGroup,
    name="infir2",
    help="FP8 continual pre-training of Qwen2.5 on Megatron: recipes, validation, launch, resume, decay.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


def _run(req: launcher.LaunchRequest) -> None:
    from ..launch import execute

    plan = launcher.plan_run(req)
    if req.dry_run:
        for warning in plan.findings.machine:
            print(f"warning: {warning}", file=sys.stderr)
        print(execute.describe(plan))
        print(execute.format_command(plan))
        return
    execute.execute(plan)


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
    stable_exp: Annotated[Optional[str], typer.Option(
        "--stable-exp", help="The stable run's experiment name, when it was trained with --exp (default: the "
        "recipe's stable_name).")] = None,
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
                                exp=exp, dry_run=dry_run, decay_load=load, stable_exp=stable_exp))


@app.command("recipes")
def list_recipes() -> None:
    """List the shipped recipes with a one-line description each."""
    names = shipped_recipe_names()
    width = max(len(n) for n in names) if names else 0
    for name in names:
        try:
            description = resolve(name).recipe.description
        except RecipeError as exc:
            description = f"(invalid: {exc.problems[0]})"
        print(f"{name:<{width}}  {description}")


@app.command()
def show(recipe: RecipeOpt, sets: SetOpt = None) -> None:
    """Print the resolved recipe (extends merged, --set applied) as YAML."""
    loaded = load_recipe(recipe, sets or [])
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
    import os

    from ..layout import exp_root
    from ..reports.checkpoint_table import checkpoints_report

    print(checkpoints_report(exp, exp_root(os.environ), recipe=recipe, sets=sets or [], decay_from=decay_from))


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

    from ..reports.curve import recipe_curve
    from ..reports.schedule_plot import plot_png, schedule_report

    curve = recipe_curve(recipe, sets or [], decay_from)
    print(schedule_report(curve, points))
    if png:
        print(f"wrote {plot_png(curve, Path(png))}")



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
    from ..data import prepare as data

    try:
        result = data.prepare_data([*(inputs or []), *(more_inputs or [])], tokenizer, output_prefix,
                                   text_key=text_key, workers=workers, append_eod=append_eod, strict=strict)
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
    from ..data import prepare as data

    print(data.format_summary(data.inspect_data(prefix, tokenizer, n)))



# --- conversion commands (issue 6) ---

convert_app = typer.Typer(
    help="Hugging Face <-> Megatron (torch_dist) checkpoints of Qwen2.5-shaped models; see docs/conversion.md.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(convert_app, name="convert")

ConvertRecipeOpt = Annotated[Optional[str], typer.Option(
    "--recipe", "-r", help="Recipe whose model section the checkpoint follows (name or YAML path).",
    show_default=False)]
ConvertDryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="Check everything, print the torchrun command, and exit; writes nothing.")]


def _convert(planner: Callable[[Any], Any], req: Any) -> None:
    """Plan with one of convert_launch's planners, then print (--dry-run) or run the plan."""
    from ..convert import plan as convert_launch

    plan = planner(req)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if req.dry_run:
        print(convert_launch.format_plan(plan))
        return
    code = convert_launch.run_plan(plan)
    if code:
        raise typer.Exit(code)


@convert_app.command("hf-to-megatron")
def convert_hf_to_megatron(
    hf: Annotated[str, typer.Option("--hf", help="Hugging Face Qwen2 folder: config.json and *.safetensors.",
                                    show_default=False)],
    out: Annotated[str, typer.Option("--out", help="New (or empty) folder for the Megatron checkpoint.",
                                     show_default=False)],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Recipe that will train from the checkpoint.")] = "7b",
    sets: SetOpt = None,
    tp: Annotated[Optional[int], typer.Option(
        "--tp", help="Training TP to check the shapes against (default: the recipe's). The checkpoint is written "
        "unsharded; Megatron reshards it on load.", show_default=False)] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Do not read the written checkpoint back.")] = False,
    dry_run: ConvertDryRunOpt = False,
) -> None:
    """Convert a Hugging Face Qwen2.5 model into a Megatron torch_dist checkpoint for checkpoint.pretrained.

    The HF config.json must agree with the recipe's model section (every difference is listed, exit 2). The
    vocabulary is padded with zero rows to the recipe's padded size. Writes OUT/release and a tracker saying
    'release' (weights only, what Megatron's --pretrained-checkpoint loads), then reads it back and compares it
    bit for bit. Runs on one GPU, in BF16; then train with --set checkpoint.pretrained=OUT.
    """
    from ..convert.plan import ConvertRequest, plan_hf_to_megatron

    _convert(plan_hf_to_megatron, ConvertRequest(recipe=recipe, sets=sets or [], hf=hf, out=out, tp=tp,
                                                 verify=not no_verify, dry_run=dry_run))


@convert_app.command("megatron-to-hf")
def convert_megatron_to_hf(
    ckpt: Annotated[str, typer.Option(
        "--ckpt", help="An iter_NNNNNNN or release folder (or a checkpoints directory: its tracker's folder).",
        show_default=False)],
    out: Annotated[str, typer.Option("--out", help="New (or empty) folder for the Hugging Face model.",
                                     show_default=False)],
    recipe: ConvertRecipeOpt = None,
    sets: SetOpt = None,
    tokenizer: Annotated[Optional[str], typer.Option(
        "--tokenizer", help="Copy the tokenizer files (and generation_config.json) of this folder.",
        show_default=False)] = None,
    hf_config: Annotated[Optional[str], typer.Option(
        "--hf-config", help="The source model's config.json (or its folder): vocab_size and token ids come from it "
        "(default: the copy kept beside the recipe's checkpoint.pretrained).", show_default=False)] = None,
    vocab_size: Annotated[Optional[int], typer.Option(
        "--vocab-size", help="Embedding rows to keep (default: the source config's vocab_size).",
        show_default=False)] = None,
    dry_run: ConvertDryRunOpt = False,
) -> None:
    """Convert one Megatron checkpoint into a Hugging Face Qwen2ForCausalLM folder (safetensors + config.json).

    Only the model weights are read (no optimizer state); padding rows of the vocabulary are dropped. The model
    shape comes from --recipe, or from exp/<name>/recipe.yaml when CKPT is inside an experiment. Every tensor is
    checked against that shape before anything runs (exit 2). Needs no GPU.
    """
    from ..convert.plan import ConvertRequest, plan_megatron_to_hf

    _convert(plan_megatron_to_hf, ConvertRequest(recipe=recipe, sets=sets or [], ckpt=ckpt, out=out,
                                                 tokenizer=tokenizer, hf_config=hf_config, vocab_size=vocab_size,
                                                 dry_run=dry_run))


@convert_app.command("check-logits")
def convert_check_logits(
    hf: Annotated[str, typer.Option("--hf", help="Hugging Face Qwen2 folder (the reference).", show_default=False)],
    ckpt: Annotated[str, typer.Option("--ckpt", help="Megatron iter_NNNNNNN or release folder.", show_default=False)],
    recipe: ConvertRecipeOpt = None,
    sets: SetOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="bf16 or fp32, for both models.")] = "bf16",
    batch: Annotated[int, typer.Option("--batch", help="Sequences of random tokens.")] = 2,
    seq: Annotated[int, typer.Option("--seq", help="Tokens per sequence.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random tokens.")] = 1234,
    max_rel: Annotated[float, typer.Option(
        "--max-rel", help="Largest accepted max |difference| / max |HF logit|.")] = 0.05,
    report: Annotated[Optional[str], typer.Option("--report", help="Also write the figures as JSON here.",
                                                  show_default=False)] = None,
    dry_run: ConvertDryRunOpt = False,
) -> None:
    """Run a Megatron checkpoint and a Hugging Face model on the same tokens and compare their logits.

    Prints the max absolute and relative error (and mean error, top-1 agreement); exit 1 when the relative
    error exceeds --max-rel. The Megatron model runs without FP8, in --dtype, on one GPU.
    """
    from ..convert.plan import ConvertRequest, plan_check_logits

    _convert(plan_check_logits, ConvertRequest(recipe=recipe, sets=sets or [], hf=hf, ckpt=ckpt, dtype=dtype,
                                               batch=batch, seq=seq, seed=seed, max_rel=max_rel, report=report,
                                               dry_run=dry_run))



# --- benchmark commands (issue 7) ---

@app.command("bench")
def bench_cmd(
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", "-r", help="Shipped recipe name (see `infir2 recipes`) or a YAML path.")] = None,
    layers: Annotated[Optional[int], typer.Option("--layers", help="Transformer layers (default: the recipe's).")] = None,
    seq: Annotated[Optional[int], typer.Option("--seq", help="Sequence length (default: the recipe's).")] = None,
    micro_batch: Annotated[Optional[int], typer.Option(
        "--micro-batch", help="Micro batch size (default: the recipe's).")] = None,
    global_batch: Annotated[Optional[int], typer.Option(
        "--global-batch", help="Global batch size (default: micro batch x data-parallel size x 8; --fidelity: the recipe's).")] = None,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", help="Timed iterations after the warm-up (default 20; --fidelity: iterations in all, default 500).")] = None,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Iterations run before timing starts.")] = 5,
    variants: Annotated[Optional[str], typer.Option(
        "--variants", help="Comma-separated variants to run, in order (default bf16,fp8-blockwise,fp8-tensorwise; "
        "--fidelity: bf16,fp8-blockwise). Built-ins: see --list-variants.")] = None,
    variant_specs: Annotated[Optional[list[str]], typer.Option(
        "--variant", metavar="NAME:ITEM,...", help="Define (and run) another variant: ITEMs are section.key=value "
        "overrides, --megatron-flag[=value] and base=VARIANT, e.g. "
        "--variant fp8-mbs2:base=fp8-blockwise,parallel.micro_batch_size=2 (repeatable).")] = None,
    variants_file: Annotated[Optional[str], typer.Option(
        "--variants-file", metavar="YAML", help="More variants: `variants: {NAME: {base, set, args}}` (run when named in --variants; without --variants, after the defaults).")] = None,
    baseline: Annotated[str, typer.Option("--baseline", help="The variant the ratios are taken against.")] = "bf16",
    sets: SetOpt = None,
    nproc_per_node: Annotated[int, typer.Option("--nproc-per-node", help="GPUs (processes) per variant.")] = 1,
    tensor_parallel: Annotated[Optional[int], typer.Option(
        "--tensor-parallel", help="TP size (default: gcd of the recipe's TP and --nproc-per-node).")] = None,
    exp_name: Annotated[Optional[str], typer.Option(
        "--exp-name", help="Folder under exp/ for the runs and results (default bench-<date>-<time>).")] = None,
    gpu_name: Annotated[Optional[str], typer.Option(
        "--gpu-name", help="GPU name for the peak table (default: torch.cuda.get_device_name).")] = None,
    fidelity: Annotated[bool, typer.Option(
        "--fidelity", help="Train on --data with a fixed seed in each variant and report the final-loss gap "
        "to the baseline (target: within 1 %).")] = False,
    data: Annotated[Optional[str], typer.Option("--data", help="--fidelity: indexed-dataset PREFIX (.bin/.idx).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(
        "--tokenizer", help="--fidelity: the tokenizer directory the data was prepared with.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="--fidelity: random seed (default: the recipe's).")] = None,
    loss_window: Annotated[int, typer.Option(
        "--loss-window", help="--fidelity: final loss = mean of the last N iterations.")] = 20,
    profile: Annotated[bool, typer.Option(
        "--profile", help="Run the PyTorch profiler over --profile-steps iterations after the warm-up and break the "
        "trace down by kernel category (timings of a profiled run are slower).")] = False,
    profile_steps: Annotated[int, typer.Option("--profile-steps", help="Iterations profiled.")] = 3,
    memory_snapshot: Annotated[bool, typer.Option(
        "--memory-snapshot", help="Record the CUDA allocator's history in every variant and attribute the blocks "
        "live at the memory peak to training phases and call sites (slows the steps: take times from a run "
        "without it).")] = False,
    memory_breakdown: Annotated[Optional[list[str]], typer.Option(
        "--memory-breakdown", metavar="SNAPSHOT", help="Only print what is live at the peak of a CUDA memory "
        "snapshot (.pickle, as written by --memory-snapshot or Megatron's --record-memory-history); repeatable.")] = None,
    breakdown: Annotated[Optional[list[str]], typer.Option(
        "--breakdown", metavar="TRACE", help="Only print the kernel-category breakdown of a profiler trace "
        "(.json or .json.gz); repeatable.")] = None,
    timeout_minutes: Annotated[Optional[float], typer.Option(
        "--timeout-minutes", help="Stop a variant that runs longer (it is reported as timed out).")] = None,
    list_variants: Annotated[bool, typer.Option("--list-variants", help="List the built-in variants and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Echo every line of the runs, not only iterations.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate every variant and print its command; run nothing.")] = False,
    extra: ExtraArg = None,
) -> None:
    """FP8 against BF16 on this machine: step time, tokens/s, TFLOP/s, MFU and peak memory per variant.

    Each variant runs as its own `infir2 train` (the real launcher and entry, on mock data, no checkpoints)
    under exp/bench-<date>-<time>/<variant>, one after the other; the figures come from Megatron's own log
    lines after --warmup-steps. Prints a table with ratios to --baseline and writes bench.json, table.md and
    bench.png there. `infir2 bench --recipe 7b --layers 8 --seq 8192` is the issue-7 comparison on one GPU.
    --set applies to every variant; Megatron flags after `--` too. Exit 2: invalid request (nothing run);
    exit 1: a variant failed.
    """
    from ..bench import plan as bench_plan
    from ..bench import run as bench_run
    from ..bench.report import RESULTS_FILE
    from ..bench.trace import format_trace_breakdown, trace_breakdown
    from ..bench.variants import list_variants as builtin_variants

    if list_variants:
        print(builtin_variants())
        return
    if breakdown:
        from pathlib import Path

        for trace in breakdown:
            try:
                print(format_trace_breakdown(trace_breakdown(Path(trace))))
            except (OSError, ValueError) as exc:
                raise BenchError([Problem("--breakdown", str(exc), trace)], "infir2: cannot read the trace") from None
        return
    if memory_breakdown:
        from pathlib import Path

        from ..bench.memory import format_memory_breakdown, snapshot_breakdown

        for snapshot in memory_breakdown:
            try:
                print(format_memory_breakdown(snapshot_breakdown(Path(snapshot))))
            except (OSError, ValueError, KeyError) as exc:
                raise BenchError([Problem("--memory-breakdown", str(exc), snapshot)],
                                 "infir2: cannot read the memory snapshot") from None
        return
    if recipe is None:
        raise BenchError([Problem("--recipe", "required (or --list-variants / --breakdown TRACE / "
                                  "--memory-breakdown SNAPSHOT)")])
    req = bench_plan.BenchRequest(
        recipe=recipe, variants=[v.strip() for v in variants.split(",") if v.strip()] if variants is not None else None,
        variant_specs=variant_specs or [], variants_file=variants_file, layers=layers, seq=seq,
        micro_batch=micro_batch, global_batch=global_batch, steps=steps, warmup_steps=warmup_steps, sets=sets or [],
        extra_args=extra or [], nproc_per_node=nproc_per_node, tensor_parallel=tensor_parallel, exp_name=exp_name,
        baseline=baseline, gpu_name=gpu_name, fidelity=fidelity, data=data, tokenizer=tokenizer, seed=seed,
        loss_window=loss_window, profile=profile, profile_steps=profile_steps, memory_snapshot=memory_snapshot,
        timeout_minutes=timeout_minutes, dry_run=dry_run, verbose=verbose)
    plan = None
    try:
        plan = bench_plan.plan_bench(req)
        if dry_run:
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
    from ..launch import slurm

    req = slurm.SbatchRequest(
        recipe=recipe, nodes=nodes, sets=sets or [], extra_args=extra or [], partition=partition,
        time=time_limit, gpus_per_node=gpus_per_node, exp=exp, port=port, signal_seconds=signal_seconds,
        exclusive=exclusive, sbatch_options=sbatch_options or [])
    script = slurm.emit(req, output)
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
