"""`infir2 bench`: FP8 against BF16 (and any other variant) through the real launcher and training loop.

Each variant is one `infir2 train` run in a child process (torchrun -> infir2_cpt.runtime.entry -> Megatron's
pretrain), on mock data (or, with --fidelity, on a prepared dataset), one after the other, each in its own
experiment folder exp/bench-<timestamp>/<variant>. Every figure comes from Megatron's own log lines
(runlog.py): iteration time, Megatron's TFLOP/s/GPU, the memory report, the loss. On top of them this
module computes tokens/s per GPU, model FLOPs with an explicit formula (ModelShape.flops_per_sequence), MFU against the
GPU's dense peak for the variant's precision, and ratios against a baseline variant (BF16).

Also here: a time breakdown of a PyTorch-profiler trace by kernel category (trace_breakdown), used by
`infir2 bench --profile` and `infir2 bench --breakdown TRACE`. `--memory-snapshot` records the CUDA
allocator's history in every variant and attributes the peak (memory_snapshot.py).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import yaml

from ..launch.execute import format_command
from ..launch.plan import LaunchEnv, LaunchPlan, LaunchRequest, plan_run
from .memory import REPORT_PHASES, snapshot_breakdown
from ..recipe.shape import ModelShape
from ..errors import BenchError, LaunchError, Problem, RecipeError
from ..recipe.schema import Recipe
from ..recipe.load import parse_set, resolve
from ..recipe.validate import EXP_NAME_RE
from ..reports.runlog import RunLog, parse_log

QWEN25_VOCAB = 151665  # Qwen2.5's tokenizer (151643 tokens + 22 special tokens)
DEFAULT_SPEED_STEPS = 20
DEFAULT_FIDELITY_STEPS = 500
DEFAULT_MICRO_BATCHES = 8  # speed mode: global batch = micro batch x data-parallel size x 8 (as the GPU probe)
FIDELITY_TARGET = 0.01  # |FP8 final loss / BF16 final loss - 1| <= 1 %
RESULTS_FILE = "bench.json"
TABLE_FILE = "table.md"
PLOT_FILE = "bench.png"
BREAKDOWN_PLOT_FILE = "breakdown.png"
TRACE_GLOB = "torch_profile/rank-*.json*"
MEMORY_SNAPSHOT_FILE = "memory_snapshot.pickle"




# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """A named set of recipe overrides (`--set` assignments) and extra Megatron flags."""

    name: str
    sets: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    description: str = ""


_SEED_FP8_FLAGS = ("precision.fp8_param_gather=true", "precision.precision_aware_optimizer=true")

BUILTIN_VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("bf16", ("precision.fp8=null",),
            description="BF16: no FP8; the recipe's optimizer settings (precision-aware optimizer as the recipe)"),
    Variant("bf16-nopao", ("precision.fp8=null", "precision.precision_aware_optimizer=false"),
            description="BF16 with the plain distributed optimizer (no precision-aware optimizer)"),
    Variant("fp8-blockwise", ("precision.fp8=blockwise", "precision.fp8_format=e4m3", *_SEED_FP8_FLAGS),
            description="FP8 blockwise E4M3 (1x128 activations, 128x128 weights) + the seed's flags: "
                        "--fp8-param-gather --use-precision-aware-optimizer"),
    Variant("fp8-tensorwise", ("precision.fp8=tensorwise", "precision.fp8_format=e4m3", *_SEED_FP8_FLAGS),
            description="FP8 per-tensor current scaling E4M3 + the seed's flags"),
    Variant("fp8-delayed", ("precision.fp8=delayed", "precision.fp8_format=hybrid", *_SEED_FP8_FLAGS),
            description="FP8 delayed scaling, hybrid format (E4M3 forward, E5M2 gradients) + the seed's flags"),
    Variant("fp8-mxfp8", ("precision.fp8=mxfp8", "precision.fp8_format=e4m3", *_SEED_FP8_FLAGS),
            description="MXFP8 (Blackwell only) + the seed's flags"),
)}
DEFAULT_SPEED_VARIANTS = ("bf16", "fp8-blockwise", "fp8-tensorwise")
DEFAULT_FIDELITY_VARIANTS = ("bf16", "fp8-blockwise")

# An item of a --variant spec starts a new item at a comma only when what follows looks like one:
# `section.key=`, `base=` or `--flag`; so values may hold commas (`data.split=99,1,0`).
_ITEM_SPLIT_RE = re.compile(r",(?=\s*(?:--|[A-Za-z_][\w.]*\s*=))")


def parse_variant_spec(spec: str, known: Mapping[str, Variant]) -> Variant:
    """`[name=]NAME:ITEM,ITEM,...` -> Variant. An ITEM is `section.key=value` (a recipe override, as --set),
    `--megatron-flag` or `--megatron-flag=value` (passed to Megatron verbatim), or `base=VARIANT` (start
    from that variant's overrides; a built-in or an earlier --variant). `NAME` alone is a variant with no
    overrides: the recipe as it is, under the bench's shape."""
    text = spec.strip()
    if text.startswith("name="):
        text = text[len("name="):]
    name, _, body = text.partition(":")
    name = name.strip()
    problems: list[Problem] = []
    if not EXP_NAME_RE.match(name):
        problems.append(Problem("--variant", "NAME must be one folder name (letters, digits, ._+=-)", spec))
    sets: list[str] = []
    extra: list[str] = []
    base_names: list[str] = []
    for item in (i.strip() for i in _ITEM_SPLIT_RE.split(body) if i.strip()) if body.strip() else ():
        if item.startswith("--"):
            extra.append(item)
        elif item.startswith("base="):
            base_name = item[len("base="):].strip()
            base = known.get(base_name)
            if base is None:
                problems.append(Problem("--variant", f"unknown base variant '{base_name}' (known: "
                                        f"{', '.join(known)})", spec))
                continue
            sets = [*base.sets, *sets]
            extra = [*base.extra_args, *extra]
            base_names.append(base.name)
        elif "=" in item:
            sets.append(item)
        else:
            problems.append(Problem("--variant", f"item '{item}' is neither SECTION.KEY=VALUE, base=VARIANT "
                                    "nor a --megatron-flag", spec))
    if problems:
        raise BenchError(problems)
    own = [i.strip() for i in _ITEM_SPLIT_RE.split(body) if i.strip() and not i.strip().startswith("base=")]
    shown = " + ".join([*base_names, ", ".join(own)] if own else base_names) or "the recipe as is"
    return Variant(name, tuple(sets), tuple(extra), description=shown)


def load_variants_file(path: Path, known: Mapping[str, Variant]) -> list[Variant]:
    """Variants from YAML:

        variants:
          fp8-mbs2:
            base: fp8-blockwise          # optional: start from this variant
            set: {parallel.micro_batch_size: 2}   # or a list of "section.key=value"
            args: ["--manual-gc"]        # extra Megatron flags
            description: micro batch 2
    """
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BenchError([Problem("--variants-file", f"cannot read: {exc}", str(path))]) from None
    entries = data.get("variants") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise BenchError([Problem("--variants-file", "expected a mapping `variants: {NAME: {base, set, args}}`",
                                  str(path))])
    known = dict(known)
    out: list[Variant] = []
    problems: list[Problem] = []
    for name, body in entries.items():
        body = body or {}
        where = f"{path.name}: variants.{name}"
        if not isinstance(body, dict) or set(body) - {"base", "set", "args", "description"}:
            problems.append(Problem(where, "expected a mapping with keys base, set, args, description"))
            continue
        sets, extra = [], []
        if body.get("base") is not None:
            base = known.get(str(body["base"]))
            if base is None:
                problems.append(Problem(where, f"unknown base variant '{body['base']}'"))
                continue
            sets, extra = list(base.sets), list(base.extra_args)
        raw_sets = body.get("set") or []
        if isinstance(raw_sets, dict):
            sets += [f"{k}={json.dumps(v)}" for k, v in raw_sets.items()]
        elif isinstance(raw_sets, list):
            sets += [str(s) for s in raw_sets]
        else:
            problems.append(Problem(where, "set: expected a mapping or a list of SECTION.KEY=VALUE"))
        raw_args = body.get("args") or []
        if not isinstance(raw_args, list):
            problems.append(Problem(where, "args: expected a list of Megatron flags"))
        else:
            extra += [str(a) for a in raw_args]
        if not EXP_NAME_RE.match(str(name)):
            problems.append(Problem(where, "the name must be one folder name (letters, digits, ._+=-)"))
        variant = Variant(str(name), tuple(sets), tuple(extra),
                          str(body.get("description") or ", ".join([*sets, *extra]) or "the recipe as is"))
        known[variant.name] = variant
        out.append(variant)
    if problems:
        raise BenchError(problems)
    return out


def select_variants(names: Sequence[str], always: Sequence[Variant] = (),
                    definitions: Sequence[Variant] = ()) -> list[Variant]:
    """The variants to run, in order: the named ones (built-in, or defined in `definitions` or `always`), then
    the `always` ones (command-line --variant) not named. A definition (from --variants-file) runs only when
    named."""
    defined = [*definitions, *always]
    known = {**BUILTIN_VARIANTS, **{v.name: v for v in defined}}
    problems = [Problem("--variants", f"unknown variant (built-in: {', '.join(BUILTIN_VARIANTS)}; or define it "
                        "with --variant NAME:ITEMS or in --variants-file)", n) for n in names if n not in known]
    names_defined = [v.name for v in defined]
    problems += [Problem("--variant", "defined twice", d) for d in sorted({n for n in names_defined
                                                                          if names_defined.count(n) > 1})]
    chosen = list(dict.fromkeys([*(n for n in names if n in known), *(v.name for v in always)]))
    if not chosen and not problems:
        problems.append(Problem("--variants", "no variant selected"))
    if problems:
        raise BenchError(problems)
    return [known[n] for n in chosen]


# --------------------------------------------------------------------------- GPU peaks


@dataclass(frozen=True)
class GpuPeak:
    label: str
    bf16_tflops: float
    fp8_tflops: Optional[float]


# Dense (no sparsity) tensor-core peaks, TFLOP/s per GPU, from the vendor's data sheets. First match wins.
GPU_PEAKS: tuple[tuple[str, GpuPeak], ...] = (
    (r"gb200", GpuPeak("GB200", 2500, 5000)),
    (r"b200", GpuPeak("B200", 2250, 4500)),
    (r"h200.*nvl", GpuPeak("H200 NVL", 835, 1671)),
    (r"h200", GpuPeak("H200 SXM", 989, 1979)),
    (r"h100.*nvl", GpuPeak("H100 NVL", 835, 1671)),
    (r"h100.*pcie", GpuPeak("H100 PCIe", 756, 1513)),
    (r"h100|h800", GpuPeak("H100/H800 SXM", 989, 1979)),
    (r"\bh20\b", GpuPeak("H20", 148, 296)),
    (r"a100|a800", GpuPeak("A100", 312, None)),
)


def gpu_peak(name: Optional[str]) -> Optional[GpuPeak]:
    """The dense BF16/FP8 peaks of a GPU by its CUDA device name; None for an unknown GPU."""
    if not name:
        return None
    lowered = name.lower()
    return next((peak for pattern, peak in GPU_PEAKS if re.search(pattern, lowered)), None)


def peak_for(peak: Optional[GpuPeak], fp8: Optional[str]) -> Optional[float]:
    """The peak that bounds a variant: the FP8 one for an FP8 recipe, else BF16."""
    if peak is None:
        return None
    return peak.fp8_tflops if fp8 else peak.bf16_tflops


# --------------------------------------------------------------------------- the request and its plan


@dataclass
class BenchRequest:
    """Everything `infir2 bench` was asked on the command line."""

    recipe: str
    variants: Optional[list[str]] = None  # names; None: the mode's defaults
    variant_specs: list[str] = field(default_factory=list)  # --variant NAME:ITEMS
    variants_file: Optional[str] = None
    layers: Optional[int] = None
    seq: Optional[int] = None
    micro_batch: Optional[int] = None
    global_batch: Optional[int] = None
    steps: Optional[int] = None  # None: 20 (speed) or 500 (fidelity)
    warmup_steps: int = 5
    sets: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    nproc_per_node: int = 1
    tensor_parallel: Optional[int] = None
    exp_name: Optional[str] = None
    baseline: str = "bf16"
    gpu_name: Optional[str] = None
    fidelity: bool = False
    data: Optional[str] = None
    tokenizer: Optional[str] = None
    seed: Optional[int] = None
    loss_window: int = 20
    profile: bool = False
    profile_steps: int = 3
    memory_snapshot: bool = False
    timeout_minutes: Optional[float] = None
    dry_run: bool = False
    verbose: bool = False


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


def _value(key: str, value: Any) -> str:
    """A --set assignment whose value YAML reads back exactly (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


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
                            ("--profile-steps", req.profile_steps, 1)):
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
    if req.exp_name is not None and not EXP_NAME_RE.match(req.exp_name):
        problems.append(Problem("--exp-name", "must be one folder name (letters, digits, ._+=-)", req.exp_name))
    return problems


def bench_sets(recipe: Recipe, req: BenchRequest, steps: int, train_iters: int) -> list[str]:
    """The overrides every variant shares: shape, data, schedule, no checkpoints, per-iteration logging.
    `recipe` is the recipe with the user's --set applied; keys the user set are left to the user."""
    user = _user_keys(req.sets)
    out: list[str] = []

    def put(key: str, value: Any) -> None:
        if key not in user:
            out.append(_value(key, value))

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
                                        "--exp-name", name))
        r = launch.recipe
        world = r.launch.nnodes * r.launch.nproc_per_node
        plans.append(VariantPlan(variant=variant, sets=sets, extra_args=extra, launch=launch, train_iters=train_iters,
                                 tokens_per_iteration=r.parallel.global_batch_size * r.model.seq_length,
                                 world_size=world, shape=ModelShape.from_recipe(r),
                                 fp8=r.precision.fp8))
    if req.baseline not in [v.name for v in variants]:
        warnings.append(Problem("--baseline", f"'{req.baseline}' is not among the variants run: no ratios",
                                req.baseline))
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


# --------------------------------------------------------------------------- GPU probe (a child process)


def gpu_check(checks: list[dict[str, Any]], timeout: float = 180.0) -> tuple[Optional[str], list[Problem]]:
    """Device name and infir2's GPU preflight (validation.check_gpu) for each (nproc, fp8), in a short child
    process, so that this process, which outlives every run, never holds a CUDA context."""
    cmd = [sys.executable, "-m", "infir2_cpt.bench.plan", "gpu-check", json.dumps(checks)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError, OSError) as exc:
        return None, [Problem("gpu", f"cannot probe the GPU: {exc}")]
    problems = [Problem(p["key"], p["message"], p.get("value")) for p in report.get("problems", [])]
    return report.get("name"), problems


def _gpu_check_main(payload: str) -> None:
    from ..recipe.validate import check_gpu

    report: dict[str, Any] = {"name": None, "problems": []}
    try:
        import torch

        if torch.cuda.is_available():
            report["name"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        report["problems"].append({"key": "gpu", "message": f"torch: {exc}"})
    seen = set()
    for check in json.loads(payload):
        recipe = Recipe()
        recipe.launch.nproc_per_node = int(check["nproc"])
        recipe.precision.fp8 = check.get("fp8")
        for problem in check_gpu(recipe).machine:
            item = (problem.key, problem.message, str(problem.value))
            if item not in seen:
                seen.add(item)
                report["problems"].append({"key": problem.key, "message": problem.message, "value": problem.value})
    print(json.dumps(report))


# --------------------------------------------------------------------------- running


@dataclass
class VariantRun:
    name: str
    command: list[str]
    exit_code: Optional[int]
    console: str
    timed_out: bool = False
    seconds: float = 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PROGRESS_RE = re.compile(r"iteration\s+\d+/\s*\d+\s*\|")


def _progress_line(name: str, line: str) -> Optional[str]:
    """A compact echo of Megatron's iteration lines (and errors) while a variant runs."""
    if _PROGRESS_RE.search(line):
        log = parse_log(line)
        if log.iterations:
            it = log.iterations[0]
            parts = [f"iteration {it.iteration}/{it.train_iters}"]
            if it.iter_ms is not None:
                parts.append(f"{it.iter_ms:.1f} ms")
            if "throughput per GPU (TFLOP/s/GPU)" in it.values:
                parts.append(f"{it.values['throughput per GPU (TFLOP/s/GPU)']:.1f} TFLOP/s/GPU")
            if it.loss is not None:
                parts.append(f"loss {it.loss:.4f}")
            return f"[{name}] " + " | ".join(parts)
    if re.search(r"Traceback|Error|error:|OutOfMemory|problem\(s\)", line):
        return f"[{name}] {line.rstrip()}"
    return None


def run_variant(req: BenchRequest, plan: BenchPlan, vp: VariantPlan,
                echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> VariantRun:
    """Run one variant as `infir2 train` in a child process; its console goes to <variant>/bench-console.log."""
    folder = plan.root / vp.name
    folder.mkdir(parents=True, exist_ok=True)
    cmd = child_command(req, vp, free_port())
    env = dict(os.environ)
    env["INFIR2_EXP_ROOT"] = str(plan.root)
    env.setdefault("PYTHONUNBUFFERED", "1")
    console_path = folder / "bench-console.log"
    lines: list[str] = []
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, text=True, errors="replace", bufsize=1)

    def pump() -> None:
        assert proc.stdout is not None
        with open(console_path, "w") as console:
            for line in proc.stdout:
                console.write(line)
                console.flush()
                lines.append(line)
                shown = line.rstrip() if req.verbose else _progress_line(vp.name, line)
                if shown:
                    echo(shown if not req.verbose else f"[{vp.name}] {shown}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    limit = req.timeout_minutes * 60 if req.timeout_minutes else None
    try:
        proc.wait(timeout=limit)
    except KeyboardInterrupt:  # Ctrl-C reached the child too (same process group): let it stop cleanly
        try:
            proc.wait(timeout=120)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
        raise
    except subprocess.TimeoutExpired:
        timed_out = True
        echo(f"[{vp.name}] over {req.timeout_minutes} min: stopping it (SIGTERM, then SIGKILL after 120 s)")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join(timeout=60)  # the console tee exits once the last worker has closed the pipe
    return VariantRun(name=vp.name, command=cmd, exit_code=proc.returncode, console="".join(lines),
                      timed_out=timed_out, seconds=time.monotonic() - started)


# --------------------------------------------------------------------------- results


_PADDED_VOCAB_RE = re.compile(r"padded vocab \(size: (\d+)\) with (\d+) dummy tokens \(new size: (\d+)\)")
THROUGHPUT_KEY = "throughput per GPU (TFLOP/s/GPU)"


def padded_vocab_from_log(text: str) -> Optional[int]:
    match = None
    for match in _PADDED_VOCAB_RE.finditer(text):
        pass
    return int(match.group(3)) if match else None


# Timed steps of one variant on a GPU that nothing else uses differ by 1-2.5 % (7B shape on an H200, runs A, B
# and D of docs/benchmarks.md); the disturbed 1.5B run (another job on the host) spread by 9-46 %.
NOISY_SPREAD = 0.05


def step_spread(metrics: Mapping[str, Any]) -> Optional[float]:
    """(slowest - fastest timed step) / median step: how steady the timed steps were."""
    lo, hi, mid = metrics.get("step_ms_min"), metrics.get("step_ms_max"), metrics.get("step_ms")
    return (hi - lo) / mid if lo is not None and hi is not None and mid else None


def noise_warning(name: str, metrics: Mapping[str, Any]) -> Optional[str]:
    """A warning when a variant's timed steps spread more than NOISY_SPREAD, else None."""
    spread = metrics.get("step_ms_spread")
    if spread is None or spread <= NOISY_SPREAD:
        return None
    return (f"{name}: timed steps spread {spread:.0%} (fastest {metrics['step_ms_min']:.0f} ms, slowest "
            f"{metrics['step_ms_max']:.0f} ms; steady runs stay under {NOISY_SPREAD:.0%}), so its median step time "
            "and ratios are unreliable. Either another job shares this GPU or host (re-run it alone), or the step "
            "is partly host-bound (a small model; FP8 adds host work per GEMM): then compare the fastest steps "
            "too (the 'fastest ms' column)")


def _ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    return value / base if value is not None and base else None


def variant_metrics(log: RunLog, warmup_steps: int, tokens_per_iteration: int, world_size: int,
                    flops_per_iteration: Optional[float], peak_tflops: Optional[float],
                    loss_window: int = 20) -> dict[str, Any]:
    """The figures of one run from Megatron's log: steady-state (after warm-up) medians, peak memory, loss."""
    its = log.iterations
    steady = [it for it in its if it.iteration > warmup_steps and it.iter_ms]
    step_ms = statistics.median(it.iter_ms for it in steady) if steady else None  # type: ignore[misc]
    megatron_tflops = [it.values[THROUGHPUT_KEY] for it in steady if THROUGHPUT_KEY in it.values]
    ours = (flops_per_iteration / (step_ms / 1000.0) / world_size / 1e12) if step_ms and flops_per_iteration else None
    mfu_basis = ours if ours is not None else (statistics.median(megatron_tflops) if megatron_tflops else None)
    losses = [it.loss for it in its if it.loss is not None]
    window = losses[-loss_window:]
    timing = {
        "step_ms": step_ms,
        "step_ms_min": min(it.iter_ms for it in steady) if steady else None,  # type: ignore[type-var]
        "step_ms_max": max(it.iter_ms for it in steady) if steady else None,  # type: ignore[type-var]
    }
    return {
        "iterations_logged": len(its),
        "timed_iterations": len(steady),
        **timing,
        "step_ms_spread": step_spread(timing),
        "tokens_per_s_per_gpu": tokens_per_iteration / (step_ms / 1000.0) / world_size if step_ms else None,
        "megatron_tflops_per_gpu": statistics.median(megatron_tflops) if megatron_tflops else None,
        "model_tflops_per_gpu": ours,
        "mfu": mfu_basis / peak_tflops if mfu_basis is not None and peak_tflops else None,
        "peak_tflops": peak_tflops,
        "max_allocated_gib": log.max_allocated_mb / 1024 if log.max_allocated_mb else None,
        "max_reserved_gib": log.max_reserved_mb / 1024 if log.max_reserved_mb else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "final_loss_window": statistics.fmean(window) if window else None,
        "loss_window": len(window),
        "checkpoints_saved": list(log.saved),
    }


RATIO_KEYS = (("step_time", "step_ms"), ("fastest_step_time", "step_ms_min"), ("tokens_per_s", "tokens_per_s_per_gpu"),
              ("tflops", "megatron_tflops_per_gpu"), ("max_allocated", "max_allocated_gib"),
              ("max_reserved", "max_reserved_gib"))


def ratios(metrics: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Optional[float]]:
    """Each figure divided by the baseline's (x BF16): step time 0.80 means 20 % faster."""
    return {key: _ratio(metrics.get(src), baseline.get(src)) for key, src in RATIO_KEYS}


def fidelity_gap(metrics: Mapping[str, Any], baseline: Mapping[str, Any],
                 target: float = FIDELITY_TARGET) -> dict[str, Any]:
    """Relative final-loss gap against the baseline, on the mean of the last loss_window iterations (and,
    for reference, on the very last one)."""
    gap = _ratio(metrics.get("final_loss_window"), baseline.get("final_loss_window"))
    last = _ratio(metrics.get("final_loss"), baseline.get("final_loss"))
    rel = gap - 1 if gap is not None else None
    return {"relative_gap": rel, "relative_gap_last": last - 1 if last is not None else None,
            "target": target, "pass": rel is not None and abs(rel) <= target}


@dataclass
class VariantResult:
    name: str
    description: str
    sets: list[str]
    extra_args: list[str]
    command: list[str]
    fp8: Optional[str]
    status: str
    exit_code: Optional[int]
    seconds: float
    metrics: dict[str, Any]
    ratios: dict[str, Optional[float]] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)
    iterations: list[dict[str, Any]] = field(default_factory=list)
    breakdown: Optional[dict[str, Any]] = None
    memory: Optional[dict[str, Any]] = None
    console_tail: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def collect_result(plan: BenchPlan, vp: VariantPlan, run: VariantRun, peak: Optional[GpuPeak]) -> VariantResult:
    """Parse one run's console (Megatron's own lines, through infir2's tee) into a VariantResult."""
    log = parse_log(run.console)
    shape = vp.shape
    vocab = padded_vocab_from_log(run.console)
    if vocab is not None and vp.launch.recipe.model.padded_vocab_size is None:
        shape = replace(shape, padded_vocab_size=vocab)
    flops = shape.flops_per_iteration(vp.launch.recipe.parallel.global_batch_size)
    metrics = variant_metrics(log, plan.request.warmup_steps if plan.mode == "speed" else 0,
                              vp.tokens_per_iteration, vp.world_size, flops, peak_for(peak, vp.fp8),
                              plan.request.loss_window)
    metrics["flops_per_iteration"] = flops
    per_sequence = shape.flops_per_sequence()
    metrics["flops_share"] = {k: v / sum(per_sequence.values()) for k, v in per_sequence.items()}
    if run.timed_out:
        status = "timed out"
    elif run.exit_code != 0:
        status = f"failed (exit {run.exit_code})"
    elif metrics["step_ms"] is None:
        status = "no timed iterations"
    else:
        status = "ok"
    result = VariantResult(
        name=vp.name, description=vp.variant.description, sets=list(vp.sets), extra_args=list(vp.extra_args),
        command=run.command, fp8=vp.fp8, status=status, exit_code=run.exit_code, seconds=round(run.seconds, 1),
        metrics=metrics,
        iterations=[{"iteration": it.iteration, "loss": it.loss, "iter_ms": it.iter_ms,
                     "tflops": it.values.get(THROUGHPUT_KEY)} for it in log.iterations],
        console_tail=run.console.splitlines()[-40:] if status != "ok" else [])
    if plan.mode == "speed" and (warning := noise_warning(vp.name, metrics)):
        result.warnings.append(warning)
    if plan.profile_window is not None:
        traces = sorted((plan.root / vp.name).glob(TRACE_GLOB))
        if traces:
            try:
                result.breakdown = trace_breakdown(traces[0])
            except (OSError, ValueError) as exc:
                result.breakdown = {"trace": str(traces[0]), "error": str(exc)}
        else:
            result.breakdown = {"error": f"no trace under {plan.root / vp.name / 'torch_profile'}"}
    if plan.request.memory_snapshot:
        result.memory = _memory_result(plan.root / vp.name / MEMORY_SNAPSHOT_FILE)
    return result


def _memory_result(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"error": f"no memory snapshot at {path}"}
    try:
        return snapshot_breakdown(path)
    except (OSError, ValueError, KeyError) as exc:
        return {"snapshot": str(path), "error": f"{type(exc).__name__}: {exc}"}


def apply_baseline(results: list[VariantResult], baseline: str, fidelity: bool) -> None:
    base = next((r for r in results if r.name == baseline and r.status == "ok"), None)
    for r in results:
        if base is None:
            r.ratios, r.fidelity = {}, {}
            continue
        r.ratios = ratios(r.metrics, base.metrics)
        if fidelity:
            r.fidelity = fidelity_gap(r.metrics, base.metrics)


# --------------------------------------------------------------------------- table, JSON, plot


def _fmt(value: Optional[float], spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(results: Sequence[VariantResult], baseline: str, gpu_label: str, fidelity: bool = False) -> str:
    """A Markdown table (paste-able into docs/benchmarks.md)."""
    if fidelity:
        head = ["variant", "status", "first loss", "final loss (last)", f"final loss (mean)",
                f"gap vs {baseline}", "within 1 %", "step ms"]
        rows = [[r.name, r.status, _fmt(r.metrics.get("first_loss"), ".4f"), _fmt(r.metrics.get("final_loss"), ".4f"),
                 _fmt(r.metrics.get("final_loss_window"), ".4f"),
                 _fmt(r.fidelity.get("relative_gap") * 100 if r.fidelity.get("relative_gap") is not None else None,
                      "+.2f", " %"),
                 "(baseline)" if r.name == baseline else ("yes" if r.fidelity.get("pass") else "NO") if r.fidelity else "-",
                 _fmt(r.metrics.get("step_ms"))] for r in results]
    else:
        head = ["variant", "status", "step ms", "spread", "fastest ms", "tokens/s/GPU", "TFLOP/s/GPU (Megatron)", "TFLOP/s/GPU (formula)",
                f"MFU ({gpu_label})", "max alloc GiB", "max reserved GiB", f"x {baseline} time",
                f"x {baseline} alloc", f"x {baseline} reserved"]
        rows = []
        for r in results:
            m, q = r.metrics, r.ratios
            spread = m.get("step_ms_spread")
            rows.append([r.name, r.status + (" (noisy)" if r.warnings else ""), _fmt(m.get("step_ms")),
                         _fmt(spread * 100 if spread is not None else None, ".1f", " %"), _fmt(m.get("step_ms_min")),
                         _fmt(m.get("tokens_per_s_per_gpu"), ",.0f"),
                         _fmt(m.get("megatron_tflops_per_gpu")), _fmt(m.get("model_tflops_per_gpu")),
                         _fmt(m["mfu"] * 100 if m.get("mfu") is not None else None, ".1f", " %"),
                         _fmt(m.get("max_allocated_gib")), _fmt(m.get("max_reserved_gib")),
                         _fmt(q.get("step_time"), ".3f"), _fmt(q.get("max_allocated"), ".3f"),
                         _fmt(q.get("max_reserved"), ".3f")])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_breakdowns(results: Sequence[VariantResult]) -> str:
    """Per-step GPU time by kernel category, one column per profiled variant."""
    profiled = [r for r in results if r.breakdown and "categories" in r.breakdown]
    if not profiled:
        return ""
    head = ["category"] + [f"{r.name} ms/step" for r in profiled] + [f"{r.name} share" for r in profiled]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cat in CATEGORY_ORDER:
        cells = [_fmt(r.breakdown["categories"][cat]["ms_per_step"], ".2f") for r in profiled]  # type: ignore[index]
        cells += [_fmt(r.breakdown["categories"][cat]["share"] * 100, ".1f", " %") for r in profiled]  # type: ignore[index]
        lines.append("| " + " | ".join([cat, *cells]) + " |")
    for key, label in (("kernel_ms_per_step", "sum of kernels"), ("gpu_busy_ms_per_step", "GPU busy (union)"),
                       ("exposed_communication_ms_per_step", "communication not overlapped"),
                       ("step_wall_ms", "step wall time")):
        cells = [_fmt(r.breakdown.get(key), ".2f") for r in profiled] + [""] * len(profiled)  # type: ignore[union-attr]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def format_memory_breakdowns(results: Sequence[VariantResult]) -> str:
    """GiB live at each variant's memory peak by training phase, one column per variant with a snapshot."""
    recorded = [r for r in results if r.memory and "phases" in r.memory]
    if not recorded:
        return ""
    head = ["live at the peak, by phase"] + [f"{r.name} GiB" for r in recorded]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    phases = [p for p in REPORT_PHASES if any(p in r.memory["phases"] for r in recorded)]  # type: ignore[index]
    for phase in phases:
        cells = [_fmt(r.memory["phases"].get(phase, {}).get("gib"), ".2f") for r in recorded]  # type: ignore[index]
        lines.append("| " + " | ".join([phase, *cells]) + " |")
    peaks = [_fmt(r.memory["peak_gib"], ".2f") for r in recorded]  # type: ignore[index]
    lines.append("| " + " | ".join(["peak (replayed)", *peaks]) + " |")
    lines.append("| " + " | ".join(["max allocated (Megatron)",
                                    *(_fmt(r.metrics.get("max_allocated_gib"), ".2f") for r in recorded)]) + " |")
    return "\n".join(lines)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (bench runs on headless GPU hosts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speed(results: Sequence[VariantResult], baseline: str, path: Path, title: str) -> Path:
    """Bar charts: step time, TFLOP/s/GPU, peak memory; each bar labelled with its ratio to the baseline."""
    plt = _pyplot()

    names = [r.name for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(min(24, max(12, 3.0 * len(names))), 4.8))
    panels = (("step_ms", "step time (ms)", "step_time"), ("megatron_tflops_per_gpu", "TFLOP/s per GPU", "tflops"))
    for ax, (key, label, ratio_key) in zip(axes[:2], panels):
        values = [r.metrics.get(key) or 0.0 for r in results]
        bars = ax.bar(names, values, color=["#888888" if n == baseline else "#1f77b4" for n in names])
        for bar, r in zip(bars, results):
            q = r.ratios.get(ratio_key)
            if q is not None:
                ax.annotate(f"{q:.3f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    ax = axes[2]
    xs = range(len(names))
    alloc = [r.metrics.get("max_allocated_gib") or 0.0 for r in results]
    reserved = [r.metrics.get("max_reserved_gib") or 0.0 for r in results]
    ax.bar([x - 0.2 for x in xs], alloc, width=0.4, label="max allocated")
    ax.bar([x + 0.2 for x in xs], reserved, width=0.4, label="max reserved")
    for x, r in zip(xs, results):
        q = r.ratios.get("max_allocated")
        if q is not None:
            ax.annotate(f"{q:.3f}x", (x - 0.2, alloc[x]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, rotation=30)
    ax.set_title("peak memory (GiB)")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save_figure(plt, fig, path)


def plot_fidelity(results: Sequence[VariantResult], baseline: str, path: Path, title: str) -> Path:
    """Loss curves, and each variant's relative loss difference to the baseline per iteration."""
    plt = _pyplot()

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    base = next((r for r in results if r.name == baseline), None)
    base_loss = {i["iteration"]: i["loss"] for i in base.iterations} if base else {}
    for r in results:
        pts = [(i["iteration"], i["loss"]) for i in r.iterations if i["loss"] is not None]
        if pts:
            top.plot(*zip(*pts), label=r.name, linewidth=1)
        if base and r is not base:
            rel = [(it, (loss / base_loss[it] - 1) * 100) for it, loss in pts if base_loss.get(it)]
            if rel:
                bottom.plot(*zip(*rel), label=f"{r.name} vs {baseline}", linewidth=1)
    top.set_ylabel("lm loss")
    top.legend(fontsize=8)
    bottom.axhline(FIDELITY_TARGET * 100, color="red", linestyle=":", linewidth=1)
    bottom.axhline(-FIDELITY_TARGET * 100, color="red", linestyle=":", linewidth=1)
    bottom.set_ylabel("loss difference (%)")
    bottom.set_xlabel("iteration")
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save_figure(plt, fig, path)


def plot_breakdowns(results: Sequence[VariantResult], path: Path, title: str) -> Optional[Path]:
    """Stacked bars of GPU time per step by kernel category, one bar per profiled variant."""
    profiled = [r for r in results if r.breakdown and "categories" in r.breakdown]
    if not profiled:
        return None
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(profiled) + 3), 5))
    bottoms = [0.0] * len(profiled)
    for cat in CATEGORY_ORDER:
        values = [r.breakdown["categories"][cat]["ms_per_step"] for r in profiled]  # type: ignore[index]
        ax.bar([r.name for r in profiled], values, bottom=bottoms, label=cat)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel("GPU kernel time per step (ms)")
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    ax.set_title(title, fontsize=10)
    return _save_figure(plt, fig, path)


# --------------------------------------------------------------------------- profiler trace breakdown

# Kernel name -> category, first match wins (case-insensitive). Heuristics for CUDA kernel names on
# Hopper (cuBLAS/cuBLASLt `nvjet_*`/`sm90_xmma_gemm_*`, CUTLASS, cuDNN/flash attention, Transformer
# Engine's cast/transpose/quantize kernels, NCCL, multi-tensor optimizer kernels). An FP8 GEMM is a GEMM
# whose name mentions an FP8 type; unmatched kernels are "other" and the biggest are listed in the JSON.
KERNEL_CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("communication", re.compile(r"nccl|all_?gather|reduce_?scatter|all_?reduce|sendrecv", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|l2norm|lamb|sgd_", re.I)),
    ("attention", re.compile(r"flash|fmha|sdpa|fused_attn|attention|attn|softmax", re.I)),
    ("quantize/cast", re.compile(r"quantiz|cast|amax|compute_scale|scale_inv|fp8_block_scaling|transpose_kernel"
                                 r"|transpose_optimized|swizzle", re.I)),
    ("gemm fp8", re.compile(r"(gemm|nvjet|xmma|cutlass|cublas|wgmma).*(e4m3|e5m2|fp8|f8f8|_qq|float8)|"
                            r"(e4m3|e5m2|fp8|float8).*(gemm|nvjet|xmma|cutlass)|nvjet\w*_qq", re.I)),
    ("gemm bf16", re.compile(r"gemm|gemv|nvjet|xmma|cutlass|cublas|s16816|s1688|wgmma|\bKernel2\b", re.I)),
)
CATEGORY_ORDER = ("gemm fp8", "gemm bf16", "attention", "quantize/cast", "optimizer", "communication",
                  "memcpy/memset", "other")
_STEP_RE = re.compile(r"^ProfilerStep#(\d+)$")


def classify_kernel(name: str, cat: str = "kernel") -> str:
    """The time-breakdown category of one GPU trace event."""
    if cat in ("gpu_memcpy", "gpu_memset") or re.match(r"^Mem(cpy|set)\b", name):
        return "memcpy/memset"
    return next((label for label, pattern in KERNEL_CATEGORIES if pattern.search(name)), "other")


def load_trace(path: Path) -> dict[str, Any]:
    """A Chrome/Kineto trace (`.json` or `.json.gz`), as written by torch.profiler's export_chrome_trace."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    data = json.loads(raw)
    if isinstance(data, list):
        data = {"traceEvents": data}
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise ValueError(f"{path}: not a Chrome trace (no traceEvents list)")
    return data


def _merge_intervals(xs: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, overlapping or touching intervals joined."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(xs):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _union_length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in _merge_intervals(intervals))


def _subtract_length(intervals: list[tuple[float, float]], cover: list[tuple[float, float]]) -> float:
    """Total length of `intervals` (merged) not covered by `cover` (merged)."""
    exposed, j, covered = 0.0, 0, _merge_intervals(cover)
    for a, b in _merge_intervals(intervals):
        pos = a
        while j < len(covered) and covered[j][1] <= pos:
            j += 1
        k = j
        while k < len(covered) and covered[k][0] < b:
            c0, c1 = covered[k]
            if c0 > pos:
                exposed += c0 - pos
            pos = max(pos, c1)
            if pos >= b:
                break
            k += 1
        if pos < b:
            exposed += b - pos
    return exposed


def trace_breakdown(trace: Path | Mapping[str, Any], top: int = 8) -> dict[str, Any]:
    """GPU time of a profiled window by kernel category, per profiled step.

    Sums each GPU kernel/memcpy/memset event's duration into its category (classify_kernel). Kernels on
    different streams overlap (NCCL with compute), so the categories can add up to more than the GPU's
    busy time; `gpu_busy_ms_per_step` is the union of all kernel intervals and
    `exposed_communication_ms_per_step` the communication time during which no other kernel ran. Steps are
    counted from the profiler's `ProfilerStep#N` annotations (1 when there are none).
    """
    data = load_trace(trace) if isinstance(trace, Path) else dict(trace)
    events = [e for e in data["traceEvents"] if isinstance(e, dict) and e.get("ph") == "X"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    step_events = [e for e in events if _STEP_RE.match(str(e.get("name", ""))) and e.get("cat") != "gpu_user_annotation"]
    steps = len({e["name"] for e in step_events}) or 1
    totals = {cat: 0.0 for cat in CATEGORY_ORDER}
    per_kernel: dict[str, dict[str, float]] = {cat: {} for cat in CATEGORY_ORDER}
    comm: list[tuple[float, float]] = []
    compute: list[tuple[float, float]] = []
    for e in gpu:
        dur = float(e.get("dur", 0.0))
        start = float(e.get("ts", 0.0))
        name = str(e.get("name", ""))
        cat = classify_kernel(name, str(e.get("cat")))
        totals[cat] += dur
        per_kernel[cat][name] = per_kernel[cat].get(name, 0.0) + dur
        (comm if cat == "communication" else compute).append((start, start + dur))
    kernel_total = sum(totals.values())
    step_wall = statistics.median(float(e.get("dur", 0.0)) for e in step_events) / 1000 if step_events else None
    return {
        "trace": str(trace) if isinstance(trace, Path) else None,
        "steps": steps,
        "kernel_ms_per_step": kernel_total / 1000 / steps,
        "gpu_busy_ms_per_step": _union_length(comm + compute) / 1000 / steps,
        "exposed_communication_ms_per_step": _subtract_length(comm, compute) / 1000 / steps,
        "step_wall_ms": step_wall,
        "categories": {cat: {"ms_per_step": totals[cat] / 1000 / steps,
                             "share": totals[cat] / kernel_total if kernel_total else 0.0} for cat in CATEGORY_ORDER},
        "top_kernels": {cat: [[name, round(us / 1000 / steps, 3)] for name, us in
                              sorted(per_kernel[cat].items(), key=lambda kv: -kv[1])[:top]]
                        for cat in CATEGORY_ORDER if per_kernel[cat]},
    }


def format_trace_breakdown(breakdown: Mapping[str, Any]) -> str:
    lines = [f"# {breakdown.get('trace') or 'trace'}: {breakdown['steps']} profiled step(s)",
             "| category | ms/step | share |", "|---|---|---|"]
    for cat in CATEGORY_ORDER:
        c = breakdown["categories"][cat]
        lines.append(f"| {cat} | {c['ms_per_step']:.2f} | {c['share'] * 100:.1f} % |")
    lines.append(f"| sum of kernels | {breakdown['kernel_ms_per_step']:.2f} | |")
    lines.append(f"| GPU busy (union) | {breakdown['gpu_busy_ms_per_step']:.2f} | |")
    lines.append(f"| communication not overlapped | {breakdown['exposed_communication_ms_per_step']:.2f} | |")
    if breakdown.get("step_wall_ms") is not None:
        lines.append(f"| step wall time (ProfilerStep) | {breakdown['step_wall_ms']:.2f} | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the whole benchmark


@dataclass
class BenchReport:
    plan: BenchPlan
    results: list[VariantResult]
    table: str
    written: list[Path]

    @property
    def all_ok(self) -> bool:
        return all(r.status == "ok" for r in self.results) and len(self.results) == len(self.plan.variants)


def _payload(plan: BenchPlan, results: Sequence[VariantResult], gpu_name: Optional[str],
             peak: Optional[GpuPeak]) -> dict[str, Any]:
    req = plan.request
    first = plan.variants[0] if plan.variants else None
    payload: dict[str, Any] = {
        "infir2_bench": 1,
        "mode": plan.mode,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "root": str(plan.root),
        "recipe": req.recipe,
        "argv": sys.argv,
        "gpu": {"name": gpu_name or "unknown GPU", "peak": asdict(peak) if peak else None},
        "baseline": req.baseline,
        "warmup_steps": req.warmup_steps if plan.mode == "speed" else 0,
        "steps": plan.steps,
        "train_iters": plan.train_iters,
        "nproc_per_node": req.nproc_per_node,
        "shape": asdict(first.shape) if first else None,
        "global_batch_size": first.launch.recipe.parallel.global_batch_size if first else None,
        "micro_batch_size": first.launch.recipe.parallel.micro_batch_size if first else None,
        "tensor_parallel": first.launch.recipe.parallel.tensor_parallel if first else None,
        "profile_window": list(plan.profile_window) if plan.profile_window else None,
        "memory_snapshot": req.memory_snapshot,
        "variants": [asdict(r) for r in results],
    }
    if plan.mode == "fidelity":
        payload["fidelity"] = {"data": req.data, "tokenizer": req.tokenizer, "loss_window": req.loss_window,
                               "target": FIDELITY_TARGET,
                               "gaps": {r.name: r.fidelity for r in results if r.name != req.baseline}}
    return payload


def run_bench(plan: BenchPlan, gpu_name: Optional[str] = None,
              echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> BenchReport:
    """Run every variant in turn, then write bench.json, table.md and bench.png (+ breakdown.png)."""
    req = plan.request
    peak = gpu_peak(gpu_name)
    plan.root.mkdir(parents=True, exist_ok=True)
    results: list[VariantResult] = []
    written: list[Path] = []
    for i, vp in enumerate(plan.variants, 1):
        echo(f"[bench] variant {i}/{len(plan.variants)}: {vp.name} ({vp.variant.description})")
        run = run_variant(req, plan, vp, echo)
        result = collect_result(plan, vp, run, peak)
        results.append(result)
        echo(f"[bench] {vp.name}: {result.status} after {result.seconds:.0f} s")
        for warning in result.warnings:
            echo(f"[bench] WARNING {warning}")
        if result.status != "ok":
            for line in result.console_tail[-15:]:
                echo(f"[{vp.name}]   {line}")
        apply_baseline(results, req.baseline, plan.mode == "fidelity")
        write_json(plan.root / RESULTS_FILE, _payload(plan, results, gpu_name, peak))
        if run.exit_code == 2 and not result.iterations:
            echo(f"[bench] {vp.name}: infir2 refused the launch (exit 2); not running the remaining variants")
            break
    gpu_label = peak.label if peak else "unknown GPU"
    table = format_table(results, req.baseline, gpu_label, fidelity=plan.mode == "fidelity")
    breakdown = "\n\n".join(part for part in (format_breakdowns(results), format_memory_breakdowns(results)) if part)
    written.append(plan.root / RESULTS_FILE)  # written after every variant, the last time with all of them
    header = (f"infir2 bench {plan.mode}: recipe {req.recipe}, GPU {gpu_name or 'unknown GPU'} "
              f"({'dense peaks BF16 %g / FP8 %s TFLOP/s' % (peak.bf16_tflops, peak.fp8_tflops) if peak else 'no known peak: no MFU'})")
    full_table = header + "\n\n" + table + ("\n\n" + breakdown if breakdown else "")
    (plan.root / TABLE_FILE).write_text(full_table + "\n")
    written.append(plan.root / TABLE_FILE)
    title = f"{req.recipe} on {gpu_name or 'unknown GPU'} ({plan.root.name})"
    with contextlib.suppress(ImportError):
        if plan.mode == "fidelity":
            written.append(plot_fidelity(results, req.baseline, plan.root / PLOT_FILE, title))
        else:
            written.append(plot_speed(results, req.baseline, plan.root / PLOT_FILE, title))
        extra = plot_breakdowns(results, plan.root / BREAKDOWN_PLOT_FILE, title)
        if extra:
            written.append(extra)
    return BenchReport(plan=plan, results=results, table=full_table, written=written)


def execute(plan: BenchPlan, echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> BenchReport:
    """Probe the GPU once (name for the peak table, infir2's GPU preflight for every variant; skipped with
    $INFIR2_GPU_CHECK=0, as in the CPU tests), then run the benchmark. Raises BenchError when the machine cannot
    run it, before anything is launched."""
    req = plan.request
    gpu_name = req.gpu_name
    if plan.gpu_check:
        checks = [{"nproc": req.nproc_per_node, "fp8": vp.fp8} for vp in plan.variants]
        detected, problems = gpu_check(checks)
        if problems:
            raise BenchError(problems, "infir2: cannot run the benchmark on this machine")
        gpu_name = gpu_name or detected
    return run_bench(plan, gpu_name, echo)


def summary(report: BenchReport) -> str:
    """What `infir2 bench` prints at the end: the table, the fidelity verdict, the files written."""
    lines = [report.table, ""]
    if report.plan.mode == "fidelity":
        for r in report.results:
            if r.name != report.plan.request.baseline and r.fidelity.get("relative_gap") is not None:
                verdict = "within" if r.fidelity["pass"] else "NOT within"
                lines.append(f"{r.name}: final loss {r.fidelity['relative_gap'] * 100:+.2f} % against "
                             f"{report.plan.request.baseline} (mean of the last {r.metrics['loss_window']} "
                             f"iterations): {verdict} {FIDELITY_TARGET * 100:g} %")
    failed = [r for r in report.results if r.status != "ok"]
    for r in failed:
        lines.append(f"{r.name}: {r.status}; console: {report.plan.root / r.name / 'bench-console.log'}")
    lines += [f"WARNING {w}" for r in report.results for w in r.warnings]
    lines += [f"wrote {p}" for p in report.written]
    return "\n".join(lines)


def list_variants() -> str:
    width = max(len(n) for n in BUILTIN_VARIANTS)
    return "\n".join(f"{v.name:<{width}}  {v.description}\n{'':<{width}}  --set {' --set '.join(v.sets)}"
                     for v in BUILTIN_VARIANTS.values())


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m infir2_cpt.bench.plan gpu-check JSON` (internal) or `python -m infir2_cpt.bench.plan breakdown TRACE...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["gpu-check"] and len(args) == 2:
        _gpu_check_main(args[1])
        return
    if args[:1] == ["breakdown"] and len(args) > 1:
        for path in args[1:]:
            print(format_trace_breakdown(trace_breakdown(Path(path))))
        return
    print("usage: python -m infir2_cpt.bench.plan breakdown TRACE.json[.gz] ...", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
