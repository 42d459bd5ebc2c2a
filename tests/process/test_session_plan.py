"""The retention and evaluation steps of the GPU session (benchmarks/scripts/session.sh Bbase, Bretain) stay valid: with
DRY=1 each infir2 command runs with --dry-run on the CPU, so a command the code no longer accepts fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_base_run_decays_and_evaluation_of_the_session_validate(tmp_path: Path) -> None:
    env = {**os.environ, "DRY": "1", "W": str(tmp_path / "w"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("INFIR2_EXP_ROOT", None)
    done = subprocess.run(["bash", "benchmarks/scripts/session.sh", "Bbase", "Bretain"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = tmp_path / "w" / "res"
    steps = (res / "steps.txt").read_text()
    exits = dict(re.findall(r"(train base|decay base-d400|decay base-d800|eval): exit (\d+)", steps))
    consoles = {name: (res / "console" / f"{name}.txt").read_text() for name in ("base", "base-d400", "base-d800",
                                                                                 "eval")}
    assert exits == {"train base": "0", "decay base-d400": "0", "decay base-d800": "0", "eval": "0"}, consoles
    base = consoles["base"]
    assert "keep the last 2 and every multiple of 400: at most 4 on disk at once" in base
    assert "--valid-data-path" in base and "--train-data-path" in base and "--split" not in base
    assert "INFIR2_RETENTION=" in base
    assert "--ckpt-step 400" in consoles["base-d400"] and "--ckpt-step 800" in consoles["base-d800"]
    assert "--skip-train" in consoles["eval"] and "as 'heldout'" in consoles["eval"]
