"""`infir2 checkpoints EXP`: an experiment's checkpoint folders with the phase, learning rate and tokens of each,
whether it is complete, its held-out loss (`infir2 eval`), what retention does with it, and what a re-run would
resume from; `--prune` applies the retention policy (retention.py)."""

from __future__ import annotations

import math
from pathlib import Path

from .. import checkpoints as ck
from ..errors import Problem, RecipeError, ReportError
from ..layout import RECIPE_FILE, DecaySource, ExperimentPaths
from ..recipe.load import resolve
from ..retention import EVAL_DIR, LOG_NAME, RetentionPolicy, decide, protection_of, prune
from .curve import experiment_curve
from .heldout import read_results
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


def retention_policy(paths: ExperimentPaths, recipe: str | None, sets: list[str] | None, keep_last: int | None,
                     keep_every: int | None) -> RetentionPolicy:
    """--keep-last/--keep-every when given, else the policy of --recipe, else of the recorded recipe.yaml (else none).
    Raises ReportError on a value that is not >= 1."""
    bad = [Problem(key, "must be >= 1", value) for key, value in (("--keep-last", keep_last),
                                                                  ("--keep-every", keep_every))
           if value is not None and value < 1]
    if keep_every is not None and keep_last is None and not bad:
        bad.append(Problem("--keep-every", "needs --keep-last (the policy keeps the last N and every multiple)",
                           keep_every))
    if bad:
        raise ReportError(bad, "infir2: invalid retention policy")
    if keep_last is not None:
        return RetentionPolicy(keep_last, keep_every)
    ref = recipe if recipe is not None else str(paths.root / RECIPE_FILE)
    if recipe is None and not (paths.root / RECIPE_FILE).is_file():
        return RetentionPolicy()
    try:
        resolved = resolve(ref, list(sets or []) if recipe is not None else [])
    except RecipeError:
        return RetentionPolicy()
    c = resolved.recipe.checkpoint
    return RetentionPolicy() if resolved.problems else RetentionPolicy(c.keep_last, c.keep_every)


def prune_report(exp: str, root: Path, recipe: str | None = None, sets: list[str] | None = None,
                 keep_last: int | None = None, keep_every: int | None = None, dry_run: bool = False) -> str:
    """`infir2 checkpoints EXP --prune [--dry-run]`: apply the retention policy now. Raises ReportError."""
    paths = resolve_experiment(exp, root)
    policy = retention_policy(paths, recipe, sets, keep_last, keep_every)
    if not policy.active:
        raise ReportError([Problem("--prune", f"no retention policy: {paths.root / RECIPE_FILE} sets no "
                                   "checkpoint.keep_last; give --keep-last N (and --keep-every M)")])
    result = prune(paths, policy, dry_run=dry_run)
    lines = [f"experiment {paths.name}: {policy.describe()}" + (" (dry run: nothing removed)" if dry_run else "")]
    rows = [[v.folder.path.name, ("would remove" if dry_run or result.blockers else "removed") if not v.keep
             else "keep", "; ".join(v.reasons)] for v in result.verdicts]
    lines += [""] + table(["checkpoint", "", "why"], rows) + [""] if rows else ["no checkpoint folders"]
    lines += [f"nothing removed: {blocker}" for blocker in result.blockers]
    lines += [f"note: {note}" for note in result.notes]
    freed = sum(size for _, size in result.removed)
    if result.removed:
        lines.append(f"removed {len(result.removed)} checkpoint(s), {human_bytes(freed)}; logged in "
                     f"{paths.logs / LOG_NAME}")
    elif not dry_run and not result.blockers:
        lines.append("nothing to remove")
    return "\n".join(lines).rstrip()


def _eval_columns(paths: ExperimentPaths) -> tuple[list[str], dict[str, dict[int, dict]]]:
    results = read_results(paths.root)
    headers = [h for label in results for h in (f"{label} loss", f"{label} ppl")]
    return headers, results


def _eval_cells(results: dict[str, dict[int, dict]], iteration: int | None) -> list[str]:
    cells = []
    for by_iteration in results.values():
        record = by_iteration.get(iteration) if iteration is not None else None
        cells += [f"{record['loss']:.4f}", f"{math.exp(min(float(record['loss']), 50.0)):.3f}"] if record \
            else ["-", "-"]
    return cells


def checkpoints_report(exp: str, root: Path, recipe: str | None = None, sets: list[str] | None = None,
                       decay_from: int | None = None) -> str:
    """The text of `infir2 checkpoints EXP` (EXP under the experiments root `root`, or a path). Raises ReportError /
    RecipeError."""
    paths = resolve_experiment(exp, root)
    curve, notes = experiment_curve(paths, recipe, sets, decay_from)
    policy = retention_policy(paths, recipe, sets, None, None)
    eval_headers, eval_results = _eval_columns(paths)
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
    verdicts = ({v.folder.path: v for v in decide(folders, policy, protection_of(paths).reasons)}
                if policy.active else {})
    rows = []
    total = 0
    on_disk = {folder.iteration for folder in folders}
    evaluated_only = sorted({it for by_it in eval_results.values() for it in by_it} - on_disk)
    entries: list[tuple[int, ck.CheckpointFolder | None]] = [
        (-1 if f.iteration is None else f.iteration, f) for f in folders] + [(it, None) for it in evaluated_only]
    for it, folder in sorted(entries, key=lambda e: e[0]):
        kept = ""
        if folder is None:  # removed (by retention), its held-out result kept
            state, size_text, mark = "removed", "-", ""
        else:
            size = folder.size_bytes()
            total += size
            state = "complete" if folder.complete else f"partial (no {', '.join(folder.missing)})"
            size_text = human_bytes(size)
            mark = "<- resume" if point.folder is not None and folder.path == point.folder.path else ""
            verdict = verdicts.get(folder.path)
            kept = "" if verdict is None else ("keep" if verdict.keep else "remove at next prune")
        if folder is not None and folder.release:
            rows.append(["release", "base", "-", "-", state, size_text, *_eval_cells(eval_results, None),
                         *([kept] if policy.active else []), mark])
            continue
        if curve is None:
            phase, lr, tokens = "?", "?", "?"
        else:
            phase, lr, tokens = curve.phase_at(it), fmt_lr(curve.lr_at(it)), human_count(curve.tokens_at(it))
        rows.append([str(it), phase, lr, tokens, state, size_text, *_eval_cells(eval_results, it),
                     *([kept] if policy.active else []), mark])
    if rows:
        lines.append("")
        lines += table(["iteration", "phase", "learning rate", "tokens seen", "state", "size", *eval_headers,
                        *(["retention"] if policy.active else []), ""], rows)
        lines.append("")
        complete = sum(1 for f in folders if f.complete)
        lines.append(f"{len(folders)} checkpoint folder(s): {complete} complete, {len(folders) - complete} partial; "
                     f"{human_bytes(total)} on disk")
        if policy.active:
            lines.append(f"retention: {policy.describe()} (`infir2 checkpoints {paths.name} --prune` applies it now)")
        if eval_headers:
            lines.append(f"held-out loss from `infir2 eval` ({paths.root / EVAL_DIR})")
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
