"""Summarize TensorBoard scalars of experiments: tags, number of points, first and last values.

Usage: python benchmarks/scripts/tb_summary.py EXP_DIR... > summary.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summarize(tb_dir: Path) -> dict[str, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        out[tag] = {"points": len(events), "first_step": events[0].step, "first": events[0].value,
                    "last_step": events[-1].step, "last": events[-1].value}
    return out


if __name__ == "__main__":
    print(json.dumps({d: summarize(Path(d) / "tensorboard") for d in sys.argv[1:]}, indent=1))
