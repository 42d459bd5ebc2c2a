"""`infir2 schedule`: a learning-rate curve as text (a small plot, the phases, sampled values) and as a PNG."""

from __future__ import annotations

from pathlib import Path

from .. import checkpoints as ck
from ..errors import Problem, ReportError
from .curve import Curve
from .figures import pyplot, save_figure
from .text import fmt_lr, human_count, table


def _boundaries(curve: Curve) -> list[int]:
    marks = {curve.start, curve.end}
    for seg in curve.segments:
        marks.update((seg.start, seg.end))
    return sorted(marks)


def ascii_plot(curve: Curve, width: int = 64, height: int = 12) -> list[str]:
    """A small text plot: LR (rows) over iterations (columns); ':' marks phase boundaries."""
    x0, x1 = curve.start, curve.end
    span = max(x1 - x0, 1)
    iters = [x0 + round(c * span / (width - 1)) for c in range(width)]
    lrs = [curve.lr_at(it) for it in iters]
    ymax = max(max(lrs), curve.schedule.lr) or 1.0

    def row_of(lr: float) -> int:
        return height - 1 - round(lr / ymax * (height - 1))

    def col_of(it: int) -> int:
        return round((it - x0) / span * (width - 1))

    grid = [[" "] * width for _ in range(height)]
    inner = [b for b in _boundaries(curve) if x0 < b < x1]
    for b in inner:
        for r in range(height):
            grid[r][col_of(b)] = ":"
    prev = None
    for c, lr in enumerate(lrs):
        r = row_of(lr)
        lo, hi = (r, r) if prev is None else (min(r, prev), max(r, prev))
        if prev is not None and hi - lo > 1:  # steep: fill the column between the two points
            for rr in range(lo + 1, hi):
                grid[rr][c] = "*"
        grid[r][c] = "*"
        prev = r
    labels = {0: fmt_lr(ymax), row_of(curve.schedule.min_lr): fmt_lr(curve.schedule.min_lr), height - 1: fmt_lr(0.0)}
    margin = max(len(v) for v in labels.values()) + 1
    lines = [labels.get(r, "").rjust(margin) + "|" + "".join(grid[r]).rstrip() for r in range(height)]
    axis = ["-"] * width
    for b in inner:
        axis[col_of(b)] = "+"
    lines.append(" " * margin + "+" + "".join(axis))
    ticks = [" "] * (width + 12)
    for b in [x0, *inner, x1]:
        text = str(b)
        start = col_of(b) - (len(text) - 1 if b == x1 else len(text) // 2 if b != x0 else 0)
        start = max(start, 0)
        if all(ch == " " for ch in ticks[max(start - 1, 0):start + len(text) + 1]):
            ticks[start:start + len(text)] = text
    lines.append(" " * (margin + 1) + "".join(ticks).rstrip() + "   (iteration)")
    names = [" "] * (width + 12)
    for seg in curve.segments:
        a, b = col_of(seg.start), col_of(seg.end)
        text = seg.phase if b - a >= len(seg.phase) + 1 else seg.phase[0] if b - a >= 2 else ""
        start = a + max((b - a - len(text)) // 2, 0)
        if text and all(ch == " " for ch in names[start:start + len(text)]):
            names[start:start + len(text)] = text
    lines.append(" " * (margin + 1) + "".join(names).rstrip())
    return lines


def sample_iterations(curve: Curve, points: int) -> list[int]:
    x0, x1 = curve.start, curve.end
    if points <= 0:
        return []
    if points == 1:
        return [x1]
    return sorted({x0 + round(i * (x1 - x0) / (points - 1)) for i in range(points)})


def schedule_report(curve: Curve, points: int = 0) -> str:
    s = curve.schedule
    lines = [f"learning-rate schedule: {curve.title}",
             f"  WSD: lr {s.lr:g}, min_lr {s.min_lr:g}, warmup_init_lr {s.warmup_init_lr:g}, {s.decay_style} decay "
             f"over {s.decay_iters} iterations; ends at iteration {s.train_iters}"]
    per = curve.tokens_per_iteration
    if per:
        lines.append(f"  {s.global_batch_size} sequences x {curve.seq_length} tokens = {per:,} tokens/iteration; "
                     f"{human_count(curve.tokens_at(s.train_iters))} tokens by iteration {s.train_iters}")
    if curve.decay_from is not None:
        lines.append(f"  `infir2 decay --load {ck.iter_dir_name(curve.decay_from)}`: --train-iters {s.train_iters} "
                     f"--lr-warmup-iters 0 --override-opt_param-scheduler; the LR is {fmt_lr(s.lr)} at "
                     f"{curve.decay_from} and {fmt_lr(s.min_lr)} at {s.train_iters}")
        if curve.stable is None:
            lines.append("  (the stable run's recipe is unknown: its part of the curve is not shown)")
        else:
            before, after = curve.stable.lr_at(curve.decay_from), s.lr_at(curve.decay_from)
            if abs(before - after) > 1e-12 * max(abs(after), 1e-30):
                where = curve.stable.phase_at(curve.decay_from)
                lines.append(f"  note: iteration {curve.decay_from} is in the stable run's {where} phase (LR "
                             f"{fmt_lr(before)} there): the decay jumps to {fmt_lr(after)} and anneals from it")
    lines.append("")
    lines += ascii_plot(curve)
    lines.append("")
    rows = []
    for seg in curve.segments:
        rows.append([seg.label, f"{seg.start} -> {seg.end}", str(seg.end - seg.start),
                     fmt_lr(seg.schedule.lr_at(seg.start)), fmt_lr(seg.schedule.lr_at(seg.end)),
                     human_count(curve.tokens_at(seg.end))])
    lines += table(["phase", "iterations", "length", "lr at start", "lr at end", "tokens by end"], rows)
    samples = sample_iterations(curve, points)
    if samples:
        lines.append("")
        lines += table(["iteration", "phase", "learning rate", "tokens seen"],
                       [[str(it), curve.phase_at(it), fmt_lr(curve.lr_at(it)), human_count(curve.tokens_at(it))]
                        for it in samples])
    return "\n".join(lines)


PHASE_COLORS = {"warmup": "#f5b041", "stable": "#5dade2", "decay": "#ec7063"}


def plot_png(curve: Curve, path: Path, max_points: int = 4000) -> Path:
    """The curve as a PNG (matplotlib, Agg backend) with the phases shaded. Raises ReportError when it cannot
    be written."""
    try:
        return _plot_png(curve, path, max_points)
    except (OSError, ValueError) as exc:
        raise ReportError([Problem("--png", str(exc), str(path))], "infir2: cannot write the plot") from None


def _plot_png(curve: Curve, path: Path, max_points: int) -> Path:
    plt = pyplot()
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=110)
    try:
        shaded: set[str] = set()
        for seg in curve.segments:
            label = None if seg.label in shaded else seg.label
            shaded.add(seg.label)
            ax.axvspan(seg.start, seg.end, color=PHASE_COLORS.get(seg.phase, "#cccccc"),
                       alpha=0.12 if seg.stable_run else 0.25, hatch="//" if seg.stable_run else None,
                       lw=0, label=label)
            n = seg.end - seg.start
            stride = max(1, n // max_points)
            xs = list(range(seg.start, seg.end, stride)) + [seg.end]
            ax.plot(xs, [seg.schedule.lr_at(x) for x in xs], color="#1b2631", lw=1.6,
                    ls="--" if seg.stable_run else "-")
        for b in _boundaries(curve)[1:-1]:
            ax.axvline(b, color="#566573", lw=0.8, ls=":")
            ax.annotate(str(b), (b, 0), xytext=(2, 2), textcoords="offset points", fontsize=8, color="#566573")
        ax.set_xlim(curve.start, curve.end)
        ax.set_ylim(0, curve.schedule.lr * 1.08)
        ax.set_xlabel("iteration")
        ax.set_ylabel("learning rate")
        ax.set_title(curve.title, fontsize=10)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:.3g}"))
        per = curve.tokens_per_iteration
        if per:
            total = curve.end * per
            scale, unit = next((v, u) for v, u in ((1e12, "trillions"), (1e9, "billions"), (1e6, "millions"),
                                                    (1.0, "")) if total >= 10 * v or v == 1.0)
            top = ax.secondary_xaxis("top", functions=(lambda x: x * per / scale, lambda t: t * scale / per))
            top.set_xlabel(f"tokens seen ({unit})" if unit else "tokens seen")
        ax.legend(loc="lower center", fontsize=8)
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(plt, fig, path)
