"""Where a run's outputs live: exp/<name>/{checkpoints,tensorboard,logs,data_cache}, and the records every
launch writes beside them (recipe.yaml, schedule.json and, for a decay, decay_source.json)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECIPE_FILE = "recipe.yaml"  # the resolved recipe of the last launch
SCHEDULE_FILE = "schedule.json"  # the LR schedule Megatron was given
DECAY_SOURCE_FILE = "decay_source.json"  # a decay run's stable checkpoint
STOP_REQUEST_FILE = ".infir2.stop"  # `infir2 stop`: every node's launcher stops its workers as on SIGTERM

# What a launch tells its processes; the experiment lock (locking.py) recognizes a run's workers by them.
EXP_DIR_ENV = "INFIR2_EXP_DIR"  # the experiment folder
DEFAULT_ENTRY = "infir2_cpt.runtime.entry"
ENTRY_ENV = "INFIR2_ENTRY"  # advanced: run another module/script under the same launcher (tests use a gloo worker)


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class StopRequest:
    time: float  # wall-clock time it was written; a launcher started later ignores it
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


def exp_root() -> Path:
    """The experiments folder: $INFIR2_EXP_ROOT, else ./exp (relative to where infir2 is run, like the seed)."""
    return Path(os.environ.get("INFIR2_EXP_ROOT") or Path.cwd() / "exp").absolute()


@dataclass(frozen=True)
class ExperimentPaths:
    name: str
    root: Path

    @classmethod
    def for_name(cls, name: str) -> "ExperimentPaths":
        return cls(name=name, root=exp_root() / name)

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
