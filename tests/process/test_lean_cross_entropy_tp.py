"""infir2's lean cross entropy across two tensor-parallel ranks (torchrun, gloo, CPU), each holding half of the
vocabulary: the same losses and gradients as Megatron's own fused cross entropy on the same parts, and as one
process's cross entropy over the whole vocabulary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from infir2_cpt.bench.run import free_port

WORKER = Path(__file__).resolve().parents[1] / "fakes" / "tp_cross_entropy_worker.py"


def test_two_ranks_match_megatron_and_the_whole_vocabulary(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
                          f"--master-port={free_port()}", str(WORKER), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["world"] == 2
        assert report["loss_lean_vs_megatron"] < 1e-5 and report["loss_lean_vs_whole"] < 1e-5, report
        # the same arithmetic as Megatron's: on the CPU the same bits (docs/fp8.md says so)
        assert report["loss_lean_vs_megatron"] == 0.0 and report["grad_entries_differing"] == 0, report
        # against FP32 over the whole vocabulary: one BF16 rounding apart at most (relative to the largest entry)
        assert report["grad_lean_vs_whole"] <= report["grad_scale"] * 2 ** -8, report
