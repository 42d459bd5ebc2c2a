"""Held-out loss per checkpoint, as `infir2 eval` stores it: exp/<name>/eval/<label>/iter_NNNNNNN.json (one file per
checkpoint and evaluation set, kept when the checkpoint itself is removed by retention). Read back here for the
columns of `infir2 checkpoints`, the summary of `infir2 eval`, and the PNG of held-out loss against tokens for a
stable run and its decays."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checkpoints as ck
from ..errors import Problem, ReportError
from ..layout import DecaySource, ExperimentPaths, read_json_object
from ..retention import EVAL_DIR
from .curve import experiment_curve
from .figures import pyplot, save_figure
from .text import human_count, table

LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}$")


def result_path(exp_dir: Path, label: str, iteration: int) -> Path:
    return exp_dir / EVAL_DIR / label / f"{ck.iter_dir_name(iteration)}.json"


def read_results(exp_dir: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """label -> iteration -> the stored record, for every readable result of the experiment."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    root = exp_dir / EVAL_DIR
    if not root.is_dir():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and LABEL_RE.match(p.name)):
        for path in sorted(folder.glob("iter_*.json")):
            iteration = ck.parse_iteration_dir(path.stem)
            record = read_json_object(path)
            if iteration is not None and record is not None and isinstance(record.get("loss"), (int, float)):
                out.setdefault(folder.name, {})[iteration] = record
    return out


def decays_of(paths: ExperimentPaths) -> list[tuple[ExperimentPaths, DecaySource]]:
    """Experiments beside this one that decay from one of its checkpoints (their decay_source.json)."""
    here = paths.checkpoints.resolve()
    found = []
    parent = paths.root.parent
    for other in sorted(parent.iterdir()) if parent.is_dir() else []:
        if other == paths.root or not other.is_dir():
            continue
        try:
            source = DecaySource.read(other)
        except (ValueError, OSError):
            continue
        if source is not None and source.ckpt_dir.resolve() == here:
            found.append((ExperimentPaths(name=other.name, root=other), source))
    return sorted(found, key=lambda pair: (pair[1].iteration, pair[0].name))


@dataclass(frozen=True)
class Series:
    """One run's held-out loss: (iteration, tokens seen or None, loss) per evaluated checkpoint."""

    name: str
    points: list[tuple[int, int | None, float]]
    decay_from: int | None = None


def _series(paths: ExperimentPaths, label: str, decay_from: int | None = None,
            start: tuple[int, int | None, float] | None = None) -> Series:
    results = read_results(paths.root).get(label, {})
    curve, _ = experiment_curve(paths)
    points = [(it, curve.tokens_at(it) if curve is not None else None, float(rec["loss"]))
              for it, rec in sorted(results.items())]
    if start is not None and points and start[0] < points[0][0]:
        points = [start, *points]  # a decay's line starts at the stable checkpoint it branched from
    return Series(paths.name, points, decay_from)


def run_and_decays(paths: ExperimentPaths, label: str) -> list[Series]:
    """The stable run's series, then one per decay from it (each starting at its branch point when that checkpoint
    was evaluated too)."""
    stable = _series(paths, label)
    by_iteration = {it: (it, tokens, loss) for it, tokens, loss in stable.points}
    out = [stable]
    for decay, source in decays_of(paths):
        out.append(_series(decay, label, source.iteration, by_iteration.get(source.iteration)))
    return out


def summary(series: list[Series], label: str) -> list[str]:
    rows = []
    for s in series:
        for it, tokens, loss in s.points:
            if s.decay_from is not None and it == s.decay_from:
                continue  # the stable run's point, listed with it
            rows.append([s.name, str(it), human_count(tokens), f"{loss:.4f}", f"{math.exp(min(loss, 50.0)):.3f}"])
    if not rows:
        return [f"no held-out results for '{label}' yet"]
    return table(["experiment", "iteration", "tokens seen", f"{label} loss", f"{label} ppl"], rows)


def plot_png(series: list[Series], label: str, path: Path) -> Path:
    """Held-out loss against tokens seen (iterations when tokens are unknown), the stable run and its decays on one
    plot. Raises ReportError when nothing can be drawn or the file cannot be written."""
    drawn = [s for s in series if s.points]
    if not drawn:
        raise ReportError([Problem("--png", f"no held-out results for '{label}' to plot")],
                          "infir2: cannot write the plot")
    try:
        return _plot_png(drawn, label, path)
    except (OSError, ValueError) as exc:
        raise ReportError([Problem("--png", str(exc), str(path))], "infir2: cannot write the plot") from None


def _plot_png(series: list[Series], label: str, path: Path) -> Path:
    plt = pyplot()
    use_tokens = all(tokens is not None for s in series for _, tokens, _ in s.points)
    top = max((tokens or 0) for s in series for _, tokens, _ in s.points) if use_tokens else 0
    scale, unit = next(((v, u) for v, u in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")) if top >= 10 * v),
                       (1.0, ""))
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    try:
        for index, s in enumerate(series):
            xs = [(tokens or 0) / scale if use_tokens else it for it, tokens, _ in s.points]
            ys = [loss for _, _, loss in s.points]
            stable = s.decay_from is None
            ax.plot(xs, ys, marker="o" if stable else "s", ms=4, lw=2.0 if stable else 1.4,
                    color="#1b2631" if stable else f"C{index % 10}",
                    label=s.name if stable else f"{s.name} (decay from {s.decay_from})")
            if not stable and s.points and s.points[0][0] == s.decay_from:
                ax.axvline(xs[0], color="#888888", lw=0.7, ls=":")
        ax.set_xlabel(f"tokens seen ({unit})" if use_tokens and unit else "tokens seen" if use_tokens
                      else "iteration")
        ax.set_ylabel(f"held-out loss ({label})")
        ax.set_title(f"held-out loss ({label}): {series[0].name} and its decays", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(plt, fig, path)
