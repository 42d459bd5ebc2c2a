"""The optimizer's FP32 master weights on a first launch from a base model, inside the training process.

With FP8 parameters (--fp8-param-gather) the model holds only the quantized weights. On the first launch
from a BF16 base model Megatron builds the optimizer first, loads the checkpoint (quantizing it into the
FP8 parameters), then rebuilds the FP32 masters from those FP8 parameters: the masters, and every
checkpoint and export after them, start from the base model rounded to 128x128-block E4M3. The launcher
asks instead for Megatron's own copy from the checkpoint (`--no-load-optim --load-main-params-from-ckpt`,
plus `--no-stream-ckpt-dequant`, without which the loaded weights the copy reads are the FP8 parameters
themselves). Resumes and decays never get these flags: their masters come from the optimizer state.

This module holds:
- the guard that drops those flags when the run already has a checkpoint of its own (a restart of the
  first launch must resume, not reset its optimizer);
- a diagnostic run after Megatron has built and loaded the model and optimizer, switched on by
  environment variables (set by hand or by the GPU proof scripts):
  INFIR2_MASTERS_REPORT=FILE  compare every master shard with the checkpoint's weights (and with the
                              dequantized FP8 parameter) and write the largest differences to FILE (JSON);
  INFIR2_MASTERS_DUMP=FILE    write the full FP32 masters, by parameter name (TP 1 only), to FILE;
  INFIR2_EXIT_AFTER_LOAD=1    stop after these, before training.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

FIRST_LOAD_FLAGS = ("--no-load-optim", "--load-main-params-from-ckpt", "--no-stream-ckpt-dequant")
REPORT_ENV = "INFIR2_MASTERS_REPORT"
DUMP_ENV = "INFIR2_MASTERS_DUMP"
EXIT_ENV = "INFIR2_EXIT_AFTER_LOAD"
TRACKER = "latest_checkpointed_iteration.txt"


def _last_value(argv: list[str], flag: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def drop_first_load_flags_on_restart(argv: list[str], has_tracker: Callable[[Path], bool]) -> tuple[list[str], list[str]]:
    """The masters-from-checkpoint flags only while --load holds no checkpoint of the run's own.

    They imply --no-load-optim: on a torchrun restart after the run's first save they would throw away the
    Adam moments and the schedule. Returns the argv and a note when something was dropped."""
    if "--load-main-params-from-ckpt" not in argv:
        return argv, []
    load = _last_value(argv, "--load")
    if load is None or not has_tracker(Path(load)):
        return argv, []
    kept = [arg for arg in argv if arg not in FIRST_LOAD_FLAGS]
    return kept, [f"{load} already holds a checkpoint of this run: resuming with its optimizer state, so "
                  f"{' '.join(FIRST_LOAD_FLAGS)} (for the first launch from the base model) are dropped"]


def tracker_exists(load_dir: Path) -> bool:
    return (load_dir / TRACKER).is_file()


# --------------------------------------------------------------------------- comparison (pure torch)


@dataclass
class ParamDiff:
    name: str
    quantized: bool  # an FP8 parameter
    numel: int
    max_abs_vs_checkpoint: float | None  # None: the checkpoint has no such tensor
    max_abs_vs_dequantized_param: float | None  # FP8 parameters only


@dataclass
class MastersReport:
    source: str  # the checkpoint folder compared with
    params: list[ParamDiff] = field(default_factory=list)
    note: str = ""

    def worst(self, key: str, quantized: bool | None = None, n: int = 5) -> list[ParamDiff]:
        rows = [p for p in self.params if getattr(p, key) is not None and (quantized is None or p.quantized == quantized)]
        return sorted(rows, key=lambda p: -getattr(p, key))[:n]

    def max(self, key: str, quantized: bool | None = None) -> float | None:
        rows = self.worst(key, quantized, n=1)
        return getattr(rows[0], key) if rows else None

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "note": self.note,
            "params": len(self.params),
            "fp8_params": sum(p.quantized for p in self.params),
            "max_abs_master_vs_checkpoint": {
                "fp8_params": self.max("max_abs_vs_checkpoint", True),
                "other_params": self.max("max_abs_vs_checkpoint", False),
            },
            "max_abs_master_vs_dequantized_fp8_param": self.max("max_abs_vs_dequantized_param", True),
            "worst_vs_checkpoint": [asdict(p) for p in self.worst("max_abs_vs_checkpoint")],
        }


def shard_difference(master_shard: Any, reference: Any, start: int, end: int) -> float:
    """max |master - reference| over the slice [start, end) of the flattened reference (FP32 arithmetic)."""
    ref = reference.reshape(-1)[start:end].to(device=master_shard.device, dtype=master_shard.dtype)
    if ref.numel() != master_shard.numel():
        raise ValueError(f"shard of {master_shard.numel()} elements against a reference slice of {ref.numel()}")
    return float((master_shard.reshape(-1) - ref).abs().max()) if ref.numel() else 0.0


def unstack_checkpoint_layers(state: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """torch_dist stacks decoder.layers.* on a leading layer axis; the model names them one by one."""
    out: dict[str, Any] = {}
    for key, tensor in state.items():
        if key.startswith("decoder.layers.") and not key[len("decoder.layers."):][:1].isdigit():
            for i in range(num_layers):
                out[f"decoder.layers.{i}.{key[len('decoder.layers.'):]}"] = tensor[i]
        else:
            out[key] = tensor
    return out


def checkpoint_folder(ckpt_dir: Path) -> Path:
    """The folder a Megatron checkpoint directory's tracker names (iter_N or release)."""
    tracker = ckpt_dir / TRACKER
    if not tracker.is_file():
        return ckpt_dir  # already a folder
    text = tracker.read_text().strip()
    return ckpt_dir / ("release" if text == "release" else f"iter_{int(text):07d}")


def read_model_tensors(folder: Path, names: Iterable[str] | None, num_layers: int) -> dict[str, Any]:
    """The model's weights in a torch_dist folder (those named, or all), read model-free (global tensors, on the
    CPU) with torch's own checkpoint reader, without a process group: it runs inside a training process as in a
    plain script."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    metadata = reader.read_metadata().state_dict_metadata
    wanted = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
              for key, meta in metadata.items()
              if isinstance(meta, TensorStorageMetadata) and not key.startswith("optimizer.")
              and "_extra_state" not in key}
    dcp.load(wanted, storage_reader=reader, no_dist=True)
    state = unstack_checkpoint_layers(wanted, num_layers)
    return state if names is None else {name: state[name] for name in names if name in state}


# --------------------------------------------------------------------------- Megatron objects (GPU)


def _distributed_optimizers(optimizer: Any) -> list[Any]:
    chained = getattr(optimizer, "chained_optimizers", None)
    return list(chained) if chained is not None else [optimizer]


def _param_names(model: list[Any]) -> dict[int, str]:
    names: dict[int, str] = {}
    for chunk in model:
        while hasattr(chunk, "module"):
            chunk = chunk.module
        for name, param in chunk.named_parameters():
            names[id(param)] = name
    return names


def master_shards(model: list[Any], optimizer: Any) -> list[tuple[str, Any, Any, int, int]]:
    """(name, model param, FP32 master shard, start, end) for every parameter with a master of its own."""
    names = _param_names(model)
    out = []
    for opt in _distributed_optimizers(optimizer):
        if not hasattr(opt, "_get_model_param_range_map"):
            continue
        for group in getattr(opt, "model_float16_groups", []):
            for param in group:
                master = getattr(param, "main_param", None)
                if master is None:
                    continue
                rng = opt._get_model_param_range_map(param)["param"]
                out.append((names.get(id(param), f"<unnamed {id(param)}>"), param, master, rng.start, rng.end))
    return out


def _is_quantized(param: Any) -> bool:
    from megatron.core.fp8_utils import is_float8tensor

    return is_float8tensor(param)


def masters_report(model: list[Any], optimizer: Any, source: Path, num_layers: int) -> MastersReport:
    shards = master_shards(model, optimizer)
    folder = checkpoint_folder(source)
    report = MastersReport(source=str(folder))
    if not shards:
        report.note = ("no FP32 master shards: the optimizer keeps the BF16 parameters themselves as masters "
                       "(precision-aware optimizer with 16-bit remainders), exact by construction")
        return report
    reference = read_model_tensors(folder, [s[0] for s in shards], num_layers)
    for name, param, master, start, end in shards:
        quantized = _is_quantized(param)
        vs_ckpt = shard_difference(master, reference[name], start, end) if name in reference else None
        vs_param = None
        if quantized:
            vs_param = shard_difference(master, param.dequantize().float(), start, end)
        report.params.append(ParamDiff(name, quantized, end - start, vs_ckpt, vs_param))
    return report


def reduce_report(report: MastersReport) -> MastersReport:
    """Every rank compared its own shards: keep, per parameter, the largest difference over the ranks."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return report
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [asdict(p) for p in report.params])
    merged: dict[str, ParamDiff] = {}
    for rows in gathered:
        for row in rows:
            p = ParamDiff(**row)
            have = merged.get(p.name)
            if have is None:
                merged[p.name] = p
                continue
            for key in ("max_abs_vs_checkpoint", "max_abs_vs_dequantized_param"):
                a, b = getattr(have, key), getattr(p, key)
                setattr(have, key, b if a is None else a if b is None else max(a, b))
            have.numel += p.numel
    return MastersReport(report.source, list(merged.values()), report.note)


def dump_masters(model: list[Any], optimizer: Any, path: Path) -> int:
    """Full FP32 masters by parameter name (the shards of all data-parallel ranks joined); TP/PP 1 only."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    if mpu.get_tensor_model_parallel_world_size() > 1 or mpu.get_pipeline_model_parallel_world_size() > 1:
        raise RuntimeError(f"{DUMP_ENV}: only for tensor and pipeline parallel size 1")
    full: dict[str, Any] = {}
    for name, param, master, start, end in master_shards(model, optimizer):
        flat = torch.zeros(param.numel(), dtype=torch.float32, device=master.device)
        flat[start:end] = master.reshape(-1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)  # every element lives in exactly one rank's shard
        full[name] = flat.view(param.shape).cpu()
    if not dist.is_initialized() or dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(full, path)
    return len(full)


def _say(message: str) -> None:
    print(f"infir2.masters: {message}", flush=True)


def after_setup(model: list[Any], optimizer: Any, args: Any, environ: Mapping[str, str] = os.environ) -> None:
    """The diagnostics the environment asks for, once the model and optimizer are built and loaded."""
    import torch.distributed as dist

    report_path, dump_path = environ.get(REPORT_ENV), environ.get(DUMP_ENV)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if report_path:
        source = args.pretrained_checkpoint if getattr(args, "finetune", False) and args.pretrained_checkpoint \
            else args.load
        report = reduce_report(masters_report(model, optimizer, Path(source), args.num_layers))
        summary = report.summary()
        if rank0:
            Path(report_path).parent.mkdir(parents=True, exist_ok=True)
            Path(report_path).write_text(json.dumps(summary, indent=1) + "\n")
            _say(f"masters vs {summary['source']}: FP8 params max |diff| "
                 f"{summary['max_abs_master_vs_checkpoint']['fp8_params']}, other params "
                 f"{summary['max_abs_master_vs_checkpoint']['other_params']}; vs the dequantized FP8 params "
                 f"{summary['max_abs_master_vs_dequantized_fp8_param']} ({report_path})")
    if dump_path:
        count = dump_masters(model, optimizer, Path(dump_path))
        if rank0:
            _say(f"wrote {count} FP32 master tensors to {dump_path}")
    if environ.get(EXIT_ENV) == "1":
        if dist.is_initialized():
            dist.barrier()
        _say(f"{EXIT_ENV}=1: stopping after the load")
        sys.exit(0)
