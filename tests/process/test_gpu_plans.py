"""The GPU plan scripts stay runnable as the code changes: every bench step of benchmarks/scripts/bench_runs.sh
is validated with `DRY=1`, which runs the real `infir2 bench --dry-run` (infir2's validation and the
variants file) without a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "scripts" / "bench_runs.sh"
BENCH_STEPS = ("A", "B", "D", "E", "U", "P", "M", "M2", "N", "S", "G", "I", "K", "full4", "full4seed", "full8")


def test_every_bench_step_of_the_gpu_plan_validates(tmp_path: Path) -> None:
    env = {**os.environ, "DRY": "1", "EV": str(tmp_path / "ev"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(["bash", str(SCRIPT), *BENCH_STEPS, "collect"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = (tmp_path / "ev" / "steps.txt").read_text()
    exits = re.findall(r"bench (\S+): exit (\d+)", steps)
    assert len(exits) == len(BENCH_STEPS), steps
    failed = {name: code for name, code in exits if code != "0"}
    consoles = tmp_path / "ev" / "console"
    assert not failed, {name: (consoles / f"{name}.txt").read_text()[-2000:] for name in failed}
    # the 4- and 8-GPU steps really plan the full 7B at TP 4
    full8 = (consoles / "b7-full-tp4-dp2.txt").read_text()
    assert "--nproc-per-node=8" in full8 and "--tensor-model-parallel-size 4" in full8
    assert "--num-layers 28" in full8 and "--seq-length 32768" in full8
    assert (tmp_path / "ev" / "out" / "results.tgz").is_file()


def _dry_session(tmp_path: Path, plan: str, **flags: str) -> str:
    """Run one plan of session.sh with DRY=1 (every infir2 command with --dry-run) and return its steps log."""
    env = {**os.environ, **flags, "DRY": "1", "W": str(tmp_path / "w"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "scripts" / "session.sh"), plan], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return (tmp_path / "w" / "res" / "steps.txt").read_text()


def test_every_command_of_the_gpu_session_plan_validates(tmp_path: Path) -> None:
    """benchmarks/scripts/session.sh (the one-daemon GPU session): every infir2 command it would run, dry."""
    # STOP, RETAIN, MASTERS, CPT and FIDSCRATCH add the steps a session skips once they are proven: all are checked
    steps = _dry_session(tmp_path, "run", STOP="1", RETAIN="1", MASTERS="1", CPT="1", FIDSCRATCH="1")
    exits = re.findall(r"(?:bench|train) (\S+): exit (\d+)", steps)
    assert {"b7", "b7-dp2", "b7-mem", "b15", "b15-tp2", "fid", "fidcpt-1236", "fidcpt-1237", "base", "m-fixed",
            "m-today", "cpt-fp8", "cpt-bf16"} <= {n for n, _ in exits}
    assert "convert proof: dry 0" in steps
    failed = {name for name, code in exits if code != "0"}
    consoles = tmp_path / "w" / "res" / "console"
    assert not failed, {name: (consoles / f"{name}.txt").read_text()[-2000:] for name in failed}
    assert "session done" in steps


def test_the_one_gpu_session_plan_validates(tmp_path: Path) -> None:
    """session.sh run1 (nvidia-h200): every infir2 command of the one-GPU plan, dry."""
    steps = _dry_session(tmp_path, "run1")
    exits = dict(re.findall(r"(?:bench|train) (\S+): exit (\d+)", steps))
    assert exits == {"b7": "0", "b15": "0", "b7-mem": "0", "base": "0", "fidcpt-1236": "0"}, steps
    assert "convert proof: dry 0" in steps
    assert "session done" in steps


def test_the_data_parallel_plan_validates(tmp_path: Path) -> None:
    """session.sh dp2 (nvidia-h200-x2, DP 2 alone): its one bench, dry."""
    steps = _dry_session(tmp_path, "dp2")
    assert dict(re.findall(r"bench (\S+): exit (\d+)", steps)) == {"b7-dp2": "0"}, steps
    assert "session done" in steps and (tmp_path / "w" / "res" / "DONE").exists()


def test_a_poll_on_a_machine_that_runs_no_session_returns_at_once(tmp_path: Path) -> None:
    """A poll that lands on a fresh machine (the last one given back) must not spend device time waiting."""
    env = {**os.environ, "W": str(tmp_path / "w"), "OUT": str(tmp_path / "out")}
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "scripts" / "session.sh"), "poll", "300"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no session on this machine" in out.stdout
