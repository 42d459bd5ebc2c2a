"""`infir2 sbatch`: the batch script is valid bash, and does what Slurm needs when it runs for real.

The script runs under real bash against stand-ins for sbatch, srun and scontrol and for the compute
nodes' `infir2` (tests/fakes/fake_slurm.py, first on PATH): they record their arguments and
environment, and behave as Slurm would where it matters (one task per node, per-node output files, srun
forwarding SIGTERM to its tasks). Checked: the #SBATCH options, the endpoint taken from the first host,
the srun and `infir2 train` arguments (and that the real `infir2 train --dry-run` accepts them), the
per-node logs, and the stop-and-requeue path on SIGUSR1 (a signal sent to the batch shell itself).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infir2_cpt.launch import slurm as slurm

INFIR2 = str(Path(sys.executable).with_name("infir2"))
FAKE = Path(__file__).resolve().parents[1] / "fakes" / "fake_slurm.py"
NODELIST = "gpu-a[01-04]"
HOSTS = ["gpu-a01", "gpu-a02", "gpu-a03", "gpu-a04"]
JOB_ID = "4242"
EXP = "cpt7b"
TRAIN_ITERS = 40000  # the 7b recipe's schedule.train_iters


# --------------------------------------------------------------------------- generating


def test_script_for_7b_on_4_nodes(cli, exp_root: Path, tmp_path: Path) -> None:
    result = cli("sbatch", "--recipe", "7b", "--nodes", "4", "--partition", "gpu", "--time", "1-12:00:00",
                 "--set", "schedule.lr=2e-4", "--set", "env.NCCL_DEBUG=WARN", "--exp", EXP,
                 "--sbatch-option", "account=proj", "--", "--seed", "7")
    assert result.exit_code == 0, result.output
    text = result.stdout
    logs = exp_root / EXP / "logs"
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1-12:00:00", f"#SBATCH --job-name={EXP}",
                 f"#SBATCH --output={logs}/slurm-%j.out", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --account=proj", "#SBATCH --open-mode=append"):
        assert line in text.splitlines(), line
    assert 'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in text
    assert '--rdzv-endpoint "$HEAD:$PORT"' in text and "PORT=29400" in text
    assert "scontrol requeue" in text
    assert logs.is_dir(), "Slurm opens the --output file before the script runs: its folder must exist"
    script = tmp_path / "job.sh"
    script.write_text(text)
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_output_option_writes_an_executable(cli, exp_root: Path, tmp_path: Path) -> None:
    target = tmp_path / "job.sh"
    result = cli("sbatch", "--recipe", "tiny", "--nodes", "1", "--output", str(target))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert target.stat().st_mode & stat.S_IXUSR
    assert subprocess.run(["bash", "-n", str(target)]).returncode == 0
    assert "#SBATCH --gpus-per-node=1" in target.read_text()  # the tiny recipe's nproc_per_node


def test_recipe_file_is_passed_by_absolute_path(cli, exp_root: Path, tmp_path: Path, monkeypatch) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("extends: tiny\nname: mine\n")
    monkeypatch.chdir(tmp_path)
    result = cli("sbatch", "--recipe", "mine.yaml", "--nodes", "2")
    assert result.exit_code == 0, result.output
    assert f"--recipe {recipe}" in result.stdout
    assert f"#SBATCH --chdir={tmp_path}" in result.stdout


def test_every_problem_is_reported_and_nothing_printed(cli, exp_root: Path) -> None:
    result = cli("sbatch", "--recipe", "7b", "--nodes", "0", "--time", "25:61:00", "--partition", "a b",
                 "--set", "parallel.tensor_parallel=3", "--sbatch-option", "time=1:00:00")
    assert result.exit_code == 2
    assert result.stdout == ""
    for text in ("--nodes: must be >= 1", "--time: must be HH:MM:SS", "--partition:",
                 "parallel.tensor_parallel: must divide model.num_attention_heads=28",
                 "--sbatch-option: --time is written by infir2 sbatch itself"):
        assert text in result.stderr, (text, result.stderr)
    assert not (exp_root / "InfiR2_CPT_FP8_7B").exists()


def test_recipe_is_validated_for_the_world_size(cli, exp_root: Path) -> None:
    # 7b is TP4: one node of 2 GPUs cannot hold it
    result = cli("sbatch", "--recipe", "7b", "--nodes", "1", "--gpus-per-node", "2")
    assert result.exit_code == 2
    assert "world size 2 (nnodes 1 x nproc_per_node 2) is not divisible by TP x PP x CP = 4" in result.stderr
    # and the global batch must split over the data-parallel ranks: 3 nodes x 8 / TP4 = DP 6, 128 % 6 != 0
    result = cli("sbatch", "--recipe", "7b", "--nodes", "3")
    assert result.exit_code == 2 and "parallel.global_batch_size" in result.stderr


def test_signal_must_come_before_the_time_limit(cli, exp_root: Path) -> None:
    result = cli("sbatch", "--recipe", "tiny", "--nodes", "1", "--time", "00:04:00", "--signal-seconds", "300")
    assert result.exit_code == 2 and "--signal-seconds: the stop warning must come before the time limit" in result.stderr


def test_unknown_recipe(cli, exp_root: Path) -> None:
    result = cli("sbatch", "--recipe", "8b", "--nodes", "2")
    assert result.exit_code == 2 and "unknown recipe" in result.stderr


@pytest.mark.parametrize("text,seconds", [("00:30:00", 1800), ("24:00:00", 86400), ("2-00:00:01", 172801),
                                          ("1:00:00", 3600), ("00:00:00", None), ("24:60:00", None),
                                          ("1-24:00:00", None), ("90", None), ("1:00", None)])
def test_time_limit_format(text: str, seconds: int | None) -> None:
    assert slurm.parse_time_limit(text) == seconds


# --------------------------------------------------------------------------- running it


@pytest.fixture
def fake_slurm(tmp_path: Path, exp_root: Path):
    """bin/ with the stand-ins, the environment to run `sbatch job.sh` in, and readers for the records."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    source = FAKE.read_text()
    for role in ("sbatch", "srun", "scontrol", "infir2"):
        path = bin_dir / role
        path.write_text(f"#!{sys.executable}\n{source}")
        path.chmod(0o755)
    records = tmp_path / "records"
    records.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "FAKE_SLURM_DIR": str(records),
                "FAKE_NODELIST": NODELIST, "FAKE_JOB_ID": JOB_ID, "FAKE_EXP": EXP,
                "FAKE_TRAIN_ITERS": str(TRAIN_ITERS), "FAKE_REAL_INFIR2": INFIR2,
                "INFIR2_BIN": str(bin_dir / "infir2"), "INFIR2_EXP_ROOT": str(exp_root)})

    class Fake:
        def __init__(self) -> None:
            self.env, self.records, self.bin = env, records, bin_dir

        def read(self, role: str) -> list[dict]:
            path = records / f"{role}.jsonl"
            return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

        def script(self, cli, *extra: str) -> Path:
            result = cli("sbatch", "--recipe", "7b", "--nodes", "4", "--partition", "gpu", "--time", "24:00:00",
                         "--exp", EXP, "--set", "schedule.lr=2e-4", *extra)
            assert result.exit_code == 0, result.output
            path = tmp_path / "job.sh"
            path.write_text(result.stdout)
            return path

        def submit(self, script: Path, **env_extra: str) -> subprocess.Popen:
            return subprocess.Popen(["sbatch", str(script)], env={**env, **env_extra}, cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def wait_ready(self, proc: subprocess.Popen, timeout: float = 60) -> None:
            deadline = time.monotonic() + timeout
            while not all((records / f"ready-{h}").exists() for h in HOSTS):
                assert proc.poll() is None, f"the job ended early: {self.batch_log()}"
                assert time.monotonic() < deadline, f"the nodes never started: {self.batch_log()}"
                time.sleep(0.05)

        def batch_log(self) -> str:
            path = exp_root / EXP / "logs" / f"slurm-{JOB_ID}.out"
            return path.read_text() if path.exists() else "(no batch log)"

        def requeues(self) -> list[list[str]]:
            return [r["argv"] for r in self.read("scontrol") if r["argv"][:1] == ["requeue"]]

    return Fake()


def _run(proc: subprocess.Popen, timeout: float = 120) -> int:
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the batch script hung")
    return proc.returncode


def test_job_runs_infir2_once_per_node(cli, fake_slurm, exp_root: Path) -> None:
    script = fake_slurm.script(cli)
    rc = _run(fake_slurm.submit(script, FAKE_TRAIN="complete", FAKE_DRY_RUN="1"))
    log = fake_slurm.batch_log()
    assert rc == 0, log
    # sbatch read the options Slurm would
    (submitted,) = fake_slurm.read("sbatch")
    assert submitted["options"]["nodes"] == "4" and submitted["options"]["signal"] == "B:USR1@300"
    assert submitted["options"]["output"] == f"{exp_root}/{EXP}/logs/slurm-%j.out"
    # the endpoint comes from the first host of the allocation
    assert ["show", "hostnames", NODELIST] in [r["argv"] for r in fake_slurm.read("scontrol")]
    # one srun step, one task per node, per-node output files
    (step,) = fake_slurm.read("srun")
    assert step["options"]["nodes"] == "4" and step["options"]["ntasks-per-node"] == "1"
    assert step["options"]["kill-on-bad-exit"] == "1"
    assert step["options"]["output"] == f"{exp_root}/{EXP}/logs/slurm-%j-%N.log"
    expected = [str(fake_slurm.bin / "infir2"), "train", "--recipe", "7b", "--set", "schedule.lr=2e-4",
                "--nnodes", "4", "--nproc-per-node", "8", "--rdzv-endpoint", "gpu-a01:29400",
                "--rdzv-id", f"infir2-{JOB_ID}", "--exp", EXP]
    assert step["command"] == expected
    assert step["env"]["INFIR2_EXP_ROOT"] == str(exp_root)
    # every node ran the same command, with its own log
    launches = fake_slurm.read("infir2")
    assert sorted(r["node"] for r in launches) == HOSTS
    assert all(r["argv"] == expected[1:] for r in launches)
    for host in HOSTS:
        node_log = (exp_root / EXP / "logs" / f"slurm-{JOB_ID}-{host}.log").read_text()
        assert f"fake infir2 on {host}: train --recipe 7b" in node_log
    # the real launcher accepts that command line (dry run on the first node)
    (first,) = [r for r in launches if r["node"] == "gpu-a01"]
    assert first["dry_run_rc"] == 0, first["dry_run_out"]
    assert "multi-node: 4 nodes x 8 processes meet at gpu-a01:29400 (rendezvous id infir2-4242)" in first["dry_run_out"]
    # finished: no requeue
    assert "rendezvous gpu-a01:29400 id infir2-4242" in log
    assert "the run is complete" in log
    assert fake_slurm.requeues() == []


def test_sigusr1_stops_cleanly_then_requeues_and_the_rerun_resumes(cli, fake_slurm, exp_root: Path) -> None:
    script = fake_slurm.script(cli)
    proc = fake_slurm.submit(script, FAKE_TRAIN="until-term", FAKE_SAVE_ITER="1500")
    fake_slurm.wait_ready(proc)
    os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@300 does before the time limit
    rc = _run(proc)
    log = fake_slurm.batch_log()
    assert rc == 0, log
    stops = fake_slurm.read("infir2-stop")
    assert sorted(r["node"] for r in stops) == HOSTS
    # a stop request, not a signal through srun (Slurm would signal every process of the step, the workers'
    # checkpoint writers too): every node saw it, none got a SIGTERM
    assert all(r["requests"] == 1 and r["signals"] == 0 for r in stops), stops
    assert len(fake_slurm.read("infir2-stop-request")) == 1 and fake_slurm.read("srun-signal") == []
    assert fake_slurm.requeues() == [["requeue", JOB_ID]]
    assert "SIGUSR1" in log and f"requeueing job {JOB_ID}" in log
    for host in HOSTS:
        assert "saved and stopped on a stop request" in (exp_root / EXP / "logs" / f"slurm-{JOB_ID}-{host}.log").read_text()
    # Slurm runs the same script again after the requeue: the same command, from the saved iteration
    first_command = fake_slurm.read("srun")[0]["command"]
    rc = _run(fake_slurm.submit(script, FAKE_TRAIN="complete", SLURM_RESTART_COUNT="1"))
    log = fake_slurm.batch_log()
    assert rc == 0, log
    assert fake_slurm.read("srun")[1]["command"] == first_command
    assert f"job {JOB_ID} (restart 1)" in log and f"checkpoint iteration 1500 of {TRAIN_ITERS}" in log
    assert "the run is complete" in log
    assert fake_slurm.requeues() == [["requeue", JOB_ID]]  # still only the first one
    # both attempts appended to the same per-node logs
    node_log = (exp_root / EXP / "logs" / f"slurm-{JOB_ID}-gpu-a02.log").read_text()
    assert node_log.count("fake infir2 on gpu-a02: train --recipe 7b") == 2


def test_clean_early_exit_before_train_iters_requeues(cli, fake_slurm) -> None:
    """launch.exit_duration_minutes: Megatron saves and exits 0 before train_iters: run again."""
    rc = _run(fake_slurm.submit(fake_slurm.script(cli), FAKE_TRAIN="early-exit", FAKE_SAVE_ITER="800"))
    assert rc == 0, fake_slurm.batch_log()
    assert fake_slurm.requeues() == [["requeue", JOB_ID]]
    assert "before train_iters" in fake_slurm.batch_log()


def test_sigterm_is_not_forwarded_again_and_does_not_requeue(cli, fake_slurm) -> None:
    """scancel / preemption / the time limit: Slurm signals the step itself (here: the test does, to the
    srun stand-in); the batch shell must not add a second SIGTERM, and must not requeue (scancel stops)."""
    proc = fake_slurm.submit(fake_slurm.script(cli), FAKE_TRAIN="until-term", FAKE_SAVE_ITER="900")
    fake_slurm.wait_ready(proc)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None, "the batch shell must wait for the step to finish saving"
    os.kill(int((fake_slurm.records / "srun.pid").read_text()), signal.SIGTERM)  # Slurm's own signal
    rc = _run(proc)
    assert rc == 0, fake_slurm.batch_log()
    assert all(r["signals"] == 1 for r in fake_slurm.read("infir2-stop"))
    assert len(fake_slurm.read("srun-signal")) == 1
    assert fake_slurm.requeues() == []
    assert "SIGTERM: the job is ending" in fake_slurm.batch_log()


def test_failed_step_keeps_its_status_and_is_not_requeued(cli, fake_slurm) -> None:
    rc = _run(fake_slurm.submit(fake_slurm.script(cli), FAKE_TRAIN="fail"))
    assert rc == 3, fake_slurm.batch_log()
    assert fake_slurm.requeues() == []
    assert "training step exited with status 3" in fake_slurm.batch_log()


def test_outside_slurm_it_refuses(cli, fake_slurm) -> None:
    env = {k: v for k, v in fake_slurm.env.items()}
    run = subprocess.run(["bash", str(fake_slurm.script(cli))], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "submit this script with sbatch" in run.stderr
