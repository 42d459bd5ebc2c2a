"""infir2's stand-in for APEX's fused_weight_gradient_mlp_cuda (wgrad_fusion.py): its arithmetic, its
registration before megatron.core probes for the module, and Megatron's own linear layer accumulating
through it (CPU, gloo)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from infir2_cpt.runtime import wgrad_fusion as wgrad_fusion


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_stand_in_accumulates_the_weight_gradient(grad_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(96, 40, dtype=torch.bfloat16)  # [tokens, in]
    g = torch.randn(96, 24, dtype=torch.bfloat16)  # [tokens, out]
    main_grad = torch.randn(24, 40, dtype=grad_dtype)
    expected = main_grad.float() + g.float().t() @ x.float()
    fn = wgrad_fusion.wgrad_gemm_accum_fp32 if grad_dtype == torch.float32 else wgrad_fusion.wgrad_gemm_accum_fp16
    fn(x, g, main_grad)
    tolerance = 0 if grad_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(main_grad.float(), expected, rtol=tolerance, atol=tolerance * 10 + 1e-5)


def test_stand_in_refuses_wrong_shapes_and_dtypes() -> None:
    x, g = torch.randn(8, 4), torch.randn(8, 3)
    with pytest.raises(ValueError, match="main_grad is"):
        wgrad_fusion.wgrad_gemm_accum_fp32(x, g, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="2-D"):
        wgrad_fusion.wgrad_gemm_accum_fp32(x[None], g[None], torch.zeros(3, 4))
    with pytest.raises(TypeError, match="FP32"):
        wgrad_fusion.wgrad_gemm_accum_fp32(x, g, torch.zeros(3, 4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="BF16"):
        wgrad_fusion.wgrad_gemm_accum_fp16(x, g, torch.zeros(3, 4))


def test_switch_reads_the_environment() -> None:
    assert not wgrad_fusion.enabled({})
    assert not wgrad_fusion.enabled({"INFIR2_WGRAD_FUSION": "0"})
    assert wgrad_fusion.enabled({"INFIR2_WGRAD_FUSION": "1"})
    assert wgrad_fusion.enabled({"INFIR2_WGRAD_FUSION": "true"})


def _run(code: str, env_switch: str) -> subprocess.CompletedProcess:
    import os
    env = {**os.environ, "INFIR2_WGRAD_FUSION": env_switch}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_megatron_keeps_the_fusion_and_its_linear_layer_accumulates_through_the_stand_in() -> None:
    """As the entry does it: register, then let megatron.core import; Megatron's own
    linear_with_grad_accumulation_and_async_allreduce then accumulates two micro-batches into main_grad
    through the stand-in and returns no .grad, and adjust_megatron_argv leaves the fusion on."""
    code = """
        import os, torch, torch.distributed as dist
        from infir2_cpt.runtime import wgrad_fusion as wgrad_fusion
        assert wgrad_fusion.install_if_enabled() and wgrad_fusion.stand_in_registered()
        assert wgrad_fusion.install_if_enabled()  # idempotent: registered once, still the stand-in
        from infir2_cpt.runtime.wheel_workarounds import adjust_megatron_argv
        assert adjust_megatron_argv(["--bf16"]) == (["--bf16"], [])
        from megatron.core.tensor_parallel import layers
        assert layers._grad_accum_fusion_available
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29731")
        dist.init_process_group("gloo", rank=0, world_size=1)
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(24, 40))
        weight.main_grad = torch.zeros(24, 40)
        expected = torch.zeros(24, 40)
        for _ in range(2):  # two micro-batches, [seq, batch, hidden] as Megatron passes them
            x = torch.randn(6, 2, 40, requires_grad=True)
            y = layers.linear_with_grad_accumulation_and_async_allreduce(
                x, weight, None, gradient_accumulation_fusion=True, allreduce_dgrad=False,
                sequence_parallel=False, tp_group=dist.group.WORLD)
            g = torch.randn_like(y)
            y.backward(g)
            expected += g.reshape(-1, 24).t() @ x.detach().reshape(-1, 40)
        assert weight.grad is None, "the fused path must not produce a separate gradient"
        torch.testing.assert_close(weight.main_grad, expected, rtol=1e-5, atol=1e-5)
        print("ok")
    """
    out = _run(code, "1")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_without_the_switch_megatron_sees_no_apex_and_the_fusion_goes_off() -> None:
    code = """
        from infir2_cpt.runtime import wgrad_fusion as wgrad_fusion
        assert not wgrad_fusion.install_if_enabled()
        from megatron.core.tensor_parallel import layers
        assert not layers._grad_accum_fusion_available
        from infir2_cpt.runtime.wheel_workarounds import adjust_megatron_argv
        argv, notes = adjust_megatron_argv(["--bf16"])
        assert argv == ["--bf16", "--no-gradient-accumulation-fusion"] and "INFIR2_WGRAD_FUSION" in notes[0]
        print("ok")
    """
    out = _run(code, "0")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
