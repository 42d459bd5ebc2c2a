"""Planning a bench: every variant checked by the launcher's own planner (launch.plan_run, dry run) before
anything runs, with the overrides all variants share (shape, data, schedule, no checkpoints)."""

from __future__ import annotations

import contextlib
import math
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import BenchError, LaunchError, Problem, RecipeError
from ..launch.execute import format_command
from ..launch.plan import LaunchEnv, LaunchPlan, LaunchRequest, plan_run
from ..recipe.load import format_set, parse_set, resolve
from ..recipe.schema import Recipe
from ..recipe.shape import ModelShape
from ..recipe.validate import EXP_NAME_RE
from ..requests import EXTRA_HELP, RECIPE_HELP, SET_HELP, argument, comma_list, option
from .variants import (BUILTIN_VARIANTS, DEFAULT_FIDELITY_VARIANTS, DEFAULT_SPEED_VARIANTS, Variant,
                       load_variants_file, parse_variant_spec, seeded_from, select_variants, with_seed)

QWEN25_VOCAB = 151665  # Qwen2.5's tokenizer (151643 tokens + 22 special tokens)
DEFAULT_SPEED_STEPS = 20
DEFAULT_FIDELITY_STEPS = 500
DEFAULT_MICRO_BATCHES = 8  # speed mode: global batch = micro batch x data-parallel size x 8 (the batch the H200 measurements used)
MEMORY_SNAPSHOT_FILE = "memory_snapshot.pickle"  # per variant, with --memory-snapshot
TRACE_GLOB = "torch_profile/rank-*.json*"  # where Megatron writes the profiler trace, with --profile


@dataclass
class BenchRequest:
    """Everything `infir2 bench` is asked on the command line."""

    recipe: str = option("--recipe", "-r", help=RECIPE_HELP, metavar="NAME|FILE")
    layers: Optional[int] = option("--layers", help="Transformer layers (default: the recipe's).", default=None)
    seq: Optional[int] = option("--seq", help="Sequence length (default: the recipe's).", default=None)
    micro_batch: Optional[int] = option("--micro-batch", help="Micro batch size (default: the recipe's).",
                                        default=None)
    global_batch: Optional[int] = option(
        "--global-batch", help="Global batch size (default: micro batch x data-parallel size x 8; --fidelity: the "
        "recipe's).", default=None)
    steps: Optional[int] = option(  # None: 20 (speed) or 500 (fidelity)
        "--steps", help="Timed iterations after the warm-up (default 20; --fidelity: iterations in all, default "
        "500).", default=None)
    warmup_steps: int = option("--warmup-steps", help="Iterations run before timing starts.", default=5)
    variants: Optional[list[str]] = option(  # names; None: the mode's defaults
        "--variants", help="Comma-separated variants to run, in order (default bf16,fp8-blockwise,fp8-tensorwise; "
        "--fidelity: bf16,fp8-blockwise). Built-ins: see `infir2 bench-variants`.", default=None, parse=comma_list)
    variant_specs: list[str] = option(
        "--variant", metavar="NAME:ITEM,...", help="Define (and run) another variant: ITEMs are section.key=value "
        "overrides, --megatron-flag[=value] and base=VARIANT, e.g. "
        "--variant fp8-mbs2:base=fp8-blockwise,parallel.micro_batch_size=2 (repeatable).", default_factory=list)
    variants_file: Optional[str] = option(
        "--variants-file", metavar="YAML", help="More variants: `variants: {NAME: {base, set, args}}` (run when "
        "named in --variants; without --variants, after the defaults).", default=None)
    baseline: str = option("--baseline", help="The variant the ratios are taken against.", default="bf16")
    also_against: list[str] = option(
        "--also-against", metavar="VARIANT,...", help="Speed mode: more baselines, each with its own time and memory "
        "ratio columns (e.g. bf16-seedflags, BF16 with the seed's flags, for like-for-like figures).",
        default_factory=list, parse=comma_list)
    sets: list[str] = option("--set", "-s", help=SET_HELP, default_factory=list, metavar="KEY=VALUE")
    nproc_per_node: int = option("--nproc-per-node", help="GPUs (processes) per variant.", default=1)
    tensor_parallel: Optional[int] = option(
        "--tensor-parallel", help="TP size (default: gcd of the recipe's TP and --nproc-per-node).", default=None)
    exp_name: Optional[str] = option(
        "--exp", "--exp-name", help="Folder under exp/ for the runs and results (default bench-<date>-<time>).",
        default=None, metavar="NAME")
    gpu_name: Optional[str] = option(
        "--gpu-name", help="GPU name for the peak table (default: torch.cuda.get_device_name).", default=None)
    fidelity: bool = option(
        "--fidelity", help="Train on --data with a fixed seed in each variant and report the final-loss gap to the "
        "baseline (target: within 0.5 %).", default=False)
    data: Optional[str] = option("--data", help="--fidelity: indexed-dataset PREFIX (.bin/.idx).", default=None)
    tokenizer: Optional[str] = option(
        "--tokenizer", help="--fidelity: the tokenizer directory the data was prepared with.", default=None)
    seed: Optional[int] = option("--seed", help="--fidelity: random seed (default: the recipe's).", default=None)
    seeds: list[str] = option(
        "--seeds", metavar="SEED,...", help="--fidelity: run every variant once per seed (named NAME.seedSEED) and "
        "compare mean final losses. One pair of runs cannot resolve a gap smaller than the spread between runs (two "
        "BF16 runs of the tiny model differed by 0.6 %); the table gives each variant's spread across seeds.",
        default_factory=list, parse=comma_list)
    parallel: int = option(
        "--parallel", metavar="N", help="--fidelity: run up to N variants at once on the same GPUs (a small model's "
        "fidelity runs leave a large GPU mostly idle; their step times are then not comparable).", default=1)
    loss_window: int = option("--loss-window", help="--fidelity: final loss = mean of the last N iterations.",
                              default=20)
    profile: bool = option(
        "--profile", help="Run the PyTorch profiler over --profile-steps iterations after the warm-up and break the "
        "trace down by kernel category (timings of a profiled run are slower).", default=False)
    profile_steps: int = option("--profile-steps", help="Iterations profiled.", default=3)
    memory_snapshot: bool = option(
        "--memory-snapshot", help="Record the CUDA allocator's history in every variant and attribute the blocks "
        "live at the memory peak to training phases and call sites (slows the steps: take times from a run without "
        "it).", default=False)
    timeout_minutes: Optional[float] = option(
        "--timeout-minutes", help="Stop a variant that runs longer (it is reported as timed out).", default=None)
    verbose: bool = option("--verbose", "-v", help="Echo every line of the runs, not only iterations.", default=False)
    dry_run: bool = option("--dry-run", help="Validate every variant and print its command; run nothing.",
                           default=False)
    extra_args: list[str] = argument(EXTRA_HELP, default_factory=list, metavar="-- MEGATRON_FLAGS", show_default=False)


@dataclass
class VariantPlan:
    variant: Variant
    sets: list[str]
    extra_args: list[str]
    launch: LaunchPlan
    train_iters: int
    tokens_per_iteration: int
    world_size: int
    shape: ModelShape
    fp8: Optional[str]

    @property
    def name(self) -> str:
        return self.variant.name


@dataclass
class BenchPlan:
    request: BenchRequest
    root: Path
    mode: str  # "speed" | "fidelity"
    steps: int
    train_iters: int
    profile_window: Optional[tuple[int, int]]
    variants: list[VariantPlan]
    warnings: list[Problem] = field(default_factory=list)
    gpu_check: bool = True  # probe the GPU before running (off where $INFIR2_GPU_CHECK=0: CPU stand-in entries)


def _user_keys(sets: Sequence[str]) -> set[str]:
    keys = set()
    for s in sets:
        with contextlib.suppress(RecipeError):
            keys.add(parse_set(s)[0])
    return keys


def _resolve_variants(req: BenchRequest) -> tuple[list[Variant], list[Problem]]:
    """The variants to run and every problem found in them. Without --variants: the mode's defaults, then
    every variant of --variants-file; --variant ones always run."""
    problems: list[Problem] = []
    from_file: list[Variant] = []
    specs: list[Variant] = []
    known = dict(BUILTIN_VARIANTS)
    if req.variants_file:
        try:
            from_file = load_variants_file(Path(req.variants_file), known)
        except BenchError as exc:
            problems += exc.problems
        known.update({v.name: v for v in from_file})
    for spec in req.variant_specs:
        try:
            variant = parse_variant_spec(spec, known)
        except BenchError as exc:
            problems += exc.problems
            continue
        specs.append(variant)
        known[variant.name] = variant
    if req.variants is not None:
        names = list(req.variants)
    else:
        names = [*(DEFAULT_FIDELITY_VARIANTS if req.fidelity else DEFAULT_SPEED_VARIANTS), *(v.name for v in from_file)]
    try:
        return select_variants(names, specs, from_file), problems
    except BenchError as exc:
        chosen = dict.fromkeys([*(n for n in names if n in known), *(v.name for v in specs)])
        return [known[n] for n in chosen], problems + [p for p in exc.problems
                                                       if p.message != "no variant selected" or not problems]


def _check_numbers(req: BenchRequest) -> list[Problem]:
    problems = []
    for key, value, low in (("--layers", req.layers, 1), ("--seq", req.seq, 1), ("--micro-batch", req.micro_batch, 1),
                            ("--global-batch", req.global_batch, 1), ("--steps", req.steps, 1),
                            ("--warmup-steps", req.warmup_steps, 0), ("--nproc-per-node", req.nproc_per_node, 1),
                            ("--tensor-parallel", req.tensor_parallel, 1), ("--loss-window", req.loss_window, 1),
                            ("--profile-steps", req.profile_steps, 1), ("--parallel", req.parallel, 1)):
        if value is not None and value < low:
            problems.append(Problem(key, f"must be >= {low}", value))
    if req.timeout_minutes is not None and req.timeout_minutes <= 0:
        problems.append(Problem("--timeout-minutes", "must be > 0", req.timeout_minutes))
    if req.fidelity:
        if not req.data:
            problems.append(Problem("--data", "--fidelity trains on a prepared dataset: give its PREFIX "
                                    "(PREFIX.bin/.idx, as written by infir2 prepare-data)"))
        if not req.tokenizer:
            problems.append(Problem("--tokenizer", "--fidelity needs the tokenizer directory the data was made with"))
    elif req.data or req.tokenizer:
        problems.append(Problem("--data" if req.data else "--tokenizer", "only with --fidelity (speed runs use "
                                "mock data)"))
    if req.parallel > 1 and not req.fidelity:
        problems.append(Problem("--parallel", "only with --fidelity (timed runs need the GPU to themselves)",
                                req.parallel))
    if req.seeds:
        bad = [s for s in req.seeds if not s.isdigit()]
        if not req.fidelity:
            problems.append(Problem("--seeds", "only with --fidelity", ",".join(req.seeds)))
        elif bad:
            problems.append(Problem("--seeds", "must be non-negative integers, comma-separated", ",".join(bad)))
        elif len(set(req.seeds)) != len(req.seeds) or len(req.seeds) < 2:
            problems.append(Problem("--seeds", "needs two or more different seeds (one seed: --seed)",
                                    ",".join(req.seeds)))
        if req.seed is not None:
            problems.append(Problem("--seed", "give either --seed or --seeds", req.seed))
    if req.exp_name is not None and not EXP_NAME_RE.match(req.exp_name):
        problems.append(Problem("--exp", "must be one folder name (letters, digits, ._+=-)", req.exp_name))
    return problems


def bench_sets(recipe: Recipe, req: BenchRequest, steps: int, train_iters: int) -> list[str]:
    """The overrides every variant shares: shape, data, schedule, no checkpoints, per-iteration logging.
    `recipe` is the recipe with the user's --set applied; keys the user set are left to the user."""
    user = _user_keys(req.sets)
    out: list[str] = []

    def put(key: str, value: Any) -> None:
        if key not in user:
            out.append(format_set(key, value))

    if req.fidelity:
        put("data.mock", False)
        put("data.blend", [{"path": req.data, "weight": 1.0}])
        put("data.split", "99,1,0")
        put("tokenizer.type", "HuggingFaceTokenizer")
        put("tokenizer.model", req.tokenizer)
    else:
        put("data.mock", True)
        put("data.blend", [])
        put("data.num_workers", 2)
        if recipe.tokenizer.type != "NullTokenizer":
            put("tokenizer.type", "NullTokenizer")
            put("tokenizer.model", None)
            put("model.vocab_size", QWEN25_VOCAB)
    if req.layers is not None:
        put("model.num_layers", req.layers)
    if req.seq is not None:
        put("model.seq_length", req.seq)
        put("model.max_position_embeddings", req.seq)
    tp = req.tensor_parallel or math.gcd(recipe.parallel.tensor_parallel, req.nproc_per_node)
    put("parallel.tensor_parallel", tp)
    put("parallel.sequence_parallel", bool(recipe.parallel.sequence_parallel and tp > 1))
    micro = req.micro_batch or recipe.parallel.micro_batch_size
    if req.micro_batch is not None:
        put("parallel.micro_batch_size", micro)
    if req.global_batch is not None:
        put("parallel.global_batch_size", req.global_batch)
    elif not req.fidelity:
        model_parallel = tp * recipe.parallel.pipeline_parallel * recipe.parallel.context_parallel
        dp = max(req.nproc_per_node // model_parallel, 1)
        put("parallel.global_batch_size", micro * dp * DEFAULT_MICRO_BATCHES)
    put("schedule.train_iters", train_iters)
    if req.fidelity:
        s = recipe.schedule
        if s.warmup_iters + s.decay_iters > train_iters:
            put("schedule.warmup_iters", train_iters // 10)
            put("schedule.decay_iters", max(train_iters // 5, 1))
        if req.seed is not None:
            put("schedule.seed", req.seed)
    else:
        put("schedule.warmup_iters", min(req.warmup_steps, train_iters - 1))
        put("schedule.decay_iters", 1)
    put("checkpoint.pretrained", None)
    put("checkpoint.async_save", False)
    put("checkpoint.save", False)
    put("logging.log_interval", 1)
    put("logging.eval_iters", 0)
    put("logging.eval_interval", max(1000, train_iters + 1))
    put("logging.tensorboard", True)
    put("logging.wandb_project", None)
    put("logging.params_norm", False)
    put("logging.num_zeros_in_grad", False)
    put("logging.profile", False)
    put("launch.exit_duration_minutes", None)
    put("launch.max_restarts", 0)
    return out


def bench_extra_args(train_iters: int, profile_window: Optional[tuple[int, int]]) -> list[str]:
    """Megatron flags every variant gets, after the recipe's (last one wins).

    No checkpoint is written (checkpoint.save=false, set in the overrides: no --save at all, so not even
    Megatron's final checkpoint, and no free-space check). --log-memory-interval T prints Megatron's memory report at
    the last iteration too, so `max allocated`/`max reserved` cover the whole run, not only the first two
    iterations where Megatron reports it by default.
    """
    args = ["--log-memory-interval", str(train_iters)]
    if profile_window is not None:
        start, end = profile_window
        args += ["--profile", "--use-pytorch-profiler", "--profile-step-start", str(start),
                 "--profile-step-end", str(end), "--profile-ranks", "0"]
    return args


def memory_snapshot_args(variant_root: Path) -> list[str]:
    """Megatron records the allocator's history from model construction on and rewrites the snapshot at every
    logged iteration, so the file left is the last iteration's (its event window ends there)."""
    return ["--record-memory-history", "--memory-snapshot-path", str(variant_root / MEMORY_SNAPSHOT_FILE)]


def plan_bench(req: BenchRequest, env: Optional[LaunchEnv] = None) -> BenchPlan:
    """Resolve and validate every variant with infir2's own planner; raises BenchError listing every problem.
    Touches nothing: no folder is created, no GPU is used. `env`: the launch host's (default: read now); every
    variant is planned under <experiments root>/<bench name>."""
    env = LaunchEnv.read() if env is None else env
    problems = _check_numbers(req)
    mode = "fidelity" if req.fidelity else "speed"
    steps = req.steps or (DEFAULT_FIDELITY_STEPS if req.fidelity else DEFAULT_SPEED_STEPS)
    train_iters = steps if req.fidelity else req.warmup_steps + steps
    profile_window = None
    if req.profile:
        start = max(req.warmup_steps, 1)
        profile_window = (start, start + req.profile_steps)
        train_iters = max(train_iters, profile_window[1] + 2)
    variants, variant_problems = _resolve_variants(req)
    if req.seeds and not problems:
        variants = [with_seed(v, int(s)) for s in req.seeds for v in variants]  # seed by seed: partial results pair up
    try:
        resolved = resolve(req.recipe, req.sets)
    except RecipeError as exc:
        raise BenchError(problems + variant_problems + exc.problems) from None
    base = resolved.recipe
    problems += resolved.problems
    if problems:  # numbers or --set wrong: planning the variants would only repeat them
        raise BenchError(problems + variant_problems)
    problems = variant_problems
    name = req.exp_name or time.strftime("bench-%Y%m%d-%H%M%S")
    root = env.exp_root / name
    common_sets = bench_sets(base, req, steps, train_iters)
    common_extra = bench_extra_args(train_iters, profile_window)
    plans: list[VariantPlan] = []
    warnings: list[Problem] = []
    variant_env = replace(env, exp_root=root)
    for variant in variants:
        sets = [*common_sets, *req.sets, *variant.sets]
        extra = [*common_extra, *req.extra_args, *variant.extra_args,
                 *(memory_snapshot_args(root / variant.name) if req.memory_snapshot else [])]
        launch_req = LaunchRequest(recipe=req.recipe, sets=sets, extra_args=extra, nnodes=1,
                                   nproc_per_node=req.nproc_per_node, rdzv_endpoint="localhost:29400",
                                   exp=variant.name, dry_run=True, check_gpu=False)  # probed once: gpu_check
        try:
            launch = plan_run(launch_req, variant_env)
        except (RecipeError, LaunchError) as exc:
            problems += [Problem(f"[{variant.name}] {p.key}", p.message, p.value) for p in exc.problems]
            continue
        machine = [Problem(f"[{variant.name}] {p.key}", p.message, p.value) for p in launch.findings.machine]
        if req.dry_run:
            warnings += machine
        else:
            problems += machine
            if launch.paths.root.exists():
                problems.append(Problem(f"[{variant.name}]", f"{launch.paths.root} already exists: choose another "
                                        "--exp", name))
        r = launch.recipe
        world = r.launch.nnodes * r.launch.nproc_per_node
        plans.append(VariantPlan(variant=variant, sets=sets, extra_args=extra, launch=launch, train_iters=train_iters,
                                 tokens_per_iteration=r.parallel.global_batch_size * r.model.seq_length,
                                 world_size=world, shape=ModelShape.from_recipe(r),
                                 fp8=r.precision.fp8))
    run_names = [seeded_from(v.name)[0] for v in variants]
    if req.baseline not in run_names:
        warnings.append(Problem("--baseline", f"'{req.baseline}' is not among the variants run: no ratios",
                                req.baseline))
    for other in req.also_against:
        if other not in run_names:
            problems.append(Problem("--also-against", f"'{other}' is not among the variants run; run it with "
                                    f"--variants ...,{other}", other))
    if req.also_against and req.fidelity:
        problems.append(Problem("--also-against", "speed mode only: a fidelity run compares losses with --baseline",
                                ",".join(req.also_against)))
    if req.fidelity and "checkpoint.pretrained" not in _user_keys(req.sets):
        warnings.append(Problem("--fidelity", "from random weights, two runs of the same arithmetic drifted 1-2 % "
                                "apart in 500 steps of the tiny recipe, more than the 0.5 % target: start every "
                                "variant from a trained model with --set checkpoint.pretrained=DIR (docs/bench.md)"))
    if req.memory_snapshot:
        warnings.append(Problem("--memory-snapshot", "recording the allocator's history slows every iteration (a "
                                "Python stack per allocation, a snapshot written per logged iteration): compare "
                                "memory from this run, step times from a run without it"))
    if not req.fidelity and req.warmup_steps < 2:
        warnings.append(Problem("--warmup-steps", "Megatron's second logged iteration still averages in the "
                                "first one; time from iteration 3 on (--warmup-steps 2 or more)", req.warmup_steps))
    if problems:
        raise BenchError(problems)
    return BenchPlan(request=req, root=root, mode=mode, steps=steps, train_iters=train_iters,
                     profile_window=profile_window, variants=plans, warnings=warnings, gpu_check=env.gpu_check)


def child_command(req: BenchRequest, vp: VariantPlan, port: int) -> list[str]:
    """The `infir2 train` command that runs one variant (through the real launcher and entry)."""
    cmd = [sys.executable, "-m", "infir2_cpt.cli", "train", "--recipe", req.recipe]
    for assignment in vp.sets:
        cmd += ["--set", assignment]
    cmd += ["--exp", vp.name, "--nnodes", "1", "--nproc-per-node", str(req.nproc_per_node),
            "--rdzv-endpoint", f"localhost:{port}"]
    if vp.extra_args:
        cmd += ["--", *vp.extra_args]
    return cmd


def describe_plan(plan: BenchPlan) -> str:
    """What --dry-run prints: each variant's `infir2 train` command and the Megatron command it becomes."""
    req = plan.request
    out = [f"# infir2 bench ({plan.mode}): {len(plan.variants)} variant(s), one after the other, under {plan.root}",
           f"# {req.recipe}: {plan.train_iters} iterations each"
           + (f", timed after {req.warmup_steps} warm-up iterations" if plan.mode == "speed" else "")
           + (f"; PyTorch profiler on iterations {plan.profile_window[0]}-{plan.profile_window[1]}"
              if plan.profile_window else "")]
    for warning in plan.warnings:
        out.append(f"# warning: {warning}")
    for vp in plan.variants:
        out.append("")
        out.append(f"## variant {vp.name}: {vp.variant.description}")
        out.append(f"# INFIR2_EXP_ROOT={shlex.quote(str(plan.root))}  (the rendezvous port: a free one, chosen at launch)")
        out.append(shlex.join(child_command(req, vp, 29400)).replace(" --set ", " \\\n    --set "))
        out.append("# which launches:")
        out.append(format_command(vp.launch))
    return "\n".join(out)
