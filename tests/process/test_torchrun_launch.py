"""A real launch on the CPU, through the same code path as a GPU run: `infir2 train` plans, writes exp/<name>/,
execs torchrun (c10d rendezvous, 1 node x 2 processes), and torchrun starts tests/fakes/gloo_worker.py
in place of the Megatron entry (INFIR2_ENTRY; INFIR2_GPU_CHECK=0 skips the GPU probe). Each worker joins a gloo
group, all-reduces, and reports its ranks, its environment and its arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infir2_cpt.bench.run import free_port

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "fakes" / "gloo_worker.py"


def launch(exp_root: Path, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NCCL_NVLS_ENABLE")}
    env.update(INFIR2_EXP_ROOT=str(exp_root), INFIR2_ENTRY=str(WORKER), INFIR2_GPU_CHECK="0", **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "infir2_cpt.cli", "train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    exp_root = tmp_path / "exp"
    port = free_port()
    proc = launch(exp_root, "--recipe", "tiny", "--nproc-per-node", "2", "--rdzv-endpoint", f"localhost:{port}",
                  "--exp", "cpu-launch", "--", "--eval-iters", "3",
                  extra_env={"CUDA_DEVICE_MAX_CONNECTIONS": "7"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exp = exp_root / "cpu-launch"
    reports = {}
    for rank in (0, 1):
        path = exp / f"gloo_rank{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no report\n{proc.stdout}\n{proc.stderr}"
        reports[rank] = json.loads(path.read_text())

    assert {r["rank"] for r in reports.values()} == {0, 1}
    for rank, report in reports.items():
        env = report["env"]
        assert report["world_size"] == 2
        assert report["all_reduce_sum"] == 3.0  # 1 + 2: the collective really ran across both processes
        assert env["RANK"] == str(rank) and env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == "2" and env["LOCAL_WORLD_SIZE"] == "2" and env["GROUP_RANK"] == "0"
        assert env["MASTER_PORT"] and env["TORCHELASTIC_RUN_ID"].startswith("infir2-cpu-launch-")
        # the recipe's environment, except where the user's own value wins
        assert env["NCCL_NVLS_ENABLE"] == "0"
        assert env["WANDB_MODE"] == "offline"
        assert env["NVTE_FUSED_ATTN"] == "1"
        assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
        assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "7"
        assert env["INFIR2_EXP_DIR"] == str(exp)
        # the Megatron arguments, pass-through last
        argv = report["argv"]
        assert argv[argv.index("--micro-batch-size") + 1] == "4"
        assert argv[argv.index("--global-batch-size") + 1] == "16"
        assert argv[argv.index("--save") + 1] == str(exp / "checkpoints")
        assert "--mock-data" in argv
        assert argv[-2:] == ["--eval-iters", "3"]
    assert reports[0]["argv"] == reports[1]["argv"]

    # what the launch recorded in exp/<name>/ before exec'ing torchrun
    assert (exp / "recipe.yaml").is_file() and (exp / "launch.sh").is_file()
    assert (exp / "checkpoints").is_dir() and (exp / "tensorboard").is_dir()
    assert "--micro-batch-size 4" in (exp / "launch.sh").read_text()


@pytest.mark.slow
def test_launch_refuses_before_torchrun(tmp_path):
    """A configuration problem stops the launch with exit 2 and nothing written, torchrun never started."""
    exp_root = tmp_path / "exp"
    proc = launch(exp_root, "--recipe", "tiny", "--nproc-per-node", "3", "--rdzv-endpoint", f"localhost:{free_port()}")
    assert proc.returncode == 2
    assert "global_batch_size" in proc.stderr
    assert not exp_root.exists()
