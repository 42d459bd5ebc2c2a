"""What a bench writes and prints: the Markdown table (with the time and memory breakdowns), bench.json and the
plots."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from ..reports.figures import pyplot, save_figure
from .memory import REPORT_PHASES
from .metrics import FIDELITY_TARGET, GpuPeak, Ratios, SeedSummary, VariantResult, baseline_of, seed_summaries
from .trace import CATEGORY_ORDER

if TYPE_CHECKING:
    from .plan import BenchPlan

RESULTS_FILE = "bench.json"
TABLE_FILE = "table.md"
PLOT_FILE = "bench.png"
BREAKDOWN_PLOT_FILE = "breakdown.png"


def _fmt(value: Optional[float], spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_table(results: Sequence[VariantResult], baseline: str, gpu_label: str, fidelity: bool = False,
                 others: Sequence[str] = ()) -> str:
    """A Markdown table (paste-able into a results page)."""
    if fidelity:
        head = ["variant", "status", "first loss", "final loss (last)", "final loss (mean)",
                f"gap vs {baseline}", f"within {FIDELITY_TARGET * 100:g} %", "step ms"]
        rows = [[r.name, r.status, _fmt(r.metrics.first_loss, ".4f"), _fmt(r.metrics.final_loss, ".4f"),
                 _fmt(r.metrics.final_loss_window, ".4f"),
                 _fmt(r.fidelity.relative_gap * 100 if r.fidelity and r.fidelity.relative_gap is not None else None,
                      "+.2f", " %"),
                 "(baseline)" if r.name == baseline else ("yes" if r.fidelity.within_target else "NO") if r.fidelity
                 else "-",
                 _fmt(r.metrics.step_ms)] for r in results]
    else:
        head = ["variant", "status", "step ms", "spread", "fastest ms", "tokens/s/GPU", "TFLOP/s/GPU (Megatron)", "TFLOP/s/GPU (formula)",
                f"MFU ({gpu_label})", "max alloc GiB", "max reserved GiB", f"x {baseline} time",
                f"x {baseline} alloc", f"x {baseline} reserved"]
        head += [f"x {name} {what}" for name in others for what in ("time", "alloc")]
        rows = []
        for r in results:
            m, q = r.metrics, r.ratios or Ratios()
            spread = m.step_ms_spread
            rows.append([r.name, r.status + (" (noisy)" if r.warnings else ""), _fmt(m.step_ms),
                         _fmt(spread * 100 if spread is not None else None, ".1f", " %"), _fmt(m.step_ms_min),
                         _fmt(m.tokens_per_s_per_gpu, ",.0f"),
                         _fmt(m.megatron_tflops_per_gpu), _fmt(m.model_tflops_per_gpu),
                         _fmt(m.mfu * 100 if m.mfu is not None else None, ".1f", " %"),
                         _fmt(m.max_allocated_gib), _fmt(m.max_reserved_gib),
                         _fmt(q.step_time, ".3f"), _fmt(q.max_allocated, ".3f"), _fmt(q.max_reserved, ".3f")])
            for name in others:
                o = r.other_ratios.get(name) or Ratios()
                rows[-1] += [_fmt(o.step_time, ".3f"), _fmt(o.max_allocated, ".3f")]
    return markdown_table(head, rows)


def format_breakdowns(results: Sequence[VariantResult]) -> str:
    """Per-step GPU time by kernel category, one column per profiled variant."""
    profiled = [r for r in results if r.breakdown and "categories" in r.breakdown]
    if not profiled:
        return ""
    head = ["category"] + [f"{r.name} ms/step" for r in profiled] + [f"{r.name} share" for r in profiled]
    rows = []
    for cat in CATEGORY_ORDER:
        cells = [_fmt(r.breakdown["categories"][cat]["ms_per_step"], ".2f") for r in profiled]  # type: ignore[index]
        cells += [_fmt(r.breakdown["categories"][cat]["share"] * 100, ".1f", " %") for r in profiled]  # type: ignore[index]
        rows.append([cat, *cells])
    for key, label in (("kernel_ms_per_step", "sum of kernels"), ("gpu_busy_ms_per_step", "GPU busy (union)"),
                       ("exposed_communication_ms_per_step", "communication not overlapped"),
                       ("step_wall_ms", "step wall time")):
        cells = [_fmt(r.breakdown.get(key), ".2f") for r in profiled] + [""] * len(profiled)  # type: ignore[union-attr]
        rows.append([label, *cells])
    return markdown_table(head, rows)


def format_memory_breakdowns(results: Sequence[VariantResult]) -> str:
    """GiB live at each variant's memory peak by training phase, one column per variant with a snapshot."""
    recorded = [r for r in results if r.memory and "phases" in r.memory]
    if not recorded:
        return ""
    head = ["live at the peak, by phase"] + [f"{r.name} GiB" for r in recorded]
    phases = [p for p in REPORT_PHASES if any(p in r.memory["phases"] for r in recorded)]  # type: ignore[index]
    rows = [[phase, *(_fmt(r.memory["phases"].get(phase, {}).get("gib"), ".2f")  # type: ignore[index]
                      for r in recorded)] for phase in phases]
    rows.append(["peak (replayed)", *(_fmt(r.memory["peak_gib"], ".2f") for r in recorded)])  # type: ignore[index]
    rows.append(["max allocated (Megatron)", *(_fmt(r.metrics.max_allocated_gib, ".2f") for r in recorded)])
    return markdown_table(head, rows)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def plot_speed(results: Sequence[VariantResult], baseline: str, path: Path, title: str) -> Path:
    """Bar charts: step time, TFLOP/s/GPU, peak memory; each bar labelled with its ratio to the baseline."""
    plt = pyplot()

    names = [r.name for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(min(24, max(12, 3.0 * len(names))), 4.8))
    panels = (("step_ms", "step time (ms)", "step_time"), ("megatron_tflops_per_gpu", "TFLOP/s per GPU", "tflops"))
    for ax, (key, label, ratio_key) in zip(axes[:2], panels):
        values = [getattr(r.metrics, key) or 0.0 for r in results]
        bars = ax.bar(names, values, color=["#888888" if n == baseline else "#1f77b4" for n in names])
        for bar, r in zip(bars, results):
            q = getattr(r.ratios, ratio_key) if r.ratios else None
            if q is not None:
                ax.annotate(f"{q:.3f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    ax = axes[2]
    xs = range(len(names))
    alloc = [r.metrics.max_allocated_gib or 0.0 for r in results]
    reserved = [r.metrics.max_reserved_gib or 0.0 for r in results]
    ax.bar([x - 0.2 for x in xs], alloc, width=0.4, label="max allocated")
    ax.bar([x + 0.2 for x in xs], reserved, width=0.4, label="max reserved")
    for x, r in zip(xs, results):
        q = r.ratios.max_allocated if r.ratios else None
        if q is not None:
            ax.annotate(f"{q:.3f}x", (x - 0.2, alloc[x]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, rotation=30)
    ax.set_title("peak memory (GiB)")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(plt, fig, path)


def plot_fidelity(results: Sequence[VariantResult], baseline: str, path: Path, title: str) -> Path:
    """Loss curves, and each variant's relative loss difference to the baseline per iteration."""
    plt = pyplot()

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    by_name = {r.name: r for r in results}
    for r in results:
        pts = [(i["iteration"], i["loss"]) for i in r.iterations if i["loss"] is not None]
        if pts:
            top.plot(*zip(*pts), label=r.name, linewidth=1)
        base = by_name.get(baseline_of(r.name, baseline))  # with --seeds: the baseline run of the same seed
        if base is not None and r is not base:
            base_loss = {i["iteration"]: i["loss"] for i in base.iterations}
            rel = [(it, (loss / base_loss[it] - 1) * 100) for it, loss in pts if base_loss.get(it)]
            if rel:
                bottom.plot(*zip(*rel), label=f"{r.name} vs {base.name}", linewidth=1)
    top.set_ylabel("lm loss")
    top.legend(fontsize=8)
    bottom.axhline(FIDELITY_TARGET * 100, color="red", linestyle=":", linewidth=1)
    bottom.axhline(-FIDELITY_TARGET * 100, color="red", linestyle=":", linewidth=1)
    bottom.set_ylabel("loss difference (%)")
    bottom.set_xlabel("iteration")
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(plt, fig, path)


def plot_breakdowns(results: Sequence[VariantResult], path: Path, title: str) -> Optional[Path]:
    """Stacked bars of GPU time per step by kernel category, one bar per profiled variant."""
    profiled = [r for r in results if r.breakdown and "categories" in r.breakdown]
    if not profiled:
        return None
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(profiled) + 3), 5))
    bottoms = [0.0] * len(profiled)
    for cat in CATEGORY_ORDER:
        values = [r.breakdown["categories"][cat]["ms_per_step"] for r in profiled]  # type: ignore[index]
        ax.bar([r.name for r in profiled], values, bottom=bottoms, label=cat)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel("GPU kernel time per step (ms)")
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    ax.set_title(title, fontsize=10)
    return save_figure(plt, fig, path)


def format_seed_table(summaries: Sequence[SeedSummary], baseline: str) -> str:
    """Fidelity over --seeds: one row per variant, its mean over the seeds against the baseline's mean."""
    head = ["variant", "seeds", "mean final loss", "spread across seeds", f"gap vs {baseline}",
            f"within {FIDELITY_TARGET * 100:g} %", f"gap beyond {baseline}'s spread"]

    def yes_no(value: Optional[bool]) -> str:
        return "-" if value is None else "yes" if value else "no"

    rows = [[s.variant, f"{s.seeds_ok}/{s.seeds}", _fmt(s.mean_final_loss, ".4f"),
             _fmt(s.spread * 100 if s.spread is not None else None, ".2f", " %"),
             _fmt(s.gap * 100 if s.gap is not None else None, "+.2f", " %"),
             "(baseline)" if s.variant == baseline
             else ("yes" if s.within_target else "NO") if s.gap is not None else "-",
             "-" if s.variant == baseline else yes_no(s.beyond_baseline_spread)] for s in summaries]
    return markdown_table(head, rows)


def results_json(plan: BenchPlan, results: Sequence[VariantResult], gpu_name: Optional[str],
                 peak: Optional[GpuPeak]) -> dict[str, Any]:
    req = plan.request
    first = plan.variants[0] if plan.variants else None
    payload: dict[str, Any] = {
        "infir2_bench": 1,
        "mode": plan.mode,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "root": str(plan.root),
        "recipe": req.recipe,
        "argv": sys.argv,
        "gpu": {"name": gpu_name or "unknown GPU", "peak": asdict(peak) if peak else None},
        "baseline": req.baseline,
        "warmup_steps": req.warmup_steps if plan.mode == "speed" else 0,
        "steps": plan.steps,
        "train_iters": plan.train_iters,
        "nproc_per_node": req.nproc_per_node,
        "shape": asdict(first.shape) if first else None,
        "global_batch_size": first.launch.recipe.parallel.global_batch_size if first else None,
        "micro_batch_size": first.launch.recipe.parallel.micro_batch_size if first else None,
        "tensor_parallel": first.launch.recipe.parallel.tensor_parallel if first else None,
        "profile_window": list(plan.profile_window) if plan.profile_window else None,
        "memory_snapshot": req.memory_snapshot,
        "variants": [asdict(r) for r in results],
    }
    if plan.mode == "fidelity":
        payload["fidelity"] = {"data": req.data, "tokenizer": req.tokenizer, "loss_window": req.loss_window,
                               "target": FIDELITY_TARGET,
                               "gaps": {r.name: asdict(r.fidelity) if r.fidelity else None
                                        for r in results if r.name != req.baseline},
                               "seeds": [int(s) for s in req.seeds],
                               "across_seeds": [asdict(s) for s in seed_summaries(list(results), req.baseline)]}
    return payload
