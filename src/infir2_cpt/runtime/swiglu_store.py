"""The SwiGLU input kept for backward in FP8 with one scale per 128 values (precision.fp8_activation_store_blockwise).

The SwiGLU input (the FC1 output, 2 x ffn_hidden_size per token) is the widest activation a layer keeps for
backward: 4 bytes per FFN element and token in BF16. Megatron's own FP8 store casts it to E4M3 without a scale
(values above 448 become NaN); Transformer Engine's SwiGLU scales it with one factor per tensor, so a few large
values cost every small one its precision. Here it is quantized the way the blockwise recipe quantizes GEMM
inputs: E4M3 in tiles of 128 consecutive values along the feature dimension, each tile with its own FP32 scale
(amax -> 448). The forward pass computes SwiGLU from the BF16 input as Megatron does, so forward activations are
unchanged; only backward reads the quantized copy. 1 byte + 4/128 bytes per element instead of 2.

On a GPU, quantizing (forward) and dequantizing with SwiGLU's backward are each one kernel compiled by
torch.compile, as Megatron compiles its own SwiGLU: the input is read once, and no FP32 temporaries are made. Elsewhere
the same functions run eagerly in chunks of rows, so that their FP32 temporaries stay small. On the CPU both give the
same bytes; on an H200 the compiled kernels round some values differently (the input's gradient within 0.004 of the
eager form's at the 7B shape), and the compiled form is the one whose fidelity and speed docs/fp8.md reports.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

BLOCK = 128  # values per scale, along the last dimension: the blockwise recipe's activation tile
E4M3_MAX = 448.0
CHUNK_ELEMENTS = 1 << 24  # eager: FP32 temporaries of at most 64 MiB while quantizing or dequantizing
COMPILED_DEVICE_TYPES = ("cuda",)  # where the compiled kernels run (tests add "cpu")

SwiGLUBack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _rows_per_chunk(width: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(width, 1))


def _check_width(width: int) -> None:
    if width % BLOCK:
        raise ValueError(f"the last dimension ({width}) must be a multiple of {BLOCK}")


def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, n) -> E4M3 data (rows, n) and the FP32 factor that gives each tile of 128 back (rows, n / 128):
    x ~= data * factor. An all-zero tile gets factor 1."""
    rows, width = x.shape
    tiles = x.float().view(rows, width // BLOCK, BLOCK)
    amax = tiles.abs().amax(dim=-1, keepdim=True)
    factor = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (tiles / factor).view(rows, width).to(torch.float8_e4m3fn), factor.squeeze(-1)


def _round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """FP32 rounded to the nearest BF16 (ties to even), still FP32. Written in integers so that a compiled kernel
    cannot skip the rounding, as it may skip a cast to BF16 and back inside one kernel."""
    bits = x.view(torch.int32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.view(torch.float32)


def dequantize_tiles(data: torch.Tensor, factors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The quantized rows back in dtype."""
    rows, width = data.shape
    x = (data.float().view(rows, width // BLOCK, BLOCK) * factors.unsqueeze(-1)).view(rows, width)
    return (_round_to_bf16(x) if dtype == torch.bfloat16 else x).to(dtype)


def _compiled(x: torch.Tensor) -> bool:
    return x.device.type in COMPILED_DEVICE_TYPES


@functools.cache
def _compiled_quantize() -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return torch.compile(quantize_tiles)


@functools.cache
def _compiled_backward(swiglu_back: SwiGLUBack) -> Callable[..., torch.Tensor]:
    def backward(grad: torch.Tensor, data: torch.Tensor, factors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return swiglu_back(grad, dequantize_tiles(data, factors, dtype))

    return torch.compile(backward)


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, n), n a multiple of 128 -> (data, factors) as quantize_tiles gives them, compiled or in chunks."""
    rows, width = x.shape
    _check_width(width)
    x = x.contiguous()  # the tiles are views of whole rows (a no-op for the FC1 output Megatron passes)
    if _compiled(x):
        return _compiled_quantize()(x)
    data = torch.empty((rows, width), dtype=torch.float8_e4m3fn, device=x.device)
    factors = torch.empty((rows, width // BLOCK), dtype=torch.float32, device=x.device)
    step = _rows_per_chunk(width)
    for start in range(0, rows, step):
        data[start:start + step], factors[start:start + step] = quantize_tiles(x[start:start + step])
    return data, factors


def swiglu_back_quantized(swiglu_back: SwiGLUBack, grad: torch.Tensor, data: torch.Tensor, factors: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    """swiglu_back(grad, the input dequantized to dtype), compiled into one kernel or in chunks of rows."""
    if _compiled(data):
        return _compiled_backward(swiglu_back)(grad, data, factors, dtype)
    rows, width = data.shape
    grad_x = torch.empty((rows, width), dtype=grad.dtype, device=grad.device)
    step = _rows_per_chunk(width)
    for start in range(0, rows, step):
        rows_x = dequantize_tiles(data[start:start + step], factors[start:start + step], dtype)
        grad_x[start:start + step] = swiglu_back(grad[start:start + step], rows_x)
    return grad_x


class BlockwiseStoreSwiGLU(torch.autograd.Function):
    """SwiGLU of a (rows, 2 x ffn) input whose backward reads the input from a blockwise FP8 copy."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, swiglu: Callable[[torch.Tensor], torch.Tensor],
                swiglu_back: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        data, factors = quantize_blocks(x)
        ctx.save_for_backward(data, factors)
        ctx.dtype, ctx.swiglu_back = x.dtype, swiglu_back
        return swiglu(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        data, factors = ctx.saved_tensors
        return swiglu_back_quantized(ctx.swiglu_back, grad.contiguous(), data, factors, ctx.dtype), None, None


def make_swiglu_impl(swiglu: Callable[[torch.Tensor], torch.Tensor],
                     swiglu_back: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A stand-in for megatron.core's bias_swiglu_impl(input, bias, fp8_input_store, cpu_offload_input) that keeps
    the input in blockwise FP8; swiglu and swiglu_back are megatron.core's own functions (the same arithmetic)."""

    def bias_swiglu_impl(input: torch.Tensor, bias: torch.Tensor | None, fp8_input_store: bool = False,
                         cpu_offload_input: bool = False) -> torch.Tensor:
        shape = input.shape
        if len(shape) not in (2, 3):
            raise ValueError(f"SwiGLU input of shape {tuple(shape)}: 2 or 3 dimensions expected")
        flat = input.reshape(-1, shape[-1])
        if bias is not None:  # autograd takes the bias's gradient through the addition
            flat = flat + bias
        if torch.is_grad_enabled() and flat.requires_grad:
            out = BlockwiseStoreSwiGLU.apply(flat, swiglu, swiglu_back)
        else:  # evaluation: nothing is kept for a backward pass, so nothing to quantize
            out = swiglu(flat)
        return out if len(shape) == 2 else out.view(shape[0], shape[1], -1)

    bias_swiglu_impl.__infir2_blockwise_store__ = True  # type: ignore[attr-defined]
    return bias_swiglu_impl


def install() -> None:
    """Megatron's MLP calls bias_swiglu_impl by the name it imported: replace that name."""
    import megatron.core.transformer.mlp as mlp
    from megatron.core.fusions.fused_bias_swiglu import swiglu, swiglu_back

    if getattr(mlp.bias_swiglu_impl, "__infir2_blockwise_store__", False):
        return
    mlp.bias_swiglu_impl = make_swiglu_impl(swiglu, swiglu_back)
