"""One writer per experiment (src/infir2_cpt/locking.py), tested on the lock itself.

Holders are real processes (a child python that takes the lock and sleeps), so liveness is checked the
way a second launch checks it. The end-to-end launches (a second `infir2 train` refused, SIGTERM, the
stale lock taken over by the same command) are in tests/process/test_reliability.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from infir2_cpt.launch import locking as locking
from infir2_cpt.layout import ExperimentPaths

NOT_HERE = "198.51.100.7:29400"  # TEST-NET-2: never an address of this machine


@pytest.fixture
def paths(tmp_path: Path) -> ExperimentPaths:
    return ExperimentPaths(name="exp1", root=tmp_path / "exp" / "exp1")


def _holder(paths: ExperimentPaths, *, nnodes: int = 1, endpoint: str = "localhost:29400",
            rdzv_id: str = "job-a", seconds: float = 30, gpus: str | None = None) -> subprocess.Popen:
    """A child process that takes the lock like a launcher would, says so, and keeps it for `seconds`."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from infir2_cpt.launch import locking as locking
        from infir2_cpt.layout import ExperimentPaths
        paths = ExperimentPaths(name={paths.name!r}, root=Path({str(paths.root)!r}))
        result = locking.acquire(paths, nnodes={nnodes}, rdzv_endpoint={endpoint!r}, rdzv_id={rdzv_id!r})
        print("held" if result.held else "skipped", flush=True)
        time.sleep({seconds})
    """)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == "held", line
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def _write_lock(paths: ExperimentPaths, **fields: object) -> dict:
    info = {**json.loads(json.dumps(locking.new_info().__dict__)), **fields}
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.lock_file.write_text(json.dumps(info))
    return info


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- the lock file


def test_lock_is_created_with_host_pid_and_start_time(paths: ExperimentPaths) -> None:
    result = locking.acquire(paths)
    assert result.held is not None and result.messages == []
    data = json.loads(paths.lock_file.read_text())
    assert data["host"] == locking.this_host()
    assert data["pid"] == os.getpid()
    assert data["started"] and abs(data["started_epoch"] - time.time()) < 60
    assert data["proc_start"] is not None  # Linux: the PID's kernel start time, against PID reuse
    assert paths.lock_file == paths.root / ".infir2.lock"


def test_the_same_process_may_acquire_twice(paths: ExperimentPaths) -> None:
    first = locking.acquire(paths).held
    assert locking.acquire(paths).held == first


def test_a_live_holder_on_this_host_refuses_naming_it(paths: ExperimentPaths) -> None:
    holder = _holder(paths)
    try:
        with pytest.raises(locking.LockError) as err:
            locking.acquire(paths)
        message = str(err.value)
        assert f"pid {holder.pid}" in message
        assert f"host {locking.this_host()}" in message
        assert "since " in message
        assert json.loads(paths.lock_file.read_text())["pid"] == holder.pid  # untouched
    finally:
        _stop(holder)


def test_a_dead_holder_is_taken_over_with_a_message(paths: ExperimentPaths) -> None:
    holder = _holder(paths, seconds=0)
    holder.wait()
    result = locking.acquire(paths)
    assert result.held is not None and result.held.pid == os.getpid()
    assert any("took over the stale lock" in m and f"pid {holder.pid}" in m for m in result.messages)
    assert json.loads(paths.lock_file.read_text())["pid"] == os.getpid()


def test_a_reused_pid_reads_as_stale(paths: ExperimentPaths) -> None:
    """The PID is alive but is another process (its kernel start time differs): stale."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_lock(paths, pid=other.pid, proc_start=1)
        result = locking.acquire(paths)
        assert result.held is not None and any("took over" in m for m in result.messages)
    finally:
        _stop(other)


def test_a_lock_from_before_a_reboot_reads_as_stale(paths: ExperimentPaths) -> None:
    _write_lock(paths, pid=1, boot_id="00000000-0000-0000-0000-000000000000")
    assert any("took over" in m for m in locking.acquire(paths).messages)


def test_a_lock_of_another_host_is_never_taken_over(paths: ExperimentPaths) -> None:
    _write_lock(paths, host="gpu-node-17", pid=_dead_pid())
    with pytest.raises(locking.LockError) as err:
        locking.acquire(paths)
    message = str(err.value)
    assert "another host" in message and "gpu-node-17" in message
    assert str(paths.lock_file) in message and "by hand" in message
    assert json.loads(paths.lock_file.read_text())["host"] == "gpu-node-17"


def test_an_unreadable_lock_refuses_and_says_how_to_clear_it(paths: ExperimentPaths,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(locking, "_PARTIAL_WAIT_S", 0.2)
    paths.root.mkdir(parents=True)
    paths.lock_file.write_text("{not json")
    with pytest.raises(locking.LockError) as err:
        locking.acquire(paths)
    assert "remove it by hand" in str(err.value)


def test_a_lock_being_written_is_waited_for(paths: ExperimentPaths) -> None:
    """O_EXCL creates the file before its JSON is written: a reader in between waits instead of failing."""
    paths.root.mkdir(parents=True)
    paths.lock_file.write_text("")
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import json, time
        from infir2_cpt.launch import locking as locking
        info = locking.new_info().__dict__
        info.update(host="gpu-node-3")
        time.sleep(0.5)
        open({str(paths.lock_file)!r}, "w").write(json.dumps(info))
    """)])
    try:
        with pytest.raises(locking.LockError, match="gpu-node-3"):
            locking.acquire(paths)
    finally:
        writer.wait()


def test_workers_that_outlive_their_launcher_block_the_takeover(paths: ExperimentPaths,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun killed with SIGKILL leaves its workers running (they are in their own sessions)."""
    monkeypatch.setattr(locking, "ORPHAN_EXIT_WAIT_S", 1.0)
    _write_lock(paths, pid=_dead_pid())
    script = paths.root.parent / "orphan_worker.py"
    script.write_text("import time\ntime.sleep(30)\n")
    env = {**os.environ, "INFIR2_EXP_DIR": str(paths.root), "INFIR2_ENTRY": str(script)}
    orphan = subprocess.Popen([sys.executable, str(script)], env=env)
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    try:
        deadline = time.monotonic() + 10
        while orphan.pid not in locking.orphaned_workers(paths.root) and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(locking.LockError) as err:
            locking.acquire(paths)
        assert f"pids {orphan.pid}" in str(err.value) and "still running" in str(err.value)
        assert str(helper.pid) not in str(err.value)  # a spawned helper (not the entry) never blocks
    finally:
        _stop(orphan)
        _stop(helper)
    assert any("took over" in m for m in locking.acquire(paths).messages)


def test_racing_takeovers_leave_exactly_one_writer(paths: ExperimentPaths) -> None:
    _write_lock(paths, pid=_dead_pid())
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from infir2_cpt.launch import locking as locking
        from infir2_cpt.layout import ExperimentPaths
        paths = ExperimentPaths(name="exp1", root=Path({str(paths.root)!r}))
        try:
            locking.acquire(paths)
            print("held", flush=True)
        except locking.LockError:
            print("refused", flush=True)
        time.sleep(3)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outcomes = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert sorted(outcomes) == ["held", "refused", "refused", "refused"], outcomes
    winner = procs[outcomes.index("held")].pid
    assert json.loads(paths.lock_file.read_text())["pid"] == winner
    assert not locking._guard_path(paths.lock_file).exists()


def test_release_removes_only_our_own_lock(paths: ExperimentPaths) -> None:
    info = locking.acquire(paths).held
    assert info is not None
    other = locking.LockInfo(**{**info.__dict__, "pid": info.pid + 1})
    assert not locking.release(paths, other) and paths.lock_file.exists()
    assert locking.release(paths, info) and not paths.lock_file.exists()


def test_lock_status_lines(paths: ExperimentPaths) -> None:
    assert locking.lock_status(paths) is None
    holder = _holder(paths, seconds=0)
    holder.wait()
    assert "stale lock" in (locking.lock_status(paths) or "")
    _write_lock(paths, host="gpu-node-17")
    assert "another host" in (locking.lock_status(paths) or "")


# --------------------------------------------------------------------------- multi-node


def test_rendezvous_host_detection() -> None:
    assert locking.is_rendezvous_host("localhost:29400")
    assert locking.is_rendezvous_host("127.0.0.1:29400")
    assert locking.is_rendezvous_host(f"{locking.this_host()}:29400")
    assert locking.is_rendezvous_host("[::1]:29400") or not _has_ipv6_loopback()
    assert not locking.is_rendezvous_host(NOT_HERE)
    assert not locking.is_rendezvous_host("no-such-host.invalid:29400")


def _has_ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_a_node_that_is_not_the_rendezvous_host_skips_the_lock(paths: ExperimentPaths) -> None:
    result = locking.acquire(paths, nnodes=2, rdzv_endpoint=NOT_HERE, rdzv_id="job-a")
    assert result.held is None
    assert "not the rendezvous host" in result.messages[0]
    assert not paths.root.exists()  # it wrote nothing


def test_a_non_host_node_is_not_refused_by_a_live_lock(paths: ExperimentPaths) -> None:
    holder = _holder(paths)  # e.g. a stray single-node run
    try:
        assert locking.acquire(paths, nnodes=2, rdzv_endpoint=NOT_HERE, rdzv_id="job-a").held is None
    finally:
        _stop(holder)


def test_the_rendezvous_host_takes_the_lock_in_a_multinode_run(paths: ExperimentPaths) -> None:
    result = locking.acquire(paths, nnodes=2, rdzv_endpoint="127.0.0.1:29400", rdzv_id="job-a")
    assert result.held is not None
    data = json.loads(paths.lock_file.read_text())
    assert (data["nnodes"], data["rdzv_endpoint"], data["rdzv_id"]) == (2, "127.0.0.1:29400", "job-a")


def test_two_nodes_of_one_job_on_one_host_do_not_refuse_each_other(paths: ExperimentPaths) -> None:
    """One-machine multi-node tests run both launchers on the host of the endpoint."""
    holder = _holder(paths, nnodes=2, endpoint="127.0.0.1:29400", rdzv_id="job-a")
    try:
        result = locking.acquire(paths, nnodes=2, rdzv_endpoint="127.0.0.1:29400", rdzv_id="job-a",
                                 gpus_present=False)
        assert result.held is None and "another node of this multi-node job" in result.messages[0]
        with pytest.raises(locking.LockError):  # another job (other rendezvous id) on the same experiment
            locking.acquire(paths, nnodes=2, rdzv_endpoint="127.0.0.1:29400", rdzv_id="job-b")
        with pytest.raises(locking.LockError):  # a single-node launch on it
            locking.acquire(paths)
    finally:
        _stop(holder)


def test_the_same_multi_node_command_twice_on_one_gpu_node_is_refused(paths: ExperimentPaths,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU host a second launcher of the same job with the same GPUs is a duplicate (it would take the
    other node's place in the rendezvous); with other GPUs it is a second node on this host and joins."""
    holder = _holder(paths, nnodes=2, endpoint="127.0.0.1:29400", rdzv_id="job-a", gpus="0,1")
    try:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
        with pytest.raises(locking.LockError, match=r"on the same GPUs \(CUDA_VISIBLE_DEVICES: 0,1\)"):
            locking.acquire(paths, nnodes=2, rdzv_endpoint="127.0.0.1:29400", rdzv_id="job-a", gpus_present=True)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
        result = locking.acquire(paths, nnodes=2, rdzv_endpoint="127.0.0.1:29400", rdzv_id="job-a",
                                 gpus_present=True)
        assert result.held is None and "another node of this multi-node job" in result.messages[0]
    finally:
        _stop(holder)


def test_all_gpus_twice_is_refused_too(paths: ExperimentPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    holder = _holder(paths, nnodes=2, endpoint="127.0.0.1:29400", rdzv_id="job-a")
    try:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        with pytest.raises(locking.LockError, match="CUDA_VISIBLE_DEVICES: all"):
            locking.acquire(paths, nnodes=2, rdzv_endpoint="127.0.0.1:29400", rdzv_id="job-a", gpus_present=True)
    finally:
        _stop(holder)


# --------------------------------------------------------------------------- release and Slurm requeue


def test_release_at_exit_removes_the_lock_of_this_process_only(paths: ExperimentPaths) -> None:
    env = {"INFIR2_EXP_DIR": str(paths.root)}
    assert not locking.release_at_exit(env)  # no lock
    _write_lock(paths, pid=_dead_pid())
    assert not locking.release_at_exit(env) and paths.lock_file.exists()  # someone else's
    paths.lock_file.unlink()
    locking.acquire(paths)
    assert not locking.release_at_exit({})  # not launched by infir2
    assert locking.release_at_exit(env) and not paths.lock_file.exists()


def test_the_holder_releases_the_lock_when_it_exits(paths: ExperimentPaths) -> None:
    """What infir2_cpt.runtime.torchrun does on its way out, in a child process that took the lock."""
    code = textwrap.dedent(f"""
        from pathlib import Path
        from infir2_cpt.launch import locking as locking
        from infir2_cpt.layout import ExperimentPaths
        paths = ExperimentPaths(name="exp1", root=Path({str(paths.root)!r}))
        locking.acquire(paths)
        assert paths.lock_file.exists()
        print(locking.release_at_exit({{"INFIR2_EXP_DIR": str(paths.root)}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
    assert not paths.lock_file.exists()


def test_an_earlier_run_of_the_same_slurm_job_is_taken_over_from_another_host(
        paths: ExperimentPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    """A requeued Slurm job may land on other nodes; Slurm ended the earlier run before restarting it."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _write_lock(paths, host="gpu-node-17", pid=12345, slurm_job_id="4242", slurm_restart_count=0)
    result = locking.acquire(paths)
    assert result.held is not None and result.held.slurm_restart_count == 1
    assert any("earlier run of Slurm job 4242" in m for m in result.messages)


@pytest.mark.parametrize("job, restarts", [("4243", 0), ("4242", 1), (None, 0)])
def test_other_slurm_jobs_or_the_same_run_are_not_taken_over(paths: ExperimentPaths, monkeypatch: pytest.MonkeyPatch,
                                                             job: str | None, restarts: int) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _write_lock(paths, host="gpu-node-17", pid=12345, slurm_job_id=job, slurm_restart_count=restarts)
    with pytest.raises(locking.LockError, match="another host"):
        locking.acquire(paths)
