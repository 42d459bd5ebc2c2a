"""infir2's lean cross entropy (parallel.cross_entropy_fusion: lean) on one process: the loss and gradient of an
independent FP32 computation, whatever the chunking, compiled or eager; the gradient written over the logits;
Megatron's language model routed to it. Across tensor-parallel ranks, against Megatron's own fused loss:
tests/process/test_lean_cross_entropy_tp.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from infir2_cpt.runtime import lean_cross_entropy as lean

SEQ, BATCH, VOCAB = 9, 2, 384


def inputs(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    logits = (torch.randn(SEQ, BATCH, VOCAB) * 4).to(dtype)
    return logits, torch.randint(0, VOCAB, (SEQ, BATCH)), torch.rand(SEQ, BATCH)


def reference(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradient (rounded to the logits' dtype) by torch's own cross entropy in FP32."""
    x = logits.detach().float().clone().requires_grad_()
    loss = F.cross_entropy(x.view(-1, VOCAB), target.view(-1), reduction="none").view(target.shape)
    (loss * weight).sum().backward()
    assert x.grad is not None
    return loss.detach(), x.grad.to(logits.dtype)


def lean_run(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
             chunk_bytes: int = lean.CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.clone().requires_grad_()
    produced = leaf * 1  # logits come out of the head's GEMM: not a leaf
    loss = lean.lean_vocab_parallel_cross_entropy(produced, target, None, chunk_bytes)
    (loss * weight).sum().backward()
    assert leaf.grad is not None
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loss_and_gradient_are_torchs_cross_entropy(dtype: torch.dtype) -> None:
    logits, target, weight = inputs(dtype)
    want_loss, want_grad = reference(logits, target, weight)
    loss, grad = lean_run(logits, target, weight)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    # one rounding to the logits' dtype, as Megatron's fused loss rounds its FP32 gradient
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=2 ** -8, atol=1e-7)


@pytest.mark.parametrize("rows_per_chunk", [1, 4, 7, SEQ * BATCH])
def test_chunking_changes_nothing(rows_per_chunk: int) -> None:
    logits, target, weight = inputs()
    whole_loss, whole_grad = lean_run(logits, target, weight)
    loss, grad = lean_run(logits, target, weight, chunk_bytes=4 * VOCAB * rows_per_chunk)
    assert torch.equal(loss, whole_loss) and torch.equal(grad, whole_grad)


def test_the_compiled_kernels_give_the_eager_results(monkeypatch: pytest.MonkeyPatch) -> None:
    logits, target, weight = inputs()
    eager = lean_run(logits, target, weight, chunk_bytes=4 * VOCAB * 5)
    monkeypatch.setattr(lean, "COMPILED_DEVICE_TYPES", ("cpu",))
    compiled = lean_run(logits, target, weight, chunk_bytes=4 * VOCAB * 5)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled[1].float(), eager[1].float(), rtol=2 ** -8, atol=1e-7)


def test_backward_writes_the_gradient_over_the_logits() -> None:
    """No gradient buffer beside the logits: the loss's gradient is the logits' own storage."""
    logits, target, weight = inputs()
    produced = logits.clone().requires_grad_() * 1
    storage = produced.data_ptr()
    seen: list[torch.Tensor] = []
    produced.register_hook(seen.append)
    (lean.lean_vocab_parallel_cross_entropy(produced, target) * weight).sum().backward()
    assert seen[0].data_ptr() == storage
    torch.testing.assert_close(seen[0].float(), reference(logits, target, weight)[1].float(), rtol=2 ** -8, atol=1e-7)


def test_evaluation_leaves_the_logits_alone() -> None:
    logits, target, _ = inputs()
    kept = logits.clone()
    with torch.no_grad():
        loss = lean.lean_vocab_parallel_cross_entropy(logits, target)
    assert torch.equal(logits, kept)
    torch.testing.assert_close(loss, reference(logits, target, torch.ones(SEQ, BATCH))[0], rtol=1e-6, atol=1e-6)


def test_large_logits_stay_finite() -> None:
    """The row maximum is subtracted before exponentials, as in Megatron's loss."""
    logits, target, weight = inputs()
    logits = logits.float() * 0 + torch.linspace(0, 3000, VOCAB)
    loss, grad = lean_run(logits, target, weight)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, reference(logits, target, weight)[0], rtol=1e-6, atol=1e-4)


def test_shapes_that_do_not_match_are_refused() -> None:
    logits, target, _ = inputs()
    with pytest.raises(ValueError, match="do not match"):
        lean.lean_vocab_parallel_cross_entropy(logits, target.t())


def test_megatrons_language_model_computes_its_loss_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """install() replaces the name Megatron's language module calls, and its own compute_language_model_loss (the
    wheel's code, with the fused loss configured as the recipes configure it) then returns the lean loss."""
    from megatron.core.models.common.language_module import language_module

    monkeypatch.setattr(language_module, "fused_vocab_parallel_cross_entropy",
                        language_module.fused_vocab_parallel_cross_entropy)  # restored after the test
    lean.install()
    assert language_module.fused_vocab_parallel_cross_entropy is lean.lean_vocab_parallel_cross_entropy
    logits, target, _ = inputs()
    model = SimpleNamespace(config=SimpleNamespace(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native"),
                            pg_collection=SimpleNamespace(tp=None))
    loss = language_module.LanguageModule.compute_language_model_loss(model, target.t(), logits)  # labels [b, s]
    torch.testing.assert_close(loss, reference(logits, target, torch.ones(SEQ, BATCH))[0].t(), rtol=1e-6, atol=1e-6)
