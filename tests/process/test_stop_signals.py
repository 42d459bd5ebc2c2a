"""Stopping a run: a stop signal (or a stop request) at any point ends with a complete checkpoint at the
iteration reached, launcher exit 0, and the same command resuming there.

Real launches: `infir2 train` as a process, the real torchrun underneath, and tests/fakes/saving_worker.py
as the training entry (gloo on the CPU). That worker saves the way Megatron does: SIGTERM sets a flag, the
ranks agree after each iteration and save there; the first save starts a helper process in the worker's
process group and every later save needs it. A stop that signals the whole group (plain torchrun's close)
kills the helper, and the save the signal asked for fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from infir2_cpt.bench.run import free_port
from infir2_cpt.layout import write_stop_request

WORKER = Path(__file__).resolve().parents[1] / "fakes" / "saving_worker.py"
EXP = "stopper"

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


class Run:
    """`infir2 train --recipe tiny --exp stopper` with the saving worker, as a process."""

    def __init__(self, tmp_path: Path, tag: str, nproc: int = 2, **env: str) -> None:
        self.exp = tmp_path / "exp" / EXP
        self.out = tmp_path / f"out-{tag}"
        self.log = tmp_path / f"launch-{tag}.log"
        full_env = {**os.environ, "INFIR2_EXP_ROOT": str(tmp_path / "exp"), "INFIR2_ENTRY": str(WORKER),
                    "INFIR2_GPU_CHECK": "0",
                    "SAVER_OUT": str(self.out), "SAVER_SAVE_INTERVAL": "20", **env}
        full_env.pop("INFIR2_EXP_DIR", None)
        args = ["--recipe", "tiny", "--exp", EXP, "--nproc-per-node", str(nproc),
                "--rdzv-endpoint", f"localhost:{free_port()}"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "infir2_cpt.cli", "train", *args], env=full_env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def events(self, rank: int = 0) -> list[dict[str, Any]]:
        path = self.out / f"events-{rank}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def wait_for(self, name: str, iteration: int = 0, timeout: float = 120) -> dict[str, Any]:
        """The first event `name` at or after `iteration`."""
        deadline = time.monotonic() + timeout
        while True:
            for record in self.events():
                if record["event"] == name and record.get("iteration", 0) >= iteration:
                    return record
            if self.proc.poll() is not None:
                raise AssertionError(f"launcher exited {self.proc.returncode} before {name}@{iteration}:\n"
                                     f"{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name}@{iteration} after {timeout}s:\n{self.text()}")
            time.sleep(0.05)

    def signal(self, signum: signal.Signals) -> float:
        self.proc.send_signal(signum)
        return time.monotonic()

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tracker(self) -> int:
        return int((self.exp / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())

    def assert_complete(self, iteration: int, nproc: int = 2) -> None:
        folder = self.exp / "checkpoints" / f"iter_{iteration:07d}"
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted([".metadata", "metadata.json", *(f"__{r}_0.distcp" for r in range(nproc))]), names

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for path in self.out.glob("events-*.jsonl"):  # workers run in sessions of their own
            for record in (json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")):
                for pid in (record["pid"], record.get("leftover")):
                    try:
                        if pid:
                            os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


def _stop_after_first_save(tmp_path: Path, signum: signal.Signals, nproc: int) -> tuple[Run, int]:
    run = Run(tmp_path, "first", nproc=nproc)
    try:
        run.wait_for("save-end", 20)
        run.wait_for("iteration", 25)
        run.signal(signum)
        assert run.wait() == 0, run.text()
    finally:
        run.kill()
    stop = run.wait_for("stop")["iteration"]
    assert stop > 25
    run.assert_complete(stop, nproc)
    assert run.tracker() == stop
    assert f"stopped by {signum.name}; all workers exited cleanly" in run.text()
    return run, stop


def test_sigterm_after_the_first_save_saves_where_it_is_and_the_same_command_resumes(tmp_path: Path) -> None:
    """The reproduction: the stop comes after a periodic save, so the save it asks for needs the helper
    process that the first save started in the worker's process group."""
    _, stop = _stop_after_first_save(tmp_path, signal.SIGTERM, nproc=2)
    again = Run(tmp_path, "again", SAVER_ITERS=str(stop + 3))
    try:
        assert again.wait() == 0, again.text()
    finally:
        again.kill()
    assert again.wait_for("start")["iteration"] == stop
    assert again.wait_for("done")["iteration"] == stop + 3


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_after_the_first_save_save_too(tmp_path: Path, signum: signal.Signals) -> None:
    _stop_after_first_save(tmp_path, signum, nproc=1)


def test_sigterm_before_the_first_save(tmp_path: Path) -> None:
    run = Run(tmp_path, "early", nproc=1)
    try:
        run.wait_for("iteration", 5)
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.text()
    finally:
        run.kill()
    stop = run.wait_for("stop")["iteration"]
    assert stop < 20
    run.assert_complete(stop, 1)


def test_a_signal_during_a_save_waits_for_it_then_saves_the_next_iteration(tmp_path: Path) -> None:
    """Megatron checks for a stop before the periodic save of an iteration: a signal that arrives while
    iteration 20 is written lets that save finish and saves iteration 21; never two writers on a folder."""
    run = Run(tmp_path, "during", SAVER_SAVE_SECONDS="2")
    try:
        run.wait_for("save-begin", 20)
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.text()
    finally:
        run.kill()
    run.assert_complete(20)
    run.assert_complete(21)
    assert run.wait_for("stop")["iteration"] == 21
    assert run.tracker() == 21


def test_more_signals_while_saving_do_not_cut_the_save_short(tmp_path: Path) -> None:
    run = Run(tmp_path, "repeat", nproc=1, SAVER_SAVE_SECONDS="3")
    try:
        run.wait_for("save-end", 20)
        run.signal(signal.SIGTERM)
        begin = run.wait_for("save-begin", 21)  # the save of the stop: 3 s long
        run.signal(signal.SIGINT)
        time.sleep(0.3)
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.text()
    finally:
        run.kill()
    run.assert_complete(begin["iteration"], 1)
    assert "SIGINT received while the workers save a checkpoint: still waiting" in run.text()
    assert "SIGTERM received while the workers save a checkpoint: still waiting" in run.text()


def test_what_a_worker_leaves_in_its_process_group_is_ended_after_it_exits(tmp_path: Path) -> None:
    run = Run(tmp_path, "leftover", nproc=1, SAVER_LEFTOVER="1")
    try:
        leftover = run.wait_for("start")["leftover"]
        run.wait_for("iteration", 3)
        assert _alive(leftover)
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.text()
        deadline = time.monotonic() + 10
        while _alive(leftover) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(leftover)
    finally:
        run.kill()


def test_a_stop_request_file_stops_like_sigterm_and_an_older_one_is_ignored(tmp_path: Path) -> None:
    exp = tmp_path / "exp" / EXP
    exp.mkdir(parents=True)
    write_stop_request(exp, "an earlier run")  # written before this launch: not for it, however recent
    run = Run(tmp_path, "request", nproc=1)
    try:
        run.wait_for("save-end", 20)
        run.wait_for("iteration", 22)
        stop_cmd = subprocess.run([sys.executable, "-m", "infir2_cpt.cli", "stop", EXP], capture_output=True, text=True,
                                  env={**os.environ, "INFIR2_EXP_ROOT": str(tmp_path / "exp")}, timeout=60)
        assert stop_cmd.returncode == 0, stop_cmd.stderr
        assert "locked by a running launch" in stop_cmd.stdout
        assert run.wait() == 0, run.text()
    finally:
        run.kill()
    stop = run.wait_for("stop")["iteration"]
    assert stop > 22
    run.assert_complete(stop, 1)
    assert "stop requested" in run.text() and "by infir2 stop on" in run.text()
    assert "an earlier run" not in run.text()
    # the same command right after: it resumes and is not stopped by the request that stopped its predecessor
    again = Run(tmp_path, "request-again", nproc=1, SAVER_ITERS=str(stop + 3))
    try:
        assert again.wait() == 0, again.text()
    finally:
        again.kill()
    assert again.wait_for("start")["iteration"] == stop and again.wait_for("done")["iteration"] == stop + 3
    assert "stop requested" not in again.text()
