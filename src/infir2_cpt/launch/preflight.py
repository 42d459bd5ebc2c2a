"""Preflight: what is checked on the launch host before anything is launched or written, beyond the recipe's
own rules (recipe/validate.py): the files the recipe names, the GPUs, the free space for a checkpoint, and the
environment the workers will see against the Megatron arguments.

These are machine problems (a file, tokenizer or GPU missing *here*): fatal for a launch, warnings in --dry-run,
since a dry run is often made on a login node that lacks them. Every check runs; nothing stops at the first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..argv import last_value
from ..layout import ExperimentPaths
from ..recipe.schema import Recipe
from ..recipe.shape import ModelShape
from ..recipe.validate import Findings


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


def check_files(recipe: Recipe, paths: ExperimentPaths) -> Findings:
    out = Findings()
    for i, entry in enumerate(recipe.data.blend):
        missing = [s for s in (".bin", ".idx") if not Path(entry.path + s).is_file()]
        if missing and not recipe.data.mock:
            # the two usual slips: the .bin/.idx file itself, or the PREFIX that was given to prepare-data
            stem = entry.path.removesuffix(".bin").removesuffix(".idx")
            hint = next((f"; did you mean {c}?" for c in (stem, entry.path + "_text_document")
                         if c != entry.path and Path(c + ".bin").is_file() and Path(c + ".idx").is_file()), "")
            out.add_machine(f"data.blend[{i}].path",
                            f"missing {' and '.join(entry.path + s for s in missing)}{hint}", entry.path)
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


# --------------------------------------------------------------------------- free space for a checkpoint

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


def check_disk_space(recipe: Recipe, paths: ExperimentPaths, notes: list[str] | None = None) -> Findings:
    """A machine problem when the checkpoint filesystem cannot hold one more checkpoint. Appends the estimate
    to `notes` (shown by --dry-run)."""
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
    if notes is not None:
        notes.append(f"one checkpoint needs about {checkpoint_estimate_text(recipe)}; "
                     f"{free / 1e9:.1f} GB free in {where}")
    if free < need:
        out.add_machine("checkpoint", f"not enough free space for one checkpoint: it needs about "
                        f"{checkpoint_estimate_text(recipe)} but {where} has {free / 1e9:.1f} GB free; free "
                        f"space or point INFIR2_EXP_ROOT at a larger filesystem")
    return out
