"""Megatron checkpoint folders: what is there, what is complete, and what a launch should load.

Megatron's own rules (megatron-core 0.19.2, megatron/training/checkpointing.py), which this module works around:
- `--load DIR` reads DIR/latest_checkpointed_iteration.txt; without it Megatron starts from random weights
  (or, with --exit-on-missing-checkpoint, exits with status 0). An iter_* folder given as --load has no
  tracker, so it silently trains from scratch.
- A garbled tracker makes Megatron print an error and sys.exit() with status 0, before --ckpt-step is read.
- `--ckpt-step N` replaces the tracker's value; `--ckpt-step 0` is ignored (falsy).
- torch_dist writes the .distcp shards, then `.metadata`, then metadata.json, then the tracker: a folder
  missing either metadata file is a partial checkpoint.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
REQUIRED_FILES = ("metadata.json", ".metadata")


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


@dataclass(frozen=True)
class CheckpointFolder:
    """One iter_* (or release) folder."""

    path: Path
    iteration: int | None  # None for a release checkpoint

    @property
    def missing(self) -> list[str]:
        return [name for name in REQUIRED_FILES if not (self.path / name).is_file()]

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def release(self) -> bool:
        return self.iteration is None

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def parse_iteration_dir(name: str) -> int | None:
    match = _ITER_RE.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(ckpt_dir: Path) -> list[CheckpointFolder]:
    """Every iter_* folder (ascending) and a release folder, complete or not."""
    if not ckpt_dir.is_dir():
        return []
    folders = []
    for child in ckpt_dir.iterdir():
        if not child.is_dir():
            continue
        iteration = parse_iteration_dir(child.name)
        if iteration is not None:
            folders.append(CheckpointFolder(child, iteration))
        elif child.name == RELEASE:
            folders.append(CheckpointFolder(child, None))
    return sorted(folders, key=lambda c: -1 if c.iteration is None else c.iteration)


@dataclass(frozen=True)
class TrackerState:
    """What latest_checkpointed_iteration.txt says: an iteration, 'release', or a problem."""

    iteration: int | None = None
    release: bool = False
    problem: str | None = None  # "missing", or why it could not be read

    @property
    def derails_megatron(self) -> bool:
        """Megatron reads the tracker before --ckpt-step: 'release' or an unreadable tracker sends it elsewhere
        or stops it (a missing one does not)."""
        return self.release or self.problem not in (None, "missing")


def read_tracker(ckpt_dir: Path) -> TrackerState:
    path = ckpt_dir / TRACKER
    if not path.is_file():
        return TrackerState(problem="missing")
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        return TrackerState(problem=f"unreadable ({exc})")
    if text == RELEASE:
        return TrackerState(release=True)
    if text.isdigit():
        return TrackerState(iteration=int(text))
    return TrackerState(problem=f"garbled (contains {text[:40]!r})")


@dataclass(frozen=True)
class ResumePoint:
    """What a launch should load from a run's own checkpoint directory.

    folder is None when there is nothing complete to resume from (a fresh start). ckpt_step is set when
    the tracker cannot be trusted and Megatron must be told the iteration. repair_tracker is set when the
    tracker file would derail Megatron: garbled (Megatron exits on it) or 'release' (Megatron would load the
    release folder whatever --ckpt-step says), so the launcher rewrites it to ckpt_step first; on a fresh
    start (folder None) it is set whenever a tracker file exists at all, since Megatron would try to load
    what it names (and then ignore --pretrained-checkpoint), so the launcher sets it aside.
    """

    folder: CheckpointFolder | None
    reason: str
    ckpt_step: int | None = None
    repair_tracker: bool = False
    partial: tuple[CheckpointFolder, ...] = ()

    @property
    def iteration(self) -> int | None:
        return None if self.folder is None else self.folder.iteration


def find_resume_point(ckpt_dir: Path) -> ResumePoint:
    """The checkpoint to resume from: the tracker's when it names a complete folder, else the newest complete."""
    folders = list_checkpoints(ckpt_dir)
    partial = tuple(f for f in folders if not f.complete)
    complete = [f for f in folders if f.complete]
    tracker = read_tracker(ckpt_dir)

    if tracker.problem is None:
        wanted = ckpt_dir / (RELEASE if tracker.release else iter_dir_name(tracker.iteration or 0))
        match = next((f for f in complete if f.path == wanted), None)
        if match is not None:
            label = "release" if tracker.release else str(tracker.iteration)
            return ResumePoint(match, f"{TRACKER} names {label} and {wanted.name} is complete", partial=partial)
        why = f"{TRACKER} names {wanted.name}, which is " + (
            "missing" if not wanted.is_dir() else f"incomplete (no {', '.join(CheckpointFolder(wanted, 0).missing)})")
    else:
        why = f"{TRACKER} is {tracker.problem}"

    newest = next((f for f in reversed(complete) if f.iteration), None)
    if newest is None:
        if partial:
            why += f"; only partial checkpoints here ({', '.join(f.path.name for f in partial)})"
        return ResumePoint(None, why + "; no complete checkpoint to resume from", partial=partial,
                           repair_tracker=tracker.problem != "missing")
    return ResumePoint(
        newest,
        why + f"; falling back to the newest complete checkpoint, {newest.path.name}",
        ckpt_step=newest.iteration,
        repair_tracker=tracker.derails_megatron,
        partial=partial,
    )


def write_tracker(ckpt_dir: Path, iteration: int | None) -> Path | None:
    """Atomically write the tracker; a garbled old one is kept beside it. Returns the backup's path.

    iteration None only sets the old tracker aside (a fresh start: Megatron must find no tracker)."""
    path = ckpt_dir / TRACKER
    backup = None
    if path.exists():
        label = "garbled" if iteration is not None else "stale"
        backup = path.with_name(f"{TRACKER}.{label}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, backup)
    if iteration is None:
        return backup
    tmp = path.with_name(f".{TRACKER}.tmp-{os.getpid()}")
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, path)
    return backup


@dataclass(frozen=True)
class TrackerRepair:
    """A tracker the launcher fixes before Megatron reads it: rewritten to `iteration`, or (None) set aside so that
    Megatron starts fresh. The old tracker is kept beside it."""

    ckpt_dir: Path
    iteration: int | None

    def describe(self) -> str:
        return (f"the tracker will be set aside and rewritten to {self.iteration}" if self.iteration is not None
                else "the tracker will be set aside so that Megatron starts fresh")

    def apply(self) -> str:
        """Do it; returns what was done, for the launch's output."""
        backup = write_tracker(self.ckpt_dir, self.iteration)
        done = f"rewrote {TRACKER} -> {self.iteration}" if self.iteration is not None else f"set {TRACKER} aside"
        return f"{done} (old one kept as {backup})"


@dataclass(frozen=True)
class LoadTarget:
    """A checkpoint named on the command line (`--load iter_0035000` or a path), in Megatron's terms."""

    ckpt_dir: Path  # the parent directory Megatron's --load needs
    iteration: int

    @property
    def folder(self) -> CheckpointFolder:
        return CheckpointFolder(self.ckpt_dir / iter_dir_name(self.iteration), self.iteration)


def parse_load_spec(spec: str, default_ckpt_dir: Path) -> tuple[LoadTarget | None, str | None]:
    """`iter_0035000` or `35000` (in default_ckpt_dir), or a path to an iter_* folder. Returns (target, problem)."""
    path = Path(spec)
    if spec.isdigit():
        folder_path = default_ckpt_dir / iter_dir_name(int(spec))
    elif parse_iteration_dir(path.name) is not None and len(path.parts) == 1:
        folder_path = default_ckpt_dir / path.name
    else:
        folder_path = path.absolute()
    iteration = parse_iteration_dir(folder_path.name)
    if iteration is None:
        return None, (f"'{spec}' is not an iteration: give iter_NNNNNNN, a step number, or the path of an "
                      f"iter_* folder (Megatron would silently train from random weights if --load pointed "
                      f"at anything else)")
    if iteration == 0:
        return None, "iteration 0 cannot be selected (Megatron ignores --ckpt-step 0)"
    return LoadTarget(folder_path.parent, iteration), None


def check_load_target(target: LoadTarget) -> str | None:
    """Why the named checkpoint cannot be loaded here, or None when it is complete."""
    folder = target.folder
    if not folder.path.is_dir():
        available = [f.path.name for f in list_checkpoints(target.ckpt_dir) if f.complete]
        have = (f"; complete checkpoints there: {', '.join(available)}" if available
                else f"; {target.ckpt_dir} holds no complete checkpoint")
        return f"{folder.path} does not exist{have}"
    if not folder.complete:
        return f"{folder.path} is a partial checkpoint (missing {', '.join(folder.missing)})"
    return None
