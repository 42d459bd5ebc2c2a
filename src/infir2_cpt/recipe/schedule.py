"""The WSD learning-rate schedule, computed the way Megatron's OptimizerParamScheduler does.

Megatron counts scheduler steps in samples (iterations x global batch size): warmup is linear from
warmup_init_lr to lr, then lr holds until `train_iters - decay_iters`, then it anneals to min_lr with the
chosen WSD shape. tests/unit/test_schedule.py checks this against Megatron's own class.

A decay run (`infir2 decay --load iter_K`) is the same schedule cut at K: decay_from(K). Every launch records the
schedule it gave Megatron in exp/<name>/schedule.json (record / from_record).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, Mapping

from .schema import Recipe

Phase = Literal["warmup", "stable", "decay", "done"]


@dataclass(frozen=True)
class WSDSchedule:
    lr: float
    min_lr: float
    train_iters: int
    warmup_iters: int
    decay_iters: int
    decay_style: str = "cosine"
    warmup_init_lr: float = 0.0
    global_batch_size: int = 1

    @classmethod
    def of(cls, recipe: Recipe) -> WSDSchedule:
        """The schedule of a recipe's whole run (warmup -> stable -> decay)."""
        s = recipe.schedule
        return cls(lr=s.lr, min_lr=s.min_lr, train_iters=s.train_iters, warmup_iters=s.warmup_iters,
                   decay_iters=s.decay_iters, decay_style=s.decay_style, warmup_init_lr=s.warmup_init_lr,
                   global_batch_size=recipe.parallel.global_batch_size)

    def decay_from(self, iteration: int) -> WSDSchedule:
        """The schedule of a decay run started from the stable checkpoint at `iteration`: it ends decay_iters later
        (train_iters K + decay_iters), has no warmup, and anneals from lr right away (Megatron is told to take
        this schedule over the checkpoint's, --override-opt_param-scheduler)."""
        return replace(self, train_iters=iteration + self.decay_iters, warmup_iters=0)

    def record(self) -> dict[str, Any]:
        """What schedule.json holds: the settings Megatron's scheduler checks when it resumes."""
        return {"lr": self.lr, "min_lr": self.min_lr, "train_iters": self.train_iters,
                "warmup_iters": self.warmup_iters, "decay_iters": self.decay_iters, "decay_style": self.decay_style,
                "global_batch_size": self.global_batch_size}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], warmup_init_lr: float = 0.0) -> WSDSchedule:
        """The schedule a schedule.json records (it has no warmup_init_lr). Raises KeyError, TypeError or
        ValueError when a value is missing or malformed."""
        return cls(lr=float(record["lr"]), min_lr=float(record["min_lr"]), train_iters=int(record["train_iters"]),
                   warmup_iters=int(record["warmup_iters"]), decay_iters=int(record["decay_iters"]),
                   decay_style=str(record["decay_style"]), warmup_init_lr=warmup_init_lr,
                   global_batch_size=int(record["global_batch_size"]))

    @property
    def anneal_start_iter(self) -> int:
        return self.train_iters - self.decay_iters

    def lr_at_samples(self, num_steps: int) -> float:
        """LR after `num_steps` samples, as OptimizerParamScheduler.get_lr computes it."""
        gbs = self.global_batch_size
        warmup_steps = self.warmup_iters * gbs
        decay_steps = self.train_iters * gbs
        wsd_steps = self.decay_iters * gbs
        if warmup_steps > 0 and num_steps <= warmup_steps:
            return self.warmup_init_lr + (self.lr - self.warmup_init_lr) * num_steps / warmup_steps
        if num_steps > decay_steps:
            return self.min_lr
        anneal_start = decay_steps - wsd_steps
        if num_steps <= anneal_start:
            coeff = 1.0
        else:
            ratio = (num_steps - anneal_start) / wsd_steps
            coeff = _wsd_coeff(self.decay_style, ratio)
        return self.min_lr + coeff * (self.lr - self.min_lr)

    def lr_at(self, iteration: int) -> float:
        """LR in effect once `iteration` optimizer steps are done (what a checkpoint at that step resumes with)."""
        return self.lr_at_samples(iteration * self.global_batch_size)

    def phase_at(self, iteration: int) -> Phase:
        if iteration < self.warmup_iters:
            return "warmup"
        if iteration <= self.anneal_start_iter:
            return "stable"
        if iteration <= self.train_iters:
            return "decay"
        return "done"


def _wsd_coeff(style: str, ratio: float) -> float:
    if style == "linear":
        return 1.0 - ratio
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * ratio) + 1.0)
    if style == "exponential":
        return (2.0 * math.pow(0.5, ratio)) - 1.0
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(ratio)
    raise ValueError(f"unknown WSD decay style {style!r}")
