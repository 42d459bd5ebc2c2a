"""Every shipped recipe, full and decay, gives an argument list that Megatron's own parser and validate_args
accept (megatron-core 0.19.2, on the CPU). Only the GPU-architecture probe is patched (validate_args asks it
for TP > 1); rank and world size are set the way torchrun would."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from infir2_cpt import checkpoints as ck
from infir2_cpt.launch.plan import LaunchRequest, plan_run
from infir2_cpt.layout import ExperimentPaths
from infir2_cpt.launch.megatron_args import LoadPlan, build_megatron_args
from infir2_cpt.recipe.load import load_recipe, shipped_recipe_names
from infir2_cpt.recipe.schedule import WSDSchedule
from infir2_cpt.recipe.shape import ModelShape, embedding_rows


@pytest.fixture(scope="module")
def megatron_arguments():
    """megatron.training.arguments, imported once per module (the import takes seconds)."""
    return pytest.importorskip("megatron.training.arguments")


@pytest.fixture
def megatron_parse(megatron_arguments, monkeypatch):
    """parse(argv, world_size) -> the validated Namespace, as Megatron's training loop would see it."""
    monkeypatch.setattr(megatron_arguments, "get_device_arch_version", lambda: 9)  # Hopper
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)

    def parse(argv: list[str], world_size: int) -> argparse.Namespace:
        parser = megatron_arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
        args = parser.parse_args(argv)
        args.rank = 0
        args.world_size = world_size
        megatron_arguments.validate_args(args, {})
        return args

    return parse


def _world(plan) -> int:
    return plan.recipe.launch.nnodes * plan.recipe.launch.nproc_per_node


def _fake_complete_checkpoint(ckpt_dir: Path, iteration: int) -> None:
    folder = ckpt_dir / ck.iter_dir_name(iteration)
    folder.mkdir(parents=True)
    for name in ck.REQUIRED_FILES:
        (folder / name).write_text("{}")
    (ckpt_dir / ck.TRACKER).write_text(f"{iteration}\n")


FULL_RECIPES = [n for n in shipped_recipe_names() if not n.endswith("-decay")]
DECAY_RECIPES = [n for n in shipped_recipe_names() if n.endswith("-decay")]


def test_shipped_recipes_are_covered():
    assert {"7b", "1.5b", "tiny"} <= set(FULL_RECIPES)
    assert {"7b-decay", "1.5b-decay"} <= set(DECAY_RECIPES)


EXPECTED = {
    # recipe: (TP, DP at the recipe's world size, padded vocab, lr, train_iters, sequence_parallel)
    "7b": (4, 2, 152064, 1e-4, 40000, True),
    "1.5b": (2, 4, 151936, 1e-4, 40000, True),
    "tiny": (1, 1, 32768, 1e-3, 300, False),
}


@pytest.mark.parametrize("name", FULL_RECIPES)
def test_full_recipe_passes_megatron_validate_args(name, exp_root, megatron_parse):
    plan = plan_run(LaunchRequest(recipe=name, dry_run=True))
    args = megatron_parse(plan.megatron_args, _world(plan))
    r = plan.recipe
    assert args.tensor_model_parallel_size == r.parallel.tensor_parallel
    assert args.pipeline_model_parallel_size == r.parallel.pipeline_parallel
    assert args.num_layers == r.model.num_layers
    assert args.hidden_size == r.model.hidden_size
    assert args.num_query_groups == r.model.num_query_groups
    assert args.group_query_attention
    assert args.add_qkv_bias and not args.add_bias_linear
    assert args.fp8 == "e4m3" and args.fp8_recipe == "blockwise"
    assert args.fp8_param_gather and args.use_distributed_optimizer and args.bf16
    assert args.lr_decay_style == "WSD" and args.lr_wsd_decay_style == "cosine"
    assert args.lr == r.schedule.lr and args.min_lr == r.schedule.min_lr
    assert args.train_iters == r.schedule.train_iters
    assert args.lr_warmup_iters == r.schedule.warmup_iters
    assert args.lr_wsd_decay_iters == r.schedule.decay_iters
    assert args.ckpt_format == "torch_dist"
    assert args.save == str(exp_root / r.name / "checkpoints") == args.load
    assert not args.no_load_optim  # resumes keep Adam state and the scheduler (the seed's bug)
    assert args.no_load_rng
    assert args.exit_signal_handler
    assert not args.profile and not args.record_memory_history
    if name in EXPECTED:
        tp, dp, padded, lr, iters, sp = EXPECTED[name]
        assert (args.tensor_model_parallel_size, args.data_parallel_size) == (tp, dp)
        assert args.lr == lr and args.train_iters == iters
        assert args.sequence_parallel is sp
        if padded is not None and r.model.padded_vocab_size is not None:
            assert args.padded_vocab_size == padded
        assert args.untie_embeddings_and_output_weights is r.model.untie_embeddings
        assert r.model.untie_embeddings is (name != "1.5b")  # Qwen2.5-1.5B ties its embeddings


def test_tiny_uses_mock_data_and_null_tokenizer(exp_root, megatron_parse):
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True))
    assert not plan.findings.machine or all(p.key == "gpu" for p in plan.findings.machine)
    args = megatron_parse(plan.megatron_args, 1)
    assert args.mock_data and args.tokenizer_type == "NullTokenizer"
    assert args.tokenizer_model is None and args.data_path is None
    # every matrix dimension a multiple of 128 (blockwise FP8 tiles)
    assert args.hidden_size % 128 == 0 and args.ffn_hidden_size % 128 == 0
    assert args.kv_channels == 128


@pytest.mark.parametrize("name", ["7b", "1.5b"])
def test_multi_node_world_size(name, exp_root, megatron_parse):
    plan = plan_run(LaunchRequest(recipe=name, nnodes=4, rdzv_endpoint="node0:29400", dry_run=True))
    args = megatron_parse(plan.megatron_args, _world(plan))
    assert args.world_size == 32
    assert args.data_parallel_size == 32 // plan.recipe.parallel.tensor_parallel


@pytest.mark.parametrize("recipe,stable,iteration,end", [
    ("7b", "InfiR2_CPT_FP8_7B", 35000, 40000),
    ("7b-decay", "InfiR2_CPT_FP8_7B", 20000, 25000),
    ("1.5b", "InfiR2_CPT_FP8_1.5B", 35000, 40000),
    ("1.5b-decay", "InfiR2_CPT_FP8_1.5B", 30000, 35000),
])
def test_decay_recipe_passes_megatron_validate_args(recipe, stable, iteration, end, exp_root, megatron_parse):
    """Through the decay code path, from a fake complete stable checkpoint."""
    _fake_complete_checkpoint(exp_root / stable / "checkpoints", iteration)
    plan = plan_run(LaunchRequest(recipe=recipe, decay_load=ck.iter_dir_name(iteration), dry_run=True))
    assert not [p for p in plan.findings.machine if p.key == "--load"], plan.findings.machine
    assert plan.recipe.phase == "decay" and plan.recipe.stable_name == stable
    args = megatron_parse(plan.megatron_args, _world(plan))
    assert args.load == str(exp_root / stable / "checkpoints")
    assert args.ckpt_step == iteration
    assert args.save == str(exp_root / plan.recipe.name / "checkpoints")
    assert args.save != args.load
    assert args.train_iters == end
    assert args.lr_warmup_iters == 0
    assert args.lr_wsd_decay_iters == 5000
    assert args.override_opt_param_scheduler
    assert args.exit_on_missing_checkpoint
    assert not args.no_load_optim
    assert args.fp8_recipe == "blockwise"


@pytest.mark.parametrize("name", DECAY_RECIPES)
def test_decay_recipe_via_build_megatron_args(name, exp_root, megatron_parse):
    """The argument builder alone, with the LoadPlan the decay logic would give."""
    recipe = load_recipe(name).recipe
    stable = ExperimentPaths.for_name(recipe.stable_name, exp_root)
    plan = LoadPlan(load_dir=stable.checkpoints, ckpt_step=35000, expect_checkpoint=True, override_scheduler=True)
    argv = build_megatron_args(recipe, ExperimentPaths.for_name(recipe.name, exp_root), plan,
                               schedule=WSDSchedule.of(recipe).decay_from(35000))
    world = recipe.launch.nnodes * recipe.launch.nproc_per_node
    args = megatron_parse(argv, world)
    assert args.ckpt_step == 35000 and args.train_iters == 40000 and args.override_opt_param_scheduler


@pytest.mark.parametrize("vocab,tp,rows", [(32767, 1, 32768), (32768, 2, 32768), (32769, 1, 32896),
                                           (151665, 2, 151808)])
def test_padded_vocab_rule_is_megatrons(vocab, tp, rows, exp_root, megatron_parse):
    """infir2's padded-vocabulary rule (recipe/shape.py) against Megatron's own: the recipe's arguments through
    Megatron's parser, then the tokenizer built as megatron.training builds it, which sets padded_vocab_size. The
    wheel's NullTokenizer has exactly --vocab-size ids (EOD is the last), so 32768 at TP 2 stays 32768."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    recipe = load_recipe("tiny", [f"model.vocab_size={vocab}", f"parallel.tensor_parallel={tp}"]).recipe
    paths = ExperimentPaths.for_name(recipe.name, exp_root)
    args = megatron_parse(build_megatron_args(recipe, paths, LoadPlan(load_dir=paths.checkpoints)), tp)
    build_tokenizer(args)
    assert args.padded_vocab_size == rows
    assert embedding_rows(recipe) == ModelShape.from_recipe(recipe).padded_vocab_size == rows


def test_extra_args_last_one_wins(exp_root, megatron_parse):
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, extra_args=["--lr", "5e-4", "--eval-iters", "3"]))
    args = megatron_parse(plan.megatron_args, 1)
    assert args.lr == 5e-4 and args.eval_iters == 3


def test_profile_flags_parse(exp_root, megatron_parse):
    plan = plan_run(LaunchRequest(recipe="tiny", sets=["logging.profile=true"], dry_run=True))
    args = megatron_parse(plan.megatron_args, 1)
    assert args.profile and args.use_pytorch_profiler and args.record_memory_history
    assert (args.profile_step_start, args.profile_step_end) == (10, 12)


def test_resume_plan_passes_megatron_validate_args(exp_root, megatron_parse):
    """A run with a complete checkpoint of its own resumes from it and insists on finding it."""
    _fake_complete_checkpoint(exp_root / "tiny" / "checkpoints", 100)
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True))
    args = megatron_parse(plan.megatron_args, 1)
    assert args.load == str(exp_root / "tiny" / "checkpoints")
    assert args.exit_on_missing_checkpoint
    assert not args.no_load_optim and not args.override_opt_param_scheduler


ALL_OPTIONS = ["precision.fp8_output_layer=true", "precision.fp8_attention=true", "precision.fp8_activation_store=true",
               "precision.fp8_activation_store_blockwise=false",
               "precision.fp8_proj_bf16_input=true", "precision.adam_moments=bf16", "model.fused_qkv_rope=true",
               "logging.nan_check=step", "parallel.cuda_graph=transformer_engine", "parallel.cuda_graph_modules=[mlp]"]


@pytest.mark.parametrize("name", ["7b", "tiny"])
def test_every_fp8_and_memory_option_passes_megatron_validate_args(name, exp_root, megatron_parse, monkeypatch,
                                                                   tmp_path):
    """The options together, and the first launch from a base model (the masters flags)."""
    base = tmp_path / "base"
    _fake_complete_checkpoint(base, 100)
    plan = plan_run(LaunchRequest(recipe=name, dry_run=True, sets=[*ALL_OPTIONS, f"checkpoint.pretrained={base}"]))
    for key, value in plan.env.items():  # Megatron reads NCCL_GRAPH_REGISTER from the environment
        monkeypatch.setenv(key, value)
    args = megatron_parse(plan.megatron_args, _world(plan))
    assert args.load_main_params_from_ckpt and args.no_load_optim and not args.stream_ckpt_dequant
    assert args.cuda_graph_impl == "transformer_engine" and args.use_te_activation_func
    assert not args.bias_swiglu_fusion
    assert str(args.exp_avg_dtype).endswith("bfloat16") and str(args.exp_avg_sq_dtype).endswith("bfloat16")


def test_async_save_uses_megatrons_own_writer(exp_root, megatron_parse):
    """Megatron's default async strategy (nvrx) needs nvidia-resiliency-ext, which the wheel lacks: a run with
    checkpoint.async_save stopped at start-up on an H200. infir2 asks for megatron-core's own writer."""
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=["checkpoint.async_save=true"]))
    args = megatron_parse(plan.megatron_args, _world(plan))
    assert args.async_save and args.use_persistent_ckpt_worker and args.async_strategy == "mcore"


def test_the_lean_loss_is_megatrons_fused_loss_replaced_at_run_time(exp_root, megatron_parse):
    """parallel.cross_entropy_fusion: lean asks Megatron for its fused loss (which the entry replaces) and tells the
    entry so; Megatron's parser accepts the list. 'te' is refused before launch, with the valid values."""
    plan = plan_run(LaunchRequest(recipe="7b", dry_run=True))  # the shipped recipes' loss
    args = megatron_parse(plan.megatron_args, _world(plan))
    assert args.cross_entropy_loss_fusion and args.cross_entropy_fusion_impl == "native"
    assert "lean_cross_entropy" in plan.env["INFIR2_RUNTIME_OPTIONS"].split(",")
    native = plan_run(LaunchRequest(recipe="7b", sets=["parallel.cross_entropy_fusion=native"], dry_run=True))
    assert megatron_parse(native.megatron_args, _world(native)).cross_entropy_fusion_impl == "native"
    assert "lean_cross_entropy" not in native.env.get("INFIR2_RUNTIME_OPTIONS", "").split(",")
    from infir2_cpt.errors import LaunchError

    with pytest.raises(LaunchError, match="null, 'native' or 'lean'"):
        plan_run(LaunchRequest(recipe="7b", sets=["parallel.cross_entropy_fusion=te"], dry_run=True))
