"""The GPU time of a PyTorch-profiler trace by kernel category (`infir2 bench --profile`, `infir2
trace-breakdown TRACE`)."""

from __future__ import annotations

import gzip
import json
import re
import statistics
from pathlib import Path
from typing import Any, Mapping

from ..errors import BenchError, Problem

# Kernel name -> category, first match wins (case-insensitive). Heuristics for CUDA kernel names on
# Hopper (cuBLAS/cuBLASLt `nvjet_*`/`sm90_xmma_gemm_*`, CUTLASS, cuDNN/flash attention, Transformer
# Engine's cast/transpose/quantize kernels, NCCL, multi-tensor optimizer kernels). An FP8 GEMM is a GEMM
# whose name mentions an FP8 type; unmatched kernels are "other" and the biggest are listed in the JSON.
KERNEL_CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("communication", re.compile(r"nccl|all_?gather|reduce_?scatter|all_?reduce|sendrecv", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|l2norm|lamb|sgd_", re.I)),
    ("attention", re.compile(r"flash|fmha|sdpa|fused_attn|attention|attn|softmax", re.I)),
    ("quantize/cast", re.compile(r"quantiz|cast|amax|compute_scale|scale_inv|fp8_block_scaling|transpose_kernel"
                                 r"|transpose_optimized|swizzle", re.I)),
    ("gemm fp8", re.compile(r"(gemm|nvjet|xmma|cutlass|cublas|wgmma).*(e4m3|e5m2|fp8|f8f8|_qq|float8)|"
                            r"(e4m3|e5m2|fp8|float8).*(gemm|nvjet|xmma|cutlass)|nvjet\w*_qq", re.I)),
    ("gemm bf16", re.compile(r"gemm|gemv|nvjet|xmma|cutlass|cublas|s16816|s1688|wgmma|\bKernel2\b", re.I)),
)
CATEGORY_ORDER = ("gemm fp8", "gemm bf16", "attention", "quantize/cast", "optimizer", "communication",
                  "memcpy/memset", "other")
_STEP_RE = re.compile(r"^ProfilerStep#(\d+)$")


def classify_kernel(name: str, cat: str = "kernel") -> str:
    """The time-breakdown category of one GPU trace event."""
    if cat in ("gpu_memcpy", "gpu_memset") or re.match(r"^Mem(cpy|set)\b", name):
        return "memcpy/memset"
    return next((label for label, pattern in KERNEL_CATEGORIES if pattern.search(name)), "other")


def load_trace(path: Path) -> dict[str, Any]:
    """A Chrome/Kineto trace (`.json` or `.json.gz`), as written by torch.profiler's export_chrome_trace."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    data = json.loads(raw)
    if isinstance(data, list):
        data = {"traceEvents": data}
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise ValueError(f"{path}: not a Chrome trace (no traceEvents list)")
    return data


def _merge_intervals(xs: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, overlapping or touching intervals joined."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(xs):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _union_length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in _merge_intervals(intervals))


def _subtract_length(intervals: list[tuple[float, float]], cover: list[tuple[float, float]]) -> float:
    """Total length of `intervals` (merged) not covered by `cover` (merged)."""
    exposed, j, covered = 0.0, 0, _merge_intervals(cover)
    for a, b in _merge_intervals(intervals):
        pos = a
        while j < len(covered) and covered[j][1] <= pos:
            j += 1
        k = j
        while k < len(covered) and covered[k][0] < b:
            c0, c1 = covered[k]
            if c0 > pos:
                exposed += c0 - pos
            pos = max(pos, c1)
            if pos >= b:
                break
            k += 1
        if pos < b:
            exposed += b - pos
    return exposed


def trace_breakdown(trace: Path | Mapping[str, Any], top: int = 8) -> dict[str, Any]:
    """GPU time of a profiled window by kernel category, per profiled step.

    Sums each GPU kernel/memcpy/memset event's duration into its category (classify_kernel). Kernels on
    different streams overlap (NCCL with compute), so the categories can add up to more than the GPU's
    busy time; `gpu_busy_ms_per_step` is the union of all kernel intervals and
    `exposed_communication_ms_per_step` the communication time during which no other kernel ran. Steps are
    counted from the profiler's `ProfilerStep#N` annotations (1 when there are none).
    """
    data = load_trace(trace) if isinstance(trace, Path) else dict(trace)
    events = [e for e in data["traceEvents"] if isinstance(e, dict) and e.get("ph") == "X"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    step_events = [e for e in events if _STEP_RE.match(str(e.get("name", ""))) and e.get("cat") != "gpu_user_annotation"]
    steps = len({e["name"] for e in step_events}) or 1
    totals = {cat: 0.0 for cat in CATEGORY_ORDER}
    per_kernel: dict[str, dict[str, float]] = {cat: {} for cat in CATEGORY_ORDER}
    comm: list[tuple[float, float]] = []
    compute: list[tuple[float, float]] = []
    for e in gpu:
        dur = float(e.get("dur", 0.0))
        start = float(e.get("ts", 0.0))
        name = str(e.get("name", ""))
        cat = classify_kernel(name, str(e.get("cat")))
        totals[cat] += dur
        per_kernel[cat][name] = per_kernel[cat].get(name, 0.0) + dur
        (comm if cat == "communication" else compute).append((start, start + dur))
    kernel_total = sum(totals.values())
    step_wall = statistics.median(float(e.get("dur", 0.0)) for e in step_events) / 1000 if step_events else None
    return {
        "trace": str(trace) if isinstance(trace, Path) else None,
        "steps": steps,
        "kernel_ms_per_step": kernel_total / 1000 / steps,
        "gpu_busy_ms_per_step": _union_length(comm + compute) / 1000 / steps,
        "exposed_communication_ms_per_step": _subtract_length(comm, compute) / 1000 / steps,
        "step_wall_ms": step_wall,
        "categories": {cat: {"ms_per_step": totals[cat] / 1000 / steps,
                             "share": totals[cat] / kernel_total if kernel_total else 0.0} for cat in CATEGORY_ORDER},
        "top_kernels": {cat: [[name, round(us / 1000 / steps, 3)] for name, us in
                              sorted(per_kernel[cat].items(), key=lambda kv: -kv[1])[:top]]
                        for cat in CATEGORY_ORDER if per_kernel[cat]},
    }


def format_trace_breakdown(breakdown: Mapping[str, Any]) -> str:
    lines = [f"# {breakdown.get('trace') or 'trace'}: {breakdown['steps']} profiled step(s)",
             "| category | ms/step | share |", "|---|---|---|"]
    for cat in CATEGORY_ORDER:
        c = breakdown["categories"][cat]
        lines.append(f"| {cat} | {c['ms_per_step']:.2f} | {c['share'] * 100:.1f} % |")
    lines.append(f"| sum of kernels | {breakdown['kernel_ms_per_step']:.2f} | |")
    lines.append(f"| GPU busy (union) | {breakdown['gpu_busy_ms_per_step']:.2f} | |")
    lines.append(f"| communication not overlapped | {breakdown['exposed_communication_ms_per_step']:.2f} | |")
    if breakdown.get("step_wall_ms") is not None:
        lines.append(f"| step wall time (ProfilerStep) | {breakdown['step_wall_ms']:.2f} | |")
    return "\n".join(lines)


def trace_file_report(path: Path) -> str:
    """The breakdown of a trace file as text; BenchError when the file cannot be read as a trace."""
    try:
        return format_trace_breakdown(trace_breakdown(path))
    except (OSError, ValueError) as exc:
        raise BenchError([Problem("TRACE", str(exc), str(path))], "infir2: cannot read the trace") from None
