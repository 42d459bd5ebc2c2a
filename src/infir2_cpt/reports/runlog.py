"""Read Megatron's console log: the per-iteration lines, memory reports, saves and loads.

Used by the GPU smoke tests, `infir2 bench` and the evidence scripts, so that every figure we report
comes from Megatron's own log lines.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

_ITER_RE = re.compile(r"iteration\s+(\d+)/\s*(\d+)\s*\|(.*)$")
_PAIR_RE = re.compile(r"\s*([^|:]+?):\s*([-+0-9.eEnaNinf]+)\s*\|")
_MEM_RE = re.compile(r"memory \(MB\)\s*\|\s*allocated:\s*([0-9.]+)\s*\|\s*max allocated:\s*([0-9.]+)\s*\|"
                     r"\s*reserved:\s*([0-9.]+)\s*\|\s*max reserved:\s*([0-9.]+)")
_SAVED_RE = re.compile(r"successfully saved checkpoint from iteration\s+(\d+)")
_LOADED_RE = re.compile(r"successfully loaded checkpoint from (\S+) \[.*?\] at iteration (\d+)")


@dataclass
class IterationLine:
    iteration: int
    train_iters: int
    values: dict[str, float]

    @property
    def loss(self) -> float | None:
        return self.values.get("lm loss")

    @property
    def lr(self) -> float | None:
        return self.values.get("learning rate")

    @property
    def iter_ms(self) -> float | None:
        return self.values.get("elapsed time per iteration (ms)")


@dataclass
class RunLog:
    iterations: list[IterationLine] = field(default_factory=list)
    max_allocated_mb: float | None = None
    max_reserved_mb: float | None = None
    saved: list[int] = field(default_factory=list)
    loaded: list[tuple[str, int]] = field(default_factory=list)
    exited_on_signal: bool = False


def parse_log(text: str) -> RunLog:
    log = RunLog()
    for line in text.splitlines():
        match = _ITER_RE.search(line)
        if match:
            values = {k.strip(): float(v) for k, v in _PAIR_RE.findall(match.group(3) + "|")}
            log.iterations.append(IterationLine(int(match.group(1)), int(match.group(2)), values))
            continue
        mem = _MEM_RE.search(line)
        if mem:
            alloc, reserved = float(mem.group(2)), float(mem.group(4))
            log.max_allocated_mb = max(log.max_allocated_mb or 0.0, alloc)
            log.max_reserved_mb = max(log.max_reserved_mb or 0.0, reserved)
        if (saved := _SAVED_RE.search(line)) is not None:
            log.saved.append(int(saved.group(1)))
        if (loaded := _LOADED_RE.search(line)) is not None:
            log.loaded.append((loaded.group(1), int(loaded.group(2))))
        if "exiting program after receiving SIGTERM" in line:
            log.exited_on_signal = True
    return log


def read_logs(log_dir: Path) -> RunLog:
    """All console logs of an experiment (every launch, oldest first) as one RunLog."""
    text = "\n".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("*.log")))
    return parse_log(text)


def summarize(log: RunLog, tokens_per_iteration: int, gpus: int, skip: int = 3) -> dict[str, float | int | None]:
    """First/last loss, steady-state iteration time, tokens/s per GPU and TFLOP/s (median after `skip`)."""
    its = [it for it in log.iterations if it.loss is not None]
    steady = [it for it in its[skip:] if it.iter_ms] or [it for it in its if it.iter_ms]
    iter_ms = statistics.median(it.iter_ms for it in steady) if steady else None  # type: ignore[misc]
    tflops = [it.values["throughput per GPU (TFLOP/s/GPU)"] for it in steady
              if "throughput per GPU (TFLOP/s/GPU)" in it.values]
    return {
        "iterations": len(its),
        "first_iteration": its[0].iteration if its else None,
        "last_iteration": its[-1].iteration if its else None,
        "first_loss": its[0].loss if its else None,
        "last_loss": its[-1].loss if its else None,
        "iter_ms_median": iter_ms,
        "tokens_per_s_per_gpu": (tokens_per_iteration / (iter_ms / 1000.0) / gpus) if iter_ms else None,
        "tflops_per_gpu_median": statistics.median(tflops) if tflops else None,
        "max_allocated_gb": (log.max_allocated_mb / 1024) if log.max_allocated_mb else None,
        "max_reserved_gb": (log.max_reserved_mb / 1024) if log.max_reserved_mb else None,
        "saved": log.saved,
    }
