"""`infir2 checkpoints EXP`: an experiment's checkpoint folders with the phase, learning rate and tokens of each,
whether it is complete, and what a re-run would resume from."""

from __future__ import annotations

from pathlib import Path

from .. import checkpoints as ck
from ..errors import Problem, ReportError
from ..layout import DecaySource, ExperimentPaths
from .curve import experiment_curve
from .text import fmt_lr, human_bytes, human_count, table


def resolve_experiment(exp: str, root: Path) -> ExperimentPaths:
    """EXP is a folder of the experiments root `root`, or the path of an experiment folder."""
    candidate = Path(exp)
    if ("/" in exp or exp.startswith(".")) and candidate.is_dir():
        return ExperimentPaths(name=candidate.resolve().name, root=candidate.resolve())
    paths = ExperimentPaths.for_name(exp, root)
    if not paths.root.is_dir():
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
        try:
            source = DecaySource.read(other)
            same = source is not None and source.ckpt_dir.resolve() == here
        except (ValueError, OSError):
            continue
        if same:
            out.append(f"{ck.iter_dir_name(source.iteration)} -> experiment {other.name} (ends at {source.train_iters})")
    return out


def checkpoints_report(exp: str, root: Path, recipe: str | None = None, sets: list[str] | None = None,
                       decay_from: int | None = None) -> str:
    """The text of `infir2 checkpoints EXP` (EXP under the experiments root `root`, or a path). Raises ReportError /
    RecipeError."""
    paths = resolve_experiment(exp, root)
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
        try:
            source = DecaySource.read(paths.root)
        except ValueError:
            source = None
        origin = source.ckpt_dir if source is not None else "the stable run"
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
