"""Our WSD learning rate against Megatron's own OptimizerParamScheduler, and `infir2 schedule`.

Megatron counts scheduler steps in samples: warmup, decay and WSD-decay lengths are iterations x global
batch size, and every iteration steps the scheduler by the global batch size (megatron.training's
get_optimizer_param_scheduler and train_step). The stand-in optimizer only needs param_groups.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from infir2_cpt import checkpoints as ck
from infir2_cpt.launch.plan import LaunchRequest, plan_run
from infir2_cpt.reports.curve import Curve, recipe_curve, schedule_segments
from infir2_cpt.recipe.schedule import WSDSchedule

pytestmark = pytest.mark.filterwarnings(
    "ignore:Could not determine rank:UserWarning", "ignore:.*not installed:UserWarning",
    "ignore:'type' is deprecated:DeprecationWarning")

osched = pytest.importorskip("megatron.core.optimizer_param_scheduler")
OptimizerParamScheduler = osched.OptimizerParamScheduler

STYLES = ("cosine", "linear", "exponential", "minus_sqrt")
WEIGHT_DECAY = 0.1


def stand_in_optimizer() -> Any:
    return SimpleNamespace(param_groups=[{"lr": 0.0, "weight_decay": 0.0}])


def megatron_scheduler(s: WSDSchedule, *, override: bool = False, optimizer: Any = None) -> Any:
    """Megatron's scheduler built the way megatron.training builds it for iteration-based training."""
    gbs = s.global_batch_size
    return OptimizerParamScheduler(
        optimizer if optimizer is not None else stand_in_optimizer(),
        init_lr=s.warmup_init_lr,
        max_lr=s.lr,
        min_lr=s.min_lr,
        lr_warmup_steps=s.warmup_iters * gbs,
        lr_decay_steps=s.train_iters * gbs,
        lr_decay_style="WSD",
        start_wd=WEIGHT_DECAY,
        end_wd=WEIGHT_DECAY,
        wd_incr_steps=s.train_iters * gbs,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=override,
        wsd_decay_steps=s.decay_iters * gbs,
        lr_wsd_decay_style=s.decay_style,
    )


def megatron_lr_at_samples(sched: Any, num_samples: int) -> float:
    sched.num_steps = num_samples
    return sched.get_lr({})


def same(ours: float, theirs: float) -> bool:
    return ours == pytest.approx(theirs, rel=1e-12, abs=1e-20)


TINY = WSDSchedule(lr=1e-3, min_lr=1e-4, train_iters=300, warmup_iters=30, decay_iters=60, global_batch_size=16)
SEVEN_B = WSDSchedule(lr=1e-4, min_lr=1e-5, train_iters=40000, warmup_iters=5000, decay_iters=5000,
                      global_batch_size=128)


def interesting_iterations(s: WSDSchedule, stride: int) -> list[int]:
    """Every `stride`-th iteration plus each phase boundary and its neighbours, and past the end."""
    marks = {0, 1, s.warmup_iters, s.anneal_start_iter, s.train_iters}
    its = set(range(0, s.train_iters + 3, stride))
    for m in marks:
        its.update(i for i in (m - 1, m, m + 1) if i >= 0)
    its.update((s.train_iters + 1, s.train_iters + 10))
    return sorted(its)


# --------------------------------------------------------------------------- get_lr at many k


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("base, stride", [(TINY, 1), (SEVEN_B, 97)])
def test_lr_equals_megatron_get_lr(base: WSDSchedule, stride: int, style: str) -> None:
    s = WSDSchedule(**{**base.__dict__, "decay_style": style})
    sched = megatron_scheduler(s)
    for k in interesting_iterations(s, stride):
        assert same(s.lr_at(k), megatron_lr_at_samples(sched, k * s.global_batch_size)), (style, k)


@pytest.mark.parametrize("style", STYLES)
def test_lr_equals_megatron_between_iterations(style: str) -> None:
    """In samples, not only at whole iterations (lr_at_samples is Megatron's get_lr)."""
    s = WSDSchedule(lr=3e-4, min_lr=3e-5, train_iters=50, warmup_iters=7, decay_iters=13, decay_style=style,
                    warmup_init_lr=1e-5, global_batch_size=12)
    sched = megatron_scheduler(s)
    for n in range(0, 52 * 12, 5):
        assert same(s.lr_at_samples(n), megatron_lr_at_samples(sched, n)), n


@pytest.mark.parametrize("style", STYLES)
def test_step_progression_matches(style: str) -> None:
    """Megatron's constructor steps by 0, then each iteration by the global batch size."""
    s = WSDSchedule(**{**TINY.__dict__, "decay_style": style, "warmup_init_lr": 2e-5})
    opt = stand_in_optimizer()
    sched = megatron_scheduler(s, optimizer=opt)
    assert same(s.lr_at(0), opt.param_groups[0]["lr"])
    for k in range(1, s.train_iters + 5):
        sched.step(s.global_batch_size)
        assert same(s.lr_at(k), opt.param_groups[0]["lr"]), k
        assert opt.param_groups[0]["weight_decay"] == WEIGHT_DECAY


def test_wsd_without_warmup_and_whole_run_decay() -> None:
    for s in (WSDSchedule(lr=1.0, min_lr=0.0, train_iters=10, warmup_iters=0, decay_iters=10, global_batch_size=3),
              WSDSchedule(lr=2e-4, min_lr=2e-4, train_iters=10, warmup_iters=2, decay_iters=4)):
        sched = megatron_scheduler(s)
        for k in range(12):
            assert same(s.lr_at(k), megatron_lr_at_samples(sched, k * s.global_batch_size)), (s, k)


def test_reference_example() -> None:
    """The verified example of the megatron-core notes: train 10, warmup 2, WSD 4, GBS 4, linear, 3e-4 -> 3e-5."""
    s = WSDSchedule(lr=3e-4, min_lr=3e-5, train_iters=10, warmup_iters=2, decay_iters=4, decay_style="linear",
                    global_batch_size=4)
    expected = [0, 1.5e-4] + [3e-4] * 5 + [2.325e-4, 1.65e-4, 9.75e-5, 3e-5, 3e-5]
    assert [s.lr_at(k) for k in range(12)] == pytest.approx(expected, rel=1e-12)


def test_phases() -> None:
    assert [TINY.phase_at(k) for k in (0, 29, 30, 240, 241, 300, 301)] == [
        "warmup", "warmup", "stable", "stable", "decay", "decay", "done"]
    assert TINY.lr_at(240) == TINY.lr and TINY.lr_at(241) < TINY.lr  # the anneal starts after 240
    assert TINY.lr_at(300) == pytest.approx(TINY.min_lr)


def test_unknown_style_is_refused() -> None:
    with pytest.raises(ValueError):
        WSDSchedule(**{**TINY.__dict__, "decay_style": "step"}).lr_at(280)


# --------------------------------------------------------------------------- decay: state saved mid-stable


def stepped(sched: Any, iterations: int, gbs: int) -> Any:
    for _ in range(iterations):
        sched.step(gbs)
    return sched


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("k", [31, 100, 150, 239, 240, 260])
def test_decay_from_a_stable_checkpoint(k: int, style: str) -> None:
    stable = WSDSchedule(**{**TINY.__dict__, "decay_style": style})
    gbs = stable.global_batch_size
    state = stepped(megatron_scheduler(stable), k, gbs).state_dict()  # saved in the checkpoint at k
    assert state["num_steps"] == k * gbs

    decay = stable.decay_from(k)
    assert (decay.train_iters, decay.warmup_iters, decay.anneal_start_iter) == (k + 60, 0, k)
    opt = stand_in_optimizer()
    sched = megatron_scheduler(decay, override=True, optimizer=opt)
    sched.load_state_dict(state)  # --override-opt_param-scheduler: the arguments win, num_steps is kept
    assert sched.num_steps == k * gbs
    assert (sched.lr_warmup_steps, sched.lr_decay_steps) == (0, (k + 60) * gbs)
    assert opt.param_groups[0]["lr"] == pytest.approx(stable.lr)  # LR at k is lr
    lrs = [opt.param_groups[0]["lr"]]
    for j in range(1, 61):
        sched.step(gbs)
        lr = opt.param_groups[0]["lr"]
        assert same(decay.lr_at(k + j), lr), j
        lrs.append(lr)
    assert lrs[-1] == pytest.approx(stable.min_lr)  # LR at k + D is min_lr
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone anneal
    if style == "cosine":
        for j in (15, 30, 45):
            cosine = stable.min_lr + 0.5 * (1 + math.cos(math.pi * j / 60)) * (stable.lr - stable.min_lr)
            assert lrs[j] == pytest.approx(cosine, rel=1e-12)


def test_decay_needs_the_override() -> None:
    """Without --override-opt_param-scheduler Megatron refuses the changed train_iters/warmup."""
    k = 150
    state = stepped(megatron_scheduler(TINY), k, 16).state_dict()
    sched = megatron_scheduler(TINY.decay_from(k))
    with pytest.raises(AssertionError):
        sched.load_state_dict(state)


def test_decay_resumes_its_own_progress() -> None:
    """A decay checkpoint at k + j, loaded by the same decay command, continues the anneal exactly."""
    k, j = 150, 25
    decay = TINY.decay_from(k)
    state = stepped(megatron_scheduler(TINY), k, 16).state_dict()
    first = megatron_scheduler(decay, override=True)
    first.load_state_dict(state)
    saved = stepped(first, j, 16).state_dict()
    opt = stand_in_optimizer()
    again = megatron_scheduler(decay, override=True, optimizer=opt)
    again.load_state_dict(saved)
    assert same(decay.lr_at(k + j), opt.param_groups[0]["lr"])
    stepped(again, 60 - j, 16)
    assert opt.param_groups[0]["lr"] == pytest.approx(TINY.min_lr)


# --------------------------------------------------------------------------- the launcher's arguments, read by Megatron


def megatron_namespace(args: list[str]) -> argparse.Namespace:
    """Our argument list through Megatron's own parser (plus the one validate_args rule the scheduler needs)."""
    arguments = pytest.importorskip("megatron.training.arguments")
    parser = argparse.ArgumentParser(allow_abbrev=False)
    arguments.add_megatron_arguments(parser)
    ns, _unknown = parser.parse_known_args(args)
    assert ns.weight_decay_incr_style == "constant"
    ns.start_weight_decay = ns.end_weight_decay = ns.weight_decay
    return ns


def scheduler_from_args(args: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, argparse.Namespace]:
    """megatron.training.get_optimizer_param_scheduler on the parsed arguments, with a stand-in optimizer."""
    training = pytest.importorskip("megatron.training.training")
    from megatron.training import global_vars

    ns = megatron_namespace(args)
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", ns)
    opt = stand_in_optimizer()
    return training.get_optimizer_param_scheduler(opt), opt, ns


def make_ckpt(ckpt_dir: Path, iteration: int) -> None:
    folder = ckpt_dir / ck.iter_dir_name(iteration)
    folder.mkdir(parents=True)
    for name in ("metadata.json", ".metadata", "__0_0.distcp"):
        (folder / name).write_text("x")


@pytest.fixture
def launch_env(exp_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("INFIR2_GPU_CHECK", "0")
    return exp_root


@pytest.mark.parametrize("recipe", ["tiny", "7b"])
def test_launcher_arguments_give_our_schedule(launch_env: Path, monkeypatch: pytest.MonkeyPatch, recipe: str) -> None:
    plan = plan_run(LaunchRequest(recipe=recipe, dry_run=True))
    sched, _, ns = scheduler_from_args(plan.megatron_args, monkeypatch)
    ours = recipe_curve(recipe).schedule
    assert ns.lr_decay_style == "WSD" and ns.lr_wsd_decay_style == ours.decay_style
    for k in interesting_iterations(ours, max(1, ours.train_iters // 300)):
        assert same(ours.lr_at(k), megatron_lr_at_samples(sched, k * ns.global_batch_size)), k


@pytest.mark.parametrize("k", [10, 150, 239])
def test_launcher_decay_arguments_anneal_from_k(launch_env: Path, monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    """Stable run to k (Megatron's scheduler from `infir2 train` arguments), then `infir2 decay --load k`."""
    stable_plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True))
    stable_sched, _, ns = scheduler_from_args(stable_plan.megatron_args, monkeypatch)
    state = stepped(stable_sched, k, ns.global_batch_size).state_dict()

    make_ckpt(launch_env / "tiny" / "checkpoints", k)
    decay_plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, decay_load=str(k)))
    sched, opt, dns = scheduler_from_args(decay_plan.megatron_args, monkeypatch)
    assert dns.override_opt_param_scheduler and dns.train_iters == k + 60 and dns.lr_warmup_iters == 0
    sched.load_state_dict(state)
    ours = recipe_curve("tiny", decay_from=k).schedule
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    for j in range(1, 61):
        sched.step(dns.global_batch_size)
        assert same(ours.lr_at(k + j), opt.param_groups[0]["lr"]), j
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert dns.train_iters == k + 60  # Megatron stops here


def test_resume_arguments_pass_megatrons_check(launch_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed `infir2 train` rebuilds the same scheduler: Megatron's unchanged-schedule assertions hold."""
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True))
    sched, _, ns = scheduler_from_args(plan.megatron_args, monkeypatch)
    state = stepped(sched, 120, ns.global_batch_size).state_dict()
    make_ckpt(launch_env / "tiny" / "checkpoints", 120)
    resumed_plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True))
    assert "--exit-on-missing-checkpoint" in resumed_plan.megatron_args
    resumed, opt, _ = scheduler_from_args(resumed_plan.megatron_args, monkeypatch)
    resumed.load_state_dict(state)  # raises if anything in the schedule differed
    assert opt.param_groups[0]["lr"] == pytest.approx(TINY.lr_at(120))


# --------------------------------------------------------------------------- curves and `infir2 schedule`


def test_segments_of_a_full_run() -> None:
    segs = schedule_segments(TINY)
    assert [(s.phase, s.start, s.end) for s in segs] == [("warmup", 0, 30), ("stable", 30, 240), ("decay", 240, 300)]
    no_warmup = WSDSchedule(**{**TINY.__dict__, "warmup_iters": 0})
    assert [s.phase for s in schedule_segments(no_warmup)] == ["stable", "decay"]


def test_decay_curve_segments() -> None:
    curve = recipe_curve("tiny", decay_from=150)
    assert [(s.label, s.start, s.end) for s in curve.segments] == [
        ("warmup (stable run)", 0, 30), ("stable (stable run)", 30, 150), ("decay", 150, 210)]
    assert curve.lr_at(20) == TINY.lr_at(20)  # before k: the stable run
    assert curve.lr_at(150) == 1e-3 and curve.lr_at(210) == pytest.approx(1e-4)
    assert curve.phase_at(151) == "decay" and curve.tokens_at(210) == 210 * 16 * 1024
    inside_decay = recipe_curve("tiny", decay_from=270)
    assert [s.label for s in inside_decay.segments][-2:] == ["decay (stable run)", "decay"]


def test_schedule_text(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("schedule", "--recipe", "tiny", "--points", "7")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "0 -> 30" in out and "30 -> 240" in out and "240 -> 300" in out
    assert "16,384 tokens/iteration" in out
    assert "|" in out and "*" in out  # the text plot
    lines = out.splitlines()
    sample_rows = lines[lines.index(next(l for l in lines if l.strip().startswith("iteration"))) + 1:]
    assert [r.split()[0] for r in sample_rows] == ["0", "50", "100", "150", "200", "250", "300"]
    assert sample_rows[-1].split()[2] == "1.000e-04"


def test_schedule_decay_from_and_png(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    png = tmp_path / "plots" / "decay.png"
    result = cli("schedule", "--recipe", "7b", "--decay-from", "20000", "--png", str(png))
    assert result.exit_code == 0, result.output
    assert "--train-iters 25000 --lr-warmup-iters 0 --override-opt_param-scheduler" in result.stdout
    assert "20000 -> 25000" in result.stdout and "warmup (stable run)" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_schedule_refusals(cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("schedule", "--recipe", "7b-decay").exit_code == 2  # a decay recipe needs --decay-from
    assert cli("schedule", "--recipe", "7b-decay", "--decay-from", "35000").exit_code == 0
    result = cli("schedule", "--recipe", "tiny", "--decay-from", "300")
    assert result.exit_code == 2 and "train_iters (300)" in result.stderr
    assert cli("schedule", "--recipe", "tiny", "--decay-from", "0").exit_code == 2
    result = cli("schedule", "--recipe", "tiny", "--set", "schedule.warmup_iters=290")
    assert result.exit_code == 2 and "exceeds" in result.stderr
    assert cli("schedule", "--recipe", "tinyy").exit_code == 2


def test_curve_without_stable_part() -> None:
    curve = Curve("x", TINY.decay_from(100), 1024, decay_from=100)
    assert [(s.phase, s.start, s.end) for s in curve.segments] == [("decay", 100, 160)]
    assert curve.start == 100 and curve.end == 160
