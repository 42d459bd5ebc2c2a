"""The `infir2` command line, in-process through typer's CliRunner: recipes, show, train/decay --dry-run."""

from __future__ import annotations

import shlex
import sys

import pytest
import yaml

from infir2_cpt import checkpoints as ck
from infir2_cpt.recipe.load import shipped_recipe_names


def _launcher_index(lines: list[str]) -> int:
    """The command's first line: the launcher (python -m <torchrun> ...), after the comments and exports."""
    return next(i for i, line in enumerate(lines)
                if line.endswith(" \\") and not line.startswith(("#", "export ", " ")))


def command_flags(stdout: str) -> list[list[str]]:
    """The Megatron flags of a dry run's printed command: one flag (with its values) per line."""
    lines = stdout.splitlines()
    start = _launcher_index(lines)
    flags = []
    for line in lines[start + 1:]:
        if not line.startswith("    "):
            break
        flags.append(shlex.split(line.rstrip("\\").strip()))
    return flags


def flag_values(stdout: str) -> dict[str, list[str]]:
    return {f[0]: f[1:] for f in command_flags(stdout)}


def launcher_line(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    return shlex.split(lines[_launcher_index(lines)].rstrip("\\"))


# --------------------------------------------------------------------------- recipes / show


def test_recipes_lists_every_shipped_recipe_with_a_description(cli):
    result = cli("recipes")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == shipped_recipe_names()
    for line in lines:
        name, description = line.split(None, 1)
        assert len(description) > 20 and "invalid" not in description
    assert any(line.startswith("7b ") and "TP4" in line for line in lines)


def test_show_prints_the_resolved_recipe(cli):
    result = cli("show", "--recipe", "7b")
    assert result.exit_code == 0
    data = yaml.safe_load(result.stdout)
    assert data["name"] == "InfiR2_CPT_FP8_7B"
    assert data["parallel"]["tensor_parallel"] == 4
    assert data["precision"]["fp8"] == "blockwise"
    assert data["env"]["NVTE_FUSED_ATTN"] == "1"
    assert set(data) >= {"model", "parallel", "data", "tokenizer", "schedule", "precision", "checkpoint",
                         "logging", "env", "launch"}


def test_show_merges_extends_and_applies_set(cli):
    result = cli("show", "--recipe", "1.5b-decay", "--set", "schedule.decay_iters=2000")
    assert result.exit_code == 0
    data = yaml.safe_load(result.stdout)
    assert data["phase"] == "decay" and data["stable_name"] == "InfiR2_CPT_FP8_1.5B"
    assert data["model"]["hidden_size"] == 1536  # from 1.5b
    assert data["schedule"]["warmup_iters"] == 0 and data["schedule"]["decay_iters"] == 2000
    assert data["schedule"]["lr"] == 1e-4  # from 7b, through 1.5b
    assert data["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_show_reports_a_bad_set(cli):
    result = cli("show", "--recipe", "7b", "--set", "parallel.tensor_paralel=2")
    assert result.exit_code == 2
    assert "did you mean 'tensor_parallel'?" in result.stderr


# --------------------------------------------------------------------------- train --dry-run


def test_train_7b_dry_run(cli, exp_root):
    result = cli("train", "--recipe", "7b", "--dry-run")
    assert result.exit_code == 0, result.output
    flags = flag_values(result.stdout)
    assert flags["--tensor-model-parallel-size"] == ["4"]
    assert flags["--fp8-recipe"] == ["blockwise"]
    assert flags["--train-iters"] == ["40000"]
    assert flags["--lr-warmup-iters"] == ["5000"]
    assert flags["--save"] == [str(exp_root / "InfiR2_CPT_FP8_7B" / "checkpoints")]
    assert flags["--load"] == flags["--save"]
    assert "--no-load-optim" not in flags and "--profile" not in flags
    launcher = launcher_line(result.stdout)
    assert launcher[0] == sys.executable and launcher[1] == "-m"  # torchrun, under this interpreter
    for option in ("--nnodes=1", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:29400"):
        assert option in launcher
    assert any(o.startswith("--rdzv-id=infir2-InfiR2_CPT_FP8_7B") for o in launcher)
    assert launcher[-2:] == ["-m", "infir2_cpt.runtime.entry"]
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in result.stdout.splitlines()
    # machine problems of this host are warnings, not errors
    assert "warning: data.blend[0].path: missing /your_data_path.bin" in result.stderr


def test_dry_run_prints_one_flag_per_line_shell_quoted(cli, exp_root):
    result = cli("train", "--recipe", "tiny", "--dry-run", "--", "--wandb-exp-name", "my run")
    assert result.exit_code == 0
    lines = [line for line in result.stdout.splitlines() if line.startswith("    ")]
    assert all(line.startswith("    --") for line in lines)
    assert lines[-1] == "    --wandb-exp-name 'my run'"
    assert all(line.endswith(" \\") for line in lines[:-1])


def test_train_tiny_dry_run(cli, exp_root):
    result = cli("train", "--recipe", "tiny", "--dry-run")
    assert result.exit_code == 0, result.output
    flags = flag_values(result.stdout)
    assert "--mock-data" in flags and flags["--tokenizer-type"] == ["NullTokenizer"]
    assert flags["--hidden-size"] == ["1024"] and flags["--num-layers"] == ["4"]
    assert "--nproc-per-node=1" in launcher_line(result.stdout)
    assert "--data-path" not in flags and "--tokenizer-model" not in flags


def test_dry_run_writes_nothing(cli, exp_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["train", "--recipe", "tiny", "--dry-run"], ["train", "--recipe", "7b", "--dry-run"],
                 ["decay", "--recipe", "7b", "--load", "iter_0035000", "--dry-run"]):
        assert cli(*args).exit_code == 0
    assert not exp_root.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_dry_run_without_exp_root_writes_nothing_under_cwd(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("train", "--recipe", "tiny", "--dry-run", env={"INFIR2_EXP_ROOT": None})
    assert result.exit_code == 0
    assert f"--save {tmp_path}/exp/tiny/checkpoints" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_1_5b_tp4_exits_2_naming_query_groups(cli, exp_root):
    result = cli("train", "--recipe", "1.5b", "--set", "parallel.tensor_parallel=4", "--dry-run")
    assert result.exit_code == 2
    assert "num_query_groups" in result.stderr
    assert "parallel.tensor_parallel: must divide model.num_query_groups=2" in result.stderr
    assert result.stdout == ""


def test_all_problems_listed_in_one_run(cli, exp_root):
    result = cli("train", "--recipe", "tiny", "--set", "schedule.train_iters=50", "--set",
                 "parallel.sequence_parallel=true", "--rdzv-endpoint", "nohost", "--dry-run")
    assert result.exit_code == 2
    assert "3 problem(s)" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("  - ")]) == 3


def test_unknown_recipe_exits_2(cli):
    result = cli("train", "--recipe", "13b", "--dry-run")
    assert result.exit_code == 2
    assert "unknown recipe" in result.stderr


@pytest.mark.parametrize("spelling", ["--rdzv_endpoint", "--rdzv-endpoint"])
def test_seed_spellings_accepted(spelling, cli, exp_root):
    result = cli("train", "--recipe", "7b", "--nnodes", "4", spelling, "node0:29400", "--nproc_per_node", "8",
                 "--dry-run")
    assert result.exit_code == 0, result.output
    launcher = launcher_line(result.stdout)
    assert "--nnodes=4" in launcher and "--rdzv-endpoint=node0:29400" in launcher
    assert "--nproc-per-node=8" in launcher


def test_rdzv_id_is_stable_and_overridable(cli, exp_root):
    first = launcher_line(cli("train", "--recipe", "7b", "--dry-run").stdout)
    second = launcher_line(cli("train", "--recipe", "7b", "--nnodes", "2", "--rdzv-endpoint", "n0:1",
                               "--dry-run").stdout)
    ids = [o for o in first if o.startswith("--rdzv-id=")]
    assert ids == [o for o in second if o.startswith("--rdzv-id=")]
    own = launcher_line(cli("train", "--recipe", "7b", "--rdzv-id", "job42", "--dry-run").stdout)
    assert "--rdzv-id=job42" in own


def test_exp_renames_the_experiment(cli, exp_root):
    result = cli("train", "--recipe", "tiny", "--exp", "tiny-lr2", "--dry-run")
    flags = flag_values(result.stdout)
    assert flags["--save"] == [str(exp_root / "tiny-lr2" / "checkpoints")]
    assert flags["--tensorboard-dir"] == [str(exp_root / "tiny-lr2" / "tensorboard")]


def test_env_from_recipe_and_user_wins(cli, exp_root):
    result = cli("train", "--recipe", "7b", "--dry-run",
                 env={"NCCL_NVLS_ENABLE": "1", "CUDA_DEVICE_MAX_CONNECTIONS": None, "WANDB_MODE": None})
    assert result.exit_code == 0
    out = result.stdout.splitlines()
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in out
    assert "export WANDB_MODE=offline" in out
    assert not any(line.startswith("export NCCL_NVLS_ENABLE") for line in out)  # the user's 1 is kept
    assert "#   NCCL_NVLS_ENABLE=1  [user (recipe: 0)]" in out
    assert "#   CUDA_DEVICE_MAX_CONNECTIONS=1  [recipe]" in out


def test_extra_args_after_double_dash_come_last(cli, exp_root):
    result = cli("train", "--recipe", "tiny", "--dry-run", "--", "--lr", "5e-4", "--recompute-activations")
    assert result.exit_code == 0
    flags = command_flags(result.stdout)
    assert flags[-2:] == [["--lr", "5e-4"], ["--recompute-activations"]]
    assert ["--lr", "0.001"] in flags[:-2]  # the recipe's value stays; Megatron takes the last one


def test_megatron_extra_args_from_recipe_come_before_command_line(cli, exp_root):
    result = cli("train", "--recipe", "tiny", "--set", 'megatron_extra_args=["--eval-iters", "1"]', "--dry-run",
                 "--", "--eval-iters", "2")
    flags = command_flags(result.stdout)
    assert flags[-2:] == [["--eval-iters", "1"], ["--eval-iters", "2"]]


# --------------------------------------------------------------------------- decay --dry-run


def test_decay_7b_dry_run(cli, exp_root):
    result = cli("decay", "--recipe", "7b", "--load", "iter_0035000", "--dry-run")
    assert result.exit_code == 0, result.output
    flags = flag_values(result.stdout)
    assert flags["--ckpt-step"] == ["35000"]
    assert flags["--train-iters"] == ["40000"]
    assert flags["--lr-warmup-iters"] == ["0"]
    assert "--override-opt_param-scheduler" in flags
    assert "--exit-on-missing-checkpoint" in flags
    assert flags["--load"] == [str(exp_root / "InfiR2_CPT_FP8_7B" / "checkpoints")]
    assert flags["--save"] == [str(exp_root / "InfiR2_CPT_FP8_7B_decay" / "checkpoints")]
    assert flags["--wandb-exp-name"] == ["InfiR2_CPT_FP8_7B_decay"]
    assert "--no-load-optim" not in flags
    # the stable checkpoint is missing on this host: a warning in a dry run
    assert "warning: --load:" in result.stderr and "iter_0035000 does not exist" in result.stderr


def test_decay_from_an_earlier_checkpoint(cli, exp_root):
    result = cli("decay", "--recipe", "1.5b", "--load", "20000", "--dry-run")
    assert result.exit_code == 0, result.output
    flags = flag_values(result.stdout)
    assert flags["--ckpt-step"] == ["20000"] and flags["--train-iters"] == ["25000"]
    assert flags["--load"] == [str(exp_root / "InfiR2_CPT_FP8_1.5B" / "checkpoints")]


def test_decay_with_seed_style_path(cli, exp_root, tmp_path):
    stable = tmp_path / "elsewhere" / "checkpoints"
    folder = stable / ck.iter_dir_name(35000)
    folder.mkdir(parents=True)
    for name in ck.REQUIRED_FILES:
        (folder / name).write_text("{}")
    result = cli("decay", "--recipe", "7b", "--load", str(folder), "--dry-run")
    assert result.exit_code == 0, result.output
    flags = flag_values(result.stdout)
    assert flags["--load"] == [str(stable)] and flags["--ckpt-step"] == ["35000"]
    assert "warning: --load" not in result.stderr


def test_decay_refuses_a_non_iteration_load(cli, exp_root):
    result = cli("decay", "--recipe", "7b", "--load", "exp/InfiR2_CPT_FP8_7B/checkpoints", "--dry-run")
    assert result.exit_code == 2
    assert "is not an iteration" in result.stderr


def test_decay_needs_load(cli):
    result = cli("decay", "--recipe", "7b", "--dry-run")
    assert result.exit_code == 2
    assert "--load" in result.output


def test_train_refuses_decay_recipe(cli, exp_root):
    result = cli("train", "--recipe", "7b-decay", "--dry-run")
    assert result.exit_code == 2
    assert "infir2 decay --recipe 7b-decay" in result.stderr


def test_help_lists_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("train", "decay", "recipes", "show"):
        assert command in result.stdout


# --------------------------------------------------------------------------- what reaches Megatron


@pytest.mark.parametrize("command", [["train", "--recipe", "tiny"],
                                     ["decay", "--recipe", "tiny", "--load", "iter_0000100"],
                                     ["bench", "--recipe", "tiny"]])
@pytest.mark.parametrize("stray", ["true", "7b"])
def test_a_stray_word_before_the_double_dash_is_a_usage_error(cli, exp_root, command, stray):
    """`--dry-run true` used to append `true` to Megatron's arguments; only what follows `--` may reach it."""
    result = cli(*command, "--dry-run", stray)
    assert result.exit_code == 2, result.output
    assert f"unexpected word '{stray}'" in result.output
    assert "Megatron flags go after" in result.output


def test_words_after_the_double_dash_still_reach_megatron(cli, exp_root):
    result = cli("train", "--recipe", "tiny", "--dry-run", "--", "--manual-gc", "--manual-gc-interval", "10")
    assert result.exit_code == 0, result.output
    assert command_flags(result.stdout)[-2:] == [["--manual-gc"], ["--manual-gc-interval", "10"]]


def test_a_misspelled_megatron_flag_is_refused_with_the_close_match(cli, exp_root):
    result = cli("train", "--recipe", "tiny", "--dry-run", "--", "--recompute-granularty", "selective")
    assert result.exit_code == 2, result.output
    assert ("--recompute-granularty is not an option of megatron-core's argument parser; did you mean "
            "--recompute-granularity?") in result.stderr


def test_a_misspelled_flag_in_the_recipe_is_refused_too(cli, exp_root, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("extends: tiny\nmegatron_extra_args: ['--manual-gcc']\n")
    result = cli("train", "--recipe", str(recipe), "--dry-run")
    assert result.exit_code == 2 and "--manual-gcc is not an option" in result.stderr


def test_without_megatron_the_flags_are_not_checked_and_it_says_so(cli, exp_root, monkeypatch):
    from infir2_cpt.launch import preflight

    monkeypatch.setattr(preflight, "megatron_option_names", lambda: None)
    result = cli("train", "--recipe", "tiny", "--dry-run", "--", "--anything-goes")
    assert result.exit_code == 0, result.output
    assert "megatron-core is not importable here: the Megatron flags after `--` were not checked " \
           "(--anything-goes)" in result.stdout


def test_megatrons_option_names_are_cached_per_version(tmp_path, monkeypatch):
    import importlib.metadata

    from infir2_cpt.launch import preflight

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    preflight.megatron_option_names.cache_clear()
    names = preflight.megatron_option_names()
    cache = tmp_path / "infir2" / f"megatron-core-{importlib.metadata.version('megatron-core')}-options.json"
    assert names is not None and "--recompute-granularity" in names and cache.is_file()
    cache.write_text('["--only-this"]')  # the cached names are what the next process reads
    preflight.megatron_option_names.cache_clear()
    assert preflight.megatron_option_names() == frozenset({"--only-this"})
    preflight.megatron_option_names.cache_clear()
