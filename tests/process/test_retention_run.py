"""Retention while a run trains: `infir2 train` as a process, the real torchrun underneath, and
tests/fakes/saving_worker.py saving like Megatron (shards, then .metadata and metadata.json, then the tracker). The
launcher, which holds the experiment lock, prunes after each newly completed checkpoint and once more at the end;
saves in progress are never touched (the worker's save would fail), and a checkpoint another experiment decays from
stays."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infir2_cpt import checkpoints as ck
from infir2_cpt.bench.run import free_port
from infir2_cpt.layout import DecaySource
from infir2_cpt.retention import LOG_NAME, POLL_ENV

WORKER = Path(__file__).resolve().parents[1] / "fakes" / "saving_worker.py"

pytestmark = pytest.mark.slow


def test_the_launcher_prunes_while_training_and_keeps_what_it_must(tmp_path: Path) -> None:
    root = tmp_path / "exp"
    decay = root / "keeper-decay"
    decay.mkdir(parents=True)
    DecaySource(root / "keeper" / "checkpoints", 40, 100).write(decay)  # a decay branched from iteration 40
    env = {**os.environ, "INFIR2_EXP_ROOT": str(root), "INFIR2_ENTRY": str(WORKER), "INFIR2_GPU_CHECK": "0",
           "SAVER_OUT": str(tmp_path / "out"), "SAVER_SAVE_INTERVAL": "20", "SAVER_ITERS": "140",
           "SAVER_STEP_SECONDS": "0.04", "SAVER_SAVE_SECONDS": "0.3", POLL_ENV: "0.1"}
    env.pop("INFIR2_EXP_DIR", None)
    command = [sys.executable, "-m", "infir2_cpt.cli", "train", "--recipe", "tiny", "--exp", "keeper",
               "--nproc-per-node", "2", "--rdzv-endpoint", f"localhost:{free_port()}",
               "--set", "checkpoint.save_interval=20", "--set", "checkpoint.keep_last=2",
               "--set", "checkpoint.keep_every=60", "--set", "schedule.train_iters=140"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    ckpt_dir = root / "keeper" / "checkpoints"
    left = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())
    # 40: a decay source; 60, 120: multiples of 60; 120, 140: the last two
    assert left == [ck.iter_dir_name(i) for i in (40, 60, 120, 140)], left
    assert all(f.complete for f in ck.list_checkpoints(ckpt_dir))
    log = (root / "keeper" / "logs" / LOG_NAME).read_text()
    for gone in (20, 80, 100):
        assert f"removed {ck.iter_dir_name(gone)}" in log
    assert "by the launcher after iter_" in log  # pruned while training, not only at the end
    assert "infir2.retention: removed iter_0000020" in output
    assert not (root / "keeper" / ".infir2.lock").exists()
