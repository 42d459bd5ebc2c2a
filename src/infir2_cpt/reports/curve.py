"""What `infir2 checkpoints` and `infir2 schedule` print: an experiment's checkpoints, and a learning-rate curve.

Both rest on the same picture of a run: its WSD schedule (schedule.py, computed like Megatron's
OptimizerParamScheduler) cut into phases. A decay run (`infir2 decay --load iter_K`) is its own schedule
with train_iters = K + decay_iters and no warmup; when the stable run's schedule is known too, the
iterations before K are drawn from it, so the curve reads as the checkpoint's whole history.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


import yaml

from .. import checkpoints as ck
from ..layout import DECAY_SOURCE_FILE, RECIPE_FILE, SCHEDULE_FILE, ExperimentPaths, exp_root, read_json_object
from ..errors import Problem, RecipeError, ReportError
from ..recipe.schema import Recipe
from ..recipe.load import apply_sets, build_recipe, load_raw, resolve_recipe_path
from ..recipe.schedule import WSDSchedule
from ..recipe.validate import Findings, check_schedule





DECAY_FROM_TITLE = "infir2: invalid --decay-from"

# --------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class Segment:
    """One phase of a curve: iterations start..end, learning rates from `schedule`."""

    phase: str  # warmup | stable | decay
    start: int
    end: int
    schedule: WSDSchedule
    stable_run: bool = False  # the stable run's part of a decay curve (before the loaded checkpoint)

    @property
    def label(self) -> str:
        return f"{self.phase} (stable run)" if self.stable_run else self.phase


def schedule_segments(s: WSDSchedule, lo: int = 0, hi: int | None = None, stable_run: bool = False) -> list[Segment]:
    """The phases of `s`, clipped to lo..hi; empty ones dropped."""
    hi = s.train_iters if hi is None else hi
    bounds = [("warmup", 0, s.warmup_iters), ("stable", s.warmup_iters, s.anneal_start_iter),
              ("decay", max(s.anneal_start_iter, s.warmup_iters), s.train_iters)]
    out = []
    for phase, start, end in bounds:
        start, end = max(start, lo), min(end, hi)
        if end > start:
            out.append(Segment(phase, start, end, s, stable_run))
    return out


def decay_schedule(s: WSDSchedule, k: int) -> WSDSchedule:
    """The schedule `infir2 decay --load iter_K` runs: train_iters K + decay_iters, no warmup, anneal from K."""
    return replace(s, train_iters=k + s.decay_iters, warmup_iters=0)


@dataclass(frozen=True)
class Curve:
    """The learning rate of one run over its iterations (for a decay run, with the stable run before it)."""

    title: str
    schedule: WSDSchedule  # the run's own schedule (a decay run's: train_iters K + D, warmup 0)
    seq_length: int | None = None
    decay_from: int | None = None  # a decay run: the stable iteration K it anneals from
    stable: WSDSchedule | None = None  # a decay run: the stable run's schedule, for iterations before K
    source: str = ""

    @property
    def segments(self) -> list[Segment]:
        if self.decay_from is None:
            return schedule_segments(self.schedule)
        before = schedule_segments(self.stable, hi=self.decay_from, stable_run=True) if self.stable else []
        return before + schedule_segments(self.schedule, lo=self.decay_from)

    @property
    def start(self) -> int:
        segments = self.segments
        return segments[0].start if segments else 0

    @property
    def end(self) -> int:
        return self.schedule.train_iters

    def schedule_at(self, iteration: int) -> WSDSchedule:
        if self.decay_from is not None and self.stable is not None and iteration < self.decay_from:
            return self.stable
        return self.schedule

    def lr_at(self, iteration: int) -> float:
        return self.schedule_at(iteration).lr_at(iteration)

    def phase_at(self, iteration: int) -> str:
        return self.schedule_at(iteration).phase_at(iteration)

    @property
    def tokens_per_iteration(self) -> int | None:
        return None if self.seq_length is None else self.schedule.global_batch_size * self.seq_length

    def tokens_at(self, iteration: int) -> int | None:
        per = self.tokens_per_iteration
        return None if per is None else iteration * per


def schedule_of(recipe: Recipe) -> WSDSchedule:
    s = recipe.schedule
    return WSDSchedule(lr=s.lr, min_lr=s.min_lr, train_iters=s.train_iters, warmup_iters=s.warmup_iters,
                       decay_iters=s.decay_iters, decay_style=s.decay_style, warmup_init_lr=s.warmup_init_lr,
                       global_batch_size=recipe.parallel.global_batch_size)


def _check(recipe: Recipe, source: str) -> None:
    findings = Findings()
    check_schedule(recipe, findings)
    if recipe.parallel.global_batch_size < 1:
        findings.add("parallel.global_batch_size", "must be >= 1", recipe.parallel.global_batch_size)
    if findings.config:
        raise RecipeError(findings.config, source)


def _stable_recipe(ref: str, sets: list[str]) -> Recipe | None:
    """For a decay curve: the stable recipe (`ref` itself, or the recipe a decay recipe extends), or None."""
    raw = load_raw(ref)
    if raw.get("phase") == "decay":
        path = resolve_recipe_path(ref)
        try:
            parent = (yaml.safe_load(path.read_text()) or {}).get("extends")
        except (OSError, yaml.YAMLError):
            return None
        if not parent:
            return None
        raw = load_raw(str(parent), (path,))
        if raw.get("phase") == "decay":
            return None
    problems: list[Problem] = []
    recipe = build_recipe(apply_sets(raw, sets, problems), problems)
    return None if problems else recipe


def recipe_curve(ref: str, sets: list[str] | None = None, decay_from: int | None = None) -> Curve:
    """The curve of `infir2 train --recipe REF` or, with decay_from K, of `infir2 decay --recipe REF --load iter_K`.
    Raises RecipeError or ReportError."""
    from ..launch.plan import LaunchRequest, load_request_recipe  # the launcher's own reading of a recipe

    sets = list(sets or [])
    problems: list[Problem] = []
    request = LaunchRequest(recipe=ref, sets=sets, decay_load=None if decay_from is None else str(decay_from))
    recipe = load_request_recipe(request, problems).recipe
    if problems:
        raise RecipeError(problems, ref)
    _check(recipe, ref)
    if decay_from is None:
        if recipe.phase == "decay":
            raise ReportError([Problem("--decay-from", f"'{ref}' is a decay recipe: it anneals from a checkpoint "
                                       "of the stable run; give that iteration with --decay-from K")],
                              DECAY_FROM_TITLE)
        return Curve(f"recipe {ref} (experiment {recipe.name})", schedule_of(recipe), recipe.model.seq_length,
                     source=f"recipe {ref}")
    if decay_from < 1:
        raise ReportError([Problem("--decay-from", "must be >= 1 (Megatron ignores --ckpt-step 0)", decay_from)],
                          DECAY_FROM_TITLE)
    if decay_from >= recipe.schedule.train_iters:
        raise ReportError([Problem("--decay-from", f"is at or past the stable recipe's train_iters "
                                   f"({recipe.schedule.train_iters}): that run has already decayed", decay_from)],
                          DECAY_FROM_TITLE)
    stable = _stable_recipe(ref, sets)
    return Curve(f"decay of recipe {ref} from iteration {decay_from} (experiment {recipe.name})",
                 decay_schedule(schedule_of(recipe), decay_from), recipe.model.seq_length, decay_from,
                 schedule_of(stable) if stable is not None else None, source=f"recipe {ref}, --decay-from {decay_from}")


def experiment_curve(paths: ExperimentPaths, recipe_ref: str | None = None, sets: list[str] | None = None,
                     decay_from: int | None = None) -> tuple[Curve | None, list[str]]:
    """The schedule an experiment ran with: --recipe when given, else what launch.execute recorded in
    exp/<name>/ (schedule.json, recipe.yaml, decay_source.json). Returns (curve or None, notes)."""
    notes: list[str] = []
    source = read_json_object(paths.root / DECAY_SOURCE_FILE)
    recorded_k = None
    if source is not None:
        try:
            recorded_k = int(source["iteration"])
        except (KeyError, TypeError, ValueError):
            notes.append(f"{DECAY_SOURCE_FILE} is unreadable; decay start unknown")
    if recipe_ref is not None:
        k = decay_from if decay_from is not None else recorded_k
        return recipe_curve(recipe_ref, sets, k), notes
    if decay_from is not None or sets:
        raise ReportError([Problem("--decay-from" if decay_from is not None else "--set",
                                   "only with --recipe (a recorded run's settings are read from "
                                   f"{paths.root / SCHEDULE_FILE})")])
    recipe = None
    recipe_path = paths.root / RECIPE_FILE
    if recipe_path.is_file():
        problems: list[Problem] = []
        try:
            recipe = build_recipe(yaml.safe_load(recipe_path.read_text()) or {}, problems)
        except (OSError, yaml.YAMLError, AttributeError) as exc:
            problems.append(Problem(str(recipe_path), f"unreadable ({exc})"))
        if problems:
            notes.append(f"{recipe_path} does not read as a recipe ({problems[0]}); ignoring it")
            recipe = None
    record = read_json_object(paths.root / SCHEDULE_FILE)
    if record is not None:
        try:
            s = WSDSchedule(lr=float(record["lr"]), min_lr=float(record["min_lr"]),
                            train_iters=int(record["train_iters"]), warmup_iters=int(record["warmup_iters"]),
                            decay_iters=int(record["decay_iters"]), decay_style=str(record["decay_style"]),
                            warmup_init_lr=recipe.schedule.warmup_init_lr if recipe else 0.0,
                            global_batch_size=int(record["global_batch_size"]))
        except (KeyError, TypeError, ValueError) as exc:
            notes.append(f"{paths.root / SCHEDULE_FILE} is unreadable ({exc!r}); ignoring it")
        else:
            what = f"{SCHEDULE_FILE}" + (f" + {RECIPE_FILE}" if recipe else "")
            if recipe is None:
                notes.append(f"no readable {RECIPE_FILE}: sequence length (and so tokens) unknown")
            return Curve(f"experiment {paths.name}", s, recipe.model.seq_length if recipe else None,
                         recorded_k, source=what), notes
    if recipe is not None:
        s = schedule_of(recipe)
        if recipe.phase == "decay" or recorded_k is not None:
            if recorded_k is None:
                notes.append(f"{RECIPE_FILE} is a decay recipe but {DECAY_SOURCE_FILE} is missing: pass --recipe "
                             "and --decay-from K for the learning rates")
                return None, notes
            s = decay_schedule(s, recorded_k)
        return Curve(f"experiment {paths.name}", s, recipe.model.seq_length, recorded_k, source=RECIPE_FILE), notes
    notes.append(f"no {SCHEDULE_FILE} or {RECIPE_FILE} in {paths.root}: pass --recipe to show phases, learning "
                 "rates and tokens")
    return None, notes


# --------------------------------------------------------------------------- formatting helpers


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def human_count(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("", "K", "M", "B", "T"):
        text = f"{int(value)}" if unit == "" else f"{value:.3g}"
        if unit == "T" or (abs(value) < 1000 and abs(float(text)) < 1000):
            return text + unit
        value /= 1000
    raise AssertionError


def fmt_lr(lr: float) -> str:
    return f"{lr:.3e}"


def table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        lines.append((indent + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths))).rstrip())
    return lines


# --------------------------------------------------------------------------- infir2 checkpoints


def resolve_experiment(exp: str) -> ExperimentPaths:
    """EXP is a folder of the experiments root, or the path of an experiment folder."""
    candidate = Path(exp)
    if ("/" in exp or exp.startswith(".")) and candidate.is_dir():
        return ExperimentPaths(name=candidate.resolve().name, root=candidate.resolve())
    paths = ExperimentPaths.for_name(exp)
    if not paths.root.is_dir():
        root = exp_root()
        known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        have = f"experiments there: {', '.join(known)}" if known else f"{root} holds no experiment"
        raise ReportError([Problem("EXP", f"no experiment folder {paths.root} ({have}; INFIR2_EXP_ROOT sets the "
                                   "experiments folder)", exp)])
    return paths


def _tracker_line(ckpt_dir: Path) -> str:
    state = ck.read_tracker(ckpt_dir)
    if state.problem is not None:
        return f"{ck.TRACKER}: {state.problem}"
    return f"{ck.TRACKER}: {'release' if state.release else state.iteration}"


def _decays_from_here(paths: ExperimentPaths) -> list[str]:
    """Other experiments beside this one whose decay_source.json names this checkpoint directory."""
    out = []
    here = paths.checkpoints.resolve()
    parent = paths.root.parent
    if not parent.is_dir():
        return out
    for other in sorted(parent.iterdir()):
        if other == paths.root or not other.is_dir():
            continue
        source = read_json_object(other / DECAY_SOURCE_FILE)
        if not source or "ckpt_dir" not in source:
            continue
        try:
            same = Path(str(source["ckpt_dir"])).resolve() == here
            k = int(source.get("iteration", 0))
        except (TypeError, ValueError, OSError):
            continue
        if same:
            out.append(f"{ck.iter_dir_name(k)} -> experiment {other.name} (ends at {source.get('train_iters', '?')})")
    return out


def checkpoints_report(exp: str, recipe: str | None = None, sets: list[str] | None = None,
                       decay_from: int | None = None) -> str:
    """The text of `infir2 checkpoints EXP`. Raises ReportError / RecipeError."""
    paths = resolve_experiment(exp)
    curve, notes = experiment_curve(paths, recipe, sets, decay_from)
    ckpt_dir = paths.checkpoints
    lines = [f"experiment {paths.name}: {paths.root}"]
    if curve is not None:
        s = curve.schedule
        per = curve.tokens_per_iteration
        tokens = (f"; {s.global_batch_size} sequences x {curve.seq_length} tokens = {per:,} tokens/iteration"
                  if per else f"; global batch {s.global_batch_size}")
        lines.append(f"schedule ({curve.source}): lr {s.lr:g} -> min_lr {s.min_lr:g}, warmup {s.warmup_iters}, "
                     f"{s.decay_style} decay {s.anneal_start_iter} -> {s.train_iters}{tokens}")
    if curve is not None and curve.decay_from is not None:
        source = read_json_object(paths.root / DECAY_SOURCE_FILE) or {}
        origin = source.get("ckpt_dir", "the stable run")
        lines.append(f"decay run: from {origin}/{ck.iter_dir_name(curve.decay_from)}, ends at iteration "
                     f"{curve.schedule.train_iters}")
    lines += [f"note: {n}" for n in notes]
    if not ckpt_dir.is_dir():
        lines.append(f"no checkpoints folder yet ({ckpt_dir})")
        return "\n".join(lines)
    lines.append(_tracker_line(ckpt_dir))
    folders = ck.list_checkpoints(ckpt_dir)
    point = ck.find_resume_point(ckpt_dir)
    rows = []
    total = 0
    for folder in folders:
        size = folder.size_bytes()
        total += size
        state = "complete" if folder.complete else f"partial (no {', '.join(folder.missing)})"
        mark = "<- resume" if point.folder is not None and folder.path == point.folder.path else ""
        if folder.release:
            rows.append(["release", "base", "-", "-", state, human_bytes(size), mark])
            continue
        it = folder.iteration or 0
        if curve is None:
            phase, lr, tokens = "?", "?", "?"
        else:
            phase, lr, tokens = curve.phase_at(it), fmt_lr(curve.lr_at(it)), human_count(curve.tokens_at(it))
        rows.append([str(it), phase, lr, tokens, state, human_bytes(size), mark])
    if rows:
        lines.append("")
        lines += table(["iteration", "phase", "learning rate", "tokens seen", "state", "size", ""], rows)
        lines.append("")
        complete = sum(1 for f in folders if f.complete)
        lines.append(f"{len(folders)} checkpoint folder(s): {complete} complete, {len(folders) - complete} partial; "
                     f"{human_bytes(total)} on disk")
    else:
        lines.append("no checkpoint folders yet")
    if point.folder is not None:
        lines.append(f"a resume loads {point.folder.path.name}: {point.reason}"
                     + (f" (--ckpt-step {point.ckpt_step})" if point.ckpt_step is not None else ""))
    elif curve is not None and curve.decay_from is not None:
        lines.append(f"nothing of its own to resume from ({point.reason}): re-running the decay loads the stable "
                     f"checkpoint {ck.iter_dir_name(curve.decay_from)} again")
    else:
        lines.append(f"a resume starts fresh: {point.reason}")
    if point.repair_tracker and (point.folder is not None or curve is None or curve.decay_from is None):
        lines.append(f"the launcher would {'rewrite' if point.folder is not None else 'set aside'} {ck.TRACKER} first")
    backups = sorted(p.name for p in ckpt_dir.glob(f"{ck.TRACKER}.*"))
    if backups:
        lines.append(f"trackers set aside earlier: {', '.join(backups)}")
    decays = _decays_from_here(paths)
    if decays:
        lines.append("decay runs from these checkpoints: " + "; ".join(decays))
    return "\n".join(lines)


# --------------------------------------------------------------------------- infir2 schedule


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
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
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
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
