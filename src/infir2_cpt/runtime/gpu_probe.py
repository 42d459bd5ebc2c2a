"""The GPU probe `infir2 bench` runs once before its variants, in a short child process of its own so that the
bench process, which outlives every run, never holds a CUDA context:

    python -m infir2_cpt.runtime.gpu_probe '[{"nproc": 1, "fp8": "blockwise"}, ...]'

prints one JSON line: the device name and the problems of infir2's GPU preflight (launch/preflight.check_gpu) for
each (processes per node, FP8 recipe) asked about."""

from __future__ import annotations

import json
import sys
from typing import Any

def main(payload: str) -> None:
    from ..launch.preflight import check_gpu

    report: dict[str, Any] = {"name": None, "problems": []}
    try:
        import torch

        if torch.cuda.is_available():
            report["name"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        report["problems"].append({"key": "gpu", "message": f"torch: {exc}"})
    seen = set()
    for check in json.loads(payload):
        for problem in check_gpu(int(check["nproc"]), check.get("fp8")).machine:
            item = (problem.key, problem.message, str(problem.value))
            if item not in seen:
                seen.add(item)
                report["problems"].append({"key": problem.key, "message": problem.message, "value": problem.value})
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
