"""The loss without FP32 copies of the logits (parallel.cross_entropy_fusion: lean).

Megatron's fused cross entropy (megatron-core 0.19.2, `native`) turns the logits into FP32 twice while computing the
loss, a shifted copy and its exponentials, and keeps the softmax in FP32 for backward. With a 152k vocabulary and
8192 tokens per micro batch that is 4.6 GiB per copy beside the 2.3 GiB of BF16 logits: 11.6 GiB at the moment the
loss is computed, the peak of a training step (measured at the 7B shape, in both precisions). Transformer Engine's
in-place loss, which avoided this, is refused by that wheel.

This loss does the same arithmetic with the same precision and keeps only the BF16 logits and two FP32 numbers per
token (the row maximum and the sum of exponentials):

- forward: the row maximum, then in chunks of rows the sum of exp(logit - max) and the target's logit, in FP32; one
  all-reduce each across the tensor-parallel ranks that hold parts of the vocabulary (max, then the sums);
  loss = log(sum) - (target logit - max);
- backward: in chunks of rows, the softmax rebuilt in FP32 from the saved BF16 logits and statistics, minus 1 at
  the target, times the incoming gradient, rounded once to the logits' dtype and written over the logits (nothing
  reads them after the loss). That is the gradient Megatron's version computes from its stored FP32 softmax.

On a GPU the per-chunk arithmetic (exponentials and their sum; the gradient) is one kernel each, compiled by
torch.compile as Megatron compiles its own loss; elsewhere it runs eagerly. Chunks of rows bound what a chunk
allocates (CHUNK_BYTES of FP32 when eager). Sums may run in a different order than Megatron's, so results agree to
FP32 rounding, not always bit for bit.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

CHUNK_BYTES = 256 << 20  # FP32 temporaries per chunk of rows (eager)
COMPILED_DEVICE_TYPES = ("cuda",)  # where the chunk arithmetic is compiled (tests add "cpu")


def sum_exp(x: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """Per row: the sum of exp(x - row_max), in FP32."""
    return torch.exp(x.float() - row_max[:, None]).sum(dim=-1)


def scaled_softmax(x: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per row: softmax(x) * grad, from the row's maximum and sum of exponentials, rounded once to x's dtype."""
    return (torch.exp(x.float() - row_max[:, None]) / row_sum[:, None] * grad[:, None]).to(x.dtype)


@functools.cache
def _compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return torch.compile(fn)


def _kernel(fn: Callable[..., torch.Tensor], x: torch.Tensor) -> Callable[..., torch.Tensor]:
    return _compiled(fn) if x.device.type in COMPILED_DEVICE_TYPES else fn


def _tp_rank_and_size(tp_group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def _all_reduce(tensor: torch.Tensor, op_name: str, tp_group: Any, size: int) -> None:
    if size > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op_name), group=tp_group)


def _row_chunks(rows: int, width: int, chunk_bytes: int) -> list[slice]:
    step = max(1, chunk_bytes // (4 * max(width, 1)))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class _LeanCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, tp_group: Any,
                chunk_bytes: int) -> torch.Tensor:
        rank, size = _tp_rank_and_size(tp_group)
        width = logits.shape[-1]
        x = logits.view(-1, width)
        first = rank * width  # this rank's part of the vocabulary: [first, first + width)
        flat_target = target.reshape(-1)
        held = (flat_target >= first) & (flat_target < first + width)
        local_target = torch.where(held, flat_target - first, torch.zeros_like(flat_target))
        chunks = _row_chunks(x.shape[0], width, chunk_bytes)

        row_max = x.amax(dim=-1).float()  # a maximum makes no FP32 copy: no chunks needed
        _all_reduce(row_max, "MAX", tp_group, size)

        sums = torch.empty(2, x.shape[0], dtype=torch.float32, device=x.device)  # sum of exponentials, target logit
        kernel = _kernel(sum_exp, x)
        for rows in chunks:
            sums[0, rows] = kernel(x[rows], row_max[rows])
        target_logit = x.gather(1, local_target[:, None]).squeeze(1)  # as stored: backward's target entries need it
        sums[1] = torch.where(held, target_logit.float() - row_max, torch.zeros_like(row_max))
        _all_reduce(sums, "SUM", tp_group, size)

        ctx.save_for_backward(logits, row_max, sums[0], held, local_target, target_logit)
        ctx.chunk_bytes = chunk_bytes
        return (torch.log(sums[0]) - sums[1]).view(target.shape)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        logits, row_max, row_sum, held, local_target, target_logit = ctx.saved_tensors
        width = logits.shape[-1]
        x = logits.view(-1, width)  # overwritten with its own gradient, chunk by chunk
        grad = grad_loss.reshape(-1).float()
        kernel = _kernel(scaled_softmax, x)
        for rows in _row_chunks(x.shape[0], width, ctx.chunk_bytes):
            x[rows] = kernel(x[rows], row_max[rows], row_sum[rows], grad[rows])
        # the targets' entries: (softmax - 1) * grad, from the logits as they were; rows whose target another rank
        # holds keep what the kernel wrote (no device-to-host copy to find the rows)
        column = local_target[:, None]
        at_target = ((torch.exp(target_logit.float() - row_max) / row_sum - 1.0) * grad).to(x.dtype)
        x.scatter_(1, column, torch.where(held, at_target, x.gather(1, column).squeeze(1))[:, None])
        return logits, None, None, None


def lean_vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group: Any = None,
                                      chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Per-token cross entropy of logits [..., vocabulary part] against target [...] (vocabulary ids), the vocabulary
    split in equal consecutive parts across tp_group's ranks as Megatron splits it. Returns FP32 losses of target's
    shape. Backward overwrites the logits with their gradient."""
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    return _LeanCrossEntropy.apply(logits.contiguous(), target, tp_group, chunk_bytes)


def install() -> None:
    """Megatron's language model calls its fused cross entropy by the name it imported; point that name here."""
    import megatron.core.models.common.language_module.language_module as language_module

    if not hasattr(language_module, "fused_vocab_parallel_cross_entropy"):
        raise RuntimeError("megatron-core has no fused_vocab_parallel_cross_entropy in its language module: "
                           "parallel.cross_entropy_fusion: lean does not fit this version")
    language_module.fused_vocab_parallel_cross_entropy = lean_vocab_parallel_cross_entropy
