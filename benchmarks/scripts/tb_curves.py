"""One TensorBoard scalar of several experiments: every logged step, each run's final value (the mean of its last
--window steps) and its gap to the baseline's; with --png, the curves and the gaps in one figure.

Usage: python benchmarks/scripts/tb_curves.py --tag "lm loss" --out curves.json [--png curves.png]
       [--baseline NAME] [--window 50] [--smooth 20] EXP_DIR...

--smooth N draws each curve's trailing mean over N steps over its faint raw values, and the gap between those
means: per-batch losses jump by 20 % from one batch to the next, which hides a gap of a few tenths of a percent.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def curve(tb_dir: Path, tag: str) -> list[list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return [[event.step, event.value] for event in acc.Scalars(tag)]


def summarize(curves: dict[str, list[list[float]]], baseline: str, window: int) -> dict[str, dict[str, float | None]]:
    finals = {name: statistics.fmean(v for _, v in points[-window:]) if points else None
              for name, points in curves.items()}
    base = finals.get(baseline)
    return {name: {"final": final, "gap": final / base - 1 if final is not None and base else None}
            for name, final in finals.items()}


def trailing_mean(points: list[list[float]], n: int) -> list[list[float]]:
    """Each step's value replaced by the mean of the last n values up to it (fewer at the start)."""
    out, total = [], 0.0
    for i, (step, value) in enumerate(points):
        total += value - (points[i - n][1] if i >= n else 0.0)
        out.append([step, total / min(i + 1, n)])
    return out


def plot(curves: dict[str, list[list[float]]], baseline: str, tag: str, path: Path, smooth: int = 1) -> None:
    from infir2_cpt.reports.figures import pyplot, save_figure

    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    if smooth > 1:
        for name, points in curves.items():
            if points:
                (line,) = top.plot([p[0] for p in points], [p[1] for p in points], linewidth=0.6, alpha=0.25)
                line.set_label("_")
        top.set_prop_cycle(None)
        curves = {name: trailing_mean(points, smooth) for name, points in curves.items()}
    base = dict((int(step), value) for step, value in curves.get(baseline, []))
    for name, points in curves.items():
        if not points:
            continue
        label = f"{name} (mean of {smooth})" if smooth > 1 else name
        top.plot([p[0] for p in points], [p[1] for p in points], label=label, linewidth=1.2 if smooth > 1 else 1)
        if name != baseline and base:
            rel = [(step, (value / base[int(step)] - 1) * 100) for step, value in points if base.get(int(step))]
            if rel:
                bottom.plot([r[0] for r in rel], [r[1] for r in rel], label=f"{name} vs {baseline}", linewidth=1)
    top.set_ylabel(tag)
    top.legend(fontsize=8)
    bottom.axhline(0, color="#888888", linewidth=0.7)
    bottom.set_ylabel("difference (%)")
    bottom.set_xlabel("iteration")
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(fontsize=8)
    save_figure(plt, fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--png", type=Path, help="also draw the curves and each one's gap to the baseline")
    parser.add_argument("--baseline", help="the experiment the others are compared with (default: the first)")
    parser.add_argument("--window", type=int, default=50, help="final value: the mean of the last N logged steps")
    parser.add_argument("--smooth", type=int, default=1, help="--png: draw trailing means over N steps (1: raw)")
    parser.add_argument("experiments", nargs="+", type=Path)
    args = parser.parse_args()
    curves = {exp.name: curve(exp / "tensorboard", args.tag) for exp in args.experiments}
    baseline = args.baseline or args.experiments[0].name
    summary = summarize(curves, baseline, args.window)
    args.out.write_text(json.dumps({"tag": args.tag, "baseline": baseline, "window": args.window,
                                    "summary": summary, "curves": curves}) + "\n")
    for name, row in summary.items():
        gap = f"{row['gap'] * 100:+.2f} %" if row["gap"] is not None else "-"
        final = f"{row['final']:.4f}" if row["final"] is not None else "-"
        print(f"{name}: final {args.tag} {final} (mean of the last {args.window}), against {baseline}: {gap}")
    if args.png:
        plot(curves, baseline, args.tag, args.png, args.smooth)


if __name__ == "__main__":
    main()
