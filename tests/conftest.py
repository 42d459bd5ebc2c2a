"""Shared fixtures. Keep this small: test files own their helpers.

Tests live in unit/ (in-process), process/ (real torchrun, gloo, bash and Megatron processes on the CPU) and
gpu/ (needs CUDA); fakes/ holds the stand-ins they start (workers, Slurm, Megatron) and build (a toy tokenizer,
a memory snapshot), importable by name from any test.

- `exp_root`: INFIR2_EXP_ROOT pointed at an empty temporary folder (returned, not yet created).
- `cli`: run the `infir2` typer app in-process (typer.testing.CliRunner); returns click's Result with
  separate `.stdout` / `.stderr` and their mix in `.output`.
- `repo_root`: the checkout's root folder.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest
from click.testing import Result
from typer.testing import CliRunner

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent / "fakes"))


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def exp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "exp"
    monkeypatch.setenv("INFIR2_EXP_ROOT", str(root))
    return root


@pytest.fixture
def cli() -> Callable[..., Result]:
    """cli("train", "--recipe", "tiny", "--dry-run", env={"X": "1"}) -> click Result (exceptions re-raised
    except SystemExit). `env` values of None unset a variable for the call."""
    from infir2_cpt.cli import app

    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
        result = runner.invoke(app, list(args), env=env, catch_exceptions=False)
        return result

    return invoke
