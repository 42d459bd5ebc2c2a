"""The learning-rate curve of a run, which `infir2 checkpoints` and `infir2 schedule` both print from.

A run's WSD schedule (recipe/schedule.py, computed like Megatron's OptimizerParamScheduler) cut into phases. A
decay run (`infir2 decay --load iter_K`) is its own schedule, WSDSchedule.decay_from(K); when the stable run's
schedule is known too, the iterations before K are drawn from it, so the curve reads as the checkpoint's whole
history. The curve comes from a recipe (recipe_curve) or from what a launch recorded (experiment_curve).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Problem, RecipeError, ReportError
from ..layout import DECAY_SOURCE_FILE, RECIPE_FILE, SCHEDULE_FILE, DecaySource, ExperimentPaths, read_json_object
from ..recipe.load import resolve
from ..recipe.schedule import WSDSchedule
from ..recipe.schema import Recipe
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


def _check(recipe: Recipe, source: str) -> None:
    findings = Findings()
    check_schedule(recipe, findings)
    if recipe.parallel.global_batch_size < 1:
        findings.add("parallel.global_batch_size", "must be >= 1", recipe.parallel.global_batch_size)
    if findings.config:
        raise RecipeError(findings.config, source)


def recipe_curve(ref: str, sets: list[str] | None = None, decay_from: int | None = None) -> Curve:
    """The curve of `infir2 train --recipe REF` or, with decay_from K, of `infir2 decay --recipe REF --load iter_K`.
    Raises RecipeError or ReportError."""
    resolved = resolve(ref, list(sets or []), decay=decay_from is not None).checked()
    recipe = resolved.recipe
    _check(recipe, ref)
    if decay_from is None:
        if recipe.phase == "decay":
            raise ReportError([Problem("--decay-from", f"'{ref}' is a decay recipe: it anneals from a checkpoint "
                                       "of the stable run; give that iteration with --decay-from K")],
                              DECAY_FROM_TITLE)
        return Curve(f"recipe {ref} (experiment {recipe.name})", WSDSchedule.of(recipe), recipe.model.seq_length,
                     source=f"recipe {ref}")
    if decay_from < 1:
        raise ReportError([Problem("--decay-from", "must be >= 1 (Megatron ignores --ckpt-step 0)", decay_from)],
                          DECAY_FROM_TITLE)
    if decay_from >= recipe.schedule.train_iters:
        raise ReportError([Problem("--decay-from", f"is at or past the stable recipe's train_iters "
                                   f"({recipe.schedule.train_iters}): that run has already decayed", decay_from)],
                          DECAY_FROM_TITLE)
    stable = resolved.stable
    return Curve(f"decay of recipe {ref} from iteration {decay_from} (experiment {recipe.name})",
                 WSDSchedule.of(recipe).decay_from(decay_from), recipe.model.seq_length, decay_from,
                 WSDSchedule.of(stable) if stable is not None else None,
                 source=f"recipe {ref}, --decay-from {decay_from}")


def experiment_curve(paths: ExperimentPaths, recipe_ref: str | None = None, sets: list[str] | None = None,
                     decay_from: int | None = None) -> tuple[Curve | None, list[str]]:
    """The schedule an experiment ran with: --recipe when given, else what launch.execute recorded in
    exp/<name>/ (schedule.json, recipe.yaml, decay_source.json). Returns (curve or None, notes)."""
    notes: list[str] = []
    recorded_k = None
    try:
        source = DecaySource.read(paths.root)
        recorded_k = source.iteration if source is not None else None
    except ValueError:
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
        try:
            resolved = resolve(str(recipe_path))
            problems = resolved.problems
        except RecipeError as exc:
            problems = exc.problems
        if problems:
            notes.append(f"{recipe_path} does not read as a recipe ({problems[0]}); ignoring it")
        else:
            recipe = resolved.recipe
    record = read_json_object(paths.root / SCHEDULE_FILE)
    if record is not None:
        try:
            s = WSDSchedule.from_record(record, recipe.schedule.warmup_init_lr if recipe else 0.0)
        except (KeyError, TypeError, ValueError) as exc:
            notes.append(f"{paths.root / SCHEDULE_FILE} is unreadable ({exc!r}); ignoring it")
        else:
            what = f"{SCHEDULE_FILE}" + (f" + {RECIPE_FILE}" if recipe else "")
            if recipe is None:
                notes.append(f"no readable {RECIPE_FILE}: sequence length (and so tokens) unknown")
            return Curve(f"experiment {paths.name}", s, recipe.model.seq_length if recipe else None,
                         recorded_k, source=what), notes
    if recipe is not None:
        s = WSDSchedule.of(recipe)
        if recipe.phase == "decay" or recorded_k is not None:
            if recorded_k is None:
                notes.append(f"{RECIPE_FILE} is a decay recipe but {DECAY_SOURCE_FILE} is missing: pass --recipe "
                             "and --decay-from K for the learning rates")
                return None, notes
            s = s.decay_from(recorded_k)
        return Curve(f"experiment {paths.name}", s, recipe.model.seq_length, recorded_k, source=RECIPE_FILE), notes
    notes.append(f"no {SCHEDULE_FILE} or {RECIPE_FILE} in {paths.root}: pass --recipe to show phases, learning "
                 "rates and tokens")
    return None, notes
