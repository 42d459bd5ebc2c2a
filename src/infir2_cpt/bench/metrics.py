"""The figures of one variant, from Megatron's own log lines (reports/runlog.py): step time, tokens/s, TFLOP/s,
MFU against the GPU's dense peak for the variant's precision, peak memory, loss; and ratios to a baseline."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..reports.runlog import RunLog
from .variants import SEED_MARK, seeded_from

FIDELITY_TARGET = 0.005  # |FP8 final loss / BF16 final loss - 1| <= 0.5 %


@dataclass(frozen=True)
class GpuPeak:
    label: str
    bf16_tflops: float
    fp8_tflops: Optional[float]


# Dense (no sparsity) tensor-core peaks, TFLOP/s per GPU, from the vendor's data sheets. First match wins.
GPU_PEAKS: tuple[tuple[str, GpuPeak], ...] = (
    (r"gb200", GpuPeak("GB200", 2500, 5000)),
    (r"b200", GpuPeak("B200", 2250, 4500)),
    (r"h200.*nvl", GpuPeak("H200 NVL", 835, 1671)),
    (r"h200", GpuPeak("H200 SXM", 989, 1979)),
    (r"h100.*nvl", GpuPeak("H100 NVL", 835, 1671)),
    (r"h100.*pcie", GpuPeak("H100 PCIe", 756, 1513)),
    (r"h100|h800", GpuPeak("H100/H800 SXM", 989, 1979)),
    (r"\bh20\b", GpuPeak("H20", 148, 296)),
    (r"a100|a800", GpuPeak("A100", 312, None)),
)


def gpu_peak(name: Optional[str]) -> Optional[GpuPeak]:
    """The dense BF16/FP8 peaks of a GPU by its CUDA device name; None for an unknown GPU."""
    if not name:
        return None
    lowered = name.lower()
    return next((peak for pattern, peak in GPU_PEAKS if re.search(pattern, lowered)), None)


def peak_for(peak: Optional[GpuPeak], fp8: Optional[str]) -> Optional[float]:
    """The peak that bounds a variant: the FP8 one for an FP8 recipe, else BF16."""
    if peak is None:
        return None
    return peak.fp8_tflops if fp8 else peak.bf16_tflops


_PADDED_VOCAB_RE = re.compile(r"padded vocab \(size: (\d+)\) with (\d+) dummy tokens \(new size: (\d+)\)")
THROUGHPUT_KEY = "throughput per GPU (TFLOP/s/GPU)"


def padded_vocab_from_log(text: str) -> Optional[int]:
    match = None
    for match in _PADDED_VOCAB_RE.finditer(text):
        pass
    return int(match.group(3)) if match else None


# Timed steps of one variant on a GPU that nothing else uses differ by 1-2.5 % (7B shape on an H200); a run
# disturbed by another job on the host spread by 9-46 % (benchmarks/2026-11-28-h200).
NOISY_SPREAD = 0.05


@dataclass
class VariantMetrics:
    """The figures of one run, from Megatron's log: steady-state (after warm-up) medians, peak memory, loss.
    bench.json holds them under each variant's "metrics", one key per field."""

    iterations_logged: int = 0
    timed_iterations: int = 0
    step_ms: Optional[float] = None  # median of the timed steps
    step_ms_min: Optional[float] = None
    step_ms_max: Optional[float] = None
    step_ms_spread: Optional[float] = None  # (slowest - fastest) / median
    tokens_per_s_per_gpu: Optional[float] = None
    megatron_tflops_per_gpu: Optional[float] = None  # Megatron's own throughput line
    model_tflops_per_gpu: Optional[float] = None  # ModelShape.flops_per_iteration / step time
    mfu: Optional[float] = None
    peak_tflops: Optional[float] = None
    max_allocated_gib: Optional[float] = None
    max_reserved_gib: Optional[float] = None
    first_loss: Optional[float] = None
    final_loss: Optional[float] = None
    final_loss_window: Optional[float] = None  # mean of the last loss_window losses
    loss_window: int = 0
    checkpoints_saved: list[int] = field(default_factory=list)
    flops_per_iteration: Optional[float] = None
    flops_share: dict[str, float] = field(default_factory=dict)  # flops_per_sequence parts, as fractions


def step_spread(metrics: VariantMetrics) -> Optional[float]:
    """(slowest - fastest timed step) / median step: how steady the timed steps were."""
    lo, hi, mid = metrics.step_ms_min, metrics.step_ms_max, metrics.step_ms
    return (hi - lo) / mid if lo is not None and hi is not None and mid else None


def noise_warning(name: str, metrics: VariantMetrics) -> Optional[str]:
    """A warning when a variant's timed steps spread more than NOISY_SPREAD, else None."""
    spread = metrics.step_ms_spread
    if spread is None or spread <= NOISY_SPREAD:
        return None
    return (f"{name}: timed steps spread {spread:.0%} (fastest {metrics.step_ms_min:.0f} ms, slowest "
            f"{metrics.step_ms_max:.0f} ms; steady runs stay under {NOISY_SPREAD:.0%}), so its median step time "
            "and ratios are unreliable. Either another job shares this GPU or host (re-run it alone), or the step "
            "is partly host-bound (a small model; FP8 adds host work per GEMM): then compare the fastest steps "
            "too (the 'fastest ms' column)")


def _ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    return value / base if value is not None and base else None


def variant_metrics(log: RunLog, warmup_steps: int, tokens_per_iteration: int, world_size: int,
                    flops_per_iteration: Optional[float], peak_tflops: Optional[float],
                    loss_window: int = 20) -> VariantMetrics:
    """The figures of one run from Megatron's log: steady-state (after warm-up) medians, peak memory, loss."""
    its = log.iterations
    steady = [it for it in its if it.iteration > warmup_steps and it.iter_ms]
    step_ms = statistics.median(it.iter_ms for it in steady) if steady else None  # type: ignore[misc]
    megatron_tflops = [it.values[THROUGHPUT_KEY] for it in steady if THROUGHPUT_KEY in it.values]
    ours = (flops_per_iteration / (step_ms / 1000.0) / world_size / 1e12) if step_ms and flops_per_iteration else None
    megatron = statistics.median(megatron_tflops) if megatron_tflops else None
    mfu_basis = ours if ours is not None else megatron
    losses = [it.loss for it in its if it.loss is not None]
    window = losses[-loss_window:]
    metrics = VariantMetrics(
        iterations_logged=len(its),
        timed_iterations=len(steady),
        step_ms=step_ms,
        step_ms_min=min(it.iter_ms for it in steady) if steady else None,  # type: ignore[type-var]
        step_ms_max=max(it.iter_ms for it in steady) if steady else None,  # type: ignore[type-var]
        tokens_per_s_per_gpu=tokens_per_iteration / (step_ms / 1000.0) / world_size if step_ms else None,
        megatron_tflops_per_gpu=megatron,
        model_tflops_per_gpu=ours,
        mfu=mfu_basis / peak_tflops if mfu_basis is not None and peak_tflops else None,
        peak_tflops=peak_tflops,
        max_allocated_gib=log.max_allocated_mb / 1024 if log.max_allocated_mb else None,
        max_reserved_gib=log.max_reserved_mb / 1024 if log.max_reserved_mb else None,
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        final_loss_window=statistics.fmean(window) if window else None,
        loss_window=len(window),
        checkpoints_saved=list(log.saved),
        flops_per_iteration=flops_per_iteration,
    )
    metrics.step_ms_spread = step_spread(metrics)
    return metrics


@dataclass(frozen=True)
class Ratios:
    """Each figure divided by the baseline's (x BF16): step_time 0.80 means 20 % faster."""

    step_time: Optional[float] = None
    fastest_step_time: Optional[float] = None
    tokens_per_s: Optional[float] = None
    tflops: Optional[float] = None
    max_allocated: Optional[float] = None
    max_reserved: Optional[float] = None


def ratios(metrics: VariantMetrics, baseline: VariantMetrics) -> Ratios:
    return Ratios(step_time=_ratio(metrics.step_ms, baseline.step_ms),
                  fastest_step_time=_ratio(metrics.step_ms_min, baseline.step_ms_min),
                  tokens_per_s=_ratio(metrics.tokens_per_s_per_gpu, baseline.tokens_per_s_per_gpu),
                  tflops=_ratio(metrics.megatron_tflops_per_gpu, baseline.megatron_tflops_per_gpu),
                  max_allocated=_ratio(metrics.max_allocated_gib, baseline.max_allocated_gib),
                  max_reserved=_ratio(metrics.max_reserved_gib, baseline.max_reserved_gib))


@dataclass(frozen=True)
class FidelityGap:
    """A variant's final loss against the baseline's: relative gap of the mean of the last loss_window iterations
    (and, for reference, of the very last one), and whether it is within the target."""

    relative_gap: Optional[float]
    relative_gap_last: Optional[float]
    target: float
    within_target: bool


def fidelity_gap(metrics: VariantMetrics, baseline: VariantMetrics, target: float = FIDELITY_TARGET) -> FidelityGap:
    gap = _ratio(metrics.final_loss_window, baseline.final_loss_window)
    last = _ratio(metrics.final_loss, baseline.final_loss)
    rel = gap - 1 if gap is not None else None
    return FidelityGap(relative_gap=rel, relative_gap_last=last - 1 if last is not None else None, target=target,
                       within_target=rel is not None and abs(rel) <= target)


@dataclass
class VariantResult:
    name: str
    description: str
    sets: list[str]
    extra_args: list[str]
    command: list[str]
    fp8: Optional[str]
    status: str
    exit_code: Optional[int]
    seconds: float
    metrics: VariantMetrics
    ratios: Optional[Ratios] = None
    other_ratios: dict[str, Optional[Ratios]] = field(default_factory=dict)  # --also-against: name -> ratios
    fidelity: Optional[FidelityGap] = None
    iterations: list[dict[str, Any]] = field(default_factory=list)
    breakdown: Optional[dict[str, Any]] = None  # trace.trace_breakdown
    memory: Optional[dict[str, Any]] = None  # memory.snapshot_breakdown
    console_tail: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def baseline_of(name: str, baseline: str) -> str:
    """The run a result is compared with: the baseline, of the same seed when the runs are per seed."""
    seed = seeded_from(name)[1]
    return baseline if seed is None else f"{baseline}{SEED_MARK}{seed}"


def apply_baseline(results: list[VariantResult], baseline: str, fidelity: bool, others: Sequence[str] = ()) -> None:
    """Ratios (and, in fidelity mode, the loss gap) of every result against the baseline's, once it ran; and
    against each of `others` (--also-against)."""
    ok = {r.name: r for r in results if r.status == "ok"}
    for r in results:
        base = ok.get(baseline_of(r.name, baseline)) or ok.get(baseline)  # (a variant may be named x.seed1 itself)
        r.ratios = ratios(r.metrics, base.metrics) if base is not None else None
        r.fidelity = fidelity_gap(r.metrics, base.metrics) if base is not None and fidelity else None
        r.other_ratios = {name: ratios(r.metrics, ok[name].metrics) if name in ok else None for name in others}


@dataclass
class SeedSummary:
    """One variant over the seeds of --seeds."""

    variant: str
    seeds_ok: int
    seeds: int
    mean_final_loss: Optional[float]  # mean over the seeds of each run's final loss (window mean)
    spread: Optional[float]  # (max - min) / mean of those final losses
    gap: Optional[float]  # mean_final_loss / the baseline's - 1
    within_target: bool
    beyond_baseline_spread: Optional[bool]  # |gap| larger than the baseline's own spread across seeds


def seed_summaries(results: list[VariantResult], baseline: str, target: float = FIDELITY_TARGET) -> list[SeedSummary]:
    """Per variant, its runs over the seeds (results named NAME.seedSEED); empty when the runs are not per seed."""
    groups: dict[str, list[VariantResult]] = {}
    for r in results:
        name, seed = seeded_from(r.name)
        if seed is not None:
            groups.setdefault(name, []).append(r)
    losses = {name: [r.metrics.final_loss_window for r in runs
                     if r.status == "ok" and r.metrics.final_loss_window is not None] for name, runs in groups.items()}
    means = {name: statistics.fmean(v) if v else None for name, v in losses.items()}
    spreads = {name: (max(v) - min(v)) / means[name] if len(v) > 1 and means[name] else None
               for name, v in losses.items()}
    out = []
    for name, runs in groups.items():
        gap = _ratio(means[name], means.get(baseline))
        rel = gap - 1 if gap is not None else None
        base_spread = spreads.get(baseline)
        out.append(SeedSummary(variant=name, seeds_ok=len(losses[name]), seeds=len(runs), mean_final_loss=means[name],
                               spread=spreads[name], gap=rel, within_target=rel is not None and abs(rel) <= target,
                               beyond_baseline_spread=None if rel is None or base_spread is None
                               else abs(rel) > base_spread))
    return out
