"""Started by tests/process/test_lean_cross_entropy_tp.py under torchrun (gloo, CPU): every rank holds its part of
the vocabulary, as Megatron splits the logits across tensor-parallel ranks, and computes the loss and its gradient
with infir2's lean loss and with Megatron's own fused loss (its functions run eagerly: compiling them on the CPU
takes long and changes no arithmetic). Each rank writes the largest differences, also against one process's
loss over the whole vocabulary, to OUT/rank<R>.json."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch._dynamo
import torch.distributed as dist
import torch.nn.functional as F

SEQ, BATCH, VOCAB = 12, 2, 512


def main() -> None:
    torch._dynamo.config.disable = True
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    from infir2_cpt.runtime.lean_cross_entropy import lean_vocab_parallel_cross_entropy

    torch.manual_seed(7)  # the same whole logits on every rank
    whole = (torch.randn(SEQ, BATCH, VOCAB) * 4).to(torch.bfloat16)
    whole[3, 1, 100] = 60.0  # one row dominated by a single logit, on rank 0's part
    target = torch.randint(0, VOCAB, (SEQ, BATCH))
    weight = torch.rand(SEQ, BATCH)
    part = VOCAB // world
    mine = whole[..., rank * part:(rank + 1) * part]

    x = whole.float().clone().requires_grad_()
    want = F.cross_entropy(x.view(-1, VOCAB), target.view(-1), reduction="none").view(SEQ, BATCH)
    (want * weight).sum().backward()
    assert x.grad is not None
    want_grad = x.grad[..., rank * part:(rank + 1) * part].to(torch.bfloat16)

    results = {}
    for name, loss_fn in (("lean", lean_vocab_parallel_cross_entropy), ("megatron", fused_vocab_parallel_cross_entropy)):
        leaf = mine.clone().requires_grad_()
        loss = loss_fn(leaf * 1, target, dist.group.WORLD)
        (loss * weight).sum().backward()
        assert leaf.grad is not None
        results[name] = (loss.detach(), leaf.grad)

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).abs().max())

    report = {
        "rank": rank, "world": world,
        "loss_lean_vs_megatron": diff(results["lean"][0], results["megatron"][0]),
        "grad_lean_vs_megatron": diff(results["lean"][1], results["megatron"][1]),
        "grad_entries_differing": int((results["lean"][1] != results["megatron"][1]).sum()),
        "loss_lean_vs_whole": diff(results["lean"][0], want.detach()),
        "grad_lean_vs_whole": diff(results["lean"][1], want_grad),
        "grad_scale": float(want_grad.float().abs().max()),
    }
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(report, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
