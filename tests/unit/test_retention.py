"""Checkpoint retention (retention.py): the policy's rules, what is never removed whatever the policy says, the
crash-safe removal, the pruning thread of the launcher, and the whole-run disk forecast of preflight."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from infir2_cpt import checkpoints as ck
from infir2_cpt import retention
from infir2_cpt.launch import preflight
from infir2_cpt.launch.plan import LaunchRequest, plan_run
from infir2_cpt.layout import DecaySource, ExperimentPaths
from infir2_cpt.recipe.load import load_recipe
from infir2_cpt.recipe.validate import check_config
from infir2_cpt.retention import RetentionPolicy, forecast, prune, save_iterations
from infir2_cpt.errors import LaunchError


def complete(ckpt_dir: Path, iteration: int, tracker: bool = True, payload: int = 10) -> Path:
    folder = ckpt_dir / ck.iter_dir_name(iteration)
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"x" * payload)
    for name in ck.REQUIRED_FILES:
        (folder / name).write_text("{}")
    if tracker:
        (ckpt_dir / ck.TRACKER).write_text(f"{iteration}\n")
    return folder


def partial(ckpt_dir: Path, iteration: int) -> Path:
    """A save in progress: shards written, metadata not yet."""
    folder = ckpt_dir / ck.iter_dir_name(iteration)
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"x")
    return folder


def names(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())


@pytest.fixture
def paths(tmp_path: Path) -> ExperimentPaths:
    paths = ExperimentPaths.for_name("run", tmp_path / "exp")
    paths.checkpoints.mkdir(parents=True)
    return paths


POLICY = RetentionPolicy(keep_last=2, keep_every=400)


# --------------------------------------------------------------------------- the policy


def test_keep_last_and_every_multiple() -> None:
    kept = retention.kept_by_policy([200, 400, 600, 800, 1000, 1200], POLICY)
    assert sorted(kept) == [400, 800, 1000, 1200]
    assert kept[1000] == ["last 2"]
    assert kept[1200] == ["newest complete", "last 2", "multiple of 400"]
    assert kept[400] == ["multiple of 400"]
    assert kept[800] == ["multiple of 400"]  # not among the last two, kept as a branch point
    assert sorted(retention.kept_by_policy([1, 2, 3], RetentionPolicy())) == [1, 2, 3]  # no policy: everything


def test_prune_removes_what_the_policy_does_not_keep_and_logs_it(paths: ExperimentPaths) -> None:
    for it in (200, 400, 600, 800, 1000, 1200):
        complete(paths.checkpoints, it)
    result = prune(paths, POLICY)
    assert names(paths.checkpoints) == ["iter_0000400", "iter_0000800", "iter_0001000", "iter_0001200"]
    assert [name for name, _ in result.removed] == ["iter_0000200", "iter_0000600"]
    assert all(size > 0 for _, size in result.removed)
    log = (paths.logs / retention.LOG_NAME).read_text()
    assert "removing iter_0000200" in log and "removed iter_0000200" in log
    assert "not among the last 2, not a multiple of 400" in log
    assert "iter_0000400" not in log
    assert ck.find_resume_point(paths.checkpoints).iteration == 1200


def test_dry_run_removes_nothing(paths: ExperimentPaths) -> None:
    for it in (200, 400, 600):
        complete(paths.checkpoints, it)
    result = prune(paths, RetentionPolicy(keep_last=1), dry_run=True)
    assert names(paths.checkpoints) == ["iter_0000200", "iter_0000400", "iter_0000600"]
    assert [v.folder.iteration for v in result.verdicts if not v.keep] == [200, 400]
    assert not (paths.logs / retention.LOG_NAME).exists()


def test_no_policy_removes_nothing(paths: ExperimentPaths) -> None:
    for it in (200, 400, 600):
        complete(paths.checkpoints, it)
    result = prune(paths, RetentionPolicy())
    assert not result.removed and len(names(paths.checkpoints)) == 3


# --------------------------------------------------------------------------- never removed


def test_a_save_in_progress_is_never_touched(paths: ExperimentPaths) -> None:
    """Partial folders stay, older or newer than the newest complete one; the newest complete stays even when a
    newer save is being written."""
    partial(paths.checkpoints, 100)  # an old save cut short
    for it in (200, 300, 400):
        complete(paths.checkpoints, it)
    partial(paths.checkpoints, 500)  # being written now
    result = prune(paths, RetentionPolicy(keep_last=1))
    assert names(paths.checkpoints) == ["iter_0000100", "iter_0000400", "iter_0000500"]
    verdict = {v.folder.iteration: v for v in result.verdicts}
    assert verdict[500].keep and "a save may still be writing it" in verdict[500].text
    assert verdict[400].keep and "newest complete" in verdict[400].text


def test_a_folder_that_completes_is_only_then_a_candidate(paths: ExperimentPaths) -> None:
    for it in (100, 200):
        complete(paths.checkpoints, it)
    writing = partial(paths.checkpoints, 300)
    prune(paths, RetentionPolicy(keep_last=1))
    assert names(paths.checkpoints) == ["iter_0000200", "iter_0000300"]
    for name in ck.REQUIRED_FILES:  # the save finishes
        (writing / name).write_text("{}")
    (paths.checkpoints / ck.TRACKER).write_text("300\n")
    prune(paths, RetentionPolicy(keep_last=1))
    assert names(paths.checkpoints) == ["iter_0000300"]


def test_the_checkpoint_the_tracker_names_stays(paths: ExperimentPaths) -> None:
    for it in (100, 200, 300):
        complete(paths.checkpoints, it, tracker=False)
    (paths.checkpoints / ck.TRACKER).write_text("100\n")  # e.g. written back by hand to redo from 100
    result = prune(paths, RetentionPolicy(keep_last=1))
    assert names(paths.checkpoints) == ["iter_0000100", "iter_0000300"]
    assert any("named by latest_checkpointed_iteration.txt" in v.text for v in result.verdicts)


def test_a_decay_source_stays(paths: ExperimentPaths) -> None:
    for it in (200, 400, 600, 800):
        complete(paths.checkpoints, it)
    decay = paths.root.parent / "run-decay"
    decay.mkdir()
    DecaySource(paths.checkpoints, 200, 400).write(decay)
    result = prune(paths, RetentionPolicy(keep_last=1))
    assert names(paths.checkpoints) == ["iter_0000200", "iter_0000800"]
    assert "decay experiment run-decay started from it" in next(v.text for v in result.verdicts
                                                               if v.folder.iteration == 200)


def test_a_decay_source_of_another_run_does_not_protect(paths: ExperimentPaths) -> None:
    for it in (200, 400):
        complete(paths.checkpoints, it)
    decay = paths.root.parent / "other-decay"
    decay.mkdir()
    DecaySource(paths.root.parent / "other" / "checkpoints", 200, 400).write(decay)
    prune(paths, RetentionPolicy(keep_last=1))
    assert names(paths.checkpoints) == ["iter_0000400"]


def test_an_unreadable_decay_source_blocks_every_removal(paths: ExperimentPaths) -> None:
    for it in (200, 400, 600):
        complete(paths.checkpoints, it)
    broken = paths.root.parent / "run-decay"
    broken.mkdir()
    (broken / "decay_source.json").write_text("{not json")
    result = prune(paths, RetentionPolicy(keep_last=1))
    assert len(names(paths.checkpoints)) == 3 and not result.removed
    assert result.blockers and "run-decay/decay_source.json cannot be read" in result.blockers[0]


def test_a_checkpoint_being_evaluated_stays_while_its_holder_lives(paths: ExperimentPaths) -> None:
    for it in (200, 400, 600):
        complete(paths.checkpoints, it)
    hold = retention.write_hold(paths.root, "test", [200])  # held by this (live) process
    prune(paths, RetentionPolicy(keep_last=1))
    assert names(paths.checkpoints) == ["iter_0000200", "iter_0000600"]
    record = json.loads(hold.read_text())
    record["pid"] = 2**22 + 12345  # a holder that is gone (a killed evaluation)
    hold.write_text(json.dumps(record))
    prune(paths, RetentionPolicy(keep_last=1))
    assert names(paths.checkpoints) == ["iter_0000600"]


def test_a_hold_from_another_host_counts_until_it_is_old(paths: ExperimentPaths) -> None:
    for it in (200, 400):
        complete(paths.checkpoints, it)
    hold = paths.root / "eval" / ".hold-elsewhere.json"
    hold.parent.mkdir(parents=True)
    hold.write_text(json.dumps({"host": socket.gethostname() + "-other", "pid": 1, "time": time.time(),
                                "iterations": [200]}))
    prune(paths, RetentionPolicy(keep_last=1))
    assert names(paths.checkpoints) == ["iter_0000200", "iter_0000400"]
    hold.write_text(json.dumps({"host": socket.gethostname() + "-other", "pid": 1,
                                "time": time.time() - retention.FOREIGN_HOLD_SECONDS - 1, "iterations": [200]}))
    prune(paths, RetentionPolicy(keep_last=1))
    assert names(paths.checkpoints) == ["iter_0000400"]


def test_release_and_foreign_folders_are_left_alone(paths: ExperimentPaths) -> None:
    (paths.checkpoints / "release").mkdir()
    (paths.checkpoints / "notes").mkdir()
    for it in (100, 200):
        complete(paths.checkpoints, it)
    prune(paths, RetentionPolicy(keep_last=1))
    assert names(paths.checkpoints) == ["iter_0000200", "notes", "release"]


# --------------------------------------------------------------------------- crash safety


def test_an_interrupted_removal_is_invisible_and_finished_by_the_next_prune(paths: ExperimentPaths,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for it in (100, 200, 300):
        complete(paths.checkpoints, it)
    monkeypatch.setattr(retention.shutil, "rmtree", lambda *args, **kwargs: None)  # "crash" after the rename
    prune(paths, RetentionPolicy(keep_last=1))
    left = names(paths.checkpoints)
    assert left == [".infir2-removing-iter_0000100", ".infir2-removing-iter_0000200", "iter_0000300"]
    assert [f.iteration for f in ck.list_checkpoints(paths.checkpoints)] == [300]  # never loaded again
    assert ck.find_resume_point(paths.checkpoints).iteration == 300
    monkeypatch.undo()
    prune(paths, RetentionPolicy(keep_last=1))
    assert names(paths.checkpoints) == ["iter_0000300"]
    assert "finished removing .infir2-removing-iter_0000100" in (paths.logs / retention.LOG_NAME).read_text()


def test_a_folder_removed_meanwhile_is_reported_not_fatal(paths: ExperimentPaths,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for it in (100, 200):
        complete(paths.checkpoints, it)

    def gone(src: Path, dst: Path) -> None:
        raise FileNotFoundError(src)

    monkeypatch.setattr(retention.os, "rename", gone)
    result = prune(paths, RetentionPolicy(keep_last=1))
    assert not result.removed and "removed meanwhile" in result.notes[0]


# --------------------------------------------------------------------------- the launcher's thread


def test_the_watcher_prunes_after_each_new_checkpoint_only_while_holding_the_lock(paths: ExperimentPaths) -> None:
    complete(paths.checkpoints, 100)
    holding = {"lock": True}
    stop = threading.Event()
    thread = threading.Thread(target=retention.watch, args=(paths, RetentionPolicy(keep_last=1), stop, 0.05,
                                                             lambda: holding["lock"]))
    thread.start()
    try:
        time.sleep(0.3)
        assert names(paths.checkpoints) == ["iter_0000100"]  # nothing new yet: nothing pruned
        complete(paths.checkpoints, 200)
        deadline = time.monotonic() + 10
        while names(paths.checkpoints) != ["iter_0000200"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert names(paths.checkpoints) == ["iter_0000200"]
        holding["lock"] = False  # another host's launcher (or none) holds it now
        complete(paths.checkpoints, 300)
        time.sleep(0.5)
        assert names(paths.checkpoints) == ["iter_0000200", "iter_0000300"]
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_policy_travels_in_the_environment() -> None:
    policy = RetentionPolicy(3, 5000)
    assert RetentionPolicy.from_env_value(policy.env_value()) == policy
    assert RetentionPolicy.from_env_value(RetentionPolicy(2, None).env_value()) == RetentionPolicy(2, None)
    for bad in (None, "", "{", '{"keep_last": 0}', '{"keep_last": null}', '[3]', '{"keep_last": "3"}'):
        assert RetentionPolicy.from_env_value(bad) is None, bad


def test_the_launch_passes_the_policy_and_says_where_it_comes_from(exp_root: Path) -> None:
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=["checkpoint.keep_last=2",
                                                                     "checkpoint.keep_every=200"]))
    assert json.loads(plan.env[retention.RETENTION_ENV]) == {"keep_last": 2, "keep_every": 200}
    assert any(s.name == retention.RETENTION_ENV and s.source == "checkpoint.keep_last/keep_every"
               for s in plan.env_report)
    off = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=["checkpoint.keep_last=null",
                                                                    "checkpoint.keep_every=null"]))
    assert retention.RETENTION_ENV not in off.env
    unsaved = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=["checkpoint.save=false"]))
    assert retention.RETENTION_ENV not in unsaved.env


# --------------------------------------------------------------------------- recipe rules


@pytest.mark.parametrize("sets,key,needle", [
    (["checkpoint.keep_last=0"], "checkpoint.keep_last", "must be >= 1"),
    (["checkpoint.keep_every=250"], "checkpoint.keep_every", "multiple of checkpoint.save_interval=100"),
    (["checkpoint.keep_last=null"], "checkpoint.keep_every", "no effect without checkpoint.keep_last"),
    (["checkpoint.keep_every=0"], "checkpoint.keep_every", "must be >= 1"),
])
def test_retention_keys_are_checked(sets: list[str], key: str, needle: str) -> None:
    problems = check_config(load_recipe("tiny", sets).recipe).config
    assert [p.key for p in problems] == [key] and needle in problems[0].message, problems


def test_the_7b_recipe_keeps_the_last_3_and_every_5000th() -> None:
    c = load_recipe("7b").recipe.checkpoint
    assert (c.keep_last, c.keep_every) == (3, 5000)
    assert not check_config(load_recipe("7b").recipe).config


# --------------------------------------------------------------------------- the forecast


def test_save_iterations() -> None:
    assert save_iterations(0, 1000, 200) == [200, 400, 600, 800, 1000]
    assert save_iterations(0, 1100, 200) == [200, 400, 600, 800, 1000, 1100]  # Megatron's save at the end
    assert save_iterations(400, 600, 50) == [450, 500, 550, 600]  # a decay from 400: not 400 itself
    assert save_iterations(450, 600, 200) == [600]
    assert save_iterations(600, 600, 200) == []


def test_forecast_of_the_7b_recipe() -> None:
    saves = save_iterations(0, 40000, 1000)
    run = forecast(RetentionPolicy(3, 5000), [], 0, saves, set())
    assert (len(run.saves), run.now, run.peak, run.final) == (40, 0, 11, 10)
    assert forecast(RetentionPolicy(), [], 0, saves, set()).peak == 40  # no policy: 4.3 TB of 7B checkpoints
    assert forecast(RetentionPolicy(3), [], 0, saves, set()).peak == 4  # three kept while the fourth is written


def test_forecast_counts_what_is_on_disk_and_what_is_protected() -> None:
    """A resume at 3000 with 1000..3000 on disk and a partial folder; a decay started from 2000."""
    saves = save_iterations(3000, 6000, 1000)
    run = forecast(RetentionPolicy(1), [1000, 2000, 3000], 1, saves, {2000})
    assert run.now == 4
    assert run.peak == 5  # 1000, 2000, 3000, partial, and 4000 being written
    assert run.final == 3  # 2000 (decay source), 6000, the partial one
    assert run.extra_at_peak == 1


def _plan(sets: list[str], free: int, monkeypatch: pytest.MonkeyPatch, recipe: str = "tiny",
          **kwargs: object) -> object:
    monkeypatch.setattr(preflight, "free_bytes", lambda path: free)
    return plan_run(LaunchRequest(recipe=recipe, dry_run=True, sets=sets, **kwargs))


def test_a_run_that_cannot_finish_is_refused_with_what_would_fit(exp_root: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe("tiny", ["schedule.train_iters=1000"]).recipe
    one = preflight.checkpoint_bytes(recipe)
    sets = ["schedule.train_iters=1000", "checkpoint.keep_last=null", "checkpoint.keep_every=null"]
    monkeypatch.setattr(preflight, "free_bytes", lambda path: int(4.5 * one))
    with pytest.raises(LaunchError) as refused:
        plan_run(LaunchRequest(recipe="tiny", sets=sets))
    message = str(refused.value)
    assert "checkpoint: the run cannot finish: training 0 -> 1000 saves 10 checkpoint(s) (iterations 100..1000 " \
           "every 100)" in message
    assert "every checkpoint stays: at most 10 on disk at once (0 now)" in message
    assert "--set checkpoint.keep_last=3 would fit" in message  # 4 on disk while the 4th of 3 kept is written
    plan = _plan([*sets[:1], "checkpoint.keep_last=3", "checkpoint.keep_every=null"], int(4.5 * one), monkeypatch)
    assert not plan.findings.machine or all(p.key == "gpu" for p in plan.findings.machine)
    note = next(n for n in plan.notes if n.startswith("disk forecast"))
    assert "keep the last 3: at most 4 on disk at once (0 now)" in note


def test_the_forecast_only_warns_in_a_dry_run_and_covers_a_decay(exp_root: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    stable = ExperimentPaths.for_name("tiny", exp_root)
    complete(stable.checkpoints, 100)
    recipe = load_recipe("tiny").recipe
    plan = _plan(["checkpoint.save_interval=20", "checkpoint.keep_every=null"],
                 preflight.checkpoint_bytes(recipe) * 2, monkeypatch, decay_load="iter_0000100")
    (warning,) = [str(p) for p in plan.findings.machine if p.key == "checkpoint"]
    assert "training 100 -> 160 saves 3 checkpoint(s) (iterations 120..160 every 20)" in warning
    assert "at most 3 on disk at once (0 now)" in warning
    assert not [n for n in plan.notes if n.startswith("disk forecast")]  # said once, as the warning
