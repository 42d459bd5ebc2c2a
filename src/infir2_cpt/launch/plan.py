"""From a request (recipe + command line) to a validated plan, printed or exec'd as torchrun.

plan_run() does all the thinking and touches nothing: recipe loading, validation, checkpoint
decisions, the Megatron argument list, the environment and the torchrun command. execute() then
creates the experiment folders, writes what it is about to run into them, and replaces this process
with torchrun (exec, so a scheduler's SIGTERM reaches torchrun and, through it, Megatron).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoints as ck
from ..layout import (DECAY_SOURCE_FILE, DEFAULT_ENTRY, ENTRY_ENV, EXP_DIR_ENV, RECIPE_FILE, SCHEDULE_FILE,
                     ExperimentPaths, read_json_object)
from .megatron_args import ArgGroup, LoadPlan, build_arg_groups, runtime_env
from ..errors import LaunchError, Problem
from ..recipe.schema import Recipe
from ..recipe.load import LoadedRecipe, apply_sets, build_recipe, load_raw, recipe_to_yaml, resolve_recipe_path
from ..runtime.fp8_options import OPTIONS_ENV
from ..runtime.torchrun import GRACE_ENV
from ..recipe.validate import (Findings, check_config, check_cuda_graph_env, check_disk_space, check_files, check_gpu,
                         drop_consequences)


@dataclass
class LaunchRequest:
    """Everything the user asked for on the command line."""

    recipe: str
    sets: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    nnodes: int | None = None
    nproc_per_node: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    exp: str | None = None
    dry_run: bool = False
    decay_load: str | None = None  # set for `infir2 decay`
    stable_exp: str | None = None  # `infir2 decay --stable-exp`: the stable run's experiment name
    check_gpu: bool = True  # False where the GPUs are checked elsewhere (bench, once) or later (sbatch, on the nodes)


@dataclass
class LaunchPlan:
    recipe: Recipe
    paths: ExperimentPaths
    load: LoadPlan
    arg_groups: list[ArgGroup]
    env: dict[str, str]  # the variables infir2 sets (user's own values already win)
    env_report: list[tuple[str, str, str]]  # (name, value, "recipe" | "user (recipe: X)")
    launcher: list[str]  # torchrun and its options, up to and including the entry
    notes: list[str]
    findings: Findings
    tracker_repair: tuple[Path, int | None] | None = None  # iteration None: set the tracker aside
    schedule_record: dict[str, Any] = field(default_factory=dict)
    decay_source: dict[str, Any] | None = None

    @property
    def megatron_args(self) -> list[str]:
        return [a for _, args in self.arg_groups for a in args]

    @property
    def command(self) -> list[str]:
        return self.launcher + self.megatron_args




# --------------------------------------------------------------------------- recipe for the request


def _cli_sets(req: LaunchRequest) -> list[str]:
    """Command-line options become --set assignments, so they are typed and validated like the recipe."""
    sets = []
    for key, value in (("launch.nnodes", req.nnodes), ("launch.nproc_per_node", req.nproc_per_node),
                       ("launch.rdzv_endpoint", req.rdzv_endpoint), ("launch.rdzv_id", req.rdzv_id),
                       ("stable_name", req.stable_exp)):
        if value is not None:
            sets.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return sets


def _decay_raw(recipe_ref: str) -> dict[str, Any]:
    """A decay recipe for `infir2 decay --recipe X`: X itself if it is one, X-decay if shipped beside it,
    else X turned into one (own experiment name, no warmup)."""
    raw = load_raw(recipe_ref)
    if raw.get("phase") == "decay":
        return raw
    path = resolve_recipe_path(recipe_ref)
    sibling = path.with_name(f"{path.stem}-decay{path.suffix}")
    if sibling.is_file():
        return load_raw(str(sibling))
    raw = dict(raw)
    raw["stable_name"] = raw.get("name", "run")
    raw["name"] = f"{raw['stable_name']}_decay"
    raw["phase"] = "decay"
    raw["schedule"] = {**raw.get("schedule", {}), "warmup_iters": 0}
    return raw


def load_request_recipe(req: LaunchRequest, problems: list[Problem]) -> LoadedRecipe:
    """The recipe with --set and command-line options applied. Type problems are appended to `problems`
    (the keys keep their defaults) so that the semantic checks still run and everything is reported at once.
    A recipe that cannot be found or parsed raises RecipeError."""
    raw = _decay_raw(req.recipe) if req.decay_load is not None else load_raw(req.recipe)
    raw = apply_sets(raw, list(req.sets) + _cli_sets(req), problems)
    if req.exp is not None:
        raw["name"] = req.exp
    return LoadedRecipe(build_recipe(raw, problems), req.recipe, raw)


# --------------------------------------------------------------------------- checkpoints and schedule


def schedule_record(recipe: Recipe, train_iters: int, warmup_iters: int) -> dict[str, Any]:
    """The settings Megatron's scheduler checks on resume; kept in exp/<name>/schedule.json."""
    s = recipe.schedule
    return {"lr": s.lr, "min_lr": s.min_lr, "train_iters": train_iters, "warmup_iters": warmup_iters,
            "decay_iters": s.decay_iters, "decay_style": s.decay_style,
            "global_batch_size": recipe.parallel.global_batch_size}


def _check_schedule_unchanged(paths: ExperimentPaths, record: dict[str, Any], out: Findings) -> None:
    """Megatron aborts a resume mid-load when the schedule changed; say so before launching, with the keys."""
    saved = read_json_object(paths.root / SCHEDULE_FILE)
    if saved is None:
        return
    for key, value in record.items():
        if key in saved and saved[key] != value:
            out.add(f"schedule.{key}" if key != "global_batch_size" else "parallel.global_batch_size",
                    f"differs from the checkpoints in {paths.root} (saved {saved[key]!r}); Megatron refuses to "
                    f"resume with a changed schedule: restore it, or start a new experiment with --exp", value)


def plan_full_run(recipe: Recipe, paths: ExperimentPaths, out: Findings, notes: list[str]) -> tuple[LoadPlan, tuple[Path, int | None] | None]:
    point = ck.find_resume_point(paths.checkpoints)
    repair = None
    if point.folder is not None:
        notes.append(f"resuming from {point.folder.path} ({point.reason})")
        if point.repair_tracker and point.ckpt_step is not None:
            repair = (paths.checkpoints, point.ckpt_step)
            notes.append(f"the tracker will be set aside and rewritten to {point.ckpt_step}")
        if point.iteration is not None and point.iteration >= recipe.schedule.train_iters:
            notes.append(f"iteration {point.iteration} >= train_iters {recipe.schedule.train_iters}: the run is "
                         "already complete; Megatron will exit after loading")
        _check_schedule_unchanged(paths, schedule_record(recipe, recipe.schedule.train_iters,
                                                         recipe.schedule.warmup_iters), out)
        return LoadPlan(load_dir=paths.checkpoints, ckpt_step=point.ckpt_step, expect_checkpoint=True), repair
    if point.repair_tracker:  # a tracker naming nothing loadable: Megatron would load it (or exit) instead
        repair = (paths.checkpoints, None)
        notes.append(f"{point.reason}: the tracker will be set aside so that Megatron starts fresh")
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
        return LoadPlan(load_dir=paths.checkpoints, pretrained=Path(recipe.checkpoint.pretrained),
                        expect_checkpoint=True, masters_from_checkpoint=masters), repair
    notes.append("no checkpoint of this run yet and checkpoint.pretrained is not set: starting from random "
                 "initialization")
    return LoadPlan(load_dir=paths.checkpoints), repair


def plan_decay_run(recipe: Recipe, paths: ExperimentPaths, load_spec: str, out: Findings,
                   notes: list[str]) -> tuple[LoadPlan, tuple[Path, int] | None, dict[str, Any] | None]:
    stable = ExperimentPaths.for_name(recipe.stable_name or recipe.name)
    target, problem = ck.parse_load_spec(load_spec, stable.checkpoints)
    if target is None:
        out.add("--load", problem or "cannot resolve", load_spec)
        return LoadPlan(load_dir=stable.checkpoints), None, None
    own = ck.find_resume_point(paths.checkpoints)
    missing = ck.check_load_target(target)
    if missing and own.folder is None:  # a decay resuming from its own checkpoints needs the stable one no more
        out.add_machine("--load", missing, load_spec)
    decay_iters = recipe.schedule.decay_iters
    if target.iteration >= recipe.schedule.train_iters:
        out.add("--load", f"iteration {target.iteration} is at or past the stable recipe's train_iters "
                f"({recipe.schedule.train_iters}): that run has already decayed", load_spec)
    if paths.checkpoints.resolve() in (target.ckpt_dir.resolve(), stable.checkpoints.resolve()):
        out.add("--exp", f"the decay would write into the stable run's checkpoint directory "
                f"({paths.checkpoints}); give the decay its own experiment name", paths.name)
    elif target.iteration > recipe.schedule.train_iters - decay_iters:
        notes.append(f"iteration {target.iteration} is inside the stable recipe's own decay phase: the decay "
                     f"restarts from lr={recipe.schedule.lr}")
    end = target.iteration + decay_iters
    source = {"ckpt_dir": str(target.ckpt_dir), "iteration": target.iteration, "train_iters": end}
    saved_source = read_json_object(paths.root / DECAY_SOURCE_FILE)
    if saved_source and (saved_source.get("iteration"), Path(str(saved_source.get("ckpt_dir"))).resolve()) != (
            target.iteration, target.ckpt_dir.resolve()):
        out.add("--load", f"experiment {paths.name} is a decay from {saved_source.get('ckpt_dir')}/"
                f"{ck.iter_dir_name(int(saved_source.get('iteration', 0)))}; to decay from another checkpoint "
                f"give it its own --exp", load_spec)
    if own.folder is not None and not out.config:
        notes.append(f"resuming this decay run from its own {own.folder.path} ({own.reason}); it ends at "
                     f"iteration {end}")
        repair = (paths.checkpoints, own.ckpt_step) if own.repair_tracker and own.ckpt_step else None
        plan = LoadPlan(load_dir=paths.checkpoints, ckpt_step=own.ckpt_step, expect_checkpoint=True,
                        override_scheduler=True, train_iters=end, warmup_iters=0)
        return plan, repair, source
    stable_tracker = ck.read_tracker(target.ckpt_dir)
    if stable_tracker.derails_megatron:
        out.add_machine("--load", f"{target.ckpt_dir / ck.TRACKER} is "
                        f"{stable_tracker.problem or 'release'}: Megatron reads it before --ckpt-step and would "
                        f"exit (or load the release folder instead); write the stable run's newest complete "
                        f"iteration into it, or move it aside", load_spec)
    notes.append(f"decay: loading {target.folder.path} (iteration {target.iteration}), annealing "
                 f"{recipe.schedule.lr} -> {recipe.schedule.min_lr} ({recipe.schedule.decay_style}) over "
                 f"{decay_iters} iterations, ending at {end}; saving into {paths.checkpoints}")
    plan = LoadPlan(load_dir=target.ckpt_dir, ckpt_step=target.iteration, expect_checkpoint=True,
                    override_scheduler=True, train_iters=end, warmup_iters=0)
    return plan, None, source


# --------------------------------------------------------------------------- environment and torchrun


def rendezvous_id(recipe: Recipe) -> str:
    """The same on every host for the same experiment, so all nodes join one job."""
    if recipe.launch.rdzv_id:
        return recipe.launch.rdzv_id
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", recipe.name)[:40]
    return f"infir2-{slug}-{hashlib.sha1(recipe.name.encode()).hexdigest()[:8]}"


def resolve_env(recipe: Recipe, base: dict[str, str]) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """The recipe's variables, except those the user already set (theirs win)."""
    env: dict[str, str] = {}
    report: list[tuple[str, str, str]] = []
    for name, value in recipe.env.items():
        if name in base:
            report.append((name, base[name], f"user (recipe: {value})"))
        else:
            env[name] = value
            report.append((name, value, "recipe"))
    env[GRACE_ENV] = str(recipe.launch.stop_grace_seconds)
    report.append((GRACE_ENV, env[GRACE_ENV], "launch.stop_grace_seconds"))
    for name, value in runtime_env(recipe).items():
        if name in base:
            report.append((name, base[name], f"user (recipe: {value})"))
        else:
            env[name] = value
            report.append((name, value, "precision/model/parallel/logging keys" if name == OPTIONS_ENV
                           else "parallel.cuda_graph"))
    if recipe.megatron.code_dir:
        pythonpath = os.pathsep.join(p for p in (base.get("PYTHONPATH", ""), recipe.megatron.code_dir) if p)
        env["PYTHONPATH"] = pythonpath
        report.append(("PYTHONPATH", pythonpath, "megatron.code_dir"))
    return env, report


def entry_target(recipe: Recipe, environ: dict[str, str]) -> list[str]:
    override = environ.get(ENTRY_ENV)
    if override:
        return [override] if override.endswith(".py") else ["-m", override]
    if recipe.megatron.code_dir:
        return [str(Path(recipe.megatron.code_dir) / "pretrain_gpt.py")]
    return ["-m", DEFAULT_ENTRY]


def torchrun_command(recipe: Recipe, environ: dict[str, str]) -> list[str]:
    launch = recipe.launch
    return [
        sys.executable, "-m", "infir2_cpt.runtime.torchrun",  # torchrun with a save-then-exit stop (torchrun.py)
        f"--nnodes={launch.nnodes}",
        f"--nproc-per-node={launch.nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={launch.rdzv_endpoint}",
        f"--rdzv-id={rendezvous_id(recipe)}",
        f"--rdzv-conf=join_timeout={launch.join_timeout}",
        f"--max-restarts={launch.max_restarts}",
        *entry_target(recipe, environ),
    ]


# --------------------------------------------------------------------------- the plan


def plan_run(req: LaunchRequest, environ: dict[str, str] | None = None) -> LaunchPlan:
    """Validate everything and decide what to run. Raises RecipeError/LaunchError with every problem."""
    environ = dict(os.environ if environ is None else environ)
    type_problems: list[Problem] = []
    recipe = load_request_recipe(req, type_problems).recipe
    paths = ExperimentPaths.for_name(recipe.name)
    findings = Findings(config=type_problems)
    findings.extend(drop_consequences(check_config(recipe), type_problems))
    notes: list[str] = []
    decay_source = None
    if req.decay_load is None and recipe.phase == "decay":
        findings.add("recipe", f"'{req.recipe}' is a decay recipe: run it with "
                     f"`infir2 decay --recipe {req.recipe} --load iter_NNNNNNN`", req.recipe)
    if req.decay_load is None:
        load, repair = plan_full_run(recipe, paths, findings, notes)
    else:
        load, repair, decay_source = plan_decay_run(recipe, paths, req.decay_load, findings, notes)
    findings.extend(check_files(recipe, paths))
    findings.extend(check_disk_space(recipe, paths, notes))
    if req.check_gpu and ENTRY_ENV not in environ:  # a replaced entry (tests) needs no GPU
        findings.extend(check_gpu(recipe))
    env, env_report = resolve_env(recipe, environ)
    if recipe.launch.nnodes > 1:  # say what a multi-node launch waits for, and for how long
        notes.append(f"multi-node: {recipe.launch.nnodes} nodes x {recipe.launch.nproc_per_node} processes meet at "
                     f"{recipe.launch.rdzv_endpoint} (rendezvous id {rendezvous_id(recipe)}); run this same command "
                     f"on every node; a node missing after {recipe.launch.join_timeout} s (launch.join_timeout) "
                     f"stops the others with an error")
    train_iters = load.train_iters if load.train_iters is not None else recipe.schedule.train_iters
    warmup = load.warmup_iters if load.warmup_iters is not None else recipe.schedule.warmup_iters
    plan = LaunchPlan(
        recipe=recipe, paths=paths, load=load,
        arg_groups=build_arg_groups(recipe, paths, load, req.extra_args),
        env=env, env_report=env_report, launcher=torchrun_command(recipe, environ), notes=notes,
        findings=findings, tracker_repair=repair,
        schedule_record=schedule_record(recipe, train_iters, warmup), decay_source=decay_source,
    )
    check_cuda_graph_env(plan.megatron_args, {**environ, **env}, findings)
    fatal = findings.config + ([] if req.dry_run else findings.machine)
    if fatal:
        raise LaunchError(fatal, [] if not req.dry_run else findings.machine)
    return plan


# --------------------------------------------------------------------------- printing and exec


def format_command(plan: LaunchPlan) -> str:
    """The environment and the command, shell-quoted, one flag (with its values) per line."""
    lines = [f"export {name}={shlex.quote(value)}" for name, value in plan.env.items()]
    lines.append(" ".join(shlex.quote(a) for a in plan.launcher) + " \\")
    flat = flag_lines(plan.megatron_args)
    for i, line in enumerate(flat):
        lines.append("    " + line + (" \\" if i < len(flat) - 1 else ""))
    return "\n".join(lines)


def flag_lines(args: list[str], prefix: str = "--") -> list[str]:
    """Shell-quoted lines of a command: a new line at every argument starting with `prefix`."""
    lines: list[list[str]] = []
    for arg in args:
        if arg.startswith(prefix) or not lines:
            lines.append([arg])
        else:
            lines[-1].append(arg)
    return [" ".join(shlex.quote(a) for a in line) for line in lines]


def describe(plan: LaunchPlan) -> str:
    out = [f"# infir2: experiment {plan.recipe.name} -> {plan.paths.root}"]
    out += [f"# {note}" for note in plan.notes]
    out.append("# environment (a variable you set yourself wins over the recipe):")
    out += [f"#   {name}={value}  [{source}]" for name, value, source in plan.env_report]
    return "\n".join(out)


def execute(plan: LaunchPlan) -> None:
    """Create exp/<name>/, record the launch there, and exec torchrun. Does not return."""
    paths = plan.paths
    from .locking import acquire_for_launch  # one writer per experiment (locking.py); kept across exec
    acquire_for_launch(paths, nnodes=plan.recipe.launch.nnodes, rdzv_endpoint=plan.recipe.launch.rdzv_endpoint,
                       rdzv_id=rendezvous_id(plan.recipe))
    paths.make_dirs()
    if plan.tracker_repair is not None:
        backup = ck.write_tracker(*plan.tracker_repair)
        done = (f"rewrote {ck.TRACKER} -> {plan.tracker_repair[1]}" if plan.tracker_repair[1] is not None
                else f"set {ck.TRACKER} aside")
        print(f"infir2: {done} (old one kept as {backup})", file=sys.stderr)
    (paths.root / RECIPE_FILE).write_text(recipe_to_yaml(plan.recipe))
    (paths.root / SCHEDULE_FILE).write_text(json.dumps(plan.schedule_record, indent=2) + "\n")
    if plan.decay_source is not None:
        (paths.root / DECAY_SOURCE_FILE).write_text(json.dumps(plan.decay_source, indent=2) + "\n")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    host = socket.gethostname().split(".")[0]
    log_file = paths.logs / f"{stamp}-{host}.log"
    launch_text = describe(plan) + "\n" + format_command(plan) + "\n"
    (paths.root / "launch.sh").write_text("#!/bin/bash\n" + launch_text)
    log_file.write_text(launch_text)
    env = dict(os.environ)
    env.update(plan.env)
    env["INFIR2_LOG_FILE"] = str(log_file)
    env[EXP_DIR_ENV] = str(paths.root)
    print(describe(plan), file=sys.stderr)
    print(f"# console log of this node (all local ranks): {log_file}", file=sys.stderr, flush=True)
    start_console_tee(log_file)
    os.execve(plan.command[0], plan.command, env)


def start_console_tee(log_file: Path) -> None:
    """Copy everything this process (and, after exec, torchrun and its workers) prints to log_file too.

    A forked child reads a pipe that replaces our stdout/stderr and writes to both the terminal and the
    log. It is not our parent, so signals sent to our PID still reach torchrun after the exec; it leaves
    the process group and ignores signals, so a Ctrl-C or a scheduler's SIGTERM to the group cannot kill
    it before the workers' last words (the checkpoint-saved lines) are written. It exits at end of file,
    when the last worker has exited.
    """
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    tee_ignores = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, tee_ignores)  # no signal between fork and SIG_IGN
    if os.fork() == 0:  # the tee
        os.close(write_end)
        os.setsid()
        for signum in tee_ignores:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        terminal = os.dup(1)
        with open(log_file, "ab", buffering=0) as log:
            while chunk := os.read(read_end, 1 << 16):
                log.write(chunk)
                try:
                    os.write(terminal, chunk)
                except OSError:
                    pass  # the terminal went away; keep logging
        os._exit(0)
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    os.close(read_end)
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)

