"""A stand-in for infir2_cpt.runtime.eval_entry, for `infir2 eval` on the CPU (tests/unit/test_eval.py).

Started by the real `infir2 eval` under the real torch.distributed.run (INFIR2_EVAL_ENTRY=<this file>), it does
what the entry does around Megatron: reads the plan ($INFIR2_EVAL_PLAN), and for every checkpoint of it writes the
result with the entry's own write_result, on the last rank. The "loss" is 2 + 100 / iteration. It also records
whether retention would leave each checkpoint alone while it is read ("held": a live hold names it), and its
Megatron arguments (--load, --ckpt-step, --skip-train) in the result.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from infir2_cpt.layout import ExperimentPaths  # noqa: E402
from infir2_cpt.retention import protection_of  # noqa: E402
from infir2_cpt.runtime.eval_entry import read_plan, write_result  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("FAKE_EVAL_FAIL"):
        sys.exit(3)
    for item in read_plan():
        exp_dir = Path(item["ckpt_dir"]).parent
        reasons = protection_of(ExperimentPaths(exp_dir.name, exp_dir)).reasons.get(item["iteration"], [])
        held = any(reason.startswith("being evaluated") for reason in reasons)
        if rank == world - 1:
            write_result(item, 2.0 + 100.0 / item["iteration"], item["iteration"],
                         {"held": held, "argv": argv, "world_size": world})


if __name__ == "__main__":
    main()
