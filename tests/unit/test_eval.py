"""`infir2 eval` (launch/evaluate.py, runtime/eval_entry.py, reports/heldout.py) and the held-out columns and
pruning of `infir2 checkpoints`: which checkpoints are evaluated, on what data, with which Megatron arguments (and
that Megatron's own parser takes them), the evaluation loop around Megatron's functions, a whole `infir2 eval` under
the real torchrun with a stand-in entry, and the results read back as a table and a plot."""

from __future__ import annotations

import argparse
import json
import re
import types
from pathlib import Path
from typing import Any

import pytest

from infir2_cpt import checkpoints as ck
from infir2_cpt.errors import LaunchError
from infir2_cpt.launch.evaluate import EvalError, EvalRequest, plan_eval
from infir2_cpt.launch.execute import write_records
from infir2_cpt.launch.plan import LaunchRequest, plan_run
from infir2_cpt.layout import ExperimentPaths
from infir2_cpt.reports.heldout import result_path, run_and_decays

FAKE_ENTRY = Path(__file__).resolve().parents[1] / "fakes" / "fake_eval_entry.py"


def make_ckpt(ckpt_dir: Path, iteration: int, complete: bool = True) -> None:
    folder = ckpt_dir / ck.iter_dir_name(iteration)
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"x" * 100)
    if complete:
        for name in ck.REQUIRED_FILES:
            (folder / name).write_text("{}")
        (ckpt_dir / ck.TRACKER).write_text(f"{iteration}\n")


def record(exp: str, sets: list[str] | None = None, decay_from: int | None = None) -> ExperimentPaths:
    """An experiment as a launch leaves it (recipe.yaml, schedule.json, decay_source.json), without running."""
    plan = plan_run(LaunchRequest(recipe="tiny", exp=exp, sets=list(sets or []), dry_run=True,
                                  decay_load=None if decay_from is None else str(decay_from),
                                  stable_exp="base" if decay_from is not None else None))
    plan.paths.make_dirs()
    write_records(plan)
    return plan.paths


@pytest.fixture
def runs(exp_root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ExperimentPaths, ExperimentPaths]:
    """base (complete 100, 200, 300; a save in progress at 250) and base-d200, a decay from 200 (220, 260)."""
    monkeypatch.setenv("INFIR2_GPU_CHECK", "0")
    base = record("base")
    for it in (100, 200, 300):
        make_ckpt(base.checkpoints, it)
    make_ckpt(base.checkpoints, 250, complete=False)
    decay = record("base-d200", decay_from=200)
    for it in (220, 260):
        make_ckpt(decay.checkpoints, it)
    return base, decay


def items(plan: Any) -> list[tuple[str, int]]:
    return [(item.exp.name, item.iteration) for item in plan.items]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


# --------------------------------------------------------------------------- what is evaluated


def test_every_complete_checkpoint_of_the_run_and_its_decays(runs: tuple[ExperimentPaths, ExperimentPaths]) -> None:
    base, decay = runs
    plan = plan_eval(EvalRequest(exp="base", dry_run=True))
    assert items(plan) == [("base", 100), ("base", 200), ("base", 300), ("base-d200", 220), ("base-d200", 260)]
    args = plan.megatron_args
    assert flag(args, "--load") == str(base.checkpoints) and flag(args, "--ckpt-step") == "100"
    assert "--skip-train" in args and "--no-load-optim" in args and "--save" not in args
    assert "--tensorboard-dir" not in args and "--pretrained-checkpoint" not in args
    assert flag(args, "--eval-iters") == "2"  # the recipe's logging.eval_iters
    assert plan.launcher[-2:] == ["-m", "infir2_cpt.runtime.eval_entry"]
    assert "--standalone" in plan.launcher
    assert "INFIR2_RETENTION" not in plan.env
    assert items(plan_eval(EvalRequest(exp="base", decays=False, dry_run=True))) == [
        ("base", 100), ("base", 200), ("base", 300)]
    picked = plan_eval(EvalRequest(exp="base", iterations=["200", "iter_0000260"], eval_iters=5, dry_run=True))
    assert items(picked) == [("base", 200), ("base-d200", 260)]
    assert flag(picked.megatron_args, "--ckpt-step") == "200" and flag(picked.megatron_args, "--eval-iters") == "5"


def test_a_run_trained_with_remainders_and_transposes_on_demand_is_evaluated(
        exp_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation builds BF16 parameters and loads no optimizer: the training's FP8-parameter options do not apply."""
    monkeypatch.setenv("INFIR2_GPU_CHECK", "0")
    run = record("rem", sets=["precision.fp8_bf16_param_remainders=true", "precision.fp8_transpose_on_demand=true",
                              "precision.fp8_output_layer=true", "precision.fp8_output_layer_param=true"])
    make_ckpt(run.checkpoints, 100)
    plan = plan_eval(EvalRequest(exp="rem", dry_run=True))
    assert items(plan) == [("rem", 100)] and "--fp8-param-gather" not in plan.megatron_args
    options = plan.env.get("INFIR2_RUNTIME_OPTIONS", "").split(",")
    assert "fp8_bf16_param_remainders" not in options and "fp8_transpose_on_demand" not in options
    assert "fp8_output_layer" in options and "fp8_output_layer_param" not in options  # FP8 GEMMs stay, BF16 weight


def test_a_missing_iteration_is_refused_and_only_warned_about_in_a_dry_run(
        runs: tuple[ExperimentPaths, ExperimentPaths]) -> None:
    with pytest.raises(LaunchError) as refused:
        plan_eval(EvalRequest(exp="base", iterations=["250", "400"]))
    assert "no complete checkpoint at 250, 400 (complete: 100, 200, 220, 260, 300)" in str(refused.value)
    plan = plan_eval(EvalRequest(exp="base", iterations=["250"], dry_run=True))
    assert plan.items == [] and plan.warnings[0].key == "--iterations"


def test_a_checkpoint_already_evaluated_on_the_same_data_is_skipped(
        runs: tuple[ExperimentPaths, ExperimentPaths]) -> None:
    base, _ = runs
    first = plan_eval(EvalRequest(exp="base", decays=False, dry_run=True))
    out = result_path(base.root, first.label, 100)
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps({"loss": 3.0, "signature": first.signature}))
    again = plan_eval(EvalRequest(exp="base", decays=False, dry_run=True))
    assert items(again) == [("base", 200), ("base", 300)] and [i.iteration for i in again.done] == [100]
    assert items(plan_eval(EvalRequest(exp="base", decays=False, redo=True, dry_run=True)))[0] == ("base", 100)
    other = plan_eval(EvalRequest(exp="base", decays=False, eval_iters=7, dry_run=True))  # other batches
    assert items(other)[0] == ("base", 100)
    assert any("made on other data or batches" in note for note in other.notes)


def test_held_out_data_defaults_to_the_valid_blend(exp_root: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFIR2_GPU_CHECK", "0")
    data = {}
    for name in ("train_text_document", "heldout_text_document", "other_text_document"):
        data[name] = str(tmp_path / name)
        for suffix in (".bin", ".idx"):
            Path(data[name] + suffix).write_bytes(b"")
    text = ["data.mock=false", f"data.blend=[{{path: {data['train_text_document']}, weight: 1.0}}]",
            "data.split=98,2,0"]
    base = record("base", [*text, f"data.valid_blend=[{{path: {data['heldout_text_document']}, weight: 1.0}}]"])
    make_ckpt(base.checkpoints, 100)
    plan = plan_eval(EvalRequest(exp="base", dry_run=True))
    assert plan.label == "heldout" and not plan.warnings
    args = plan.megatron_args
    assert flag(args, "--valid-data-path") == data["heldout_text_document"]
    assert "--data-path" not in args and "--train-data-path" not in args and "--split" not in args
    given = plan_eval(EvalRequest(exp="base", data=[data["other_text_document"]], label="mine", dry_run=True))
    assert given.label == "mine" and flag(given.megatron_args, "--valid-data-path") == data["other_text_document"]
    split = record("split", text)
    make_ckpt(split.checkpoints, 100)
    by_split = plan_eval(EvalRequest(exp="split", dry_run=True))
    assert by_split.label == "valid-split"
    assert flag(by_split.megatron_args, "--data-path") == data["train_text_document"]
    assert flag(by_split.megatron_args, "--split") == "98,2,0"
    missing = plan_eval(EvalRequest(exp="base", data=[str(tmp_path / "nothing")], dry_run=True))
    assert [w.key for w in missing.warnings] == ["--data[0].path"]


def test_what_cannot_be_evaluated_is_refused(exp_root: Path, runs: tuple[ExperimentPaths, ExperimentPaths]) -> None:
    (exp_root / "bare" / "checkpoints").mkdir(parents=True)
    with pytest.raises(EvalError, match="give the recipe with --recipe"):
        plan_eval(EvalRequest(exp="bare", dry_run=True))
    with pytest.raises(EvalError, match="experiment base-d200 was trained with another model"):
        plan_eval(EvalRequest(exp="base", sets=["model.num_layers=2"], dry_run=True))
    with pytest.raises(EvalError, match="--label"):
        plan_eval(EvalRequest(exp="base", label="../x", dry_run=True))
    with pytest.raises(EvalError, match="parallel"):  # TP 2 on one GPU
        plan_eval(EvalRequest(exp="base", sets=["parallel.tensor_parallel=2"], decays=False, dry_run=True))
    plan = plan_eval(EvalRequest(exp="nothing-yet", recipe="tiny", dry_run=True))  # a plan script's dry run
    assert plan.items == [] and plan.warnings[0].key == "EXP"


# --------------------------------------------------------------------------- Megatron's parser


@pytest.fixture
def megatron_parse(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    arguments = pytest.importorskip("megatron.training.arguments")
    monkeypatch.setattr(arguments, "get_device_arch_version", lambda: 9)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")

    def parse(argv: list[str], world_size: int) -> argparse.Namespace:
        parser = arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
        args = parser.parse_args(argv)
        args.rank, args.world_size = 0, world_size
        arguments.validate_args(args, {})
        return args

    return parse


@pytest.mark.parametrize("recipe,world", [("tiny", 1), ("7b", 8)])
def test_evaluation_arguments_pass_megatrons_parser(recipe: str, world: int, exp_root: Path, megatron_parse,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFIR2_GPU_CHECK", "0")
    (exp_root / "run" / "checkpoints").mkdir(parents=True)
    make_ckpt(exp_root / "run" / "checkpoints", 1000)
    plan = plan_eval(EvalRequest(exp="run", recipe=recipe, data=["/data/heldout_text_document"], dry_run=True))
    args = megatron_parse(plan.megatron_args, world)
    assert args.skip_train and args.no_load_optim and args.no_load_rng and args.exit_on_missing_checkpoint
    assert args.ckpt_step == 1000 and args.load == str(exp_root / "run" / "checkpoints") and args.save is None
    assert args.valid_data_path == ["/data/heldout_text_document"] and args.split is None
    assert args.fp8_recipe == "blockwise" and not args.fp8_param_gather  # FP8 GEMMs, BF16 weights as saved
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, per_split = get_blend_and_blend_per_split(args)
    assert blend is None and per_split == [None, (["/data/heldout_text_document"], None), None]


def test_training_with_a_valid_blend_passes_megatrons_parser(exp_root: Path, megatron_parse) -> None:
    sets = ["data.blend=[{path: /d/a, weight: 0.7}, {path: /d/b, weight: 0.3}]",
            "data.valid_blend=[{path: /d/held, weight: 1.0}]"]
    plan = plan_run(LaunchRequest(recipe="7b", sets=sets, dry_run=True))
    args = megatron_parse(plan.megatron_args, 8)
    assert args.data_path is None and args.split is None
    assert args.train_data_path == ["0.7", "/d/a", "0.3", "/d/b"] and args.valid_data_path == ["/d/held"]
    from megatron.training.utils import get_blend_and_blend_per_split

    _, per_split = get_blend_and_blend_per_split(args)
    assert per_split == [(["/d/a", "/d/b"], [0.7, 0.3]), (["/d/held"], None), None]


def test_new_megatron_flags_are_rows_of_the_deviation_table(exp_root: Path, runs: Any) -> None:
    """Every flag of a training with data.valid_blend, and of an evaluation, that the seed scripts never pass has a
    row in docs/recipes.md (the 7B seed's flags are read from the golden file)."""
    golden = Path(__file__).resolve().parent / "golden" / "seed_7b.txt"
    seed = {token for line in golden.read_text().splitlines() for token in line.split() if token.startswith("--")}
    docs = (Path(__file__).resolve().parents[2] / "docs" / "recipes.md").read_text()
    rows = {line.split("`")[1] for line in docs.splitlines() if line.startswith("| `--")}
    training = plan_run(LaunchRequest(recipe="7b", dry_run=True,
                                      sets=["data.valid_blend=[{path: /d/held, weight: 1.0}]"])).megatron_args
    evaluation = plan_eval(EvalRequest(exp="base", dry_run=True)).megatron_args
    ours = {a for a in training + evaluation if a.startswith("--")}
    assert {"--train-data-path", "--valid-data-path", "--skip-train"} <= ours
    assert ours - seed <= rows, sorted(ours - seed - rows)


# --------------------------------------------------------------------------- the entry's loop


def test_the_entry_evaluates_each_checkpoint_with_megatrons_functions(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Megatron's load_checkpoint, build_train_valid_test_data_iterators and evaluate, stubbed: the first checkpoint
    is the one pretrain() loaded; each later one is loaded by pointing --load/--ckpt-step at it, evaluated on a
    fresh validation iterator, and written by the last rank."""
    import megatron.training
    import megatron.training.checkpointing as checkpointing
    import megatron.training.training as training
    import megatron.training.utils as utils

    from infir2_cpt.runtime import eval_entry

    args = types.SimpleNamespace(iteration=100, load="/a", ckpt_step=100, eval_iters=3, eval_global_batch_size=16,
                                 seq_length=1024)
    calls: list[Any] = []

    def load_checkpoint(model: Any, optimizer: Any, scheduler: Any) -> tuple[int, int]:
        calls.append(("load", args.load, args.ckpt_step, optimizer))
        return args.ckpt_step, 0

    def build(provider: Any) -> tuple[None, str, None]:
        calls.append(("iterator", provider is eval_entry.entry.train_valid_test_datasets_provider))
        return None, f"iterator-{len(calls)}", None

    def evaluate(forward: Any, iterator: Any, model: Any, process: Any, config: Any, **kwargs: Any):
        calls.append(("evaluate", iterator, kwargs.get("pg_collection")))
        return {"lm loss": 2.0 + args.ckpt_step / 1000}, None, False

    monkeypatch.setattr(megatron.training, "get_args", lambda: args)
    monkeypatch.setattr(checkpointing, "load_checkpoint", load_checkpoint)
    monkeypatch.setattr(training, "build_train_valid_test_data_iterators", build)
    monkeypatch.setattr(training, "evaluate", evaluate)
    monkeypatch.setattr(utils, "is_last_rank", lambda: True)
    monkeypatch.setattr(utils, "print_rank_last", lambda message: None)
    monkeypatch.setattr(training, "evaluate_and_print_results", training.evaluate_and_print_results)
    plan = [{"exp": "a", "ckpt_dir": "/a", "iteration": 100, "out": str(tmp_path / "a100.json"), "record": {"x": 1}},
            {"exp": "a", "ckpt_dir": "/a", "iteration": 200, "out": str(tmp_path / "a200.json")},
            {"exp": "b", "ckpt_dir": "/b", "iteration": 260, "out": str(tmp_path / "b260.json")}]
    eval_entry.install(plan)
    training.evaluate_and_print_results("validation", "forward", "iterator-0", ["model"], 100, None, "config",
                                        verbose=True, pg_collection="pgc")
    training.evaluate_and_print_results("test", "forward", "test-iterator", ["model"], 100, None, "config")
    assert calls == [("evaluate", "iterator-0", "pgc"),
                     ("load", "/a", 200, None), ("iterator", True), ("evaluate", "iterator-3", "pgc"),
                     ("load", "/b", 260, None), ("iterator", True), ("evaluate", "iterator-6", "pgc")]
    first = json.loads((tmp_path / "a100.json").read_text())
    assert first["loss"] == pytest.approx(2.1) and first["x"] == 1 and first["loaded_iteration"] == 100
    assert first["tokens_evaluated"] == 3 * 16 * 1024 and first["checkpoint"] == "/a/iter_0000100"
    assert json.loads((tmp_path / "b260.json").read_text())["loss"] == pytest.approx(2.26)
    args.iteration = 100
    eval_entry.install([{**plan[0], "iteration": 150}])  # Megatron loaded something else than asked
    with pytest.raises(RuntimeError, match="asked for iteration 150"):
        training.evaluate_and_print_results("validation", "forward", "it", ["model"], 100, None, "config")


# --------------------------------------------------------------------------- a whole `infir2 eval`


def test_infir2_eval_runs_holds_stores_and_reports(runs: tuple[ExperimentPaths, ExperimentPaths], cli,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real launcher and torch.distributed.run with a stand-in entry (tests/fakes/fake_eval_entry.py)."""
    base, decay = runs
    monkeypatch.setenv("INFIR2_EVAL_ENTRY", str(FAKE_ENTRY))
    png = tmp_path / "heldout.png"
    result = cli("eval", "base", "--png", str(png))
    assert result.exit_code == 0, result.output
    stored = json.loads(result_path(decay.root, "mock", 260).read_text())
    assert stored["loss"] == pytest.approx(2.0 + 100 / 260) and stored["held"] is True
    assert "--skip-train" in stored["argv"] and stored["signature"]["eval_iters"] == 2
    assert not list((base.root / "eval").glob(".hold-*")) and not list((decay.root / "eval").glob(".hold-*"))
    assert not list((base.root / "eval").glob(".plan-*"))
    assert re.search(rf"base-d200 +260 +4.26M +{2.0 + 100 / 260:.4f}", result.stdout), result.stdout
    assert png.stat().st_size > 10_000
    series = run_and_decays(base, "mock")
    assert [s.name for s in series] == ["base", "base-d200"]
    assert [p[0] for p in series[1].points] == [200, 220, 260]  # the decay's line starts at its branch point
    assert series[1].points[0][1] == 200 * 16 * 1024  # tokens seen
    again = cli("eval", "base")  # everything evaluated already: nothing launched
    assert again.exit_code == 0 and "0 checkpoint(s) to evaluate" in again.stderr
    table = cli("checkpoints", "base")
    row = next(line for line in table.stdout.splitlines() if line.strip().startswith("200 "))
    assert "mock loss" in table.stdout and f"{2.5:.4f}" in row


def test_a_failed_evaluation_exits_1_and_leaves_no_hold(runs: tuple[ExperimentPaths, ExperimentPaths], cli,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    base, _ = runs
    monkeypatch.setenv("INFIR2_EVAL_ENTRY", str(FAKE_ENTRY))
    monkeypatch.setenv("FAKE_EVAL_FAIL", "1")
    result = cli("eval", "base", "--no-decays")
    assert result.exit_code == 1
    assert "torchrun: exited with status 1" in result.stderr
    assert "base/iter_0000100: no result was written" in result.stderr
    assert not list((base.root / "eval").glob(".hold-*"))


# --------------------------------------------------------------------------- `infir2 checkpoints` and pruning


def test_checkpoints_shows_held_out_loss_and_rows_of_removed_checkpoints(runs: Any, cli) -> None:
    base, _ = runs
    for it, loss in ((100, 3.0), (50, 3.5)):  # 50: its folder was removed by retention
        out = result_path(base.root, "heldout", it)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"loss": loss}))
    result = cli("checkpoints", "base")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines()
             if line.startswith("  ") and line.split()[0].isdigit()}
    assert lines["50"][4:8] == ["removed", "-", "3.5000", "33.115"]
    assert lines["100"][4:9] == ["complete", "104", "B", "3.0000", "20.086"]  # size "104 B"
    assert lines["200"][7:9] == ["-", "-"]
    assert "heldout loss" in result.stdout and "heldout ppl" in result.stdout


def test_prune_from_the_command_line(runs: Any, cli) -> None:
    base, _ = runs
    dry = cli("checkpoints", "base", "--prune", "--dry-run", "--keep-last", "1")
    assert dry.exit_code == 0, dry.output
    assert "iter_0000100  would remove  not among the last 1" in dry.stdout
    assert "iter_0000200  keep" in dry.stdout and "decay experiment base-d200 started from it" in dry.stdout
    assert "iter_0000250  keep          partial: a save may still be writing it" in dry.stdout
    assert (base.checkpoints / "iter_0000100").is_dir()
    done = cli("checkpoints", "base", "--prune", "--keep-last", "1")
    assert done.exit_code == 0 and "removed 1 checkpoint(s)" in done.stdout
    assert sorted(p.name for p in base.checkpoints.iterdir() if p.is_dir()) == [
        "iter_0000200", "iter_0000250", "iter_0000300"]
    recorded = cli("checkpoints", "base", "--prune")  # the recorded recipe's policy: tiny keeps the last 3
    assert recorded.exit_code == 0 and "nothing to remove" in recorded.stdout
    for args, needle in ((["--dry-run"], "--dry-run: only with --prune"),
                         (["--prune", "--keep-every", "200"], "--keep-every: needs --keep-last"),
                         (["--prune", "--keep-last", "0"], "--keep-last: must be >= 1")):
        refused = cli("checkpoints", "base", *args)
        assert refused.exit_code == 2 and needle in refused.stderr, refused.output
    none = cli("checkpoints", "base", "--prune", "--recipe", "tiny", "--set", "checkpoint.keep_last=null",
               "--set", "checkpoint.keep_every=null")
    assert none.exit_code == 2 and "no retention policy" in none.stderr


def test_without_a_gpu_the_evaluation_is_refused_with_the_gpu_preflight(runs, monkeypatch):
    """The one GPU preflight, as `infir2 train` has it (the CPU test host has no CUDA GPU)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    monkeypatch.delenv("INFIR2_GPU_CHECK")
    with pytest.raises(LaunchError) as info:
        plan_eval(EvalRequest(exp="base"))
    assert any("no CUDA GPU is visible on this host (the evaluation runs Megatron on GPUs)" in str(p)
               for p in info.value.problems)
