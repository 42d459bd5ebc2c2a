"""GPU smoke test: the tiny recipe through the real CLI, entry point and Megatron training loop.

Skipped without CUDA (CI has none); run on a GPU host with `python -m pytest -q -m gpu tests/gpu`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _train(tmp_path: Path, exp: str, *sets: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "INFIR2_EXP_ROOT": str(tmp_path / "exp"), "CUDA_VISIBLE_DEVICES": "0"}
    cmd = [sys.executable, "-m", "infir2_cpt.cli", "train", "--recipe", "tiny", "--exp", exp,
           "--rdzv-endpoint", "localhost:29611",
           "--set", "schedule.train_iters=40", "--set", "schedule.warmup_iters=4",
           "--set", "schedule.decay_iters=10", "--set", "checkpoint.save_interval=20",
           "--set", "logging.eval_interval=20", "--set", "logging.eval_iters=1", *sets]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("precision", ["blockwise", "null"])
def test_tiny_recipe_trains_and_checkpoints(tmp_path: Path, precision: str) -> None:
    from infir2_cpt.reports.runlog import read_logs

    exp = f"gpu-smoke-{precision}"
    result = _train(tmp_path, exp, "--set", f"precision.fp8={precision}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    root = tmp_path / "exp" / exp
    log = read_logs(root / "logs")
    losses = [it.loss for it in log.iterations if it.loss is not None]
    assert len(losses) >= 30, f"only {len(losses)} iteration lines"
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"loss did not fall: {losses[:5]} -> {losses[-5:]}"
    for iteration in (20, 40):
        folder = root / "checkpoints" / f"iter_{iteration:07d}"
        assert (folder / "metadata.json").is_file() and (folder / ".metadata").is_file(), folder
    assert (root / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "40"
    assert list((root / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events"
