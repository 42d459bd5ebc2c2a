"""One TensorBoard scalar of several experiments, every logged step: {experiment: [[step, value], ...]}.

Usage: python benchmarks/scripts/tb_curves.py --tag "lm loss" --out curves.json EXP_DIR...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(tb_dir: Path, tag: str) -> list[list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return [[event.step, event.value] for event in acc.Scalars(tag)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("experiments", nargs="+", type=Path)
    args = parser.parse_args()
    args.out.write_text(json.dumps({exp.name: curve(exp / "tensorboard", args.tag) for exp in args.experiments}) + "\n")


if __name__ == "__main__":
    main()
