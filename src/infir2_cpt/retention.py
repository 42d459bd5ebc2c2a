"""Checkpoint retention: which checkpoints of a run stay on disk, the pruning that removes the others, and the
whole-run forecast of how many are on disk at once.

The policy (recipe keys checkpoint.keep_last and checkpoint.keep_every) keeps the newest keep_last complete
checkpoints and every checkpoint whose iteration is a multiple of keep_every (the stable-phase branch points a
decay can start from). Whatever the policy says, pruning never removes:
- a partial checkpoint (no .metadata or metadata.json yet): a save may still be writing it;
- the newest complete checkpoint, and the one latest_checkpointed_iteration.txt names (what a resume loads);
- a checkpoint another experiment beside this one decays from (its decay_source.json names it);
- a checkpoint `infir2 eval` is reading (a hold file in exp/<name>/eval/, removed when the evaluation ends);
- a release folder, or anything that is not an iter_* folder.
When a decay_source.json beside the experiment cannot be read, nothing is removed (it could name any of them).

Removal is crash-safe: the folder is first renamed to a dot-name that neither Megatron nor infir2 ever loads
(.infir2-removing-iter_N), then deleted; a removal cut short is finished by the next prune. Every removal is
logged to exp/<name>/logs/retention.log.

The same rules drive the forecast (forecast()): the saves a run will make, each followed by a prune, give the
most checkpoints on disk at once, which preflight compares with the free space.

While a run trains, the launcher that holds the experiment lock prunes after each newly completed checkpoint
(watch(), started by runtime/torchrun.py); `infir2 checkpoints EXP --prune` does the same offline.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from . import checkpoints as ck
from .layout import DecaySource, ExperimentPaths, read_json_object

RETENTION_ENV = "INFIR2_RETENTION"  # the policy, as JSON, for the launcher's pruning thread
POLL_ENV = "INFIR2_RETENTION_POLL_SECONDS"  # how often the launcher looks for a new checkpoint (tests: less)
DEFAULT_POLL_SECONDS = 30.0
REMOVING_PREFIX = ".infir2-removing-"
LOG_NAME = "retention.log"
EVAL_DIR = "eval"
HOLD_PREFIX = ".hold-"
# A hold written on another host cannot be checked for a live process: it is honoured for this long.
FOREIGN_HOLD_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class RetentionPolicy:
    """keep_last None: no retention, every checkpoint stays."""

    keep_last: int | None = None
    keep_every: int | None = None

    @property
    def active(self) -> bool:
        return self.keep_last is not None

    @classmethod
    def of(cls, keep_last: int | None, keep_every: int | None) -> RetentionPolicy:
        return cls(keep_last, keep_every)

    def describe(self) -> str:
        if not self.active:
            return "no retention policy (checkpoint.keep_last unset): every checkpoint stays"
        every = f" and every multiple of {self.keep_every}" if self.keep_every else ""
        return f"keep the last {self.keep_last}{every}"

    def env_value(self) -> str:
        return json.dumps({"keep_last": self.keep_last, "keep_every": self.keep_every})

    @classmethod
    def from_env_value(cls, text: str | None) -> RetentionPolicy | None:
        """The policy a launch passed in RETENTION_ENV; None when absent or unreadable."""
        try:
            data = json.loads(text) if text else None
            policy = cls(data["keep_last"], data.get("keep_every")) if isinstance(data, dict) else None
        except (ValueError, KeyError, TypeError):
            return None
        ok = policy is not None and all(v is None or (isinstance(v, int) and v >= 1)
                                        for v in (policy.keep_last, policy.keep_every))
        return policy if ok and policy is not None and policy.active else None


# --------------------------------------------------------------------------- the rules


def kept_by_policy(complete: list[int], policy: RetentionPolicy) -> dict[int, list[str]]:
    """Iterations of complete checkpoints the policy itself keeps, with why (ascending input)."""
    reasons: dict[int, list[str]] = {}
    if not policy.active:
        return {it: ["no retention policy"] for it in complete}
    ordered = sorted(complete)
    if ordered:
        reasons.setdefault(ordered[-1], []).append("newest complete")
    for it in ordered[-policy.keep_last:] if policy.keep_last else []:
        reasons.setdefault(it, []).append(f"last {policy.keep_last}")
    if policy.keep_every:
        for it in ordered:
            if it % policy.keep_every == 0:
                reasons.setdefault(it, []).append(f"multiple of {policy.keep_every}")
    return reasons


@dataclass(frozen=True)
class Verdict:
    """What pruning does with one folder, and why."""

    folder: ck.CheckpointFolder
    keep: bool
    reasons: tuple[str, ...]

    @property
    def text(self) -> str:
        return ("keep: " if self.keep else "remove: ") + "; ".join(self.reasons)


def decide(folders: list[ck.CheckpointFolder], policy: RetentionPolicy,
           protected: dict[int, list[str]]) -> list[Verdict]:
    """The verdict on every folder (list_checkpoints' order). `protected`: iteration -> why it must stay."""
    complete = [f.iteration for f in folders if f.complete and f.iteration is not None]
    kept = kept_by_policy(complete, policy)
    out = []
    for folder in folders:
        if folder.release:
            out.append(Verdict(folder, True, ("release folder (a base model)",)))
        elif not folder.complete:
            out.append(Verdict(folder, True, ("partial: a save may still be writing it",)))
        else:
            it = folder.iteration or 0
            reasons = kept.get(it, []) + protected.get(it, [])
            if reasons:
                out.append(Verdict(folder, True, tuple(reasons)))
            else:
                every = f", not a multiple of {policy.keep_every}" if policy.keep_every else ""
                out.append(Verdict(folder, False, (f"not among the last {policy.keep_last}{every}",)))
    return out


# --------------------------------------------------------------------------- what must stay whatever the policy


@dataclass
class Protection:
    """Iterations that must stay, with why, and problems that forbid pruning altogether."""

    reasons: dict[int, list[str]] = field(default_factory=dict)
    blockers: list[str] = field(default_factory=list)

    def add(self, iteration: int, reason: str) -> None:
        self.reasons.setdefault(iteration, []).append(reason)


def decay_sources(paths: ExperimentPaths, protection: Protection) -> None:
    """Experiments beside this one whose decay_source.json names a checkpoint of it."""
    here = paths.checkpoints.resolve()
    parent = paths.root.parent
    if not parent.is_dir():
        return
    for other in sorted(parent.iterdir()):
        if other == paths.root or not other.is_dir():
            continue
        try:
            source = DecaySource.read(other)
        except (ValueError, OSError):
            protection.blockers.append(f"{other}/decay_source.json cannot be read: it may name any checkpoint "
                                       f"here; fix or remove it")
            continue
        if source is not None and source.ckpt_dir.resolve() == here:
            protection.add(source.iteration, f"decay experiment {other.name} started from it")


def hold_path(exp_dir: Path, token: str) -> Path:
    return exp_dir / EVAL_DIR / f"{HOLD_PREFIX}{token}.json"


def write_hold(exp_dir: Path, token: str, iterations: list[int]) -> Path:
    """Mark checkpoints of exp_dir as being read (by `infir2 eval`), so that pruning leaves them."""
    path = hold_path(exp_dir, token)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "iterations": iterations}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)
    return path


def _hold_is_live(record: dict) -> bool:
    if record.get("host") != socket.gethostname():
        return time.time() - float(record.get("time", 0)) < FOREIGN_HOLD_SECONDS
    try:
        os.kill(int(record.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def eval_holds(exp_dir: Path, protection: Protection) -> None:
    for path in sorted((exp_dir / EVAL_DIR).glob(f"{HOLD_PREFIX}*.json")):
        record = read_json_object(path)
        if record is None or not _hold_is_live(record):
            continue
        for it in record.get("iterations", []):
            if isinstance(it, int):
                protection.add(it, f"being evaluated ({path.name})")


def protection_of(paths: ExperimentPaths) -> Protection:
    protection = Protection()
    tracker = ck.read_tracker(paths.checkpoints)
    if tracker.iteration is not None:
        protection.add(tracker.iteration, f"named by {ck.TRACKER}")
    decay_sources(paths, protection)
    eval_holds(paths.root, protection)
    return protection


# --------------------------------------------------------------------------- pruning


@dataclass
class PruneResult:
    verdicts: list[Verdict]
    removed: list[tuple[str, int]] = field(default_factory=list)  # (folder name, bytes)
    blockers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _log(paths: ExperimentPaths, line: str) -> None:
    paths.logs.mkdir(parents=True, exist_ok=True)
    with open(paths.logs / LOG_NAME, "a") as log:
        log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {line}\n")


def finish_interrupted_removals(ckpt_dir: Path) -> list[str]:
    """Delete what an earlier prune renamed but did not finish deleting."""
    done = []
    for leftover in sorted(ckpt_dir.glob(f"{REMOVING_PREFIX}*")):
        shutil.rmtree(leftover, ignore_errors=True)
        done.append(leftover.name)
    return done


def prune(paths: ExperimentPaths, policy: RetentionPolicy, *, dry_run: bool = False,
          who: str = "infir2 checkpoints --prune") -> PruneResult:
    """Apply the policy to paths.checkpoints. With dry_run only the verdicts are computed."""
    folders = ck.list_checkpoints(paths.checkpoints)
    protection = protection_of(paths)
    verdicts = decide(folders, policy, protection.reasons)
    result = PruneResult(verdicts, blockers=list(protection.blockers))
    if not policy.active:
        result.notes.append(policy.describe())
        return result
    if protection.blockers or dry_run:  # a blocker: the verdicts stand, but nothing is removed
        return result
    for name in finish_interrupted_removals(paths.checkpoints):
        _log(paths, f"finished removing {name} (an earlier removal was interrupted)")
    for verdict in verdicts:
        if verdict.keep:
            continue
        folder = verdict.folder
        if not folder.complete or ck.read_tracker(paths.checkpoints).iteration == folder.iteration:
            continue  # changed since the verdict: leave it
        size = folder.size_bytes()
        trash = folder.path.with_name(REMOVING_PREFIX + folder.path.name)
        try:
            os.rename(folder.path, trash)  # atomic: from here on nothing loads it
        except FileNotFoundError:
            result.notes.append(f"{folder.path.name} was removed meanwhile (another prune)")
            continue
        _log(paths, f"removing {folder.path.name} ({size} bytes) by {who}: {'; '.join(verdict.reasons)}")
        shutil.rmtree(trash, ignore_errors=True)
        _log(paths, f"removed {folder.path.name}")
        result.removed.append((folder.path.name, size))
    return result


# --------------------------------------------------------------------------- while a run trains


def _say(message: str) -> None:
    print(f"infir2.retention: {message}", file=sys.stderr, flush=True)


def newest_complete(ckpt_dir: Path) -> int | None:
    complete = [f.iteration for f in ck.list_checkpoints(ckpt_dir) if f.complete and f.iteration]
    return max(complete) if complete else None


def prune_and_report(paths: ExperimentPaths, policy: RetentionPolicy, who: str) -> None:
    """One prune, its outcome on stderr (the launcher's console log). Never raises: pruning must not stop a run."""
    try:
        result = prune(paths, policy, who=who)
    except OSError as exc:
        _say(f"pruning {paths.checkpoints} failed: {exc}")
        return
    for blocker in result.blockers:
        _say(f"nothing removed: {blocker}")
    for name, size in result.removed:
        _say(f"removed {name} ({size / 1e9:.1f} GB): {policy.describe()} (log: {paths.logs / LOG_NAME})")


def watch(paths: ExperimentPaths, policy: RetentionPolicy, stop: threading.Event, poll_seconds: float,
          holds_lock: Callable[[], bool]) -> None:
    """Prune after each newly completed checkpoint until `stop` is set. Only while this process holds the
    experiment lock (one host prunes)."""
    seen = newest_complete(paths.checkpoints)
    while not stop.wait(poll_seconds):
        newest = newest_complete(paths.checkpoints)
        if newest is not None and (seen is None or newest > seen):
            seen = newest
            if holds_lock():
                prune_and_report(paths, policy, who=f"the launcher after {ck.iter_dir_name(newest)}")


def poll_seconds(environ: Mapping[str, str]) -> float:
    try:
        return max(0.05, float(environ.get(POLL_ENV) or DEFAULT_POLL_SECONDS))
    except ValueError:
        return DEFAULT_POLL_SECONDS


# --------------------------------------------------------------------------- the whole-run forecast


def save_iterations(start: int, end: int, interval: int) -> list[int]:
    """The iterations a run from `start` to `end` saves at: every multiple of interval after start, and end
    itself (Megatron saves when training ends off an interval)."""
    if interval < 1 or end <= start:
        return []
    first = (start // interval + 1) * interval
    saves = list(range(first, end + 1, interval))
    if not saves or saves[-1] != end:
        saves.append(end)
    return saves


@dataclass(frozen=True)
class Forecast:
    saves: list[int]  # the iterations the run will save at
    now: int  # checkpoint folders of the run on disk now (partial ones included)
    peak: int  # the most on disk at once, during a save
    final: int  # on disk when the run ends

    @property
    def extra_at_peak(self) -> int:
        """How many more folders than now the run holds at its peak (what the free space must take)."""
        return max(self.peak - self.now, 0)


def forecast(policy: RetentionPolicy, existing: list[int], partial: int, saves: list[int],
             protected: set[int]) -> Forecast:
    """Replay the run: each save adds a folder (all kept ones still there while it is written), then the prune
    that follows it applies the policy. `existing`: complete checkpoints on disk now; `partial`: partial folders
    (never removed); `protected`: iterations that stay whatever the policy."""
    on_disk = set(existing)
    now = len(on_disk) + partial
    peak = now
    for it in saves:
        on_disk.add(it)
        peak = max(peak, len(on_disk) + partial)
        if policy.active:
            kept = kept_by_policy(sorted(on_disk), policy)
            on_disk = {i for i in on_disk if i in kept or i in protected}
    return Forecast(saves=saves, now=now, peak=peak, final=len(on_disk) + partial)
