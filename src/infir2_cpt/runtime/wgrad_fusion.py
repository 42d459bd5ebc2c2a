"""A stand-in for APEX's `fused_weight_gradient_mlp_cuda`, so that gradient-accumulation fusion can stay on
without APEX.

Megatron's own linear layers (in a TE model only the output layer) call this module to accumulate their
weight gradient straight into the FP32 `main_grad` buffer; without it, Megatron refuses
`--gradient-accumulation-fusion` and we must pass `--no-gradient-accumulation-fusion`, which also turns
off Transformer Engine's native fusion in every TE layer (TE reads the same config flag). Each TE weight
then writes a BF16 gradient per micro-batch that Megatron's DDP hook adds to `main_grad` afterwards.

The stand-in does what APEX's kernel does, with Transformer Engine's GEMM (`general_gemm`, accumulate
into `out` with the output in `main_grad`'s dtype, as TE's own layers call it), and a plain FP32 matmul
where TE or CUDA is absent (the CPU tests).

Switched by the environment variable INFIR2_WGRAD_FUSION (recipe key `env.INFIR2_WGRAD_FUSION`):
`1` (every shipped recipe sets it) registers the stand-in when APEX is missing; `0`, or unset, leaves
gradient-accumulation fusion off without APEX. Measured: benchmarks/README.md ("Keeping gradient-accumulation
fusion").
"""

from __future__ import annotations

import functools
import importlib.machinery
import os
import sys
import types

import torch

from .wheel_workarounds import APEX_WGRAD_MODULE as MODULE_NAME
from .wheel_workarounds import apex_wgrad_fusion_available

ENV_SWITCH = "INFIR2_WGRAD_FUSION"


@functools.cache  # looked up once: the stand-in runs in every backward pass of the output layer
def _te_general_gemm():
    """Transformer Engine's GEMM, or None where TE cannot be imported (CPU-only installs)."""
    try:
        from transformer_engine.pytorch.cpp_extensions import general_gemm
    except Exception:  # noqa: BLE001 - any import failure means: use the matmul fallback
        return None
    return general_gemm


def _accumulate(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad += grad_output^T @ total_input, for 2-D [tokens, in] and [tokens, out] operands."""
    if total_input.dim() != 2 or grad_output.dim() != 2:
        raise ValueError(f"{MODULE_NAME} stand-in: expected 2-D operands, got input "
                         f"{tuple(total_input.shape)} and grad_output {tuple(grad_output.shape)}")
    expected = (grad_output.shape[1], total_input.shape[1])
    if tuple(main_grad.shape) != expected:
        raise ValueError(f"{MODULE_NAME} stand-in: main_grad is {tuple(main_grad.shape)}, expected {expected}")
    gemm = _te_general_gemm() if main_grad.is_cuda else None
    if gemm is not None:
        # The layout and argument order TE's own Linear uses for its fused weight-gradient GEMM.
        gemm(total_input, grad_output, out_dtype=main_grad.dtype, accumulate=True, layout="NT",
             out=main_grad, grad=True)
        return
    product = grad_output.t().to(torch.float32) @ total_input.to(torch.float32)
    main_grad.add_(product.to(main_grad.dtype))


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """APEX's signature: accumulate the weight gradient into an FP32 main_grad."""
    if main_grad.dtype != torch.float32:
        raise TypeError(f"wgrad_gemm_accum_fp32 needs an FP32 main_grad, got {main_grad.dtype}")
    _accumulate(total_input, grad_output, main_grad)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """APEX's signature: accumulate the weight gradient into a BF16/FP16 main_grad."""
    if main_grad.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"wgrad_gemm_accum_fp16 needs a BF16/FP16 main_grad, got {main_grad.dtype}")
    _accumulate(total_input, grad_output, main_grad)


def enabled(environ: dict[str, str] | None = None) -> bool:
    value = (os.environ if environ is None else environ).get(ENV_SWITCH, "0").strip().lower()
    return value in ("1", "true", "yes", "on")


def install() -> None:
    """Register the stand-in under APEX's module name unless the real module (or the stand-in) is there.
    Must run before megatron.core.tensor_parallel is imported, which probes the module once at import time."""
    if apex_wgrad_fusion_available():
        return
    module = types.ModuleType(MODULE_NAME, __doc__)
    module.__spec__ = importlib.machinery.ModuleSpec(MODULE_NAME, loader=None, origin=__name__)
    module.wgrad_gemm_accum_fp32 = wgrad_gemm_accum_fp32  # type: ignore[attr-defined]
    module.wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp16  # type: ignore[attr-defined]
    module.infir2_stand_in = True  # type: ignore[attr-defined]
    sys.modules[MODULE_NAME] = module


def stand_in_registered() -> bool:
    return getattr(sys.modules.get(MODULE_NAME), "infir2_stand_in", False)


def install_if_enabled(environ: dict[str, str] | None = None) -> bool:
    """The entry's switch: register the stand-in when INFIR2_WGRAD_FUSION asks for it. True when the stand-in
    is what Megatron will find (False when switched off, or when APEX itself is installed)."""
    if enabled(environ):
        install()
    return stand_in_registered()
