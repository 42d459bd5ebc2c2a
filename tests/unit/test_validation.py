"""Each preflight rule has a failing case whose message is checked, and all problems come out together.

Configuration problems are fatal even in a dry run; machine problems (files, tokenizer, exp/, GPU) are
warnings in a dry run and fatal for a launch. Launches here are planned with INFIR2_GPU_CHECK=0, which
skips the GPU probe the way the CPU torchrun test does, and never exec'd.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infir2_cpt.launch.plan import LaunchEnv, LaunchRequest, plan_run
from infir2_cpt.errors import LaunchError, RecipeError
from infir2_cpt.recipe.load import load_recipe
from infir2_cpt.launch.preflight import check_gpu
from infir2_cpt.recipe.validate import check_config, parse_endpoint



def no_gpu_probe() -> LaunchEnv:
    """This process's environment (INFIR2_EXP_ROOT from the exp_root fixture) without the GPU preflight."""
    return LaunchEnv.read({**os.environ, "INFIR2_GPU_CHECK": "0"})


def config_problems(recipe: str = "tiny", *sets: str, **request) -> list[str]:
    """The fatal problems of a dry run (configuration problems only)."""
    with pytest.raises(LaunchError) as info:
        plan_run(LaunchRequest(recipe=recipe, sets=list(sets), dry_run=True, **request), no_gpu_probe())
    return [str(p) for p in info.value.problems]


def machine_problems(recipe: str = "tiny", *sets: str, **request) -> list[str]:
    """Machine problems: warnings in a dry run, and the very same problems fatal for a launch."""
    plan = plan_run(LaunchRequest(recipe=recipe, sets=list(sets), dry_run=True, **request), no_gpu_probe())
    warnings = [str(p) for p in plan.findings.machine]
    with pytest.raises(LaunchError) as info:
        plan_run(LaunchRequest(recipe=recipe, sets=list(sets), dry_run=False, **request), no_gpu_probe())
    assert [str(p) for p in info.value.problems] == warnings
    return warnings


def one(problems: list[str], text: str) -> str:
    hits = [p for p in problems if text in p]
    assert len(hits) == 1, f"expected exactly one problem containing {text!r} in {problems}"
    return hits[0]


def write_recipe(tmp_path: Path, text: str, name: str = "mine.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- the shipped recipes are clean


@pytest.mark.parametrize("name", ["7b", "1.5b", "tiny", "7b-decay", "1.5b-decay"])
def test_shipped_recipes_have_no_config_problems(name):
    findings = check_config(load_recipe(name).recipe)
    assert findings.config == []


def test_tiny_dry_run_has_no_machine_problems(exp_root):
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True), no_gpu_probe())
    assert [p for p in plan.findings.machine if p.key != "checkpoint"] == []


# --------------------------------------------------------------------------- parallel layout


def test_tp_must_divide_heads_and_query_groups(exp_root):
    problems = config_problems("tiny", "parallel.tensor_parallel=3", nproc_per_node=3)
    assert one(problems, "must divide model.num_attention_heads=8").startswith("parallel.tensor_parallel:")
    assert "valid: 1, 2, 4, 8" in one(problems, "num_attention_heads=8")
    assert "(got 3)" in one(problems, "num_attention_heads=8")
    assert "valid: 1, 2" in one(problems, "must divide model.num_query_groups=2")


def test_1_5b_tp4_names_query_groups(exp_root):
    problems = config_problems("1.5b", "parallel.tensor_parallel=4")
    text = one(problems, "num_query_groups=2")
    assert text.startswith("parallel.tensor_parallel: must divide model.num_query_groups=2")
    assert "(got 4)" in text
    assert not any("num_attention_heads" in p for p in problems)  # 12 heads divide by 4


def test_world_size_divisible_by_model_parallel(exp_root):
    problems = config_problems("7b", nproc_per_node=6)
    assert one(problems, "world size") == (
        "parallel: world size 6 (nnodes 1 x nproc_per_node 6) is not divisible by TP x PP x CP = 4")


def test_world_size_counts_pipeline_and_context_parallel(exp_root):
    problems = config_problems("7b", "parallel.pipeline_parallel=3")
    assert "is not divisible by TP x PP x CP = 12" in one(problems, "world size 8")


def test_global_batch_divisible_by_micro_batch_times_dp(exp_root):
    problems = config_problems("7b", "parallel.global_batch_size=129")
    text = one(problems, "parallel.global_batch_size")
    assert "must be a multiple of micro_batch_size x data-parallel size = 1 x 2 = 2" in text
    assert "(got 129)" in text
    problems = config_problems("tiny", "parallel.global_batch_size=20", nproc_per_node=2)
    assert "= 4 x 2 = 8" in one(problems, "parallel.global_batch_size")


def test_sequence_parallel_needs_tp(exp_root):
    problems = config_problems("tiny", "parallel.sequence_parallel=true")
    assert one(problems, "sequence_parallel") == (
        "parallel.sequence_parallel: needs tensor_parallel > 1 (Megatron would silently turn it off); "
        "set it to false (got True)")


# --------------------------------------------------------------------------- FP8


def test_blockwise_fp8_needs_multiples_of_128(exp_root):
    problems = config_problems("tiny", "model.ffn_hidden_size=2800")
    assert one(problems, "128-wide blocks") == (
        "model.ffn_hidden_size: blockwise FP8 quantizes in 128-wide blocks: model.ffn_hidden_size = 2800 "
        "is not a multiple of 128 (got 2800)")


def test_blockwise_fp8_checks_hidden_size(exp_root):
    problems = config_problems("tiny", "model.hidden_size=960")  # 8 heads of 120
    assert "model.hidden_size = 960 is not a multiple of 128" in one(problems, "model.hidden_size:")


def test_blockwise_fp8_checks_per_rank_shards(exp_root):
    """1.5B at TP4: the FFN shard is 8960 / 4 = 2240 wide, not a multiple of 128."""
    problems = config_problems("1.5b", "parallel.tensor_parallel=4")
    problem = one(problems, "2240")
    assert "model.ffn_hidden_size / tensor_parallel = 8960 / 4 = 2240 is not a multiple of 128 (got 8960)" in problem


def test_a_fractional_shard_is_shown_rounded_and_the_key_keeps_its_own_value(exp_root):
    problem = one(config_problems("7b", "parallel.tensor_parallel=3"), "/ 3 =")
    assert problem == ("model.ffn_hidden_size: blockwise FP8 quantizes in 128-wide blocks: model.ffn_hidden_size / "
                       "tensor_parallel = 18944 / 3 = 6314.67 is not a multiple of 128 (got 18944)")


def test_messages_show_values_as_written_and_lists_of_mappings_by_example(exp_root):
    problem = one(config_problems("tiny", "data.blend={path: x}"), "data.blend")
    assert problem == "data.blend: expected list of mapping, e.g. [{path: ..., weight: ...}] (got {path: x})"


def test_an_unknown_recipe_is_an_invalid_recipe_said_once(cli):
    result = cli("train", "--recipe", "7bb", "--dry-run")
    assert result.exit_code == 2 and result.stderr.startswith("infir2: invalid recipe: 1 problem(s)")


def test_too_little_free_space_is_said_once_in_a_dry_run(cli, exp_root):
    result = cli("train", "--recipe", "7b", "--set", "model.num_layers=4000", "--dry-run")
    assert result.exit_code == 0
    assert result.output.count("GB free") == 1 and "warning: checkpoint: not enough free space" in result.stderr


def test_bf16_has_no_block_constraint(exp_root):
    plan = plan_run(LaunchRequest(recipe="tiny", sets=["model.ffn_hidden_size=2800", "precision.fp8=null"],
                                  dry_run=True), no_gpu_probe())
    assert "--fp8-recipe" not in plan.megatron_args


def test_gpu_rule_reports_no_gpu_on_a_cpu_host():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    findings = check_gpu(1, "blockwise")
    assert [str(p) for p in findings.machine] == ["gpu: no CUDA GPU is visible on this host"]
    assert findings.config == []
    converting = check_gpu(1, None, "this conversion builds the Megatron model on one GPU").machine
    assert [str(p) for p in converting] == ["gpu: no CUDA GPU is visible on this host (this conversion builds the "
                                            "Megatron model on one GPU)"]


@pytest.mark.parametrize("backend,value", [("flash", "1"), ("unfused", "1"), ("local", "1"), ("auto", "0"),
                                           ("fused", "0"), ("flash", "")])
def test_attention_backend_env_must_agree(backend, value, exp_root):
    """Megatron asserts NVTE_FUSED_ATTN is unset or what the backend implies ("" counts as set)."""
    problems = config_problems("tiny", f"model.attention_backend={backend}", f"env.NVTE_FUSED_ATTN='{value}'")
    expected = "1" if backend in ("auto", "fused") else "0"
    assert one(problems, "NVTE_FUSED_ATTN") == (
        f"env.NVTE_FUSED_ATTN: must be {expected} (or absent) when model.attention_backend={backend!r}: "
        f"Megatron asserts it (--set env.NVTE_FUSED_ATTN={expected}) (got {value!r})")


@pytest.mark.parametrize("backend,value", [("fused", "1"), ("flash", "0"), ("auto", "1")])
def test_attention_backend_env_accepted(backend, value, exp_root):
    plan = plan_run(LaunchRequest(recipe="tiny", sets=[f"model.attention_backend={backend}",
                                                        f"env.NVTE_FUSED_ATTN={value}"], dry_run=True),
                    no_gpu_probe())
    assert plan.env["NVTE_FUSED_ATTN"] == value


# --------------------------------------------------------------------------- schedule


def test_warmup_plus_decay_within_train_iters(exp_root):
    problems = config_problems("tiny", "schedule.train_iters=50")
    assert one(problems, "exceeds") == "schedule: warmup_iters + decay_iters = 90 exceeds train_iters = 50"


# --------------------------------------------------------------------------- machine: data, tokenizer, exp/


def test_data_prefix_needs_bin_and_idx(exp_root, tmp_path):
    prefix = tmp_path / "corpus_text_document"
    prefix.with_suffix(".bin").write_bytes(b"")
    sets = ["data.mock=false", f"data.blend=[{{path: '{prefix}', weight: 1.0}}]"]
    warnings = machine_problems("tiny", *sets)
    assert one(warnings, "missing") == f"data.blend[0].path: missing {prefix}.idx (got '{prefix}')"
    prefix.with_suffix(".idx").write_bytes(b"")
    plan = plan_run(LaunchRequest(recipe="tiny", sets=sets, dry_run=True), no_gpu_probe())
    assert not [p for p in plan.findings.machine if p.key.startswith("data")]
    assert plan.megatron_args[:2] == ["--data-path", str(prefix)]


def test_data_prefix_missing_both_files(exp_root, tmp_path):
    prefix = tmp_path / "nothing"
    warnings = machine_problems("tiny", "data.mock=false", f"data.blend=[{{path: '{prefix}'}}]")
    assert f"missing {prefix}.bin and {prefix}.idx" in one(warnings, "data.blend[0].path")


def test_empty_blend_without_mock_is_a_config_problem(exp_root):
    problems = config_problems("tiny", "data.mock=false")
    assert one(problems, "data.blend") == "data.blend: is empty: list indexed-dataset prefixes, or set data.mock: true"


def test_tokenizer_directory_must_exist(exp_root, tmp_path):
    missing = tmp_path / "no-such-tokenizer"
    warnings = machine_problems("tiny", "tokenizer.type=HuggingFaceTokenizer", f"tokenizer.model={missing}")
    assert one(warnings, "tokenizer") == f"tokenizer.model: tokenizer directory not found (got '{missing}')"


def test_hf_tokenizer_needs_a_directory(exp_root):
    problems = config_problems("tiny", "tokenizer.type=HuggingFaceTokenizer")
    assert one(problems, "tokenizer.model") == "tokenizer.model: HuggingFaceTokenizer needs a tokenizer directory"


def _unwritable_dir(tmp_path: Path) -> Path:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if not os.access(locked, os.W_OK):
        return locked
    for candidate in (Path("/proc/1"), Path("/proc/sys")):  # root ignores mode bits; procfs does not
        if candidate.is_dir() and not os.access(candidate, os.W_OK):
            return candidate
    pytest.skip("no unwritable directory available to this user")


def test_exp_must_be_writable(tmp_path, monkeypatch):
    unwritable = _unwritable_dir(tmp_path)
    monkeypatch.setenv("INFIR2_EXP_ROOT", str(unwritable / "exp"))
    try:
        warnings = machine_problems("tiny")
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert one(warnings, "not writable") == f"exp: {unwritable} is not writable (got '{unwritable / 'exp' / 'tiny'}')"


# --------------------------------------------------------------------------- launch


@pytest.mark.parametrize("endpoint", ["node0", "node0:", ":29400", "node0:70000", "node 0:29400", "node0:29400:1"])
def test_bad_endpoint(endpoint, exp_root):
    problems = config_problems("tiny", rdzv_endpoint=endpoint)
    assert one(problems, "rdzv_endpoint") == (
        f"launch.rdzv_endpoint: must be HOST:PORT with a port in 1-65535 (got {endpoint!r})")


@pytest.mark.parametrize("endpoint,expected", [
    ("node0:29400", ("node0", 29400)), ("10.0.0.1:1", ("10.0.0.1", 1)), ("[fe80::1]:29400", ("[fe80::1]", 29400)),
    ("node-0.cluster.local:65535", ("node-0.cluster.local", 65535)),
])
def test_good_endpoints_parse(endpoint, expected):
    assert parse_endpoint(endpoint) == expected


def test_nnodes_zero(exp_root):
    problems = config_problems("tiny", nnodes=0)
    assert one(problems, "launch.nnodes") == "launch.nnodes: must be >= 1 (got 0)"


def test_nproc_per_node_zero(exp_root):
    problems = config_problems("tiny", nproc_per_node=0)
    assert one(problems, "launch.nproc_per_node") == "launch.nproc_per_node: must be >= 1 (got 0)"


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.0.0.2", "[::1]", "LOCALHOST"])
def test_loopback_endpoint_with_several_nodes(host, exp_root):
    problems = config_problems("7b", nnodes=2, rdzv_endpoint=f"{host}:29400")
    text = one(problems, "loopback")
    assert text.startswith("launch.rdzv_endpoint: is a loopback address but nnodes=2")
    assert "give the first node's hostname or IP" in text
    # one node on loopback is fine
    plan_run(LaunchRequest(recipe="7b", nnodes=1, rdzv_endpoint=f"{host}:29400", dry_run=True))


# --------------------------------------------------------------------------- recipe files and --set


def test_unknown_key_with_suggestion(tmp_path, exp_root):
    path = write_recipe(tmp_path, "extends: tiny\nparallel:\n  tensor_paralel: 2\n")
    problems = config_problems(path)
    text = one(problems, "tensor_paralel")
    assert text.startswith("parallel.tensor_paralel: unknown key; did you mean 'tensor_parallel'? valid keys: ")


def test_unknown_top_level_key(tmp_path, exp_root):
    path = write_recipe(tmp_path, "extends: tiny\nschedul:\n  lr: 1.0e-3\n")
    assert "did you mean 'schedule'?" in one(config_problems(path), "schedul:")


def test_wrong_type(tmp_path, exp_root):
    path = write_recipe(tmp_path, "extends: tiny\nparallel:\n  global_batch_size: many\n"
                                  "parallel_extra: 1\nlogging:\n  tensorboard: maybe\n")
    problems = config_problems(path)
    assert one(problems, "global_batch_size") == "parallel.global_batch_size: expected an integer (got 'many')"
    assert one(problems, "tensorboard") == "logging.tensorboard: expected true or false (got 'maybe')"
    assert "unknown key" in one(problems, "parallel_extra")


def test_wrong_type_from_set(exp_root):
    problems = config_problems("tiny", "schedule.lr=fast")
    assert one(problems, "schedule.lr") == "schedule.lr: expected a number (got 'fast')"


@pytest.mark.parametrize("text,where", [
    ("name: x\nmodel:\n  num_layers: 2\n   hidden_size: 3\n", "line 4, column 15"),
    ("name: x\nparallel:\n  tensor_parallel: 2\n\tcontext_parallel: 1\n", "line 4, column 1"),
])
def test_yaml_syntax_error_has_line_and_column(text, where, tmp_path, exp_root):
    path = write_recipe(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        plan_run(LaunchRequest(recipe=path, dry_run=True))
    (problem,) = info.value.problems
    assert str(problem).startswith(f"{path}: YAML syntax error at {where}: ")


def test_yaml_syntax_error_in_an_extended_recipe(tmp_path, exp_root):
    write_recipe(tmp_path, "name: base\nmodel: [\n", "base.yaml")
    path = write_recipe(tmp_path, "extends: base.yaml\nname: child\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "base.yaml: YAML syntax error at line 3" in str(info.value.problems[0])


def test_unknown_recipe_name():
    with pytest.raises(RecipeError) as info:
        plan_run(LaunchRequest(recipe="7bb", dry_run=True))
    (problem,) = info.value.problems
    assert str(problem).startswith("recipe: unknown recipe (shipped: ")
    assert "did you mean '7b'?" in str(problem)
    assert "(got '7bb')" in str(problem)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(str(tmp_path / "nope.yaml"))
    assert "file not found" in str(info.value.problems[0])


def test_set_on_nonexistent_key(exp_root):
    problems = config_problems("tiny", "parallel.tensor_paralel=2")
    text = one(problems, "tensor_paralel")
    assert text.startswith("--set parallel.tensor_paralel: no key 'tensor_paralel' in parallel; "
                           "did you mean 'tensor_parallel'?")


def test_set_on_nonexistent_section(exp_root):
    assert "no key 'paralel' in recipe; did you mean 'parallel'?" in one(config_problems("tiny", "paralel.x=1"), "paralel")


def test_set_without_equals(exp_root):
    assert "expected SECTION.KEY=VALUE" in one(config_problems("tiny", "parallel.tensor_parallel"), "--set")


def test_set_env_variable(exp_root):
    plan = plan_run(LaunchRequest(recipe="tiny", sets=["env.NCCL_DEBUG=INFO"], dry_run=True),
                    LaunchEnv.read({"INFIR2_EXP_ROOT": str(exp_root), "INFIR2_GPU_CHECK": "0"}))
    assert plan.env["NCCL_DEBUG"] == "INFO"


def test_decay_recipe_refused_by_train(exp_root):
    problems = config_problems("7b-decay")
    assert "is a decay recipe: run it with `infir2 decay --recipe 7b-decay --load iter_NNNNNNN`" in one(
        problems, "decay recipe")


def test_decay_load_must_name_an_iteration(exp_root):
    problems = config_problems("7b", decay_load="checkpoints")
    assert "is not an iteration" in one(problems, "--load")


# --------------------------------------------------------------------------- everything at once


def test_all_problems_reported_together(exp_root):
    problems = config_problems("tiny", "schedule.train_iters=50", "parallel.sequence_parallel=true",
                               rdzv_endpoint="nohost")
    assert len(problems) == 3, problems
    assert [p.split(":")[0] for p in problems] == ["parallel.sequence_parallel", "schedule", "launch.rdzv_endpoint"]


def test_type_problems_and_rule_problems_together(tmp_path, exp_root):
    """A key with a wrong type keeps its default, so the other rules still run and report."""
    path = write_recipe(tmp_path, "extends: tiny\nparallel:\n  micro_batch_size: big\n  sequence_parallel: true\n"
                                  "schedule:\n  train_iters: 50\nlaunch:\n  nnodes: 0\n")
    problems = config_problems(path)
    assert len(problems) == 4, problems
    for text in ("expected an integer", "needs tensor_parallel > 1", "exceeds train_iters", "launch.nnodes"):
        one(problems, text)


def test_config_and_machine_problems_separated(exp_root, tmp_path):
    """In a dry run only the configuration problems are fatal; the machine ones are listed as warnings."""
    missing = tmp_path / "absent"
    req = LaunchRequest(recipe="tiny", sets=["schedule.train_iters=50", "data.mock=false",
                                             f"data.blend=[{{path: '{missing}'}}]"], dry_run=True)
    with pytest.raises(LaunchError) as info:
        plan_run(req, no_gpu_probe())
    assert [p.key for p in info.value.problems] == ["schedule"]
    assert [p.key for p in info.value.warnings if p.key.startswith("data")] == ["data.blend[0].path"]


def test_a_hostname_or_routable_address_is_not_loopback(exp_root):
    for host in ("node01", "10.1.2.3", "[fe80::1]"):
        plan = plan_run(LaunchRequest(recipe="7b", nnodes=2, rdzv_endpoint=f"{host}:29400", dry_run=True),
                        no_gpu_probe())  # no configuration problem at all: the plan is made
        assert plan.recipe.launch.rdzv_endpoint == f"{host}:29400"


# --------------------------------------------------------------------------- what runs in FP8 beyond Megatron's flags


def test_fp8_options_do_nothing_in_bf16_and_say_so(exp_root):
    """`--set precision.fp8=null` turns an FP8 recipe into its BF16 baseline: its FP8 options are not errors there,
    they install nothing, and the launch names them."""
    on = ["precision.fp8_output_layer=true", "precision.fp8_output_layer_param=true", "precision.fp8_attention=true",
          "precision.fp8_activation_store_blockwise=true", "precision.fp8_bf16_param_remainders=true"]
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=["precision.fp8=null", *on]), no_gpu_probe())
    assert plan.env["INFIR2_RUNTIME_OPTIONS"] == "lean_cross_entropy"  # the recipe's loss, in either precision
    note = one(plan.notes, "precision.fp8_output_layer")
    assert "no effect without FP8" in note and all(s.split("=")[0] in note for s in on)
    fp8 = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=on[:2] + on[3:]), no_gpu_probe())
    assert not any("no effect without FP8" in n for n in fp8.notes)


def test_the_exact_memory_options_apply_where_they_can_and_the_launch_says_where_they_do_not(exp_root):
    on = ["precision.fp8_transpose_on_demand=true", "precision.fp8_proj_bf16_input=true"]
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=on), no_gpu_probe())
    assert {"fp8_proj_original_input", "fp8_transpose_on_demand"} <= set(plan.env["INFIR2_RUNTIME_OPTIONS"].split(","))
    assert not [n for n in plan.notes if "has no effect" in n]
    cases = {("precision.fp8=null",): ("fp8_proj_bf16_input has no effect without FP8",
                                       "fp8_transpose_on_demand has no effect without FP8"),
             ("precision.fp8=tensorwise",): ("with precision.fp8=tensorwise (it needs blockwise)",),
             ("precision.fp8_param_gather=false",): ("without FP8 parameters",),
             ("parallel.cuda_graph=transformer_engine",): ("with CUDA graphs",)}
    for sets, said in cases.items():
        plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=[*on, *sets]), no_gpu_probe())
        notes = " | ".join(plan.notes)
        assert all(s in notes for s in said), (sets, notes)
        options = plan.env.get("INFIR2_RUNTIME_OPTIONS", "")
        assert "fp8_transpose_on_demand" not in options
        assert ("fp8_proj_original_input" in options) == (sets != ("precision.fp8=null",))


def test_the_blockwise_swiglu_store_needs_tiles_of_128_on_each_gpu(exp_root):
    plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=["precision.fp8_activation_store_blockwise=true"]),
             no_gpu_probe())  # 2 x 2816 = 44 tiles
    problem = one(config_problems("tiny", "precision.fp8_activation_store_blockwise=true",
                                  "model.ffn_hidden_size=2848"), "precision.fp8_activation_store_blockwise:")
    assert "= 5696, to be a multiple of 128" in problem


def test_the_op_fuser_runs_in_both_precisions_but_not_with_either_swiglu_store(exp_root):
    fuser = ["model.te_op_fuser=true", "parallel.overlap_param_gather=false",
             "precision.fp8_activation_store_blockwise=false"]
    for sets in (fuser, [*fuser, "precision.fp8=null"]):
        plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=sets), no_gpu_probe())
        assert "te_op_fuser" in plan.env["INFIR2_RUNTIME_OPTIONS"].split(",")
    problem = one(config_problems("tiny", *fuser, "precision.fp8_activation_store_blockwise=true"),
                  "model.te_op_fuser:")
    assert "precision.fp8_activation_store_blockwise" in problem
    problem = one(config_problems("tiny", *fuser, "precision.fp8_activation_store=true"), "model.te_op_fuser:")
    assert "cannot take precision.fp8_activation_store" in problem
    bf16 = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=[*fuser, "precision.fp8_activation_store=true",
                                                                      "precision.fp8=null"]), no_gpu_probe())
    assert "te_op_fuser" in bf16.env["INFIR2_RUNTIME_OPTIONS"].split(",")  # the store is FP8's: nothing to refuse
    problem = one(config_problems("tiny", "model.te_op_fuser=true", "precision.fp8_activation_store_blockwise=false"),
                  "model.te_op_fuser:")
    assert "parallel.overlap_param_gather=false" in problem


def test_the_attention_amax_history_reaches_the_workers_only_with_fp8_attention(exp_root):
    on = ["precision.fp8_attention=true", "precision.fp8_attention_amax_history=1024"]
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=on), no_gpu_probe())
    assert plan.env["INFIR2_FP8_ATTENTION_AMAX_HISTORY"] == "1024"
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=["precision.fp8_attention=true"]), no_gpu_probe())
    assert "INFIR2_FP8_ATTENTION_AMAX_HISTORY" not in plan.env
    assert "has no effect without FP8 attention" in one(
        config_problems("tiny", "precision.fp8_attention_amax_history=16"), "precision.fp8_attention_amax_history:")
    assert "at least 1" in one(config_problems("tiny", "precision.fp8_attention=true",
                                               "precision.fp8_attention_amax_history=0"),
                               "precision.fp8_attention_amax_history:")


def test_an_fp8_parameter_head_needs_the_fp8_head_and_fp8_parameters(exp_root):
    on = ["precision.fp8_output_layer=true", "precision.fp8_output_layer_param=true"]
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=on), no_gpu_probe())
    assert {"fp8_output_layer", "fp8_output_layer_param"} <= set(plan.env["INFIR2_RUNTIME_OPTIONS"].split(","))
    # elsewhere it installs nothing and the launch says why
    for sets, why in ((["precision.fp8_output_layer=false"], "without the FP8 head"),
                      ([*on, "precision.fp8_param_gather=false"], "without FP8 parameters")):
        plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=sets), no_gpu_probe())
        assert "fp8_output_layer_param" not in plan.env["INFIR2_RUNTIME_OPTIONS"].split(",")
        assert why in one(plan.notes, "precision.fp8_output_layer_param has no effect")


def test_fp8_attention_is_launched_with_a_word_on_its_fidelity(exp_root):
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=["precision.fp8_attention=true"]), no_gpu_probe())
    assert [n for n in plan.notes if n.startswith("precision.fp8_attention diverged")]
    assert "fp8_attention" in plan.env["INFIR2_RUNTIME_OPTIONS"]
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True), no_gpu_probe())
    assert not [n for n in plan.notes if n.startswith("precision.fp8_attention")]


def test_fp8_output_layer_needs_untied_embeddings(exp_root):
    problem = one(config_problems("1.5b", "precision.fp8_output_layer=true"), "precision.fp8_output_layer")
    assert "untie_embeddings" in problem


def test_fp8_attention_needs_head_dim_128_and_attention_outside_cuda_graphs(exp_root):
    problems = config_problems("tiny", "precision.fp8_attention=true", "model.num_attention_heads=16",
                               "model.num_query_groups=4", "parallel.cuda_graph=transformer_engine")
    assert "head dim 128 only; this model's is 64" in one(problems, "precision.fp8_attention:")
    assert "use [mlp]" in one(problems, "parallel.cuda_graph_modules")


def test_bad_values_of_the_new_keys_name_what_is_valid(exp_root):
    problems = config_problems("tiny", "precision.adam_moments=fp16", "logging.nan_check=never",
                               "parallel.cuda_graph=full", "parallel.cuda_graph_modules=[layer]")
    assert "must be fp32 or bf16" in one(problems, "precision.adam_moments")
    assert "must be micro_batch or step" in one(problems, "logging.nan_check")
    assert "must be null, transformer_engine or local" in one(problems, "parallel.cuda_graph:")
    assert "must be attn or mlp" in one(problems, "parallel.cuda_graph_modules")


def test_the_blockwise_swiglu_store_is_one_way_and_needs_megatrons_fused_swiglu(exp_root):
    key = "precision.fp8_activation_store_blockwise"
    assert "choose one way" in one(config_problems("tiny", f"{key}=true", "precision.fp8_activation_store=true"), key)
    problem = one(config_problems("tiny", f"{key}=true", "megatron_extra_args=[--no-bias-swiglu-fusion]"), key)
    assert "needs Megatron's fused SwiGLU, which --no-bias-swiglu-fusion" in problem
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=[f"{key}=true"]), no_gpu_probe())
    assert "fp8_activation_store_blockwise" in plan.env["INFIR2_RUNTIME_OPTIONS"].split(",")
    argv = [a for group in plan.arg_groups for a in group.args]
    assert "--no-bias-swiglu-fusion" not in argv and "--use-te-activation-func" not in argv


def test_bf16_param_remainders_apply_to_blockwise_fp8_weights_with_the_precision_aware_distributed_optimizer(
        exp_root):
    key = "precision.fp8_bf16_param_remainders"
    for sets in (["precision.fp8=tensorwise"], ["precision.fp8_param_gather=false"],
                 ["precision.precision_aware_optimizer=false"],
                 ["parallel.distributed_optimizer=false", "precision.fp8_param_gather=false",
                  "parallel.overlap_param_gather=false"]):
        plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=[f"{key}=true", *sets]), no_gpu_probe())
        assert "fp8_bf16_param_remainders" not in plan.env.get("INFIR2_RUNTIME_OPTIONS", "").split(",")
        note = one(plan.notes, f"{key} has no effect")
        assert "it applies to blockwise FP8 parameters with the precision-aware, distributed optimizer" in note, sets
    problem = one(config_problems("tiny", f"{key}=true", "megatron_extra_args=[--dist-ckpt-optim-fully-reshardable]"),
                  key)
    assert "cannot be used with --dist-ckpt-optim-fully-reshardable" in problem
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=[f"{key}=true"]), no_gpu_probe())
    assert "fp8_bf16_param_remainders" in plan.env["INFIR2_RUNTIME_OPTIONS"].split(",")


def test_bf16_adam_moments_need_the_precision_aware_optimizer(exp_root):
    problem = one(config_problems("tiny", "precision.adam_moments=bf16", "precision.precision_aware_optimizer=false"),
                  "precision.adam_moments")
    assert "precision_aware_optimizer" in problem


def test_runtime_options_reach_the_workers_environment(exp_root):
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=[
        "precision.fp8_output_layer=true", "precision.fp8_attention=true", "model.fused_qkv_rope=true",
        "logging.nan_check=step", "parallel.cuda_graph=transformer_engine", "parallel.cuda_graph_modules=[mlp]"]),
        no_gpu_probe())
    # the recipe's exact memory options: the projection's input applies, transposes on demand not (CUDA graphs)
    assert plan.env["INFIR2_RUNTIME_OPTIONS"] == \
        "fp8_output_layer,fp8_output_layer_param,fp8_attention,fp8_activation_store_blockwise," \
        "fp8_proj_original_input,fp8_bf16_param_remainders,fused_qkv_rope,lean_cross_entropy,nan_check_per_step"
    assert plan.env["NCCL_GRAPH_REGISTER"] == "0"  # what Megatron asks for beside expandable segments
    user = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=["parallel.cuda_graph=transformer_engine"]),
                    LaunchEnv.read({**os.environ, "INFIR2_GPU_CHECK": "0", "NCCL_GRAPH_REGISTER": "0"}))
    assert "NCCL_GRAPH_REGISTER" not in user.env  # the user's own value wins (and is reported)
    assert ("NCCL_GRAPH_REGISTER", "0", "user (recipe: 0)") in [(e.name, e.value, e.source) for e in user.env_report]
    plain = plan_run(LaunchRequest(recipe="tiny", dry_run=True), no_gpu_probe())
    assert plain.env["INFIR2_RUNTIME_OPTIONS"] == \
        "fp8_output_layer,fp8_output_layer_param,fp8_activation_store_blockwise,fp8_proj_original_input," \
        "fp8_transpose_on_demand,fp8_bf16_param_remainders,lean_cross_entropy"  # the recipes' FP8 options and loss
    bf16 = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=["precision.fp8=null"]), no_gpu_probe())
    assert bf16.env["INFIR2_RUNTIME_OPTIONS"] == "lean_cross_entropy"
    native = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=["precision.fp8=null",
                                                                       "parallel.cross_entropy_fusion=native"]),
                      no_gpu_probe())
    assert "INFIR2_RUNTIME_OPTIONS" not in native.env


def test_the_stop_grace_period_is_at_least_a_second(exp_root):
    assert "launch.stop_grace_seconds: must be >= 1 (got 0)" in config_problems("tiny", "launch.stop_grace_seconds=0")
