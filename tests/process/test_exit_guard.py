"""A failed worker ends even when a thread it started would keep the interpreter alive (runtime/exit_guard.py):
real Python processes, each with a non-daemon thread that never ends."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

SCRIPT = """
import sys, threading, time
from infir2_cpt.runtime.exit_guard import run_bounded

def main():
    if {linger}:
        threading.Thread(target=time.sleep, args=(3600,)).start()  # not a daemon: Python waits for it at exit
    {ending}

run_bounded(main, grace_seconds=1.0)
"""


def run(ending: str, linger: bool = True) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(linger=linger, ending=ending)], capture_output=True,
                         text=True, timeout=60)
    return out, time.monotonic() - start


@pytest.mark.parametrize(("ending", "status"), [("raise AssertionError('in the param gather')", 1),
                                                ("sys.exit(3)", 3), ("sys.exit('a message')", 1)])
def test_a_failed_run_ends_with_its_status_despite_a_lingering_thread(ending: str, status: int) -> None:
    out, seconds = run(ending)
    assert out.returncode == status and seconds < 30, (out.returncode, seconds, out.stderr)
    assert f"exiting now with status {status}" in out.stderr
    if "raise" in ending:
        assert "AssertionError: in the param gather" in out.stderr  # the traceback comes first, as without the guard


def test_a_failed_run_that_shuts_down_by_itself_is_not_cut_short() -> None:
    out, _ = run("raise RuntimeError('plain failure')", linger=False)
    assert out.returncode == 1 and "RuntimeError: plain failure" in out.stderr
    assert "exiting now" not in out.stderr


def test_a_run_that_ends_well_is_left_alone() -> None:
    """Status 0 (a stop request honoured) arms nothing: the lingering thread is waited for, as Python does."""
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", SCRIPT.format(linger=True, ending="sys.exit(0)")], capture_output=True,
                       timeout=5)
