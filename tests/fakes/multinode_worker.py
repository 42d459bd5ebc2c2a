"""A stand-in for Megatron's entry in the multi-node tests: one torchrun worker on the gloo backend.

The launcher under test runs this file instead of infir2_cpt.runtime.entry (INFIR2_ENTRY=<this file>). Each
worker records what torchrun told it (RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK, ...), joins a gloo
process group and all-gathers every rank's identity, so the test can check that the two "nodes" formed
one job: ranks unique and complete, and every worker agreeing on who is who. The report of rank R goes to
$MULTINODE_OUT/rank-R.json. The Megatron arguments the launcher appended are recorded, not parsed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
            "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "INFIR2_EXP_DIR")


def main() -> int:
    out = Path(os.environ["MULTINODE_OUT"])
    env = {key: os.environ.get(key) for key in ENV_KEYS}
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    me = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "hostname": socket.gethostname(),
          "pid": os.getpid(), "agent_pid": os.getppid(), "env": env}
    everyone: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    # a real collective on tensors too: the sum of all ranks
    total = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(total)
    dist.barrier()
    report = {**me, "argv": sys.argv[1:], "gathered": everyone, "rank_sum": total.item()}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank-{me['rank']}.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.rename(out / f"rank-{me['rank']}.json")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
