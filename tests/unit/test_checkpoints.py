"""Resume detection on fake checkpoint trees, the launcher's load decisions, and `infir2 checkpoints`.

A complete torch_dist checkpoint here is iter_NNNNNNN/ with metadata.json, .metadata and a dummy
__0_0.distcp; a partial one lacks one of the two metadata files (Megatron writes them last).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from infir2_cpt import checkpoints as ck
from infir2_cpt.launch.execute import write_records
from infir2_cpt.launch.plan import LaunchPlan, LaunchRequest, plan_run
from infir2_cpt.recipe.schedule import WSDSchedule

# --------------------------------------------------------------------------- fake trees


def make_ckpt(ckpt_dir: Path, iteration: int | str, missing: tuple[str, ...] = (), shard_bytes: int = 1000) -> Path:
    """iter_<iteration>/ (or release/) with the torch_dist files, minus `missing`."""
    folder = ckpt_dir / (iteration if isinstance(iteration, str) else ck.iter_dir_name(iteration))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__0_0.distcp").write_bytes(b"\0" * shard_bytes)
    if "metadata.json" not in missing:
        (folder / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
    if ".metadata" not in missing:
        (folder / ".metadata").write_bytes(b"dcp-metadata")
    return folder


def set_tracker(ckpt_dir: Path, content: str | bytes) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / ck.TRACKER
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.fixture
def ckpts(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


# --------------------------------------------------------------------------- folders and tracker


def test_list_checkpoints_sorted_release_first_and_ignores_strays(ckpts: Path) -> None:
    make_ckpt(ckpts, 200)
    make_ckpt(ckpts, 100, missing=(".metadata",))
    make_ckpt(ckpts, "release")
    (ckpts / "iter_12").mkdir()  # not Megatron's 7-digit name
    (ckpts / "iter_0000300").write_text("a file, not a folder")
    (ckpts / "something_else").mkdir()
    folders = ck.list_checkpoints(ckpts)
    assert [f.path.name for f in folders] == ["release", "iter_0000100", "iter_0000200"]
    assert [f.iteration for f in folders] == [None, 100, 200]
    assert [f.complete for f in folders] == [True, False, True]
    assert folders[1].missing == [".metadata"]
    assert folders[0].release and not folders[2].release
    assert folders[2].size_bytes() == 1000 + len(b"dcp-metadata") + len(
        '{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')


def test_list_checkpoints_of_a_missing_directory(tmp_path: Path) -> None:
    assert ck.list_checkpoints(tmp_path / "nope") == []


@pytest.mark.parametrize("content, expected", [
    ("200\n", ck.TrackerState(iteration=200)),
    ("  35000  ", ck.TrackerState(iteration=35000)),
    ("release\n", ck.TrackerState(release=True)),
])
def test_read_tracker_good(ckpts: Path, content: str, expected: ck.TrackerState) -> None:
    set_tracker(ckpts, content)
    assert ck.read_tracker(ckpts) == expected


@pytest.mark.parametrize("content", ["", "20O", "-1", "iter_0000200", "1e3", "200 300"])
def test_read_tracker_garbled(ckpts: Path, content: str) -> None:
    set_tracker(ckpts, content)
    state = ck.read_tracker(ckpts)
    assert state.iteration is None and not state.release
    assert state.problem is not None and state.problem.startswith("garbled")


def test_read_tracker_missing_and_unreadable(ckpts: Path) -> None:
    assert ck.read_tracker(ckpts).problem == "missing"
    set_tracker(ckpts, b"\xff\xfe\x00garbage")
    assert ck.read_tracker(ckpts).problem.startswith("unreadable")


# --------------------------------------------------------------------------- find_resume_point


def test_nothing_at_all(ckpts: Path) -> None:
    point = ck.find_resume_point(ckpts)
    assert point.folder is None and point.ckpt_step is None and not point.repair_tracker
    assert "missing" in point.reason and "no complete checkpoint" in point.reason


def test_tracker_names_a_complete_checkpoint(ckpts: Path) -> None:
    make_ckpt(ckpts, 100)
    make_ckpt(ckpts, 200)
    set_tracker(ckpts, "200\n")
    point = ck.find_resume_point(ckpts)
    assert point.iteration == 200
    assert point.ckpt_step is None  # Megatron's own tracker is right: nothing to override
    assert not point.repair_tracker and point.partial == ()
    assert "names 200 and iter_0000200 is complete" in point.reason


def test_tracker_behind_a_newer_complete_checkpoint_is_trusted(ckpts: Path) -> None:
    """A crash between metadata.json and the tracker write: the tracker's checkpoint is still a good one."""
    make_ckpt(ckpts, 100)
    make_ckpt(ckpts, 200)
    set_tracker(ckpts, "100")
    point = ck.find_resume_point(ckpts)
    assert point.iteration == 100 and point.ckpt_step is None


@pytest.mark.parametrize("missing", [("metadata.json",), (".metadata",), ("metadata.json", ".metadata")])
def test_tracker_names_a_partial_checkpoint(ckpts: Path, missing: tuple[str, ...]) -> None:
    make_ckpt(ckpts, 100)
    make_ckpt(ckpts, 200, missing=missing)
    set_tracker(ckpts, "200")
    point = ck.find_resume_point(ckpts)
    assert point.iteration == 100
    assert point.ckpt_step == 100  # Megatron must be told, the tracker says 200
    assert not point.repair_tracker  # a readable tracker is overridden by --ckpt-step
    assert [f.iteration for f in point.partial] == [200]
    assert f"iter_0000200, which is incomplete (no {', '.join(missing)})" in point.reason
    assert "falling back to the newest complete checkpoint, iter_0000100" in point.reason


def test_tracker_names_a_missing_folder(ckpts: Path) -> None:
    make_ckpt(ckpts, 100)
    set_tracker(ckpts, "300")
    point = ck.find_resume_point(ckpts)
    assert point.iteration == 100 and point.ckpt_step == 100 and not point.repair_tracker
    assert "iter_0000300, which is missing" in point.reason


@pytest.mark.parametrize("content", ["", "2OO", b"\xff\xfe"])
def test_garbled_tracker_falls_back_and_asks_for_repair(ckpts: Path, content: str | bytes) -> None:
    make_ckpt(ckpts, 100)
    make_ckpt(ckpts, 200)
    make_ckpt(ckpts, 300, missing=("metadata.json",))
    set_tracker(ckpts, content)
    point = ck.find_resume_point(ckpts)
    assert point.iteration == 200 and point.ckpt_step == 200
    assert point.repair_tracker  # Megatron exits (status 0) on a garbled tracker before --ckpt-step is read
    assert [f.iteration for f in point.partial] == [300]


def test_missing_tracker_with_checkpoints(ckpts: Path) -> None:
    make_ckpt(ckpts, 100)
    make_ckpt(ckpts, 200)
    make_ckpt(ckpts, 300, missing=(".metadata",))
    point = ck.find_resume_point(ckpts)
    assert point.iteration == 200 and point.ckpt_step == 200
    assert not point.repair_tracker  # --ckpt-step works without a tracker
    assert point.reason.startswith(f"{ck.TRACKER} is missing")


@pytest.mark.parametrize("tracker", [None, "100", "garbage"])
def test_only_partial_checkpoints(ckpts: Path, tracker: str | None) -> None:
    make_ckpt(ckpts, 100, missing=("metadata.json",))
    if tracker is not None:
        set_tracker(ckpts, tracker)
    point = ck.find_resume_point(ckpts)
    assert point.folder is None and point.ckpt_step is None
    assert "only partial checkpoints here (iter_0000100)" in point.reason
    # a tracker that exists would make Megatron load (or exit on) it: the launcher must set it aside
    assert point.repair_tracker == (tracker is not None)


def test_iteration_zero_is_never_a_fallback(ckpts: Path) -> None:
    """Megatron ignores --ckpt-step 0, so a fallback to iter_0000000 could not be expressed."""
    make_ckpt(ckpts, 0)
    point = ck.find_resume_point(ckpts)
    assert point.folder is None


def test_release_style_base_checkpoint(tmp_path: Path) -> None:
    """A converted base model: tracker 'release' and a release/ folder (what --pretrained-checkpoint names)."""
    base = tmp_path / "qwen_base"
    make_ckpt(base, "release")
    set_tracker(base, "release\n")
    point = ck.find_resume_point(base)
    assert point.folder is not None and point.folder.release and point.iteration is None
    assert point.ckpt_step is None and not point.repair_tracker
    assert "names release and release is complete" in point.reason


def test_release_tracker_with_incomplete_release_folder_is_rewritten(ckpts: Path) -> None:
    """Megatron keeps the release flag even with --ckpt-step, so the tracker must be rewritten."""
    make_ckpt(ckpts, "release", missing=(".metadata",))
    make_ckpt(ckpts, 100)
    set_tracker(ckpts, "release")
    point = ck.find_resume_point(ckpts)
    assert point.iteration == 100 and point.ckpt_step == 100 and point.repair_tracker
    assert "release, which is incomplete (no .metadata)" in point.reason


def test_write_tracker_sets_the_old_one_aside(ckpts: Path) -> None:
    make_ckpt(ckpts, 200)
    set_tracker(ckpts, "2x0")
    backup = ck.write_tracker(ckpts, 200)
    assert backup is not None and backup.read_text() == "2x0" and ".garbled-" in backup.name
    assert ck.read_tracker(ckpts) == ck.TrackerState(iteration=200)
    assert ck.find_resume_point(ckpts).ckpt_step is None  # now Megatron's own tracker is right
    assert not list(ckpts.glob(f".{ck.TRACKER}.tmp-*"))


def test_write_tracker_none_only_sets_aside(ckpts: Path) -> None:
    set_tracker(ckpts, "100")
    backup = ck.write_tracker(ckpts, None)
    assert backup is not None and backup.read_text() == "100" and ".stale-" in backup.name
    assert not (ckpts / ck.TRACKER).exists()
    assert ck.write_tracker(ckpts, None) is None  # nothing left to set aside


# --------------------------------------------------------------------------- the launcher's decisions


@pytest.fixture
def launch_env(exp_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """INFIR2_EXP_ROOT=tmp and INFIR2_GPU_CHECK=0 (no GPU checks)."""
    monkeypatch.setenv("INFIR2_GPU_CHECK", "0")
    return exp_root


def plan_tiny(*sets: str, **kwargs: object) -> LaunchPlan:
    return plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=list(sets), **kwargs))  # type: ignore[arg-type]


def flag_value(args: list[str], flag: str) -> str | None:
    """The value after the last occurrence of flag, or None when absent."""
    idx = [i for i, a in enumerate(args) if a == flag]
    return args[idx[-1] + 1] if idx else None


def test_fresh_start_without_base_model(launch_env: Path) -> None:
    plan = plan_tiny()
    args = plan.megatron_args
    ckpt_dir = launch_env / "tiny" / "checkpoints"
    assert flag_value(args, "--load") == str(ckpt_dir)
    assert flag_value(args, "--save") == str(ckpt_dir)
    assert "--ckpt-step" not in args
    assert "--pretrained-checkpoint" not in args
    assert "--exit-on-missing-checkpoint" not in args  # nothing is expected: random init is the intent
    assert "--override-opt_param-scheduler" not in args
    assert flag_value(args, "--train-iters") == "300" and flag_value(args, "--lr-warmup-iters") == "30"
    assert plan.start.repair is None
    assert any("random initialization" in n for n in plan.notes)
    assert not (launch_env / "tiny").exists()  # planning touches nothing


def test_resume_from_the_tracker(launch_env: Path) -> None:
    ckpt_dir = launch_env / "tiny" / "checkpoints"
    make_ckpt(ckpt_dir, 100)
    make_ckpt(ckpt_dir, 200)
    set_tracker(ckpt_dir, "200")
    plan = plan_tiny()
    args = plan.megatron_args
    assert flag_value(args, "--load") == str(ckpt_dir)
    assert "--ckpt-step" not in args
    assert "--exit-on-missing-checkpoint" in args
    assert "--pretrained-checkpoint" not in args
    assert "--override-opt_param-scheduler" not in args  # same schedule: Megatron checks it is unchanged
    assert "--no-load-optim" not in args  # the seed's flag that restarted the warmup on every resume
    assert flag_value(args, "--train-iters") == "300"
    assert plan.start.repair is None
    assert any(f"resuming from {ckpt_dir / 'iter_0000200'}" in n for n in plan.notes)


def test_resume_with_ckpt_step_fallback(launch_env: Path) -> None:
    ckpt_dir = launch_env / "tiny" / "checkpoints"
    make_ckpt(ckpt_dir, 100)
    make_ckpt(ckpt_dir, 200, missing=("metadata.json",))  # killed while saving
    set_tracker(ckpt_dir, "200")
    plan = plan_tiny()
    args = plan.megatron_args
    assert flag_value(args, "--load") == str(ckpt_dir)
    assert flag_value(args, "--ckpt-step") == "100"
    assert "--exit-on-missing-checkpoint" in args
    assert plan.start.repair is None
    assert any("iter_0000200, which is incomplete" in n and "iter_0000100" in n for n in plan.notes)


def test_missing_tracker_resumes_with_ckpt_step(launch_env: Path) -> None:
    ckpt_dir = launch_env / "tiny" / "checkpoints"
    make_ckpt(ckpt_dir, 100)
    plan = plan_tiny()
    assert flag_value(plan.megatron_args, "--ckpt-step") == "100"
    assert "--exit-on-missing-checkpoint" in plan.megatron_args
    assert plan.start.repair is None


def test_garbled_tracker_plans_a_repair(launch_env: Path) -> None:
    ckpt_dir = launch_env / "tiny" / "checkpoints"
    make_ckpt(ckpt_dir, 100)
    make_ckpt(ckpt_dir, 200)
    set_tracker(ckpt_dir, "")  # truncated by a crash during Megatron's plain open('w')
    plan = plan_tiny()
    assert plan.start.repair == ck.TrackerRepair(ckpt_dir, 200)
    assert flag_value(plan.megatron_args, "--ckpt-step") == "200"
    assert "--exit-on-missing-checkpoint" in plan.megatron_args
    assert any("rewritten to 200" in n for n in plan.notes)
    assert (ckpt_dir / ck.TRACKER).read_text() == ""  # a plan does not repair; execute() does
    plan.start.repair.apply()  # what execute() does before exec
    assert ck.find_resume_point(ckpt_dir).ckpt_step is None


def test_pretrained_used_when_the_run_has_no_checkpoint(launch_env: Path, tmp_path: Path) -> None:
    base = tmp_path / "qwen_base"
    make_ckpt(base, "release")
    set_tracker(base, "release")
    plan = plan_tiny(f"checkpoint.pretrained={base}")
    args = plan.megatron_args
    assert flag_value(args, "--pretrained-checkpoint") == str(base)
    assert flag_value(args, "--load") == str(launch_env / "tiny" / "checkpoints")  # so later runs resume
    assert "--exit-on-missing-checkpoint" in args
    assert "--ckpt-step" not in args
    assert not plan.findings.machine  # the base checkpoint has its tracker
    assert any("starting from the base model" in n for n in plan.notes)


MASTERS_FLAGS = ["--no-load-optim", "--load-main-params-from-ckpt", "--no-stream-ckpt-dequant"]


@pytest.mark.parametrize("sets, wanted", [
    ([], True),  # FP8 parameters (tiny is FP8 blockwise with fp8_param_gather)
    (["checkpoint.masters_from_pretrained=false"], False),  # Megatron's default: masters from the FP8 params
    (["precision.fp8=null"], False),  # BF16: the parameters are the masters
    (["precision.fp8_param_gather=false"], False),  # BF16 parameters: masters cloned from them, exact
])
def test_masters_from_the_base_model_only_on_the_first_launch_with_fp8_parameters(
        launch_env: Path, tmp_path: Path, sets: list[str], wanted: bool) -> None:
    base = tmp_path / "qwen_base"
    make_ckpt(base, "release")
    set_tracker(base, "release")
    plan = plan_tiny(f"checkpoint.pretrained={base}", *sets)
    args = plan.megatron_args
    assert all((flag in args) == wanted for flag in MASTERS_FLAGS), args
    assert plan.load.masters_from_checkpoint == wanted
    assert any("master weights" in n for n in plan.notes) == (not sets or "masters_from_pretrained" in sets[0])
    # and never once the run has a checkpoint of its own: the masters then come from its optimizer state
    make_ckpt(launch_env / "tiny" / "checkpoints", 100)
    set_tracker(launch_env / "tiny" / "checkpoints", "100")
    resumed = plan_tiny(f"checkpoint.pretrained={base}", *sets).megatron_args
    assert not any(flag in resumed for flag in MASTERS_FLAGS)


def test_pretrained_used_when_the_run_has_only_partial_checkpoints(launch_env: Path, tmp_path: Path) -> None:
    base = tmp_path / "qwen_base"
    make_ckpt(base, "release")
    set_tracker(base, "release")
    ckpt_dir = launch_env / "tiny" / "checkpoints"
    make_ckpt(ckpt_dir, 100, missing=(".metadata",))
    plan = plan_tiny(f"checkpoint.pretrained={base}")
    assert flag_value(plan.megatron_args, "--pretrained-checkpoint") == str(base)
    assert "--exit-on-missing-checkpoint" in plan.megatron_args
    assert plan.start.repair is None  # no tracker: Megatron falls through to --pretrained-checkpoint


@pytest.mark.parametrize("tracker", ["100", "garbage"])
def test_stale_tracker_is_set_aside_for_a_fresh_start(launch_env: Path, tmp_path: Path, tracker: str) -> None:
    """With a tracker present Megatron ignores --pretrained-checkpoint and loads (or exits on) the tracker."""
    base = tmp_path / "qwen_base"
    make_ckpt(base, "release")
    set_tracker(base, "release")
    ckpt_dir = launch_env / "tiny" / "checkpoints"
    make_ckpt(ckpt_dir, 100, missing=("metadata.json",))
    set_tracker(ckpt_dir, tracker)
    plan = plan_tiny(f"checkpoint.pretrained={base}")
    assert plan.start.repair == ck.TrackerRepair(ckpt_dir, None)
    assert flag_value(plan.megatron_args, "--pretrained-checkpoint") == str(base)
    assert "--ckpt-step" not in plan.megatron_args
    assert any("set aside" in n for n in plan.notes)
    plan.start.repair.apply()
    assert not (ckpt_dir / ck.TRACKER).exists()


def test_pretrained_not_used_once_the_run_has_a_checkpoint(launch_env: Path, tmp_path: Path) -> None:
    base = tmp_path / "qwen_base"
    make_ckpt(base, "release")
    set_tracker(base, "release")
    ckpt_dir = launch_env / "tiny" / "checkpoints"
    make_ckpt(ckpt_dir, 100)
    make_ckpt(ckpt_dir, 200, missing=(".metadata",))
    set_tracker(ckpt_dir, "200")
    plan = plan_tiny(f"checkpoint.pretrained={base}")
    args = plan.megatron_args
    assert "--pretrained-checkpoint" not in args  # a restart never reloads the base model
    assert flag_value(args, "--ckpt-step") == "100"
    assert "--exit-on-missing-checkpoint" in args


def test_pretrained_without_tracker_is_a_machine_problem(launch_env: Path, tmp_path: Path) -> None:
    base = tmp_path / "not_a_checkpoint"
    base.mkdir()
    plan = plan_tiny(f"checkpoint.pretrained={base}")  # a dry run: warnings only
    assert any(p.key == "checkpoint.pretrained" for p in plan.findings.machine)


def test_train_dry_run_prints_the_decision(launch_env: Path, cli) -> None:  # type: ignore[no-untyped-def]
    ckpt_dir = launch_env / "tiny" / "checkpoints"
    make_ckpt(ckpt_dir, 100)
    make_ckpt(ckpt_dir, 200, missing=("metadata.json",))
    set_tracker(ckpt_dir, "200")
    result = cli("train", "--recipe", "tiny", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.stdout and "iter_0000100" in result.stdout
    assert "--ckpt-step 100" in result.stdout
    assert "--exit-on-missing-checkpoint" in result.stdout


# --------------------------------------------------------------------------- infir2 checkpoints


def record_launch(plan: LaunchPlan) -> None:
    """What launch.execute writes into exp/<name>/ before exec (without exec'ing)."""
    plan.paths.make_dirs()
    write_records(plan)


TINY = WSDSchedule(lr=1e-3, min_lr=1e-4, train_iters=300, warmup_iters=30, decay_iters=60, global_batch_size=16)


def table_rows(stdout: str) -> dict[str, list[str]]:
    """Rows of the checkpoint table by their first cell."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("iteration"))
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = [c for c in line.strip().split("  ") if c.strip()]
        rows[cells[0].strip()] = [c.strip() for c in cells]
    return rows


def test_checkpoints_table(launch_env: Path, cli) -> None:  # type: ignore[no-untyped-def]
    record_launch(plan_tiny())
    ckpt_dir = launch_env / "tiny" / "checkpoints"
    make_ckpt(ckpt_dir, 20, shard_bytes=2048)
    make_ckpt(ckpt_dir, 100)
    make_ckpt(ckpt_dir, 200)
    make_ckpt(ckpt_dir, 270, missing=("metadata.json",))
    set_tracker(ckpt_dir, "270")
    result = cli("checkpoints", "tiny")
    assert result.exit_code == 0, result.output
    out = result.stdout
    rows = table_rows(out)
    assert list(rows) == ["20", "100", "200", "270"]
    assert rows["20"][1:4] == ["warmup", f"{TINY.lr_at(20):.3e}", "328K"]  # 20 x 16 x 1024 = 327,680
    assert rows["100"][1:4] == ["stable", "1.000e-03", "1.64M"]
    assert rows["200"][1:4] == ["stable", "1.000e-03", "3.28M"]
    assert rows["270"][1:3] == ["decay", f"{TINY.lr_at(270):.3e}"]
    assert rows["270"][4] == "partial (no metadata.json)"
    assert rows["200"][4] == "complete" and rows["200"][-1] == "<- resume"
    assert "<- resume" not in rows["100"]
    assert rows["20"][5] == f"{(2048 + 12 + 63) / 1024:.1f} KiB"
    assert f"{ck.TRACKER}: 270" in out
    assert "a resume loads iter_0000200" in out and "--ckpt-step 200" in out
    assert "4 checkpoint folder(s): 3 complete, 1 partial" in out
    assert "16 sequences x 1024 tokens = 16,384 tokens/iteration" in out


def test_checkpoints_garbled_tracker_and_set_aside(launch_env: Path, cli) -> None:  # type: ignore[no-untyped-def]
    record_launch(plan_tiny())
    ckpt_dir = launch_env / "tiny" / "checkpoints"
    make_ckpt(ckpt_dir, 100)
    set_tracker(ckpt_dir, "1O0")
    result = cli("checkpoints", "tiny")
    assert result.exit_code == 0, result.output
    assert f"{ck.TRACKER}: garbled" in result.stdout
    assert f"the launcher would rewrite {ck.TRACKER} first" in result.stdout
    ck.write_tracker(ckpt_dir, 100)
    result = cli("checkpoints", "tiny")
    assert f"{ck.TRACKER}: 100" in result.stdout
    assert "trackers set aside earlier" in result.stdout


def test_checkpoints_without_records_needs_recipe(launch_env: Path, cli) -> None:  # type: ignore[no-untyped-def]
    ckpt_dir = launch_env / "tiny" / "checkpoints"
    make_ckpt(ckpt_dir, 100)
    set_tracker(ckpt_dir, "100")
    result = cli("checkpoints", "tiny")
    assert result.exit_code == 0, result.output
    assert table_rows(result.stdout)["100"][1:4] == ["?", "?", "?"]
    assert "pass --recipe" in result.stdout
    result = cli("checkpoints", "tiny", "--recipe", "tiny")
    assert result.exit_code == 0, result.output
    assert table_rows(result.stdout)["100"][1:4] == ["stable", "1.000e-03", "1.64M"]
    result = cli("checkpoints", "tiny", "--recipe", "tiny", "--set", "parallel.global_batch_size=32")
    assert table_rows(result.stdout)["100"][3] == "3.28M"


def test_checkpoints_release_and_empty(launch_env: Path, cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = tmp_path / "base_exp"
    make_ckpt(base / "checkpoints", "release")
    set_tracker(base / "checkpoints", "release")
    result = cli("checkpoints", str(base))  # a path to an experiment folder
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout)
    assert rows["release"][1] == "base" and rows["release"][-1] == "<- resume"
    (launch_env / "empty").mkdir(parents=True)
    result = cli("checkpoints", "empty")
    assert result.exit_code == 0, result.output
    assert "no checkpoints folder yet" in result.stdout


def test_checkpoints_unknown_experiment_exits_2(launch_env: Path, cli) -> None:  # type: ignore[no-untyped-def]
    (launch_env / "tiny").mkdir(parents=True)
    result = cli("checkpoints", "tinny")
    assert result.exit_code == 2
    assert "no experiment folder" in result.stderr and "tiny" in result.stderr
    result = cli("checkpoints", "tiny", "--decay-from", "100")  # --decay-from only with --recipe
    assert result.exit_code == 2
    result = cli("checkpoints", "tiny", "--recipe", "no-such-recipe")
    assert result.exit_code == 2 and "unknown recipe" in result.stderr


def test_first_launch_from_a_base_model_says_how_fp8_master_weights_start(exp_root, monkeypatch, tmp_path):
    from infir2_cpt.launch.plan import LaunchRequest, plan_run

    monkeypatch.setenv("INFIR2_GPU_CHECK", "0")
    base = tmp_path / "base"
    (base / "release").mkdir(parents=True)
    (base / "latest_checkpointed_iteration.txt").write_text("release")
    for name in ("metadata.json", ".metadata"):
        (base / "release" / name).write_text("{}")
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=[f"checkpoint.pretrained={base}"]))
    assert plan.load.pretrained == base
    assert any("master weights" in note for note in plan.notes)
    bf16 = plan_run(LaunchRequest(recipe="tiny", dry_run=True,
                                  sets=[f"checkpoint.pretrained={base}", "precision.fp8=null"]))
    assert not any("master weights" in note for note in bf16.notes)
