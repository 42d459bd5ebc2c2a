"""`infir2 decay --load ...`: the arguments for several iterations, the refusals, and the decay's own resume.

Fake stable checkpoints (iter_N/ with metadata.json, .metadata and a dummy shard) live under
INFIR2_EXP_ROOT=tmp; INFIR2_GPU_CHECK=0 so no GPU is looked for. The tiny recipe: train_iters 300,
decay 60, GBS 16, seq 1024; its decay experiment is tiny_decay.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from infir2_cpt import checkpoints as ck
from infir2_cpt.launch import execute
from infir2_cpt.launch.execute import write_records
from infir2_cpt.layout import DecaySource
from infir2_cpt.errors import LaunchError
from infir2_cpt.launch.megatron_args import master_weights
from infir2_cpt.launch.plan import LaunchPlan, LaunchRequest, plan_run


def make_ckpt(ckpt_dir: Path, iteration: int, missing: tuple[str, ...] = ()) -> Path:
    folder = ckpt_dir / ck.iter_dir_name(iteration)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__0_0.distcp").write_bytes(b"\0" * 64)
    for name in ("metadata.json", ".metadata"):
        if name not in missing:
            (folder / name).write_text("{}")
    return folder


def set_tracker(ckpt_dir: Path, text: str) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / ck.TRACKER).write_text(text)


def flag_value(args: list[str], flag: str) -> str | None:
    idx = [i for i, a in enumerate(args) if a == flag]
    return args[idx[-1] + 1] if idx else None


@pytest.fixture
def env(exp_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("INFIR2_GPU_CHECK", "0")
    return exp_root


@pytest.fixture
def stable(env: Path) -> Path:
    """The tiny stable run's checkpoints: complete 10, 100, 150, 200; partial 250; tracker 250."""
    ckpt_dir = env / "tiny" / "checkpoints"
    for it in (10, 100, 150, 200):
        make_ckpt(ckpt_dir, it)
    make_ckpt(ckpt_dir, 250, missing=("metadata.json",))
    set_tracker(ckpt_dir, "250")
    return ckpt_dir


@pytest.fixture
def no_exec(monkeypatch: pytest.MonkeyPatch) -> list[LaunchPlan]:
    """A launch that gets past planning records its plan here instead of exec'ing torchrun."""
    executed: list[LaunchPlan] = []
    monkeypatch.setattr(execute, "execute", executed.append)
    return executed


def plan_decay(load: str, *sets: str, exp: str | None = None, recipe: str = "tiny") -> LaunchPlan:
    return plan_run(LaunchRequest(recipe=recipe, dry_run=True, decay_load=load, sets=list(sets), exp=exp))


def record_launch(plan: LaunchPlan) -> None:
    """The files launch.execute writes before exec."""
    plan.paths.make_dirs()
    write_records(plan)


# --------------------------------------------------------------------------- naming a checkpoint


def test_parse_load_spec(tmp_path: Path) -> None:
    default = tmp_path / "exp" / "tiny" / "checkpoints"
    for spec, iteration in (("150", 150), ("0000150", 150), ("iter_0000150", 150), ("iter_12345678", 12345678)):
        target, problem = ck.parse_load_spec(spec, default)
        assert problem is None and target == ck.LoadTarget(default, iteration), spec
    folder = tmp_path / "elsewhere" / "checkpoints" / "iter_0000120"
    target, problem = ck.parse_load_spec(str(folder) + "/", default)
    assert problem is None and target == ck.LoadTarget(folder.parent, 120)
    for bad in ("iter_150", str(tmp_path / "exp" / "tiny" / "checkpoints"), "latest", "0", "iter_0000000"):
        target, problem = ck.parse_load_spec(bad, default)
        assert target is None and problem, bad


def test_check_load_target(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    make_ckpt(ckpt_dir, 100)
    make_ckpt(ckpt_dir, 200, missing=(".metadata",))
    assert ck.check_load_target(ck.LoadTarget(ckpt_dir, 100)) is None
    assert "partial checkpoint (missing .metadata)" in ck.check_load_target(ck.LoadTarget(ckpt_dir, 200))
    problem = ck.check_load_target(ck.LoadTarget(ckpt_dir, 300))
    assert "does not exist" in problem and "iter_0000100" in problem
    assert "holds no complete checkpoint" in ck.check_load_target(ck.LoadTarget(tmp_path / "empty", 5))


# --------------------------------------------------------------------------- the decay arguments


@pytest.mark.parametrize("spec, k", [("10", 10), ("150", 150), ("iter_0000200", 200), ("ABS", 100)])
def test_decay_arguments(stable: Path, env: Path, spec: str, k: int) -> None:
    if spec == "ABS":
        spec = str(stable / ck.iter_dir_name(k))
    plan = plan_decay(spec)
    args = plan.megatron_args
    assert plan.recipe.name == "tiny_decay" and plan.recipe.phase == "decay"
    assert flag_value(args, "--load") == str(stable)  # the parent: an iter_* folder as --load trains from scratch
    assert not any(ck.parse_iteration_dir(Path(a).name) is not None for a in args)  # no iter_* folder anywhere
    assert flag_value(args, "--ckpt-step") == str(k)
    assert flag_value(args, "--train-iters") == str(k + 60)
    assert flag_value(args, "--lr-warmup-iters") == "0"
    assert flag_value(args, "--lr-wsd-decay-iters") == "60"
    assert flag_value(args, "--lr-decay-style") == "WSD" and flag_value(args, "--lr-wsd-decay-style") == "cosine"
    assert flag_value(args, "--lr") == "0.001" and flag_value(args, "--min-lr") == "0.0001"
    assert "--override-opt_param-scheduler" in args
    assert "--exit-on-missing-checkpoint" in args
    assert "--no-load-optim" not in args and "--finetune" not in args  # optimizer state and iteration continue
    assert "--pretrained-checkpoint" not in args
    assert flag_value(args, "--save") == str(env / "tiny_decay" / "checkpoints")
    assert plan.start.decay_source == DecaySource(stable, k, k + 60)
    assert plan.schedule.train_iters == k + 60 and plan.schedule.warmup_iters == 0
    assert plan.start.repair is None
    assert not plan.findings.machine, plan.findings.machine
    assert any(f"ending at {k + 60}" in n for n in plan.notes)


def test_decay_from_another_experiments_folder(env: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere" / "checkpoints"
    make_ckpt(other, 120)
    plan = plan_decay(str(other / "iter_0000120"), exp="tiny_decay_b")
    args = plan.megatron_args
    assert flag_value(args, "--load") == str(other) and flag_value(args, "--ckpt-step") == "120"
    assert flag_value(args, "--save") == str(env / "tiny_decay_b" / "checkpoints")


def test_decay_of_the_7b_recipe(env: Path) -> None:
    stable_dir = env / "InfiR2_CPT_FP8_7B" / "checkpoints"
    make_ckpt(stable_dir, 35000)
    plan = plan_decay("iter_0035000", recipe="7b")
    args = plan.megatron_args
    assert plan.paths.name == "InfiR2_CPT_FP8_7B_decay"
    assert flag_value(args, "--load") == str(stable_dir)
    assert flag_value(args, "--ckpt-step") == "35000" and flag_value(args, "--train-iters") == "40000"
    assert flag_value(args, "--lr-warmup-iters") == "0"


def test_decay_inside_the_stable_decay_phase_is_noted(stable: Path) -> None:
    make_ckpt(stable, 270)
    plan = plan_decay("270")
    assert flag_value(plan.megatron_args, "--train-iters") == "330"
    assert any("inside the stable recipe's own decay phase" in n for n in plan.notes)


# --------------------------------------------------------------------------- refusals


def test_refuses_a_partial_checkpoint(stable: Path, cli, no_exec) -> None:  # type: ignore[no-untyped-def]
    result = cli("decay", "--recipe", "tiny", "--load", "iter_0000250")
    assert result.exit_code == 2, result.output
    assert "partial checkpoint (missing metadata.json)" in result.stderr
    assert no_exec == []
    dry = cli("decay", "--recipe", "tiny", "--load", "iter_0000250", "--dry-run")  # a login node: warning only
    assert dry.exit_code == 0 and "warning:" in dry.stderr and "partial checkpoint" in dry.stderr


def test_refuses_a_missing_checkpoint(stable: Path, cli, no_exec) -> None:  # type: ignore[no-untyped-def]
    result = cli("decay", "--recipe", "tiny", "--load", "175")
    assert result.exit_code == 2
    assert "iter_0000175 does not exist" in result.stderr
    assert "iter_0000150" in result.stderr  # what is there instead
    assert no_exec == []


@pytest.mark.parametrize("spec", ["300", "iter_0000310"])
def test_refuses_at_or_past_train_iters(stable: Path, cli, spec: str) -> None:  # type: ignore[no-untyped-def]
    make_ckpt(stable, 300)
    make_ckpt(stable, 310)
    result = cli("decay", "--recipe", "tiny", "--load", spec, "--dry-run")
    assert result.exit_code == 2
    assert "at or past the stable recipe's train_iters (300)" in result.stderr


@pytest.mark.parametrize("spec", ["iter_150", "exp/tiny/checkpoints", "0"])
def test_refuses_what_is_not_an_iteration(stable: Path, cli, spec: str) -> None:  # type: ignore[no-untyped-def]
    result = cli("decay", "--recipe", "tiny", "--load", spec, "--dry-run")
    assert result.exit_code == 2 and "--load" in result.stderr


def test_refuses_writing_into_the_stable_run(stable: Path, cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("decay", "--recipe", "tiny", "--load", "150", "--exp", "tiny", "--dry-run")
    assert result.exit_code == 2
    assert "would write into the stable run's checkpoint directory" in result.stderr
    other = tmp_path / "elsewhere" / "checkpoints"
    make_ckpt(other, 120)
    result = cli("decay", "--recipe", "tiny", "--load", str(other / "iter_0000120"), "--exp", "tiny", "--dry-run")
    assert result.exit_code == 2  # loads from elsewhere, but still writes into the stable experiment


def test_refuses_a_garbled_stable_tracker(stable: Path, cli, no_exec) -> None:  # type: ignore[no-untyped-def]
    """Megatron reads --load's tracker before --ckpt-step and exits (status 0) on a garbled one."""
    set_tracker(stable, "25O")
    result = cli("decay", "--recipe", "tiny", "--load", "150")
    assert result.exit_code == 2 and "garbled" in result.stderr and no_exec == []
    set_tracker(stable, "250")
    assert cli("decay", "--recipe", "tiny", "--load", "150").exit_code == 0
    assert len(no_exec) == 1 and flag_value(no_exec[0].megatron_args, "--ckpt-step") == "150"


# --------------------------------------------------------------------------- the decay's own resume


def test_decay_resumes_from_its_own_checkpoint(stable: Path, env: Path) -> None:
    first = plan_decay("150")
    record_launch(first)
    decay_dir = env / "tiny_decay" / "checkpoints"
    make_ckpt(decay_dir, 200)
    set_tracker(decay_dir, "200")
    plan = plan_decay("150")
    args = plan.megatron_args
    assert flag_value(args, "--load") == str(decay_dir)  # its own progress, not the stable checkpoint again
    assert "--ckpt-step" not in args  # the decay dir's tracker is right
    assert flag_value(args, "--train-iters") == "210"  # still k + D
    assert flag_value(args, "--lr-warmup-iters") == "0"
    assert "--override-opt_param-scheduler" in args and "--exit-on-missing-checkpoint" in args
    assert flag_value(args, "--save") == str(decay_dir)
    assert any("resuming this decay run from its own" in n for n in plan.notes)


def test_decay_resume_with_fallback_and_repair(stable: Path, env: Path) -> None:
    record_launch(plan_decay("150"))
    decay_dir = env / "tiny_decay" / "checkpoints"
    make_ckpt(decay_dir, 160)
    make_ckpt(decay_dir, 170)
    make_ckpt(decay_dir, 180, missing=(".metadata",))
    set_tracker(decay_dir, "")
    plan = plan_decay("iter_0000150")
    assert flag_value(plan.megatron_args, "--load") == str(decay_dir)
    assert flag_value(plan.megatron_args, "--ckpt-step") == "170"
    assert flag_value(plan.megatron_args, "--train-iters") == "210"
    assert plan.start.repair == ck.TrackerRepair(decay_dir, 170)


def test_decay_with_only_partial_own_checkpoints_starts_over(stable: Path, env: Path) -> None:
    record_launch(plan_decay("150"))
    decay_dir = env / "tiny_decay" / "checkpoints"
    make_ckpt(decay_dir, 200, missing=("metadata.json",))
    plan = plan_decay("150")
    assert flag_value(plan.megatron_args, "--load") == str(stable)
    assert flag_value(plan.megatron_args, "--ckpt-step") == "150"


def test_decay_resume_needs_the_stable_checkpoint_no_more(stable: Path, env: Path, cli, no_exec) -> None:  # type: ignore[no-untyped-def]
    record_launch(plan_decay("150"))
    decay_dir = env / "tiny_decay" / "checkpoints"
    make_ckpt(decay_dir, 200)
    set_tracker(decay_dir, "200")
    for f in (stable / "iter_0000150").iterdir():
        f.unlink()
    (stable / "iter_0000150").rmdir()
    result = cli("decay", "--recipe", "tiny", "--load", "iter_0000150")
    assert result.exit_code == 0, result.output
    assert flag_value(no_exec[0].megatron_args, "--load") == str(decay_dir)


def test_same_source_spelled_differently_resumes(stable: Path, env: Path) -> None:
    record_launch(plan_decay("150"))
    make_ckpt(env / "tiny_decay" / "checkpoints", 200)
    spelled = env / "tiny" / ".." / "tiny" / "checkpoints" / "iter_0000150"
    plan = plan_decay(str(spelled))
    assert flag_value(plan.megatron_args, "--load") == str(env / "tiny_decay" / "checkpoints")


def test_second_decay_into_the_same_experiment_is_refused(stable: Path, env: Path, cli) -> None:  # type: ignore[no-untyped-def]
    record_launch(plan_decay("150"))
    make_ckpt(env / "tiny_decay" / "checkpoints", 200)
    result = cli("decay", "--recipe", "tiny", "--load", "iter_0000100", "--dry-run")
    assert result.exit_code == 2
    assert "is a decay from" in result.stderr and "iter_0000150" in result.stderr and "--exp" in result.stderr
    with pytest.raises(LaunchError):
        plan_decay("100")
    ok = plan_decay("100", exp="tiny_decay_from_100")  # its own experiment is fine
    assert flag_value(ok.megatron_args, "--ckpt-step") == "100"


def test_second_decay_refused_even_before_a_checkpoint(stable: Path, env: Path) -> None:
    record_launch(plan_decay("150"))  # launched, killed before its first save
    with pytest.raises(LaunchError) as info:
        plan_decay("200")
    assert any(p.key == "--load" for p in info.value.problems)


def test_stable_exp_names_the_stable_run_trained_under_another_exp(env: Path, cli) -> None:
    """`infir2 train --recipe tiny --exp myrun` then `infir2 decay --recipe tiny --stable-exp myrun --load iter_100`."""
    stable_dir = env / "myrun" / "checkpoints"
    make_ckpt(stable_dir, 100)
    set_tracker(stable_dir, "100")
    result = cli("decay", "--recipe", "tiny", "--load", "iter_0000100", "--stable-exp", "myrun",
                 "--exp", "myrun_decay", "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"--load {stable_dir}" in result.output and "--ckpt-step 100" in result.output
    assert f"--save {env / 'myrun_decay' / 'checkpoints'}" in result.output
    assert "--train-iters 160" in result.output
    missing = cli("decay", "--recipe", "tiny", "--load", "iter_0000100", "--dry-run")  # looks in exp/tiny
    assert "warning: --load" in missing.output and "does not exist" in missing.output


# --------------------------------------------------------------------------- the form of the master weights


def test_checkpoints_are_not_resumed_or_decayed_with_master_weights_of_another_form(stable: Path, env: Path) -> None:
    """Megatron would cast FP32 masters into 16-bit remainders (or back) while loading, without an error."""
    record_launch(plan_run(LaunchRequest(recipe="tiny", dry_run=True)))  # the run as launched: FP8 parameters
    with pytest.raises(LaunchError) as err:  # resumed in BF16
        plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=["precision.fp8=null"]))
    text = str(err.value)
    assert "precision.fp8: the checkpoints in" in text and "were written with precision.fp8=\"blockwise\": they keep " \
        "the master weights as FP32 copies of the FP8 weights, the BF16 parameters with 16-bit remainders; with " \
        "precision.fp8=null they would be read as the BF16 parameters with 16-bit remainders" in text
    with pytest.raises(LaunchError, match="precision.fp8_bf16_param_remainders: the checkpoints in"):
        plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=["precision.fp8_bf16_param_remainders=false"]))
    plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=["precision.fp8_format=hybrid"]))  # same form: resumes
    with pytest.raises(LaunchError, match="precision.fp8: the checkpoints in .*/tiny/checkpoints were written"):
        plan_decay("200", "precision.fp8=null")  # a decay's first launch reads the stable run's optimizer state
    decay = plan_decay("200")
    record_launch(decay)
    make_ckpt(decay.paths.checkpoints, 220)
    set_tracker(decay.paths.checkpoints, "220")
    with pytest.raises(LaunchError, match="precision.fp8: the checkpoints in .*/tiny_decay/checkpoints were written"):
        plan_decay("200", "precision.fp8=null")  # and its resume its own


@pytest.mark.parametrize("sets, form", [
    ((), "FP32 copies of the FP8 weights, the BF16 parameters with 16-bit remainders"),  # the recipes' remainders
    (("precision.fp8_bf16_param_remainders=false",), "FP32 copies of all parameters"),  # blockwise FP8 parameters
    (("precision.fp8=null",), "the BF16 parameters with 16-bit remainders"),
    (("precision.fp8_param_gather=false",), "FP32 copies of all parameters"),  # remainders do not apply
    (("precision.fp8=tensorwise",), "FP32 copies of all parameters"),
    (("precision.fp8=delayed", "precision.fp8_param_gather=false"), "the BF16 parameters with 16-bit remainders"),
    (("precision.fp8=delayed",), "FP32 copies of the FP8 weights, the BF16 parameters with 16-bit remainders"),
    (("precision.fp8=null", "precision.precision_aware_optimizer=false"), "FP32 copies of all parameters"),
])
def test_the_form_of_the_master_weights_follows_megatrons_precision_aware_rule(env: Path, sets: tuple[str, ...],
                                                                                form: str) -> None:
    assert master_weights(plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=list(sets))).recipe) == form
