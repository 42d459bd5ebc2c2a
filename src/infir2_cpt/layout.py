"""Where a run's outputs live: <experiments root>/<name>/{checkpoints,tensorboard,logs,data_cache}, and the records
every launch writes beside them (recipe.yaml, schedule.json and, for a decay, decay_source.json).

The experiments root is $INFIR2_EXP_ROOT, else ./exp. It is read from the environment the caller passes
(exp_root(environ)), never from deep inside, so that a caller with a root of its own (the benchmark, a test)
states it instead of changing the process environment.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

RECIPE_FILE = "recipe.yaml"  # the resolved recipe of the last launch
SCHEDULE_FILE = "schedule.json"  # the LR schedule Megatron was given (recipe/schedule.py, WSDSchedule.record)
DECAY_SOURCE_FILE = "decay_source.json"  # a decay run's stable checkpoint (DecaySource)
STOP_REQUEST_FILE = ".infir2.stop"  # `infir2 stop`: every node's launcher stops its workers as on SIGTERM

EXP_ROOT_ENV = "INFIR2_EXP_ROOT"
# What a launch tells its processes; the experiment lock (launch/locking.py) recognizes a run's workers by them.
EXP_DIR_ENV = "INFIR2_EXP_DIR"  # the experiment folder
DEFAULT_ENTRY = "infir2_cpt.runtime.entry"
ENTRY_ENV = "INFIR2_ENTRY"  # run another module/script under the same launcher (tests: a CPU stand-in worker)
GPU_CHECK_ENV = "INFIR2_GPU_CHECK"  # "0": skip the GPU preflight (tests whose stand-in entry runs on the CPU)


def exp_root(environ: Mapping[str, str], cwd: Path | None = None) -> Path:
    """The experiments folder: $INFIR2_EXP_ROOT, else ./exp (relative to where infir2 is run, like the seed)."""
    return Path(environ.get(EXP_ROOT_ENV) or (cwd or Path.cwd()) / "exp").absolute()


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class StopRequest:
    time: float  # wall-clock time it was written; a launcher started well after it ignores it
    origin: str  # who asked, for the log line


def stop_request_path(exp_dir: Path) -> Path:
    return exp_dir / STOP_REQUEST_FILE


def write_stop_request(exp_dir: Path, origin: str) -> Path:
    """Ask the running launch of exp_dir (every node of it) to save and stop. Written atomically."""
    path = stop_request_path(exp_dir)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"time": time.time(), "origin": origin}) + "\n")
    tmp.replace(path)
    return path


def read_stop_request(path: Path) -> StopRequest | None:
    data = read_json_object(path)
    if data is None or not isinstance(data.get("time"), (int, float)):
        return None
    return StopRequest(time=float(data["time"]), origin=str(data.get("origin", "unknown")))


@dataclass(frozen=True)
class ExperimentPaths:
    name: str
    root: Path

    @classmethod
    def for_name(cls, name: str, exp_root: Path) -> "ExperimentPaths":
        return cls(name=name, root=exp_root / name)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def data_cache(self) -> Path:
        return self.root / "data_cache"

    @property
    def lock_file(self) -> Path:
        return self.root / ".infir2.lock"

    def make_dirs(self) -> None:
        for path in (self.checkpoints, self.tensorboard, self.logs):
            path.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class DecaySource:
    """decay_source.json: the stable checkpoint a decay run anneals from, and the iteration it ends at."""

    ckpt_dir: Path  # the stable run's checkpoints directory
    iteration: int  # the stable checkpoint loaded (K)
    train_iters: int  # K + decay_iters

    def write(self, exp_dir: Path) -> None:
        record = {"ckpt_dir": str(self.ckpt_dir), "iteration": self.iteration, "train_iters": self.train_iters}
        (exp_dir / DECAY_SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def read(cls, exp_dir: Path) -> DecaySource | None:
        """The record of `exp_dir`; None when there is none. Raises ValueError when it is unreadable."""
        path = exp_dir / DECAY_SOURCE_FILE
        if not path.exists():
            return None
        record = read_json_object(path)
        try:
            return cls(Path(str(record["ckpt_dir"])), int(record["iteration"]), int(record["train_iters"]))
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path} is not a readable {DECAY_SOURCE_FILE}") from None

    def same_checkpoint(self, other: DecaySource) -> bool:
        return self.iteration == other.iteration and self.ckpt_dir.resolve() == other.ckpt_dir.resolve()
