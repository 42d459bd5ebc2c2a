"""`infir2 eval`: held-out loss and perplexity of one, several or all checkpoints of an experiment and of its decays,
through Megatron's own evaluation, in one launch (runtime/eval_entry.py).

plan_eval() checks everything and decides: the model and data (the experiment's recorded recipe.yaml, or
--recipe/--set), the checkpoints (complete ones only; those already evaluated on the same data are skipped unless
--redo), the Megatron arguments (the training arguments with --skip-train, --load/--ckpt-step at the first
checkpoint, no --save, no optimizer state) and the torchrun command. run_eval() writes the plan file the entry
reads, marks the checkpoints as being read (a hold file per experiment, so that retention leaves them), runs
torchrun in the foreground, removes the holds, and reports the results stored beside the checkpoints
(exp/<name>/eval/<label>/iter_N.json, reports/heldout.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoints as ck
from ..errors import Infir2Error, LaunchError, Problem, RecipeError
from ..layout import ENTRY_ENV, GPU_CHECK_ENV, RECIPE_FILE, ExperimentPaths, exp_root
from ..recipe.load import recorded_recipe, resolve
from ..recipe.schedule import WSDSchedule
from ..recipe.schema import BlendEntry, Recipe
from ..recipe.validate import Findings, check_config, drop_consequences
from ..reports.heldout import LABEL_RE, decays_of, read_results, result_path
from ..requests import SET_HELP, argument, comma_list, option
from ..retention import EVAL_DIR, RETENTION_ENV, write_hold
from .megatron_args import LoadPlan, data_args, model_args, parallel_args, precision_args, training_args
from .plan import resolve_env
from .preflight import check_blend_files, check_gpu

ENTRY_MODULE = "infir2_cpt.runtime.eval_entry"
EVAL_ENTRY_ENV = "INFIR2_EVAL_ENTRY"  # tests: another module or script in place of the evaluation entry
PLAN_ENV = "INFIR2_EVAL_PLAN"  # read by runtime/eval_entry.py


class EvalError(Infir2Error):
    title = "infir2: cannot evaluate"


class EvalFailed(Infir2Error):
    title = "infir2: the evaluation failed"
    exit_code = 1


@dataclass
class EvalRequest:
    """Everything `infir2 eval` is asked on the command line."""

    exp: str = argument("Experiment name (a folder of exp/, or of $INFIR2_EXP_ROOT), or the path of an experiment "
                        "folder.", metavar="EXP", show_default=False)
    iterations: list[str] = option(
        "--iterations", help="Only these checkpoints, comma-separated: 400,800 or iter_0000400 (default: every "
        "complete checkpoint).", parse=comma_list, metavar="LIST", default_factory=list)
    decays: bool = option("--decays/--no-decays", help="Also the experiments beside it that decay from its "
                          "checkpoints (their decay_source.json).", default=True)
    data: list[str] = option(
        "--data", help="Held-out indexed dataset prefix (repeatable; equal weights). Default: the recipe's "
        "data.valid_blend, else the validation share (data.split) of data.blend.", metavar="PREFIX",
        default_factory=list)
    label: str | None = option(
        "--label", help="Name of the evaluation set: results go to exp/<name>/eval/LABEL/ (default: the first "
        "dataset's name, or valid-split).", default=None)
    eval_iters: int | None = option(
        "--eval-iters", help="Batches per checkpoint (of the recipe's global batch size; default: the recipe's "
        "logging.eval_iters).", min=1, default=None)
    recipe: str | None = option(
        "--recipe", "-r", help="Model, parallelism and data from this recipe instead of the experiment's recorded "
        "recipe.yaml.", default=None)
    sets: list[str] = option("--set", "-s", help=SET_HELP, default_factory=list)
    nproc_per_node: int | None = option("--nproc-per-node", help="GPUs to evaluate on (one host; default: the "
                                        "recipe's launch.nproc_per_node).", default=None)
    redo: bool = option("--redo", help="Evaluate again checkpoints that already have a result for this set.",
                        default=False)
    png: str | None = option("--png", help="Write held-out loss against tokens seen, the run and its decays on one "
                             "plot.", metavar="FILE", default=None)
    dry_run: bool = option("--dry-run", help="Print the checkpoints, the environment and the command; launch "
                           "nothing and write nothing.", default=False)


@dataclass(frozen=True)
class EvalItem:
    exp: ExperimentPaths
    iteration: int

    @property
    def ckpt_dir(self) -> Path:
        return self.exp.checkpoints


@dataclass
class EvalPlan:
    paths: ExperimentPaths  # the experiment asked for
    recipe: Recipe
    label: str
    signature: dict[str, Any]  # what makes two results comparable (data, batches, sequence length)
    items: list[EvalItem]  # to evaluate, in launch order
    done: list[EvalItem]  # already evaluated on this set (skipped)
    experiments: list[ExperimentPaths]
    megatron_args: list[str]
    env: dict[str, str]
    launcher: list[str]
    notes: list[str] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def command(self) -> list[str]:
        return self.launcher + self.megatron_args


# --------------------------------------------------------------------------- what to evaluate


def _experiment(exp: str, root: Path, out: Findings) -> ExperimentPaths:
    candidate = Path(exp)
    if ("/" in exp or exp.startswith(".")) and candidate.is_dir():
        return ExperimentPaths(name=candidate.resolve().name, root=candidate.resolve())
    paths = ExperimentPaths.for_name(exp, root)
    if not paths.root.is_dir():
        out.add_machine("EXP", f"no experiment folder {paths.root} yet: nothing to evaluate", exp)
    return paths


def _recipe(req: EvalRequest, paths: ExperimentPaths, out: Findings) -> Recipe | None:
    # Training-only machinery stays out: CUDA graphs, the profiler, FP8 parameters (they exist for the
    # distributed optimizer's all-gather; the checkpoint holds BF16 weights, and FP8 GEMMs stay on) and the form of
    # the optimizer's masters (no optimizer state is loaded)
    sets = [*req.sets, "launch.nnodes=1", "parallel.cuda_graph=null", "parallel.cuda_graph_modules=[]",
            "logging.profile=false", "precision.fp8_param_gather=false", "precision.fp8_bf16_param_remainders=false",
            "precision.fp8_output_layer_param=false"]
    if req.nproc_per_node is not None:
        sets.append(f"launch.nproc_per_node={req.nproc_per_node}")
    recorded = paths.root / RECIPE_FILE
    if req.recipe is None and not recorded.is_file():
        out.add("--recipe", f"{recorded} does not exist (a run launched without infir2, or not yet launched): give "
                "the recipe with --recipe")
        return None
    try:
        resolved = resolve(req.recipe if req.recipe is not None else str(recorded), sets)
    except RecipeError as exc:
        out.config.extend(exc.problems)
        return None
    out.config.extend(resolved.problems)
    out.extend(drop_consequences(check_config(resolved.recipe), resolved.problems))
    return resolved.recipe


def _parse_iterations(specs: list[str], out: Findings) -> set[int] | None:
    if not specs:
        return None
    wanted = set()
    for spec in specs:
        it = int(spec) if spec.isdigit() else ck.parse_iteration_dir(spec)
        if it is None or it < 1:
            out.add("--iterations", "give iteration numbers or iter_NNNNNNN folder names, comma-separated", spec)
        else:
            wanted.add(it)
    return wanted


def _model_matches(recipe: Recipe, paths: ExperimentPaths, out: Findings) -> None:
    """A decay (or --recipe) with another model shape cannot be loaded into the model built for the first one."""
    recorded = recorded_recipe(paths.root / RECIPE_FILE)
    if recorded is None:
        return
    other = recorded.model
    differ = [f.name for f in dataclasses.fields(other) if getattr(other, f.name) != getattr(recipe.model, f.name)]
    if differ:
        keys = ", ".join(f"model.{k}" for k in differ)
        out.add("model", f"experiment {paths.name} was trained with another model ({keys} differ from the recipe "
                "evaluated with); evaluate it on its own")


def _eval_data(req: EvalRequest, recipe: Recipe) -> tuple[list[BlendEntry] | None, str, Any]:
    """(the blend evaluated, or None for the validation share of data.blend; the default label; what the data is,
    for the results' signature)."""
    if req.data:
        entries = [BlendEntry(path=p, weight=1.0) for p in req.data]
    elif recipe.data.valid_blend:
        entries = list(recipe.data.valid_blend)
    else:
        if recipe.data.mock:
            return None, "mock", "mock data"
        return None, "valid-split", {"blend": [[e.path, e.weight] for e in recipe.data.blend],
                                     "split": recipe.data.split}
    name = Path(entries[0].path).name.removesuffix("_text_document") or "heldout"
    return entries, name, [[e.path, e.weight] for e in entries]


def eval_megatron_args(recipe: Recipe, paths: ExperimentPaths, first: EvalItem | None,
                       valid: list[BlendEntry] | None, eval_iters: int) -> list[str]:
    """The training arguments of the recipe, turned into Megatron's evaluation: --skip-train, the first checkpoint
    as --load/--ckpt-step (the entry loads the others), the evaluated data, and nothing written (no --save, no
    TensorBoard)."""
    schedule = WSDSchedule.of(recipe)
    load_dir = first.ckpt_dir if first is not None else paths.checkpoints
    args = data_args(recipe, paths, valid_only=valid) + parallel_args(recipe) + model_args(recipe)
    args += training_args(recipe, schedule, LoadPlan(load_dir=load_dir)) + precision_args(recipe)
    args += ["--ckpt-format", recipe.checkpoint.format, "--load", str(load_dir)]
    if first is not None:
        args += ["--ckpt-step", str(first.iteration)]
    args += ["--no-load-optim", "--no-load-rng", "--exit-on-missing-checkpoint", "--skip-train"]
    args += ["--log-interval", str(recipe.logging.log_interval), "--eval-interval", str(recipe.logging.eval_interval),
             "--eval-iters", str(eval_iters)]
    return args


def plan_eval(req: EvalRequest, environ: dict[str, str] | None = None) -> EvalPlan:
    """Check everything and decide what to evaluate. Raises EvalError (config) or LaunchError (machine) with every
    problem; in a dry run machine problems are warnings (plan.warnings)."""
    environ = dict(os.environ if environ is None else environ)
    out = Findings()
    paths = _experiment(req.exp, exp_root(environ), out)
    recipe = _recipe(req, paths, out)
    wanted = _parse_iterations(req.iterations, out)
    if req.label is not None and not LABEL_RE.match(req.label):
        out.add("--label", "must be one folder name: letters, digits and ._+=-", req.label)
    if recipe is None:
        raise EvalError(out.config or out.machine)
    valid, default_label, data_text = _eval_data(req, recipe)
    label = req.label or default_label
    eval_iters = req.eval_iters if req.eval_iters is not None else recipe.logging.eval_iters
    if eval_iters < 1:
        out.add("--eval-iters", "must be >= 1 (the recipe's logging.eval_iters is 0): give --eval-iters N", eval_iters)
    if valid is not None:
        check_blend_files(valid, "--data" if req.data else "data.valid_blend", out)
    elif not recipe.data.mock:
        check_blend_files(recipe.data.blend, "data.blend", out)
    experiments = [paths] + ([d for d, _ in decays_of(paths)] if req.decays and paths.root.is_dir() else [])
    for other in experiments:
        _model_matches(recipe, other, out)
    signature = {"data": data_text, "eval_iters": eval_iters, "seq_length": recipe.model.seq_length,
                 "global_batch_size": recipe.parallel.global_batch_size}
    items, done, notes, found = [], [], [], set()
    for exp in experiments:
        complete = [f.iteration for f in ck.list_checkpoints(exp.checkpoints) if f.complete and f.iteration]
        tracker = ck.read_tracker(exp.checkpoints)
        chosen = [it for it in complete if wanted is None or it in wanted]
        found.update(chosen)
        if chosen and tracker.derails_megatron:
            out.add_machine("checkpoints", f"{exp.checkpoints / ck.TRACKER} is {tracker.problem or 'release'}: "
                            "Megatron reads it before --ckpt-step and would stop; write an iteration into it", exp.name)
        stored = read_results(exp.root).get(label, {})
        for it in chosen:
            previous = stored.get(it)
            same = previous is not None and previous.get("signature") == signature
            (done if same and not req.redo else items).append(EvalItem(exp, it))
            if previous is not None and not same and not req.redo:
                notes.append(f"{exp.name} {ck.iter_dir_name(it)}: the stored '{label}' result was made on other data "
                             "or batches; evaluating it again")
    if wanted is not None and wanted - found:
        have = sorted({f.iteration for e in experiments for f in ck.list_checkpoints(e.checkpoints)
                       if f.complete and f.iteration})
        out.add_machine("--iterations", f"no complete checkpoint at {', '.join(map(str, sorted(wanted - found)))} "
                        f"(complete: {', '.join(map(str, have)) or 'none'})", ",".join(req.iterations))
    if not items and not done and paths.root.is_dir():
        out.add_machine("EXP", f"no complete checkpoint to evaluate in {paths.checkpoints}"
                        + (" or its decays" if len(experiments) > 1 else ""), req.exp)
    if items and environ.get(GPU_CHECK_ENV) != "0" and not req.dry_run:
        out.extend(check_gpu(recipe.launch.nproc_per_node, recipe.precision.fp8, "the evaluation runs Megatron on GPUs"))
    megatron_args = eval_megatron_args(recipe, paths, items[0] if items else None, valid, eval_iters)
    env, _ = resolve_env(recipe, environ)
    env.pop(RETENTION_ENV, None)  # the evaluation writes no checkpoint
    entry = environ.get(EVAL_ENTRY_ENV) or ENTRY_MODULE
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                f"--nproc-per-node={recipe.launch.nproc_per_node}",
                *([entry] if entry.endswith(".py") else ["-m", entry])]
    if valid is not None:
        what = ", ".join(e.path for e in valid)
    elif recipe.data.mock:
        what = "mock data"
    else:
        what = f"the validation share of data.blend (data.split {recipe.data.split})"
    notes.insert(0, f"evaluating on {what} as '{label}': {eval_iters} x {recipe.parallel.global_batch_size} sequences "
                 f"of {recipe.model.seq_length} tokens per checkpoint; results in exp/<name>/{EVAL_DIR}/{label}/")
    notes.append(f"{len(items)} checkpoint(s) to evaluate: "
                 + (", ".join(f"{i.exp.name}/{ck.iter_dir_name(i.iteration)}" for i in items) or "none")
                 + (f"; {len(done)} already evaluated (--redo evaluates them again)" if done else ""))
    fatal = out.config + ([] if req.dry_run else out.machine)
    if out.config:
        raise EvalError(out.config)
    if fatal:
        raise LaunchError(fatal)
    plan = EvalPlan(paths=paths, recipe=recipe, label=label, signature=signature, items=items, done=done,
                    experiments=experiments, megatron_args=megatron_args, env=env, launcher=launcher, notes=notes,
                    warnings=list(out.machine))
    return plan


# --------------------------------------------------------------------------- running it


def plan_file(plan: EvalPlan) -> Path:
    return plan.paths.root / EVAL_DIR / f".plan-{socket.gethostname()}-{os.getpid()}.json"


def plan_record(plan: EvalPlan) -> dict[str, Any]:
    """What the entry reads: per checkpoint where it is and where its result goes."""
    record = {"label": plan.label, "signature": plan.signature}
    return {"items": [{"exp": item.exp.name, "ckpt_dir": str(item.ckpt_dir), "iteration": item.iteration,
                       "out": str(result_path(item.exp.root, plan.label, item.iteration)),
                       "record": record} for item in plan.items]}


def run_eval(plan: EvalPlan) -> None:
    """Launch the evaluation in the foreground (nothing to do when every checkpoint was evaluated already)."""
    if not plan.items:
        return
    token = f"{socket.gethostname()}-{os.getpid()}"
    path = plan_file(plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan_record(plan), indent=1) + "\n")
    holds = []
    for exp in plan.experiments:
        iterations = [item.iteration for item in plan.items if item.exp == exp]
        if iterations:
            holds.append(write_hold(exp.root, token, iterations))
    env = {**os.environ, **plan.env, PLAN_ENV: str(path)}
    env.pop(ENTRY_ENV, None)
    try:
        code = subprocess.call(plan.command, env=env)
    except KeyboardInterrupt:
        code = 130
    finally:
        for hold in holds:
            hold.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    missing = [item for item in plan.items if not result_path(item.exp.root, plan.label, item.iteration).is_file()]
    if code or missing:
        problems = [Problem("torchrun", f"exited with status {code}")] if code else []
        problems += [Problem(f"{item.exp.name}/{ck.iter_dir_name(item.iteration)}", "no result was written")
                     for item in missing]
        raise EvalFailed(problems)

