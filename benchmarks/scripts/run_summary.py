"""Per-experiment figures from Megatron's own console log lines (exp/<name>/logs/*.log).

Usage: python benchmarks/scripts/run_summary.py EXP_DIR... > runs.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from infir2_cpt.reports.runlog import read_logs, summarize


def summary(exp_dir: Path) -> dict:
    recipe = yaml.safe_load((exp_dir / "recipe.yaml").read_text())
    tokens = recipe["parallel"]["global_batch_size"] * recipe["model"]["seq_length"]
    gpus = recipe["launch"]["nnodes"] * recipe["launch"]["nproc_per_node"]
    log = read_logs(exp_dir / "logs")
    out = summarize(log, tokens, gpus)
    out["loaded"] = log.loaded
    out["exited_on_signal"] = log.exited_on_signal
    out["lr_by_iteration"] = {it.iteration: it.lr for it in log.iterations}
    out["loss_by_iteration"] = {it.iteration: it.loss for it in log.iterations}
    out["gpus"] = gpus
    return out


if __name__ == "__main__":
    print(json.dumps({d: summary(Path(d)) for d in sys.argv[1:]}, indent=1))
