"""Where a run's outputs live: exp/<name>/{checkpoints,tensorboard,logs,data_cache}."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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
