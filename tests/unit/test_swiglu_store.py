"""The SwiGLU input kept in blockwise FP8 for backward (runtime/swiglu_store.py): the quantization's error bound
per 128-value tile, what autograd keeps, the gradients against exact SwiGLU, and Megatron's MLP calling it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infir2_cpt.runtime import swiglu_store
from infir2_cpt.runtime.swiglu_store import BLOCK, dequantize_tiles, make_swiglu_impl, quantize_blocks


def swiglu(y: torch.Tensor) -> torch.Tensor:  # the reference: SiLU of the first half times the second
    a, b = torch.chunk(y, 2, -1)
    return F.silu(a) * b


def swiglu_back(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y = y.detach().requires_grad_()
    with torch.enable_grad():
        out = swiglu(y)
    (grad,) = torch.autograd.grad(out, y, g)
    return grad


def test_each_tile_of_128_keeps_its_own_scale_within_e4m3s_rounding() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 4 * BLOCK)
    x[3, 5] = 3e4  # an outlier costs only its own tile its precision
    x[7, BLOCK:2 * BLOCK] = 0  # an all-zero tile
    data, factors = quantize_blocks(x)
    assert data.dtype == torch.float8_e4m3fn and data.shape == x.shape
    assert factors.dtype == torch.float32 and factors.shape == (64, 4)
    back = dequantize_tiles(data, factors, torch.float32)
    tiles, back_tiles = x.view(64, 4, BLOCK), back.view(64, 4, BLOCK)
    amax = tiles.abs().amax(-1)
    # E4M3 keeps 3 mantissa bits: every value within 1/16 of its tile's largest, the largest itself (448) to FP32
    assert ((back_tiles - tiles).abs().amax(-1) <= amax / 16).all()
    assert torch.allclose(back_tiles.abs().amax(-1), amax, rtol=1e-6, atol=0)
    assert torch.equal(back[7, BLOCK:2 * BLOCK], torch.zeros(BLOCK)) and factors[7, 1] == 1
    # the outlier's neighbours in other tiles stay as precise as without it
    other = (back[3, BLOCK:] - x[3, BLOCK:]).abs() / x[3, BLOCK:].abs().clamp(min=1e-3)
    assert other.median() < 0.05
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize_blocks(torch.zeros(2, 100))


def test_chunks_give_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(50, 2 * BLOCK, dtype=torch.bfloat16)
    whole = quantize_blocks(x)
    monkeypatch.setattr(swiglu_store, "CHUNK_ELEMENTS", 3 * 2 * BLOCK)  # 3 rows at a time, a short last chunk
    chunked = quantize_blocks(x)
    assert torch.equal(whole[0].view(torch.uint8), chunked[0].view(torch.uint8))
    assert torch.equal(whole[1], chunked[1])


def test_a_strided_input_gives_the_bytes_of_its_contiguous_copy() -> None:
    wide = torch.randn(20, 3 * BLOCK, dtype=torch.bfloat16)
    x = wide[:, :2 * BLOCK]  # rows 3 tiles apart in memory
    assert not x.is_contiguous()
    strided, dense = quantize_blocks(x), quantize_blocks(x.contiguous())
    assert torch.equal(strided[0].view(torch.uint8), dense[0].view(torch.uint8)) and torch.equal(strided[1], dense[1])


def test_dequantizing_to_bf16_rounds_as_a_cast_does() -> None:
    """The integer rounding (which a compiled kernel cannot skip) is the cast's round-to-nearest-even."""
    torch.manual_seed(2)
    x = torch.cat([torch.randn(40, 4 * BLOCK) * s for s in (1e-3, 1.0, 50.0)]).to(torch.bfloat16)
    data, factors = quantize_blocks(x)
    exact = (data.float().view(120, 4, BLOCK) * factors.unsqueeze(-1)).view(120, -1)
    assert torch.equal(dequantize_tiles(data, factors, torch.bfloat16), exact.to(torch.bfloat16))
    halfway = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.0]).view(torch.int32)
    assert torch.equal(swiglu_store._round_to_bf16(halfway.view(torch.float32)),
                       halfway.view(torch.float32).to(torch.bfloat16).float())


def test_the_compiled_kernels_give_the_eager_bytes_with_megatrons_swiglu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU quantizing and SwiGLU's backward are compiled (torch.compile, one kernel each); compiled here on the
    CPU, they must give the chunked eager path's bytes, Megatron's compiled swiglu_back included."""
    from megatron.core.fusions.fused_bias_swiglu import swiglu as mswiglu, swiglu_back as mswiglu_back

    torch.manual_seed(3)
    x = (torch.randn(96, 6 * BLOCK) * 3).to(torch.bfloat16).requires_grad_()
    with torch.no_grad():
        x[5, 7] = 3e4
    g = torch.randn(96, 3 * BLOCK, dtype=torch.bfloat16)
    impl = make_swiglu_impl(mswiglu, mswiglu_back)
    monkeypatch.setattr(swiglu_store, "CHUNK_ELEMENTS", 10 * 6 * BLOCK)
    eager_q = quantize_blocks(x.detach())
    out = impl(x, None)
    out.backward(g)
    eager_grad = x.grad
    x.grad = None
    monkeypatch.setattr(swiglu_store, "COMPILED_DEVICE_TYPES", ("cpu",))
    compiled_q = quantize_blocks(x.detach())
    assert torch.equal(eager_q[0].view(torch.uint8), compiled_q[0].view(torch.uint8))
    assert torch.equal(eager_q[1], compiled_q[1])
    out = impl(x, None)
    out.backward(g)
    assert torch.equal(x.grad, eager_grad)


def test_forward_is_swiglu_and_backward_reads_the_quantized_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(swiglu_store, "CHUNK_ELEMENTS", 7 * 4 * BLOCK)
    torch.manual_seed(1)
    impl = make_swiglu_impl(swiglu, swiglu_back)
    x = torch.randn(3, 10, 4 * BLOCK, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 10, 2 * BLOCK, dtype=torch.bfloat16)
    packed: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = impl(x, None)
    assert out.shape == (3, 10, 2 * BLOCK) and torch.equal(out, swiglu(x))  # forward: the BF16 arithmetic
    assert {t.dtype for t in packed} == {torch.float8_e4m3fn, torch.float32}  # no BF16 copy of the input kept
    kept = sum(t.numel() * t.element_size() for t in packed)
    assert kept == x.numel() * (1 + 4 / BLOCK)  # against 2 bytes per value in BF16
    out.backward(g)
    data, factors = quantize_blocks(x.detach().view(30, -1))
    expected = swiglu_back(g.view(30, -1), dequantize_tiles(data, factors, torch.bfloat16)).view_as(x)
    assert torch.equal(x.grad, expected)
    exact = swiglu_back(g, x.detach())
    assert (x.grad.float() - exact.float()).norm() / exact.float().norm() < 0.05


def test_without_a_backward_to_come_nothing_is_quantized(monkeypatch: pytest.MonkeyPatch) -> None:
    impl = make_swiglu_impl(swiglu, swiglu_back)
    monkeypatch.setattr(swiglu_store, "quantize_blocks", lambda x: pytest.fail("quantized for no backward"))
    x = torch.randn(4, 2 * BLOCK, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(impl(x, None), swiglu(x))
    assert torch.equal(impl(x.detach(), None), swiglu(x.detach()))


def test_a_bias_is_added_before_and_gets_its_gradient() -> None:
    impl = make_swiglu_impl(swiglu, swiglu_back)
    x = torch.randn(6, 2 * BLOCK, requires_grad=True)
    bias = torch.randn(2 * BLOCK, requires_grad=True)
    impl(x, bias).sum().backward()
    assert bias.grad is not None and torch.allclose(bias.grad, x.grad.sum(0))
    with pytest.raises(ValueError, match="2 or 3 dimensions"):
        impl(torch.zeros(2 * BLOCK), None)


def test_megatrons_mlp_calls_it_with_megatrons_own_swiglu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The MLP calls bias_swiglu_impl by the name it imported; with the option that name is ours, built on
    megatron.core's swiglu and swiglu_back (same forward bits as the fused original)."""
    import megatron.core.transformer.mlp as mlp
    from megatron.core.fusions import fused_bias_swiglu

    monkeypatch.setattr(mlp, "bias_swiglu_impl", mlp.bias_swiglu_impl)  # restored after the test
    swiglu_store.install()
    swiglu_store.install()  # once only
    ours = mlp.bias_swiglu_impl
    assert getattr(ours, "__infir2_blockwise_store__", False)
    x = torch.randn(4, 2, 2 * BLOCK, dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = ours(x, None, False, False)
    ref = fused_bias_swiglu.bias_swiglu_impl(x_ref, None, False, False)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    assert (x.grad.float() - x_ref.grad.float()).norm() / x_ref.grad.float().norm() < 0.05


def test_the_gpu_check_script_runs_and_compares_on_the_cpu(tmp_path) -> None:
    """benchmarks/scripts/swiglu_store_check.py (the GPU session's per-call check), at a small shape on the CPU."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "scripts" / "swiglu_store_check.py"
    spec = importlib.util.spec_from_file_location("swiglu_store_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = swiglu_store.COMPILED_DEVICE_TYPES
    assert module.main(["--out", str(tmp_path), "--device", "cpu", "--rows", "64", "--ffn", "256",
                        "--warmup", "1", "--repeat", "1"]) == 0
    assert swiglu_store.COMPILED_DEVICE_TYPES == before
    result = json.loads((tmp_path / "swiglu_store_check.json").read_text())
    assert result["same_quantized_bytes"] and result["same_output"] and result["same_input_gradient"]
    assert result["blockwise_fp8_compiled"]["kept_bytes"] == 64 * 512 * (1 + 4 / BLOCK)
    assert result["megatron_bf16_store"]["kept_bytes"] == 64 * 512 * 2
    assert result["codes_differing_share"] == 0 and result["max_code_steps"] == 0


def test_the_gpu_check_counts_how_far_two_quantizations_are_apart() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "scripts" / "swiglu_store_check.py"
    spec = importlib.util.spec_from_file_location("swiglu_store_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x = torch.randn(4, 256)
    data, factors = swiglu_store.quantize_tiles(x)
    codes = data.view(torch.uint8).clone()
    i = int((codes & 0x7F).argmax())  # a code with room above it within its sign
    codes.view(-1)[i] -= 1  # one E4M3 step towards zero
    moved = module.quantization_difference(data, factors, codes.view(torch.float8_e4m3fn), factors * (1 + 2**-23))
    assert moved["max_code_steps"] == 1 and moved["codes_differing_share"] == round(1 / x.numel(), 8)
    assert 0 < moved["factor_max_relative_difference"] <= 2**-22
    codes.view(-1)[i] ^= 0x80  # and a sign flip is never one step
    assert module.quantization_difference(data, factors, codes.view(torch.float8_e4m3fn), factors)[
        "max_code_steps"] == 255
