"""Preflight: what is checked on the launch host before anything is launched or written, beyond the recipe's
own rules (recipe/validate.py): the files the recipe names, the GPUs, the free space for a checkpoint and for the
whole run under the retention policy (retention.py), and the environment the workers will see against the
Megatron arguments.

These are machine problems (a file, tokenizer or GPU missing *here*): fatal for a launch, warnings in --dry-run,
since a dry run is often made on a login node that lacks them. Every check runs; nothing stops at the first.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib.metadata
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Mapping

from .. import checkpoints as ck
from ..argv import last_value
from ..layout import ExperimentPaths
from ..recipe.schema import BlendEntry, Recipe
from ..recipe.shape import ModelShape
from ..recipe.validate import Findings
from ..retention import Forecast, RetentionPolicy, forecast, protection_of, save_iterations


def check_cuda_graph_env(megatron_args: list[str], env: dict[str, str], out: Findings) -> None:
    """Megatron refuses Transformer Engine CUDA graphs with expandable segments unless NCCL_GRAPH_REGISTER=0
    (illegal memory accesses otherwise); the shipped recipes set expandable segments. `env` is what the
    ranks will see: the user's environment with the recipe's variables applied."""
    if last_value(megatron_args, "--cuda-graph-impl") != "transformer_engine":
        return
    if "expandable_segments:True" in env.get("PYTORCH_CUDA_ALLOC_CONF", "") and env.get("NCCL_GRAPH_REGISTER") != "0":
        out.add("env.NCCL_GRAPH_REGISTER", "--cuda-graph-impl transformer_engine with PYTORCH_CUDA_ALLOC_CONF="
                "expandable_segments:True needs NCCL_GRAPH_REGISTER=0 (Megatron asserts it at start-up): add "
                "`--set env.NCCL_GRAPH_REGISTER=0`, or drop expandable segments from env.PYTORCH_CUDA_ALLOC_CONF",
                env.get("NCCL_GRAPH_REGISTER"))


def _options_cache(version: str, environ: Mapping[str, str]) -> Path:
    root = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "infir2" / f"megatron-core-{version}-options.json"


@functools.cache
def megatron_option_names() -> frozenset[str] | None:
    """Every option string of Megatron's own argument parser, or None when megatron-core is not importable here
    (a login host without the `megatron` extra). Building the parser imports megatron.training (seconds), so
    the names are kept in ~/.cache/infir2, per megatron-core version."""
    try:
        version = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None
    cache = _options_cache(version, os.environ)
    try:
        return frozenset(json.loads(cache.read_text()))
    except (OSError, ValueError):
        pass
    try:
        with warnings.catch_warnings():  # its import warns about optional kernels (APEX, TE) the parser needs not
            warnings.simplefilter("ignore")
            from megatron.training.arguments import add_megatron_arguments
    except Exception:  # installed but broken beyond the point where its parser can be built
        return None
    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False, add_help=False))
    names = frozenset(parser._option_string_actions)  # argparse keeps no public list of its option strings
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(sorted(names)))
        tmp.replace(cache)
    except OSError:  # a read-only home: check without the cache
        pass
    return names


def check_megatron_flags(flags: list[str], out: Findings, notes: list[str]) -> None:
    """The flags passed through to Megatron (after `--`, and megatron_extra_args) are real options of the
    installed megatron-core: a typo would otherwise stop every node at start-up (argparse exits there)."""
    names = [flag.split("=", 1)[0] for flag in flags if flag.startswith("--")]
    if not names:
        return
    known = megatron_option_names()
    if known is None:
        notes.append("megatron-core is not importable here: the Megatron flags after `--` were not checked "
                     f"({' '.join(names)})")
        return
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]}?" if close else ""
            out.add("--", f"{name} is not an option of megatron-core's argument parser{hint}", name)


def check_files(recipe: Recipe, paths: ExperimentPaths) -> Findings:
    out = Findings()
    if not recipe.data.mock:
        check_blend_files(recipe.data.blend, "data.blend", out)
        check_blend_files(recipe.data.valid_blend, "data.valid_blend", out)
    tok = recipe.tokenizer
    if tok.type == "HuggingFaceTokenizer" and tok.model and not Path(tok.model).is_dir():
        out.add_machine("tokenizer.model", "tokenizer directory not found", tok.model)
    if recipe.megatron.code_dir and not (Path(recipe.megatron.code_dir) / "pretrain_gpt.py").is_file():
        out.add_machine("megatron.code_dir", "has no pretrain_gpt.py", recipe.megatron.code_dir)
    if recipe.checkpoint.pretrained:
        pre = Path(recipe.checkpoint.pretrained)
        if not (pre / "latest_checkpointed_iteration.txt").is_file():
            out.add_machine("checkpoint.pretrained",
                            "is not a Megatron checkpoint directory (no latest_checkpointed_iteration.txt)", str(pre))
    existing = nearest_existing(paths.root)
    if not os.access(existing, os.W_OK):
        out.add_machine("exp", f"{existing} is not writable", str(paths.root))
    return out


def check_blend_files(entries: list[BlendEntry], key: str, out: Findings) -> None:
    for i, entry in enumerate(entries):
        missing = [s for s in (".bin", ".idx") if not Path(entry.path + s).is_file()]
        if missing:
            # the two usual slips: the .bin/.idx file itself, or the PREFIX that was given to prepare-data
            stem = entry.path.removesuffix(".bin").removesuffix(".idx")
            hint = next((f"; did you mean {c}?" for c in (stem, entry.path + "_text_document")
                         if c != entry.path and Path(c + ".bin").is_file() and Path(c + ".idx").is_file()), "")
            out.add_machine(f"{key}[{i}].path", f"missing {' and '.join(entry.path + s for s in missing)}{hint}",
                            entry.path)


def nearest_existing(path: Path) -> Path:
    """The path itself, or its nearest ancestor that exists (where a folder to be created would go)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_gpu(gpus: int, fp8: str | None, purpose: str = "") -> Findings:
    """The GPU preflight of every command that needs GPUs on this host: `gpus` of them visible and, for blockwise
    FP8, compute capability >= 9.0 and CUDA >= 12.9 (TE's own requirement). `purpose` says why, when no GPU is
    visible at all."""
    out = Findings()
    try:
        import torch
    except ImportError:
        out.add_machine("gpu", "torch is not importable here")
        return out
    if not torch.cuda.is_available():
        out.add_machine("gpu", "no CUDA GPU is visible on this host" + (f" ({purpose})" if purpose else ""))
        return out
    count = torch.cuda.device_count()
    if count < gpus:
        out.add_machine("launch.nproc_per_node", f"only {count} GPU(s) visible on this host", gpus)
    if fp8 == "blockwise":
        major, minor = torch.cuda.get_device_capability(0)
        if (major, minor) < (9, 0):
            out.add_machine("precision.fp8", f"blockwise FP8 needs compute capability >= 9.0 (Hopper); this GPU "
                            f"is {major}.{minor}", "blockwise")
        cuda = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
        if cuda < (12, 9):
            out.add_machine("precision.fp8", f"blockwise FP8 needs torch built with CUDA >= 12.9 (have "
                            f"{torch.version.cuda})", "blockwise")
    return out


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(nearest_existing(path)).free


# --------------------------------------------------------------------------- free space: one checkpoint, the whole run

# Distributed Adam keeps, per parameter, an fp32 main copy + exp_avg + exp_avg_sq: 12 bytes, all saved.
OPTIMIZER_BYTES_PER_PARAM = 12
# Weights are saved in bf16. FP8 parameters (precision.fp8_param_gather) would be 1 byte, but megatron-core
# 0.19.2 dequantizes quantized tensors to bf16 when it writes a torch_dist checkpoint
# (dist_checkpointing/strategies/filesystem_async.py), so a checkpoint holds 2 bytes per weight either way.
WEIGHT_BYTES_PER_PARAM = 2


def checkpoint_bytes(recipe: Recipe) -> int:
    """Size of one checkpoint: weights and the optimizer state."""
    return ModelShape.from_recipe(recipe).parameters * (WEIGHT_BYTES_PER_PARAM + OPTIMIZER_BYTES_PER_PARAM)


def checkpoint_estimate_text(recipe: Recipe) -> str:
    params = ModelShape.from_recipe(recipe).parameters
    return (f"{checkpoint_bytes(recipe) / 1e9:.1f} GB ({params / 1e9:.2f}B parameters x "
            f"{WEIGHT_BYTES_PER_PARAM + OPTIMIZER_BYTES_PER_PARAM} bytes: bf16 weights {WEIGHT_BYTES_PER_PARAM} + "
            f"fp32 Adam main params, exp_avg, exp_avg_sq {OPTIMIZER_BYTES_PER_PARAM})")


def check_disk_space(recipe: Recipe, paths: ExperimentPaths, notes: list[str] | None = None, start: int = 0,
                     end: int | None = None) -> Findings:
    """A machine problem when the checkpoint filesystem cannot hold one more checkpoint, or cannot hold what the
    whole run keeps on disk at its peak under the retention policy (training from `start` to `end`, default the
    recipe's train_iters). Appends the estimates to `notes` (shown by --dry-run)."""
    out = Findings()
    if not recipe.checkpoint.save:
        return out
    need = checkpoint_bytes(recipe)
    where = nearest_existing(paths.checkpoints)
    try:
        free = free_bytes(paths.checkpoints)
    except OSError as exc:
        out.add_machine("checkpoint", f"cannot measure the free space of {where}: {exc}")
        return out
    end = recipe.schedule.train_iters if end is None else end
    policy = RetentionPolicy.of(recipe.checkpoint.keep_last, recipe.checkpoint.keep_every)
    run = run_forecast(recipe, paths, policy, start, end)
    more = run.extra_at_peak * need
    if free < need:  # said once, as the problem (a dry run prints it as a warning)
        out.add_machine("checkpoint", f"not enough free space for one checkpoint: it needs about "
                        f"{checkpoint_estimate_text(recipe)} but {where} has {free / 1e9:.1f} GB free; free "
                        f"space or point INFIR2_EXP_ROOT at a larger filesystem")
    elif free < more:
        out.add_machine("checkpoint", f"the run cannot finish: {forecast_text(recipe, policy, run, start, end)}, "
                        f"but {where} has {free / 1e9:.1f} GB free; "
                        f"{_what_would_fit(recipe, paths, policy, start, end, free, need)}")
    elif notes is not None:
        notes.append(f"one checkpoint needs about {checkpoint_estimate_text(recipe)}; "
                     f"{free / 1e9:.1f} GB free in {where}")
        if run.saves:
            notes.append(f"disk forecast: {forecast_text(recipe, policy, run, start, end)}; "
                         f"{free / 1e9:.1f} GB free")
    return out


def run_forecast(recipe: Recipe, paths: ExperimentPaths, policy: RetentionPolicy, start: int,
                 end: int) -> Forecast:
    """The retention forecast for a run of `recipe` from `start` to `end` into paths.checkpoints, from what is
    on disk there now."""
    folders = ck.list_checkpoints(paths.checkpoints)
    existing = [f.iteration for f in folders if f.complete and f.iteration is not None]
    partial = sum(1 for f in folders if not f.complete or f.release)
    protected = set(protection_of(paths).reasons) if folders else set()
    saves = save_iterations(start, end, recipe.checkpoint.save_interval)
    return forecast(policy, existing, partial, saves, protected)


def forecast_text(recipe: Recipe, policy: RetentionPolicy, run: Forecast, start: int, end: int) -> str:
    size = checkpoint_bytes(recipe)
    saves = run.saves
    span = (f"iterations {saves[0]}..{saves[-1]} every {recipe.checkpoint.save_interval}" if len(saves) > 1
            else f"iteration {saves[0]}")
    return (f"training {start} -> {end} saves {len(saves)} checkpoint(s) ({span}); {policy.describe()}: at most "
            f"{run.peak} on disk at once ({run.now} now), about {run.extra_at_peak * size / 1e9:.1f} GB more than "
            f"now at the peak ({run.extra_at_peak} x {size / 1e9:.1f} GB)")


def _what_would_fit(recipe: Recipe, paths: ExperimentPaths, policy: RetentionPolicy, start: int, end: int,
                    free: int, need: int) -> str:
    """The advice: the largest checkpoint.keep_last (with the same keep_every) that fits, if any."""
    fits = [k for k in range(1, 101)
            if run_forecast(recipe, paths, RetentionPolicy(k, policy.keep_every), start,
                            end).extra_at_peak * need <= free]
    where = "free space, or point INFIR2_EXP_ROOT at a larger filesystem"
    if fits and (policy.keep_last is None or max(fits) < policy.keep_last):
        every = f" (with keep_every {policy.keep_every})" if policy.keep_every else ""
        return f"--set checkpoint.keep_last={max(fits)}{every} would fit; or {where}"
    if policy.keep_every:
        return f"keep fewer branch points (a larger checkpoint.keep_every), {where}"
    return where
