"""The SwiGLU input in blockwise FP8 (precision.fp8_activation_store_blockwise) on one SwiGLU call of a real shape:
the compiled kernels against the eager form (the same quantization?) and what each costs against Megatron's own
fused SwiGLU, which keeps the input in BF16.

    python3 benchmarks/scripts/swiglu_store_check.py --out DIR [--rows 8192 --ffn 18944] [--device cpu]

--rows x 2 --ffn is the SwiGLU input of one layer and micro batch: 8192 x (2 x 18944) for the 7B shape at seq 8192,
16384 x (2 x 8960) for 1.5B at seq 8192 and micro batch 2. Megatron's swiglu and swiglu_back (megatron.core),
bias-free, BF16. Prints and writes swiglu_store_check.json: whether the quantized copy, the output and the input's
gradient are bitwise equal between the compiled and the eager form, and where they are not, by how much (the share of
FP8 codes that differ, the largest difference in E4M3 steps, the scales' largest relative difference); forward,
backward and forward + backward milliseconds of each form and of Megatron's (CUDA events, the median of --repeat
calls after --warmup); the bytes each keeps for backward. Exit status 0 iff the outputs are bitwise equal and the
quantizations agree to one E4M3 step with scales within 2^-22: a GPU kernel's FP32 division may round a value
to the neighbouring code where the eager division does not (seen on an H200). --device cpu (small shapes) is what
the tests run, where the two agree bit for bit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from infir2_cpt.runtime import swiglu_store


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeat: int) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU, wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def kept_bytes(impl: Callable[..., torch.Tensor], x: torch.Tensor) -> int:
    """What autograd keeps for backward from one call."""
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        impl(x, None)
    return sum(t.numel() * t.element_size() for t in kept)


def measure(impl: Callable[..., torch.Tensor], x: torch.Tensor, g: torch.Tensor, warmup: int, repeat: int
            ) -> dict[str, float]:
    def forward() -> torch.Tensor:
        return impl(x, None)

    def both() -> None:
        impl(x, None).backward(g)

    fwd = timed(forward, x.device, warmup, repeat)
    total = timed(both, x.device, warmup, repeat)
    return {"forward_ms": round(fwd, 3), "backward_ms": round(total - fwd, 3), "total_ms": round(total, 3),
            "kept_bytes": kept_bytes(impl, x)}


def quantization_difference(e_data: torch.Tensor, e_factors: torch.Tensor, c_data: torch.Tensor,
                            c_factors: torch.Tensor) -> dict[str, Any]:
    """How far two quantizations of the same input are apart. E4M3 codes of one sign are ordered by magnitude, so
    the difference of two codes (sign bit dropped) counts steps; a sign that differs counts as a large step."""
    e, c = e_data.view(torch.uint8).int(), c_data.view(torch.uint8).int()
    steps = torch.where((e ^ c) & 0x80 != 0, torch.full_like(e, 255), ((e & 0x7F) - (c & 0x7F)).abs())
    rel = ((e_factors - c_factors).abs() / e_factors.abs().clamp_min(torch.finfo(torch.float32).tiny)).max()
    return {"codes_differing_share": round(float((e != c).float().mean()), 8),
            "max_code_steps": int(steps.max()), "factor_max_relative_difference": float(rel)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--ffn", type=int, default=18944, help="ffn_hidden_size (the input is twice as wide)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args(argv)
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl, swiglu, swiglu_back

    device = torch.device(args.device)
    torch.manual_seed(0)
    x = (torch.randn(args.rows, 2 * args.ffn, device=device) * 2).to(torch.bfloat16)
    x[::97, ::89] *= 200  # outliers, each costing only its own tile precision
    x.requires_grad_()
    g = torch.randn(args.rows, args.ffn, device=device, dtype=torch.bfloat16)
    ours = swiglu_store.make_swiglu_impl(swiglu, swiglu_back)
    compiled_types = swiglu_store.COMPILED_DEVICE_TYPES

    def forms(compiled: bool) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
        swiglu_store.COMPILED_DEVICE_TYPES = (device.type,) if compiled else ()
        quantized = swiglu_store.quantize_blocks(x.detach())
        x.grad = None
        out = ours(x, None)
        out.backward(g)
        return quantized, out.detach(), x.grad.detach().clone()

    (eq_data, eq_factors), e_out, e_grad = forms(compiled=False)
    (cq_data, cq_factors), c_out, c_grad = forms(compiled=True)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__, "rows": args.rows, "width": 2 * args.ffn,
        "same_quantized_bytes": bool(torch.equal(eq_data.view(torch.uint8), cq_data.view(torch.uint8))
                                     and torch.equal(eq_factors, cq_factors)),
        "same_output": bool(torch.equal(e_out, c_out)),
        "same_input_gradient": bool(torch.equal(e_grad, c_grad)),
        "gradient_max_abs_difference": float((e_grad.float() - c_grad.float()).abs().max()),
        **quantization_difference(eq_data, eq_factors, cq_data, cq_factors),
    }
    x.grad = None
    result["megatron_bf16_store"] = measure(lambda t, b: bias_swiglu_impl(t, b, False, False), x, g,
                                            args.warmup, args.repeat)
    for name, compiled in (("blockwise_fp8_eager", False), ("blockwise_fp8_compiled", True)):
        swiglu_store.COMPILED_DEVICE_TYPES = (device.type,) if compiled else ()
        result[name] = measure(ours, x, g, args.warmup, args.repeat)
    swiglu_store.COMPILED_DEVICE_TYPES = compiled_types
    base = result["megatron_bf16_store"]["total_ms"]
    for name in ("blockwise_fp8_eager", "blockwise_fp8_compiled"):
        result[name]["extra_ms_per_call"] = round(result[name]["total_ms"] - base, 3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "swiglu_store_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    same = result["same_quantized_bytes"] and result["same_output"] and result["same_input_gradient"]
    close = result["same_output"] and result["max_code_steps"] <= 1 and result["factor_max_relative_difference"] <= 2**-22
    print("compiled and eager give the same bytes" if same else
          "compiled and eager agree to one E4M3 step" if close else
          "FAIL: the compiled form differs from the eager one")
    return 0 if close else 1


if __name__ == "__main__":
    sys.exit(main())
