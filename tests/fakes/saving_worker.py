"""A stand-in for Megatron's training loop in the stop-signal tests: it saves the way Megatron does.

The launcher under test runs this file instead of infir2_cpt.runtime.entry (INFIR2_ENTRY=<this file>), under the
real torchrun on the CPU, every rank in one gloo group. What it shares with Megatron 0.19.2 (with
--exit-signal-handler), which is what a stop must not break:
- SIGTERM only sets a flag; after each iteration the ranks agree (all_reduce) whether any rank got it,
  then save at that iteration and exit 0 ("exiting program after receiving SIGTERM");
- the periodic save (every SAVER_SAVE_INTERVAL iterations) comes after that check, so a signal that
  arrives during a save is acted on after the next iteration;
- the first save starts a helper process in the worker's process group (Megatron's checkpoint writer
  starts a multiprocessing manager for its results queue); every later save needs it: the shards are
  written by threads that report through the manager's queue. A helper killed by a signal sent to the
  whole group makes the next save fail;
- each rank writes iter_N/__<rank>_0.distcp, rank 0 then .metadata, metadata.json and the tracker
  latest_checkpointed_iteration.txt, so infir2 sees complete and partial folders as it sees Megatron's;
- a relaunch resumes from the tracker.
Two writers on one folder are detected (an O_EXCL marker per rank) and fail the worker.

Environment: SAVER_OUT (a folder for events-<rank>.jsonl: start, save-begin, save-end, stop, done),
SAVER_ITERS (stop at this iteration, default 100000), SAVER_STEP_SECONDS (0.05), SAVER_SAVE_INTERVAL
(20), SAVER_SAVE_SECONDS (time one shard write takes, 0.2), SAVER_LEFTOVER=1 (start a helper that
outlives the worker, in its process group, as a stuck DataLoader worker would; its pid is in the start
event).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

OUT = Path(os.environ.get("SAVER_OUT", "."))
RANK = int(os.environ.get("RANK", "0"))
TRACKER = "latest_checkpointed_iteration.txt"


def event(name: str, **extra: Any) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"events-{RANK}.jsonl", "a") as f:
        f.write(json.dumps({"event": name, "pid": os.getpid(), "time": time.time(), **extra}) + "\n")


class Saver:
    def __init__(self, ckpt_dir: Path, save_seconds: float) -> None:
        self.ckpt_dir = ckpt_dir
        self.save_seconds = save_seconds
        self.manager: Any = None
        self.results: Any = None

    def _write_shard(self, folder: Path) -> None:
        time.sleep(self.save_seconds)
        (folder / f"__{RANK}_0.distcp").write_bytes(os.urandom(64))
        self.results.put(("written", RANK))

    def save(self, iteration: int) -> None:
        import torch.distributed as dist

        if self.manager is None:  # like Megatron's writer: a helper process (spawned), started at the first save
            self.manager = multiprocessing.get_context("spawn").Manager()
            self.results = self.manager.Queue()
        folder = self.ckpt_dir / f"iter_{iteration:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / f".writing-{RANK}"
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # a second writer fails here
        os.close(fd)
        event("save-begin", iteration=iteration)
        writer = threading.Thread(target=self._write_shard, args=(folder,))
        writer.start()
        writer.join()
        assert self.results.get(timeout=60) == ("written", RANK)
        marker.unlink()
        dist.barrier()
        if RANK == 0:
            (folder / ".metadata").write_bytes(b"\0")
            (folder / "metadata.json").write_text("{}")
            tmp = self.ckpt_dir / f".{TRACKER}.tmp"
            tmp.write_text(f"{iteration}\n")
            tmp.replace(self.ckpt_dir / TRACKER)
        dist.barrier()
        event("save-end", iteration=iteration)


def main() -> int:
    import torch
    import torch.distributed as dist

    stop = {"flag": False}

    def on_sigterm(_signum: int, _frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_sigterm)
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=120))
    ckpt_dir = Path(os.environ["INFIR2_EXP_DIR"]) / "checkpoints"
    tracker = ckpt_dir / TRACKER
    iteration = int(tracker.read_text()) if tracker.is_file() else 0
    total = int(os.environ.get("SAVER_ITERS", "100000"))
    step_seconds = float(os.environ.get("SAVER_STEP_SECONDS", "0.05"))
    interval = int(os.environ.get("SAVER_SAVE_INTERVAL", "20"))
    saver = Saver(ckpt_dir, float(os.environ.get("SAVER_SAVE_SECONDS", "0.2")))
    leftover = subprocess.Popen(["sleep", "600"]) if os.environ.get("SAVER_LEFTOVER") == "1" else None
    event("start", iteration=iteration, leftover=leftover.pid if leftover else None)
    while iteration < total:
        time.sleep(step_seconds)  # one training step
        iteration += 1
        event("iteration", iteration=iteration)
        received = torch.tensor([int(stop["flag"])])
        dist.all_reduce(received, op=dist.ReduceOp.MAX)
        if received.item():
            saver.save(iteration)
            event("stop", iteration=iteration)
            dist.destroy_process_group()
            return 0
        if iteration % interval == 0:
            saver.save(iteration)
    event("done", iteration=iteration)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
