"""The SwiGLU input kept for backward in FP8 with one scale per 128 values (precision.fp8_activation_store_blockwise).

The SwiGLU input (the FC1 output, 2 x ffn_hidden_size per token) is the widest activation a layer keeps for
backward: 4 bytes per FFN element and token in BF16. Megatron's own FP8 store casts it to E4M3 without a scale
(values above 448 become NaN); Transformer Engine's SwiGLU scales it with one factor per tensor, so a few large
values cost every small one its precision. Here it is quantized the way the blockwise recipe quantizes GEMM
inputs: E4M3 in tiles of 128 consecutive values along the feature dimension, each tile with its own FP32 scale
(amax -> 448). The forward pass computes SwiGLU from the BF16 input as Megatron does, so forward activations are
unchanged; only backward reads the quantized copy. 1 byte + 4/128 bytes per element instead of 2.

Plain torch (torch.float8_e4m3fn), so it runs wherever torch does; quantizing and dequantizing go in chunks of rows
so that their FP32 temporaries stay small next to the activations they replace.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

BLOCK = 128  # values per scale, along the last dimension: the blockwise recipe's activation tile
E4M3_MAX = 448.0
CHUNK_ELEMENTS = 1 << 24  # FP32 temporaries of at most 64 MiB while quantizing or dequantizing


def _rows_per_chunk(width: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(width, 1))


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, n), n a multiple of 128 -> E4M3 data (rows, n) and the FP32 factor that gives each tile back
    (rows, n / 128): x ~= data * factor. An all-zero tile gets factor 1."""
    rows, width = x.shape
    if width % BLOCK:
        raise ValueError(f"the last dimension ({width}) must be a multiple of {BLOCK}")
    data = torch.empty((rows, width), dtype=torch.float8_e4m3fn, device=x.device)
    factors = torch.empty((rows, width // BLOCK), dtype=torch.float32, device=x.device)
    step = _rows_per_chunk(width)
    for start in range(0, rows, step):
        tiles = x[start:start + step].float().view(-1, width // BLOCK, BLOCK)
        amax = tiles.abs().amax(dim=-1, keepdim=True)
        factor = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        data[start:start + step] = (tiles / factor).view(-1, width).to(torch.float8_e4m3fn)
        factors[start:start + step] = factor.squeeze(-1)
    return data, factors


def dequantize_rows(data: torch.Tensor, factors: torch.Tensor, start: int, stop: int, dtype: torch.dtype
                    ) -> torch.Tensor:
    """Rows start:stop of a quantized tensor, back in dtype."""
    width = data.shape[1]
    tiles = data[start:stop].float().view(-1, width // BLOCK, BLOCK) * factors[start:stop].unsqueeze(-1)
    return tiles.view(-1, width).to(dtype)


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
        rows, width = data.shape
        grad_x = torch.empty((rows, width), dtype=grad.dtype, device=grad.device)
        step = _rows_per_chunk(width)
        for start in range(0, rows, step):
            x = dequantize_rows(data, factors, start, start + step, ctx.dtype)
            grad_x[start:start + step] = ctx.swiglu_back(grad[start:start + step], x)
        return grad_x, None, None


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
