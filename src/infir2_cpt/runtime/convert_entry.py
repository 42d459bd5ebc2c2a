"""The checkpoint I/O of `infir2 convert`, run by torchrun as a single process.

    python -m torch.distributed.run --standalone --nproc-per-node=1 -m infir2_cpt.runtime.convert_entry MODE [options] \
        [-- MEGATRON ARGS]

MODE is one of:
- hf-to-megatron: initialize Megatron with the recipe's model arguments (BF16, TP=1, no FP8 parameters),
  build the GPTModel exactly as the training entry does (megatron.training's GPTModelBuilder from
  gpt_config_from_args), copy the mapped HF tensors into its state_dict (every key and shape checked),
  save it with Megatron's own save_checkpoint as a release checkpoint (OUT/release, tracker 'release': what
  --pretrained-checkpoint loads, weights only), then read the written checkpoint back and compare it bit for
  bit with the model. Needs a CUDA GPU.
- megatron-to-hf: read the model tensors of one torch_dist checkpoint folder (iter_NNNNNNN or release; the
  optimizer state is not read), check every key and shape, map them back, and write safetensors, config.json
  and (optionally) the tokenizer files. Needs no GPU: it joins a one-process gloo group.
- check-logits: the same Megatron model loaded from a checkpoint folder and a transformers Qwen2ForCausalLM
  loaded from an HF folder run on the same random token batch; prints (and writes with --report) the max
  absolute and relative logit error. Exit status 0 when within --max-rel, 1 otherwise. Needs a CUDA GPU.

The checkpoint is read model-free: dist_checkpointing.load_tensors_metadata lists the tensors, and only the
model's (global, unsharded, layers stacked on a leading axis) are loaded, so a checkpoint written at any TP or
PP size reads the same way. `infir2 convert ...` validates everything it can on the CPU and builds this
command; run it by hand only with the arguments that command prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from ..convert.mapping import (
    CONVERSION_RECORD,
    HF_CONFIG_FILE,
    SOURCE_CONFIG_FILE,
    copy_tokenizer_files,
    expected_checkpoint_shapes,
    expected_hf_shapes,
    from_model_names,
    hf_config_dict,
    hf_tensor_shapes,
    hf_to_megatron_state,
    megatron_to_hf_state,
    read_hf_state,
    state_dtype,
    to_model_names,
    unstack_layers,
    write_hf_folder,
)
from ..recipe.shape import ModelShape

MODES = ("hf-to-megatron", "megatron-to-hf", "check-logits")


def log(message: str) -> None:
    print(f"infir2.convert: {message}", flush=True)


# --------------------------------------------------------------------------- arguments


def parse_entry_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This module's own options, and the Megatron arguments after `--`."""
    if "--" in argv:
        cut = argv.index("--")
        own, megatron = argv[:cut], argv[cut + 1:]
    else:
        own, megatron = argv, []
    parser = argparse.ArgumentParser(prog="infir2_cpt.runtime.convert_entry", allow_abbrev=False)
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--shape", required=True, help="ModelShape as JSON")
    parser.add_argument("--hf", type=Path, help="HF folder (hf-to-megatron input, check-logits reference)")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--ckpt", type=Path, help="a torch_dist checkpoint folder (iter_NNNNNNN or release)")
    parser.add_argument("--source-config", type=Path, help="config.json whose extra keys the HF export keeps")
    parser.add_argument("--tokenizer", type=Path, help="folder whose tokenizer files are copied to the export")
    parser.add_argument("--no-verify", action="store_true", help="skip reading the written checkpoint back")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--max-rel", type=float, default=0.05)
    parser.add_argument("--report", type=Path)
    return parser.parse_args(own), megatron


def shape_from_json(text: str) -> ModelShape:
    return ModelShape(**json.loads(text))


# --------------------------------------------------------------------------- Megatron (GPU)


def megatron_init(megatron_argv: list[str]) -> Any:
    """parse_and_validate_args + initialize_megatron, with the wheel workarounds the training entry applies."""
    from .wheel_workarounds import adjust_megatron_argv, skip_dataset_helper_compilation

    argv, notes = adjust_megatron_argv(megatron_argv)
    for note in notes:
        log(note)
    skip_dataset_helper_compilation()
    sys.argv = [sys.argv[0], *argv]
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.initialize import initialize_megatron

    args = parse_and_validate_args()
    initialize_megatron()
    return args


def build_models(args: Any) -> list[Any]:
    """The model list the training loop builds (GPTModelBuilder, Float16Module for BF16), without DDP."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import gpt_config_from_args

    config = gpt_config_from_args(args)
    builder = config.get_builder_cls()(config)
    return builder.build_distributed_models(pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                                            wrap_with_ddp=False, data_parallel_random_init=False)


def unwrap(module: Any) -> Any:
    """The GPTModel inside Float16Module / DDP wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def model_weights(model: Any) -> dict[str, Any]:
    """The model's state_dict tensors (parameters, live); TE `_extra_state` entries and empty placeholders left out."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if not k.endswith("_extra_state") and v is not None and hasattr(v, "shape") and v.numel() > 0}


def copy_into_model(model: Any, megatron_state: Mapping[str, Any]) -> list[str]:
    """Copy (with a cast to the model's dtype and device) every mapped tensor into the model.

    Returns the problems instead of copying anything when a key is missing, unexpected or mis-shaped."""
    import torch

    targets = model_weights(model)
    state = to_model_names(megatron_state, targets)
    problems = [f"model weight {k} has no mapped tensor" for k in targets if k not in state]
    problems += [f"mapped tensor {k} has no model weight" for k in state if k not in targets]
    problems += [f"{k}: model shape {list(targets[k].shape)}, mapped {list(state[k].shape)}"
                 for k in targets if k in state and tuple(targets[k].shape) != tuple(state[k].shape)]
    if problems:
        return problems
    with torch.no_grad():
        for key, target in targets.items():
            target.data.copy_(state[key].to(device=target.device, dtype=target.dtype))
    return []


def save_release(models: list[Any]) -> None:
    """Megatron's save_checkpoint as a release checkpoint into args.save: no optimizer, no RNG state."""
    from megatron.training.checkpointing import save_checkpoint

    save_checkpoint(0, models, None, None, 0, release=True)


# --------------------------------------------------------------------------- checkpoint reading (CPU)


def ensure_process_group() -> None:
    """dist_checkpointing needs a process group; megatron-to-hf joins a gloo one (torchrun's env://)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group("gloo", init_method="env://", timeout=timedelta(minutes=30))


def checkpoint_tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Global shapes of every tensor in a torch_dist checkpoint folder (no process group needed)."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(folder))
    return {key: tuple(value.global_shape) for key, value in metadata.items()}


def checkpoint_shape_problems(found: Mapping[str, tuple[int, ...]], shape: ModelShape) -> list[str]:
    """Model tensors of a checkpoint against the shape: missing, mis-shaped, or unknown (optimizer state ignored)."""
    expected = expected_checkpoint_shapes(shape)
    problems = [f"checkpoint has no {k} (expected {list(v)})" for k, v in expected.items() if k not in found]
    problems += [f"checkpoint {k} has shape {list(found[k])}, expected {list(v)}"
                 for k, v in expected.items() if k in found and tuple(found[k]) != tuple(v)]
    unknown = sorted(k for k in found if k not in expected and not k.startswith("optimizer."))
    if unknown:
        problems.append(f"checkpoint has model tensors this mapping does not know: {', '.join(unknown[:8])}")
    return problems


def read_checkpoint_folder(folder: Path, shape: ModelShape) -> dict[str, Any]:
    """The model weights of one torch_dist checkpoint folder, per-layer TE names (CPU tensors)."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(folder))
    problems = checkpoint_shape_problems({k: tuple(v.global_shape) for k, v in metadata.items()}, shape)
    if problems:
        raise SystemExit("infir2.convert: the checkpoint does not fit the model shape:\n  - " + "\n  - ".join(problems))
    wanted = {key: metadata[key] for key in expected_checkpoint_shapes(shape)}
    loaded = dist_checkpointing.load(wanted, str(folder), validate_access_integrity=False)
    return unstack_layers({key: loaded[key] for key in wanted}, shape.num_layers)


def compare_exact(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    import torch

    problems = [f"{k} missing" for k in expected if k not in found]
    problems += [f"{k} differs" for k in expected if k in found and not torch.equal(
        expected[k].detach().cpu(), found[k].detach().cpu().to(expected[k].dtype))]
    return problems


# --------------------------------------------------------------------------- modes


def run_hf_to_megatron(opts: argparse.Namespace, megatron_argv: list[str]) -> int:
    shape = shape_from_json(opts.shape)
    args = megatron_init(megatron_argv)
    models = build_models(args)
    model = unwrap(models[0])
    log(f"reading {opts.hf}")
    megatron_state = hf_to_megatron_state(read_hf_state(opts.hf), shape)
    problems = copy_into_model(model, megatron_state)
    if problems:
        log("the mapped weights do not fit the Megatron model:\n  - " + "\n  - ".join(problems))
        return 1
    del megatron_state
    log(f"saving a release checkpoint into {args.save}")
    save_release(models)
    if not opts.no_verify:
        written = read_checkpoint_folder(Path(args.save) / "release", shape)
        problems = compare_exact(from_model_names(model_weights(model)), written)
        if problems:
            log("the written checkpoint differs from the model:\n  - " + "\n  - ".join(problems[:20]))
            return 1
        log(f"verified: {len(written)} tensors read back from {Path(args.save) / 'release'} equal the model's")
    write_conversion_record(Path(args.save), opts.hf, shape)
    log(f"done: use it with --set checkpoint.pretrained={args.save}")
    return 0


def write_conversion_record(out: Path, hf_dir: Path, shape: ModelShape) -> None:
    """Beside the checkpoint: the source config.json (megatron-to-hf reuses its extra keys) and what was done."""
    import torch
    import megatron.core

    source = hf_dir / HF_CONFIG_FILE
    if source.is_file():
        (out / SOURCE_CONFIG_FILE).write_text(source.read_text())
    record = {"source": str(hf_dir.absolute()), "checkpoint": "release", "format": "torch_dist",
              "written_tensor_parallel": 1, "shape": shape.__dict__, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "torch": torch.__version__, "megatron_core": getattr(megatron.core, "__version__", "?")}
    (out / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def run_megatron_to_hf(opts: argparse.Namespace) -> int:
    shape = shape_from_json(opts.shape)
    ensure_process_group()
    log(f"reading the model tensors of {opts.ckpt}")
    megatron_state = read_checkpoint_folder(opts.ckpt, shape)
    hf_state = megatron_to_hf_state(megatron_state, shape)
    del megatron_state
    base = json.loads(opts.source_config.read_text()) if opts.source_config else None
    config = hf_config_dict(shape, base, dtype=state_dtype(hf_state))
    written = write_hf_folder(hf_state, config, opts.out)
    copied = copy_tokenizer_files(opts.tokenizer, opts.out) if opts.tokenizer else []
    found = hf_tensor_shapes(opts.out)
    expected = expected_hf_shapes(shape)
    if found != expected:
        log(f"written tensors do not match the expected Qwen2 layout: {sorted(set(found) ^ set(expected))[:8]}")
        return 1
    log(f"wrote {', '.join(p.name for p in written)}" + (f"; tokenizer files: {', '.join(copied)}" if copied else ""))
    log(f"done: {opts.out} ({len(hf_state)} tensors, vocab {shape.vocab_size} of {shape.padded_vocab_size} rows)")
    return 0


def logit_errors(reference: Any, other: Any) -> dict[str, float]:
    """Max absolute error, relative error (max abs / max |reference|), mean abs error, top-1 agreement."""
    diff = (other.float() - reference.float()).abs()
    scale = reference.float().abs().max().clamp_min(1e-12)
    return {
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / scale),
        "mean_abs": float(diff.mean()),
        "reference_max_abs": float(scale),
        "top1_agreement": float((other.argmax(-1) == reference.argmax(-1)).float().mean()),
    }


def random_tokens(batch: int, seq: int, vocab: int, seed: int) -> Any:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator)


def megatron_logits(model: Any, tokens: Any) -> Any:
    import torch

    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    model.eval()
    with torch.no_grad():
        return model(tokens, positions, None)


def hf_logits(hf_dir: Path, tokens: Any, dtype: str) -> Any:
    import torch
    from transformers import Qwen2ForCausalLM

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = Qwen2ForCausalLM.from_pretrained(str(hf_dir), dtype=torch_dtype)
    model = model.to(device=tokens.device, dtype=torch_dtype).eval()  # older transformers ignore dtype=
    with torch.no_grad():
        return model(input_ids=tokens).logits


def run_check_logits(opts: argparse.Namespace, megatron_argv: list[str]) -> int:
    import torch

    shape = shape_from_json(opts.shape)
    args = megatron_init(megatron_argv)
    models = build_models(args)
    problems = copy_into_model(unwrap(models[0]), read_checkpoint_folder(opts.ckpt, shape))
    if problems:
        log("the checkpoint does not fit the Megatron model:\n  - " + "\n  - ".join(problems))
        return 1
    tokens = random_tokens(opts.batch, opts.seq, shape.vocab_size, opts.seed).to(torch.cuda.current_device())
    meg = megatron_logits(models[0], tokens)[..., : shape.vocab_size].float().cpu()
    del models
    torch.cuda.empty_cache()
    ref = hf_logits(opts.hf, tokens, opts.dtype).float().cpu()
    errors = logit_errors(ref, meg)
    report = {"hf": str(opts.hf), "megatron_checkpoint": str(opts.ckpt), "dtype": opts.dtype,
              "batch": opts.batch, "seq": opts.seq, "seed": opts.seed, "vocab": shape.vocab_size,
              "padded_vocab": shape.padded_vocab_size, **errors, "max_rel_allowed": opts.max_rel,
              "ok": errors["max_rel"] <= opts.max_rel}
    print(json.dumps(report, indent=2), flush=True)
    if opts.report:
        opts.report.parent.mkdir(parents=True, exist_ok=True)
        opts.report.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> None:
    from .entry import die_with_launcher

    die_with_launcher()
    opts, megatron_argv = parse_entry_args(list(sys.argv[1:] if argv is None else argv))
    if opts.mode == "hf-to-megatron":
        code = run_hf_to_megatron(opts, megatron_argv)
    elif opts.mode == "megatron-to-hf":
        code = run_megatron_to_hf(opts)
    else:
        code = run_check_logits(opts, megatron_argv)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(code)


if __name__ == "__main__":
    from infir2_cpt.runtime.exit_guard import run_bounded

    run_bounded(main)
