"""A stand-in for the training entry, started by infir2's real launcher through torchrun on the CPU.

tests/process/test_torchrun_launch.py runs `infir2 train` with INFIR2_ENTRY pointing here. Every rank joins a gloo
process group (env:// from torchrun's variables), checks an all_reduce, and writes what it received --
its ranks, the recipe's environment and its Megatron arguments -- to $INFIR2_EXP_DIR/gloo_rank<R>.json.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

REPORTED_ENV = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RUN_ID", "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_NVLS_ENABLE", "WANDB_MODE",
    "TORCH_NCCL_AVOID_RECORD_STREAMS", "NVTE_FUSED_ATTN", "PYTORCH_CUDA_ALLOC_CONF", "INFIR2_EXP_DIR",
    "INFIR2_LOG_FILE",
)


def main() -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    report = {
        "rank": rank,
        "world_size": world,
        "all_reduce_sum": value.item(),
        "env": {name: os.environ.get(name) for name in REPORTED_ENV},
        "argv": sys.argv[1:],
    }
    out_dir = Path(os.environ["INFIR2_EXP_DIR"])
    tmp = out_dir / f".gloo_rank{rank}.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out_dir / f"gloo_rank{rank}.json")
    dist.barrier()
    dist.destroy_process_group()
    print(f"gloo worker rank {rank}/{world} done", flush=True)


if __name__ == "__main__":
    main()
