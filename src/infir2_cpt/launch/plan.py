"""From a request (recipe + command line) to a checked plan. Nothing here writes or starts anything.

plan_run() does all the thinking: the recipe (recipe.resolve), its rules (recipe/validate.py) and the preflight
(preflight.py), where the run starts (its own newest complete checkpoint, the base model, or for a decay a
stable checkpoint), the Megatron argument list, the environment and the torchrun command. execute.py then
records the plan in the experiment folder and replaces this process with torchrun.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .. import checkpoints as ck
from ..checkpoints import TrackerRepair
from ..errors import LaunchError
from ..layout import (DEFAULT_ENTRY, ENTRY_ENV, GPU_CHECK_ENV, RECIPE_FILE, SCHEDULE_FILE, DecaySource,
                      ExperimentPaths, exp_root, read_json_object)
from ..recipe.load import ResolvedRecipe, format_set, recorded_recipe, resolve
from ..recipe.schedule import WSDSchedule
from ..recipe.schema import Recipe
from ..recipe.validate import Findings, check_config, drop_consequences
from ..requests import EXP_HELP, EXTRA_HELP, RECIPE_HELP, SET_HELP, argument, option
from ..retention import RETENTION_ENV
from ..runtime.torchrun import GRACE_ENV
from ..runtime.fp8_options import OPTIONS_ENV
from .megatron_args import (ArgGroup, LoadPlan, build_arg_groups, exact_fp8_memory_options, master_weights,
                            runtime_env, unapplied_fp8_options)
from .vocabulary import check_data_vocabulary, follow_tokenizer, recipe_tokenizer
from .preflight import check_cuda_graph_env, check_disk_space, check_files, check_gpu, check_megatron_flags


@dataclass
class LaunchRequest:
    """Everything `infir2 train` and `infir2 decay` are asked on the command line."""

    recipe: str = option("--recipe", "-r", help=RECIPE_HELP, metavar="NAME|FILE")
    decay_load: str | None = option(  # `infir2 decay` only
        "--load", help="Stable-phase checkpoint: iter_0035000 (in the stable run's checkpoints), or a path to an "
        "iter_* folder.", default=None, metavar="ITER|PATH")
    stable_exp: str | None = option(  # `infir2 decay` only
        "--stable-exp", help="The stable run's experiment name, when it was trained with --exp (default: the "
        "recipe's stable_name).", default=None, metavar="NAME")
    sets: list[str] = option("--set", "-s", help=SET_HELP, default_factory=list, metavar="KEY=VALUE")
    extra_args: list[str] = argument(EXTRA_HELP, default_factory=list, metavar="-- MEGATRON_FLAGS", show_default=False)
    nnodes: int | None = option("--nnodes", help="Number of hosts (run the same command on each).", default=None)
    nproc_per_node: int | None = option("--nproc-per-node", "--nproc_per_node", help="GPUs per host.", default=None)
    rdzv_endpoint: str | None = option(
        "--rdzv-endpoint", "--rdzv_endpoint", help="HOST:PORT of the c10d rendezvous, the same on every host.",
        default=None, metavar="HOST:PORT")
    rdzv_id: str | None = option(
        "--rdzv-id", "--rdzv_id", help="Rendezvous id (default: derived from the experiment name).", default=None,
        metavar="ID")
    exp: str | None = option("--exp", help=EXP_HELP, default=None, metavar="NAME")
    dry_run: bool = option(
        "--dry-run", help="Print the environment and the full command, then exit; touches no GPU and nothing under "
        "exp/.", default=False)
    check_gpu: bool = True  # False where the GPUs are checked elsewhere (bench, once) or later (sbatch, on the nodes)


@dataclass(frozen=True)
class LaunchEnv:
    """The launch host's environment as the planner uses it, read once (LaunchEnv.read) and passed down.

    variables: the user's environment, which the workers inherit; a variable the recipe sets and the user has
    set too keeps the user's value. exp_root: $INFIR2_EXP_ROOT, else ./exp. For tests and advanced use,
    $INFIR2_ENTRY runs another module or script under the same launcher instead of infir2's training entry, and
    $INFIR2_GPU_CHECK=0 skips the GPU preflight (a stand-in entry that runs on the CPU needs no GPU)."""

    variables: dict[str, str]
    exp_root: Path
    entry: str | None = None
    gpu_check: bool = True

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> LaunchEnv:
        variables = dict(os.environ if environ is None else environ)
        return cls(variables=variables, exp_root=exp_root(variables), entry=variables.get(ENTRY_ENV) or None,
                   gpu_check=variables.get(GPU_CHECK_ENV, "1").strip() != "0")


@dataclass(frozen=True)
class EnvSetting:
    """One variable of the workers' environment, and where its value comes from (printed by --dry-run)."""

    name: str
    value: str
    source: str  # "recipe", "user (recipe: X)", or the recipe key it is derived from


@dataclass(frozen=True)
class StartPlan:
    """Where the run starts: what Megatron loads and the schedule it is given, plus what the launcher fixes (a
    tracker that would derail Megatron) or records (a decay run's stable checkpoint) before it starts."""

    load: LoadPlan
    schedule: WSDSchedule
    repair: TrackerRepair | None = None
    decay_source: DecaySource | None = None
    start_iteration: int = 0  # the iteration training continues from (the disk forecast counts the saves after it)


@dataclass
class LaunchPlan:
    recipe: Recipe
    paths: ExperimentPaths
    start: StartPlan
    arg_groups: list[ArgGroup]
    env: dict[str, str]  # the variables infir2 sets (user's own values already win)
    env_report: list[EnvSetting]
    launcher: list[str]  # torchrun and its options, up to and including the entry
    notes: list[str]
    findings: Findings

    @property
    def load(self) -> LoadPlan:
        return self.start.load

    @property
    def schedule(self) -> WSDSchedule:
        return self.start.schedule

    @property
    def megatron_args(self) -> list[str]:
        return [a for group in self.arg_groups for a in group.args]

    @property
    def command(self) -> list[str]:
        return self.launcher + self.megatron_args


# --------------------------------------------------------------------------- recipe for the request


def _cli_sets(req: LaunchRequest) -> list[str]:
    """Command-line options become --set assignments, so they are typed and validated like the recipe."""
    sets = []
    for key, value in (("launch.nnodes", req.nnodes), ("launch.nproc_per_node", req.nproc_per_node),
                       ("launch.rdzv_endpoint", req.rdzv_endpoint), ("launch.rdzv_id", req.rdzv_id),
                       ("stable_name", req.stable_exp), ("name", req.exp)):
        if value is not None:
            sets.append(format_set(key, value))
    return sets


def request_recipe(req: LaunchRequest) -> ResolvedRecipe:
    """The recipe with --set and the command-line options applied (`infir2 decay`: its decay recipe). Type problems
    are in .problems (the keys keep their defaults) so that the rules still run and everything is reported at
    once; a recipe that cannot be found or parsed raises RecipeError."""
    return resolve(req.recipe, [*req.sets, *_cli_sets(req)], decay=req.decay_load is not None)


# --------------------------------------------------------------------------- where the run starts


def _check_schedule_unchanged(paths: ExperimentPaths, schedule: WSDSchedule, out: Findings) -> None:
    """Megatron aborts a resume mid-load when the schedule changed; say so before launching, with the keys."""
    saved = read_json_object(paths.root / SCHEDULE_FILE)
    if saved is None:
        return
    for key, value in schedule.record().items():
        if key in saved and saved[key] != value:
            out.add(f"schedule.{key}" if key != "global_batch_size" else "parallel.global_batch_size",
                    f"differs from the checkpoints in {paths.root} (saved {saved[key]!r}); Megatron refuses to "
                    f"resume with a changed schedule: restore it, or start a new experiment with --exp", value)


# the recipe keys that decide how the optimizer keeps the master weights (master_weights)
MASTER_WEIGHT_KEYS = ("precision.fp8", "precision.fp8_param_gather", "precision.precision_aware_optimizer",
                      "precision.fp8_bf16_param_remainders", "parallel.distributed_optimizer")


def _check_master_weights_unchanged(recorded_in: ExperimentPaths, recipe: Recipe, out: Findings) -> None:
    """A checkpoint's optimizer state holds the master weights in one form (FP32 copies, or 16-bit remainders
    beside the BF16 parameters); Megatron would load one into the other by a plain cast, without an error. Compare
    with the recipe recorded by the launch that wrote the checkpoints."""
    recorded = recorded_recipe(recorded_in.root / RECIPE_FILE)
    if recorded is None:
        return
    before, now = master_weights(recorded), master_weights(recipe)
    if before == now:
        return
    changed = [k for k in MASTER_WEIGHT_KEYS if _value_at(recorded, k) != _value_at(recipe, k)]
    key = changed[0] if changed else "precision"
    then = ", ".join(format_set(k, _value_at(recorded, k)) for k in changed)
    later = ", ".join(format_set(k, _value_at(recipe, k)) for k in changed)
    out.add(key, f"the checkpoints in {recorded_in.checkpoints} were written with {then}: they keep the master "
            f"weights as {before}; with {later} they would be read as {now}, and Megatron would cast one into the "
            f"other without an error. Restore {' and '.join(changed) or 'the precision'}, or start a new "
            "experiment (--exp) with checkpoint.pretrained set to a checkpoint of this run (its optimizer state "
            "starts anew)")


def _value_at(recipe: Recipe, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


def plan_full_run(recipe: Recipe, paths: ExperimentPaths, out: Findings, notes: list[str]) -> StartPlan:
    """A run of the whole schedule: from its own newest complete checkpoint, else the base model, else random."""
    schedule = WSDSchedule.of(recipe)
    point = ck.find_resume_point(paths.checkpoints)
    if point.folder is not None:
        notes.append(f"resuming from {point.folder.path} ({point.reason})")
        repair = None
        if point.repair_tracker and point.ckpt_step is not None:
            repair = TrackerRepair(paths.checkpoints, point.ckpt_step)
            notes.append(repair.describe())
        if point.iteration is not None and point.iteration >= recipe.schedule.train_iters:
            notes.append(f"iteration {point.iteration} >= train_iters {recipe.schedule.train_iters}: the run is "
                         "already complete; Megatron will exit after loading")
        _check_schedule_unchanged(paths, schedule, out)
        _check_master_weights_unchanged(paths, recipe, out)
        load = LoadPlan(load_dir=paths.checkpoints, ckpt_step=point.ckpt_step, expect_checkpoint=True)
        return StartPlan(load, schedule, repair, start_iteration=point.iteration or 0)
    repair = None
    if point.repair_tracker:  # a tracker naming nothing loadable: Megatron would load it (or exit) instead
        repair = TrackerRepair(paths.checkpoints, None)
        notes.append(f"{point.reason}: {repair.describe()}")
    elif point.partial:
        notes.append(f"{point.reason}")
    if recipe.checkpoint.pretrained:
        notes.append(f"no checkpoint of this run yet: starting from the base model {recipe.checkpoint.pretrained}")
        fp8_params = bool(recipe.precision.fp8 and recipe.precision.fp8_param_gather)
        masters = fp8_params and recipe.checkpoint.masters_from_pretrained
        if masters:
            notes.append("FP8 parameters: the optimizer's FP32 master weights are copied from the base model's "
                         "BF16 weights (the FP8 parameters are their quantized copy)")
        elif fp8_params:
            notes.append("checkpoint.masters_from_pretrained is false: Megatron builds the FP32 master weights "
                         "from the FP8 parameters, i.e. the base model's weights rounded to FP8")
        load = LoadPlan(load_dir=paths.checkpoints, pretrained=Path(recipe.checkpoint.pretrained),
                        expect_checkpoint=True, masters_from_checkpoint=masters)
        return StartPlan(load, schedule, repair)
    notes.append("no checkpoint of this run yet and checkpoint.pretrained is not set: starting from random "
                 "initialization")
    return StartPlan(LoadPlan(load_dir=paths.checkpoints), schedule, repair)


def plan_decay_run(recipe: Recipe, paths: ExperimentPaths, stable: ExperimentPaths, load_spec: str, out: Findings,
                   notes: list[str]) -> StartPlan:
    """A decay from the stable run's checkpoint named by --load (or, once it has its own, from those)."""
    target, problem = ck.parse_load_spec(load_spec, stable.checkpoints)
    if target is None:
        out.add("--load", problem or "cannot resolve", load_spec)
        return StartPlan(LoadPlan(load_dir=stable.checkpoints), WSDSchedule.of(recipe))
    schedule = WSDSchedule.of(recipe).decay_from(target.iteration)
    own = ck.find_resume_point(paths.checkpoints)
    missing = ck.check_load_target(target)
    if missing and own.folder is None:  # a decay resuming from its own checkpoints needs the stable one no more
        out.add_machine("--load", missing, load_spec)
    if target.iteration >= recipe.schedule.train_iters:
        out.add("--load", f"iteration {target.iteration} is at or past the stable recipe's train_iters "
                f"({recipe.schedule.train_iters}): that run has already decayed", load_spec)
    if paths.checkpoints.resolve() in (target.ckpt_dir.resolve(), stable.checkpoints.resolve()):
        out.add("--exp", f"the decay would write into the stable run's checkpoint directory "
                f"({paths.checkpoints}); give the decay its own experiment name", paths.name)
    elif target.iteration > recipe.schedule.train_iters - recipe.schedule.decay_iters:
        notes.append(f"iteration {target.iteration} is inside the stable recipe's own decay phase: the decay "
                     f"restarts from lr={recipe.schedule.lr}")
    source = DecaySource(target.ckpt_dir, target.iteration, schedule.train_iters)
    try:
        saved = DecaySource.read(paths.root)
    except ValueError:
        saved = None
    if saved is not None and not saved.same_checkpoint(source):
        out.add("--load", f"experiment {paths.name} is a decay from {saved.ckpt_dir}/"
                f"{ck.iter_dir_name(saved.iteration)}; to decay from another checkpoint give it its own --exp",
                load_spec)
    _check_master_weights_unchanged(paths if own.folder is not None else stable, recipe, out)
    if own.folder is not None and not out.config:
        notes.append(f"resuming this decay run from its own {own.folder.path} ({own.reason}); it ends at "
                     f"iteration {schedule.train_iters}")
        repair = (TrackerRepair(paths.checkpoints, own.ckpt_step) if own.repair_tracker and own.ckpt_step
                  else None)
        load = LoadPlan(load_dir=paths.checkpoints, ckpt_step=own.ckpt_step, expect_checkpoint=True,
                        override_scheduler=True)
        return StartPlan(load, schedule, repair, source, start_iteration=own.iteration or target.iteration)
    stable_tracker = ck.read_tracker(target.ckpt_dir)
    if stable_tracker.derails_megatron:
        out.add_machine("--load", f"{target.ckpt_dir / ck.TRACKER} is "
                        f"{stable_tracker.problem or 'release'}: Megatron reads it before --ckpt-step and would "
                        f"exit (or load the release folder instead); write the stable run's newest complete "
                        f"iteration into it, or move it aside", load_spec)
    notes.append(f"decay: loading {target.folder.path} (iteration {target.iteration}), annealing "
                 f"{recipe.schedule.lr} -> {recipe.schedule.min_lr} ({recipe.schedule.decay_style}) over "
                 f"{recipe.schedule.decay_iters} iterations, ending at {schedule.train_iters}; saving into "
                 f"{paths.checkpoints}")
    load = LoadPlan(load_dir=target.ckpt_dir, ckpt_step=target.iteration, expect_checkpoint=True,
                    override_scheduler=True)
    return StartPlan(load, schedule, None, source, start_iteration=target.iteration)


# --------------------------------------------------------------------------- environment and torchrun


def rendezvous_id(recipe: Recipe) -> str:
    """The same on every host for the same experiment, so all nodes join one job."""
    if recipe.launch.rdzv_id:
        return recipe.launch.rdzv_id
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", recipe.name)[:40]
    return f"infir2-{slug}-{hashlib.sha1(recipe.name.encode()).hexdigest()[:8]}"


# Where each variable of runtime_env comes from, for --dry-run's environment listing.
RUNTIME_ENV_SOURCES = {OPTIONS_ENV: "precision/model/parallel/logging keys",
                       RETENTION_ENV: "checkpoint.keep_last/keep_every"}


def resolve_env(recipe: Recipe, base: Mapping[str, str]) -> tuple[dict[str, str], list[EnvSetting]]:
    """The recipe's variables, except those the user already set (theirs win)."""
    env: dict[str, str] = {}
    report: list[EnvSetting] = []
    for name, value in recipe.env.items():
        if name in base:
            report.append(EnvSetting(name, base[name], f"user (recipe: {value})"))
        else:
            env[name] = value
            report.append(EnvSetting(name, value, "recipe"))
    env[GRACE_ENV] = str(recipe.launch.stop_grace_seconds)
    report.append(EnvSetting(GRACE_ENV, env[GRACE_ENV], "launch.stop_grace_seconds"))
    for name, value in runtime_env(recipe).items():
        if name in base:
            report.append(EnvSetting(name, base[name], f"user (recipe: {value})"))
        else:
            env[name] = value
            report.append(EnvSetting(name, value, RUNTIME_ENV_SOURCES.get(name, "parallel.cuda_graph")))
    if recipe.megatron.code_dir:
        pythonpath = os.pathsep.join(p for p in (base.get("PYTHONPATH", ""), recipe.megatron.code_dir) if p)
        env["PYTHONPATH"] = pythonpath
        report.append(EnvSetting("PYTHONPATH", pythonpath, "megatron.code_dir"))
    return env, report


def entry_target(recipe: Recipe, entry: str | None) -> list[str]:
    """What torchrun starts on every GPU: $INFIR2_ENTRY, Megatron-LM's pretrain_gpt.py, or infir2's entry."""
    if entry:
        return [entry] if entry.endswith(".py") else ["-m", entry]
    if recipe.megatron.code_dir:
        return [str(Path(recipe.megatron.code_dir) / "pretrain_gpt.py")]
    return ["-m", DEFAULT_ENTRY]


def torchrun_command(recipe: Recipe, entry: str | None) -> list[str]:
    launch = recipe.launch
    return [
        sys.executable, "-m", "infir2_cpt.runtime.torchrun",  # torchrun with a save-then-exit stop
        f"--nnodes={launch.nnodes}",
        f"--nproc-per-node={launch.nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={launch.rdzv_endpoint}",
        f"--rdzv-id={rendezvous_id(recipe)}",
        f"--rdzv-conf=join_timeout={launch.join_timeout}",
        f"--max-restarts={launch.max_restarts}",
        *entry_target(recipe, entry),
    ]


# --------------------------------------------------------------------------- the plan


def plan_run(req: LaunchRequest, env: LaunchEnv | None = None) -> LaunchPlan:
    """Check everything and decide what to run. Raises RecipeError/LaunchError with every problem.
    `env`: the launch host's environment (default: this process's, read now)."""
    env = LaunchEnv.read() if env is None else env
    resolved = request_recipe(req)
    recipe = resolved.recipe
    paths = ExperimentPaths.for_name(recipe.name, env.exp_root)
    findings = Findings(config=list(resolved.problems))
    findings.extend(drop_consequences(check_config(recipe), resolved.problems))
    notes: list[str] = []
    tokenizer = recipe_tokenizer(recipe)
    recipe = follow_tokenizer(recipe, tokenizer, notes)
    if req.decay_load is None and recipe.phase == "decay":
        findings.add("recipe", f"'{req.recipe}' is a decay recipe: run it with "
                     f"`infir2 decay --recipe {req.recipe} --load iter_NNNNNNN`", req.recipe)
    if req.decay_load is None:
        start = plan_full_run(recipe, paths, findings, notes)
    else:
        stable = ExperimentPaths.for_name(recipe.stable_name or recipe.name, env.exp_root)
        start = plan_decay_run(recipe, paths, stable, req.decay_load, findings, notes)
    findings.extend(check_files(recipe, paths))
    findings.extend(check_data_vocabulary(recipe, tokenizer))
    findings.extend(check_disk_space(recipe, paths, notes, start.start_iteration, start.schedule.train_iters))
    check_megatron_flags([*recipe.megatron_extra_args, *req.extra_args], findings, notes)
    notes.extend(exact_fp8_memory_options(recipe)[2])
    notes.extend(unapplied_fp8_options(recipe))
    if recipe.precision.fp8 and recipe.precision.fp8_attention:
        notes.append("precision.fp8_attention diverged in continual pre-training from a base model in infir2's "
                     "fidelity test (docs/fp8.md, 'Measuring fidelity'): measure it on your model with "
                     "`infir2 bench --fidelity` before a long run")
    if req.check_gpu and env.gpu_check:
        findings.extend(check_gpu(recipe.launch.nproc_per_node, recipe.precision.fp8))
    worker_env, env_report = resolve_env(recipe, env.variables)
    if recipe.launch.nnodes > 1:  # say what a multi-node launch waits for, and for how long
        notes.append(f"multi-node: {recipe.launch.nnodes} nodes x {recipe.launch.nproc_per_node} processes meet at "
                     f"{recipe.launch.rdzv_endpoint} (rendezvous id {rendezvous_id(recipe)}); run this same command "
                     f"on every node; a node missing after {recipe.launch.join_timeout} s (launch.join_timeout) "
                     f"stops the others with an error")
    plan = LaunchPlan(
        recipe=recipe, paths=paths, start=start,
        arg_groups=build_arg_groups(recipe, paths, start.load, req.extra_args, start.schedule),
        env=worker_env, env_report=env_report, launcher=torchrun_command(recipe, env.entry), notes=notes,
        findings=findings,
    )
    check_cuda_graph_env(plan.megatron_args, {**env.variables, **worker_env}, findings)
    fatal = findings.config + ([] if req.dry_run else findings.machine)
    if fatal:
        raise LaunchError(fatal, [] if not req.dry_run else findings.machine)
    return plan

