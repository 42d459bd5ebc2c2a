"""`infir2 convert hf-to-megatron | megatron-to-hf | check-logits` (docs/conversion.md)."""

from __future__ import annotations

import sys

import typer

from ..convert.plan import (CheckLogitsRequest, ConvertPlan, HfToMegatronRequest, MegatronToHfRequest, format_plan,
                            plan_check_logits, plan_hf_to_megatron, plan_megatron_to_hf, run_plan)


def _print_or_run(plan: ConvertPlan, dry_run: bool) -> None:
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if dry_run:
        print(format_plan(plan))
        return
    code = run_plan(plan)
    if code:
        raise typer.Exit(code)


def hf_to_megatron(req: HfToMegatronRequest) -> None:
    """Convert a Hugging Face Qwen2.5 model into a Megatron torch_dist checkpoint for checkpoint.pretrained.

    The HF config.json must agree with the recipe's model section (every difference is listed, exit 2). The
    vocabulary is padded with zero rows to the recipe's padded size. Writes OUT/release and a tracker saying
    'release' (weights only, what Megatron's --pretrained-checkpoint loads), then reads it back and compares it
    bit for bit. Runs on one GPU, in BF16; then train with --set checkpoint.pretrained=OUT.

    Examples:

    
      infir2 convert hf-to-megatron --hf /models/Qwen2.5-7B --out ckpt/qwen2.5-7b --recipe 7b
    """
    _print_or_run(plan_hf_to_megatron(req), req.dry_run)


def megatron_to_hf(req: MegatronToHfRequest) -> None:
    """Convert one Megatron checkpoint into a Hugging Face Qwen2ForCausalLM folder (safetensors + config.json).

    Only the model weights are read (no optimizer state); padding rows of the vocabulary are dropped. The model
    shape comes from --recipe, or from exp/<name>/recipe.yaml when CKPT is inside an experiment. Every tensor is
    checked against that shape before anything runs (exit 2). Needs no GPU.

    Examples:

    
      infir2 convert megatron-to-hf --ckpt exp/NAME/checkpoints/iter_0040000 --out hf/NAME
    """
    _print_or_run(plan_megatron_to_hf(req), req.dry_run)


def check_logits(req: CheckLogitsRequest) -> None:
    """Run a Megatron checkpoint and a Hugging Face model on the same tokens and compare their logits.

    Prints the max absolute and relative error (and mean error, top-1 agreement); exit 1 when the relative
    error exceeds --max-rel. The Megatron model runs without FP8, in --dtype, on one GPU.

    Examples:

    
      infir2 convert check-logits --hf /models/Qwen2.5-7B --ckpt ckpt/qwen2.5-7b/release
    """
    _print_or_run(plan_check_logits(req), req.dry_run)
