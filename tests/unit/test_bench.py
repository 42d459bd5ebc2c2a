"""`infir2 bench` in process: variants -> recipe overrides -> the exact Megatron arguments (infir2's planner and
Megatron's own parser), Megatron's log lines -> the table, the FLOP formula against Megatron's
num_floating_point_operations, MFU and ratios, the JSON/PNG outputs and the profiler-trace breakdown. The whole
orchestration end to end, with real processes: tests/process/test_bench_runs.py."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from infir2_cpt.bench import plan as bench_plan
from infir2_cpt.bench import run
from infir2_cpt.bench.run import LOWEST_PORT, ephemeral_low, free_port
from infir2_cpt.bench.metrics import (VariantMetrics, VariantResult, apply_baseline, fidelity_gap, gpu_peak,
                                      noise_warning, padded_vocab_from_log, peak_for, ratios, seed_summaries,
                                      step_spread, variant_metrics)
from infir2_cpt.bench.plan import BenchPlan, BenchRequest, VariantPlan, child_command, describe_plan, plan_bench
from infir2_cpt.bench.report import (format_seed_table, format_table, plot_breakdowns, plot_fidelity, plot_speed,
                                     write_json)
from infir2_cpt.bench.trace import classify_kernel, format_trace_breakdown, trace_breakdown
from infir2_cpt.bench.variants import (BUILTIN_VARIANTS, Variant, load_variants_file, parse_variant_spec,
                                       select_variants)
from infir2_cpt.errors import BenchError, Problem
from infir2_cpt.launch.plan import LaunchEnv
from infir2_cpt.recipe.shape import ModelShape
from infir2_cpt.reports.runlog import parse_log
from infir2_cpt.runtime.wheel_workarounds import adjust_megatron_argv

REPO = Path(__file__).resolve().parents[2]
FAKE_ENTRY = REPO / "tests" / "fakes" / "fake_megatron.py"


def _value(argv: list[str], flag: str) -> str:
    """The value of the last occurrence of `flag` (argparse: last one wins)."""
    index = len(argv) - 1 - argv[::-1].index(flag)
    return argv[index + 1]


def _plan(exp_root: Path, **kwargs) -> BenchPlan:
    kwargs.setdefault("dry_run", True)
    return plan_bench(BenchRequest(**kwargs), LaunchEnv.read({**os.environ, "INFIR2_EXP_ROOT": str(exp_root)}))


def _by_name(plan: BenchPlan) -> dict[str, VariantPlan]:
    return {vp.name: vp for vp in plan.variants}


# --------------------------------------------------------------------------- variants -> Megatron arguments


def test_7b_8_layer_shape_gives_the_expected_megatron_arguments(exp_root):
    plan = _plan(exp_root, recipe="7b", layers=8, seq=8192, exp_name="bench-t")
    variants = _by_name(plan)
    assert list(variants) == ["bf16", "fp8-blockwise", "fp8-tensorwise"]
    assert plan.root == exp_root / "bench-t" and plan.train_iters == 25 and plan.steps == 20
    for name, vp in variants.items():
        argv = vp.launch.megatron_args
        assert vp.launch.paths.root == exp_root / "bench-t" / name
        assert vp.launch.recipe.name == name
        # the shape: 7B's layer, 8 of them, 8192 tokens, Qwen2.5's vocabulary in 152064 rows
        for flag, value in (("--num-layers", "8"), ("--hidden-size", "3584"), ("--ffn-hidden-size", "18944"),
                            ("--num-attention-heads", "28"), ("--num-query-groups", "4"), ("--seq-length", "8192"),
                            ("--max-position-embeddings", "8192"), ("--vocab-size", "151665"),
                            ("--padded-vocab-size", "152064"), ("--tensor-model-parallel-size", "1"),
                            ("--micro-batch-size", "1"), ("--global-batch-size", "8"), ("--train-iters", "25"),
                            ("--eval-iters", "0"), ("--log-interval", "1"), ("--log-memory-interval", "25"),
                            ("--tokenizer-type", "NullTokenizer")):
            assert _value(argv, flag) == value, (name, flag)
        assert "--mock-data" in argv and "--data-path" not in argv and "--tokenizer-model" not in argv
        assert "--sequence-parallel" not in argv  # TP 1 on one GPU
        assert "--save" not in argv  # no checkpoint at all, not even Megatron's final one
        assert "--pretrained-checkpoint" not in argv and "--exit-on-missing-checkpoint" not in argv
        assert "--wandb-project" not in argv and "--log-params-norm" not in argv
        assert "--log-num-zeros-in-grad" not in argv and "--profile" not in argv
        assert "--log-throughput" in argv and "--bf16" in argv
        assert vp.launch.recipe.launch.nproc_per_node == 1 and vp.world_size == 1
        assert vp.tokens_per_iteration == 8 * 8192
    bf16, block, tensor = (variants[n].launch.megatron_args for n in ("bf16", "fp8-blockwise", "fp8-tensorwise"))
    assert "--fp8-format" not in bf16 and "--fp8-recipe" not in bf16 and "--fp8-param-gather" not in bf16
    assert "--use-precision-aware-optimizer" in bf16  # BF16 keeps the recipe's optimizer
    assert _value(block, "--fp8-format") == "e4m3" and _value(block, "--fp8-recipe") == "blockwise"
    assert "--fp8-param-gather" in block and "--use-precision-aware-optimizer" in block
    assert _value(tensor, "--fp8-recipe") == "tensorwise" and "--fp8-param-gather" in tensor
    assert variants["bf16"].fp8 is None and variants["fp8-blockwise"].fp8 == "blockwise"


def test_child_command_is_infir2_train_with_the_same_overrides(exp_root):
    plan = _plan(exp_root, recipe="7b", layers=8, seq=8192, variants=["fp8-blockwise"], sets=["data.num_workers=4"])
    vp = plan.variants[0]
    cmd = child_command(plan.request, vp, 29555)
    assert cmd[:5] == [sys.executable, "-m", "infir2_cpt.cli", "train", "--recipe"]
    assert cmd[cmd.index("--exp") + 1] == "fp8-blockwise"
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "localhost:29555"
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert sets == vp.sets
    assert "data.num_workers=2" not in sets  # a key the user sets is left to the user ...
    assert sets.index("precision.fp8=blockwise") > sets.index("data.num_workers=4")  # ... and the variant's come last
    assert cmd[cmd.index("--") + 1:] == vp.extra_args == ["--log-memory-interval", "25"]
    text = describe_plan(plan)
    assert "--set precision.fp8=blockwise" in text and "-m infir2_cpt.runtime.entry" in text


@pytest.fixture(scope="module")
def megatron_arguments():
    return pytest.importorskip("megatron.training.arguments")


@pytest.fixture
def megatron_parse(megatron_arguments, monkeypatch):
    """Megatron's own parser and validate_args, as the training loop would see the arguments (CPU: the
    GPU-architecture probe is patched; rank and world size set as torchrun would)."""
    monkeypatch.setattr(megatron_arguments, "get_device_arch_version", lambda: 9)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)

    def parse(argv: list[str], world_size: int = 1) -> argparse.Namespace:
        parser = megatron_arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
        args = parser.parse_args(argv)
        args.rank, args.world_size = 0, world_size
        megatron_arguments.validate_args(args, {})
        return args

    return parse


def test_megatron_parser_accepts_the_fp8_blockwise_bench_run(exp_root, megatron_parse):
    vp = _by_name(_plan(exp_root, recipe="7b", layers=8, seq=8192))["fp8-blockwise"]
    argv, _ = adjust_megatron_argv(vp.launch.megatron_args, apex_available=False)  # what the entry passes on
    args = megatron_parse(argv)
    assert args.fp8 == "e4m3" and args.fp8_recipe == "blockwise" and args.fp8_param_gather
    assert args.use_precision_aware_optimizer and args.use_distributed_optimizer and args.bf16
    assert (args.num_layers, args.hidden_size, args.seq_length) == (8, 3584, 8192)
    assert (args.padded_vocab_size, args.vocab_size) == (152064, 151665)
    assert args.tensor_model_parallel_size == 1 and not args.sequence_parallel
    assert (args.micro_batch_size, args.global_batch_size, args.data_parallel_size) == (1, 8, 1)
    assert args.train_iters == 25 and args.eval_iters == 0 and args.log_interval == 1
    assert args.mock_data and args.tokenizer_type == "NullTokenizer"
    assert args.save is None  # checkpoint.save=false: no --save, so nothing is ever saved
    assert args.log_memory_interval == 25 and args.log_throughput
    assert args.wandb_project is None and not args.log_params_norm and not args.profile


def test_megatron_parser_accepts_the_profiled_bf16_run(exp_root, megatron_parse):
    plan = _plan(exp_root, recipe="1.5b", seq=8192, nproc_per_node=2, variants=["bf16"], profile=True)
    vp = plan.variants[0]
    args = megatron_parse(adjust_megatron_argv(vp.launch.megatron_args, apex_available=False)[0], world_size=2)
    assert args.fp8 is None and args.tensor_model_parallel_size == 2 and args.sequence_parallel
    assert args.profile and args.use_pytorch_profiler and args.profile_ranks == [0]
    assert (args.profile_step_start, args.profile_step_end) == (5, 8) and args.train_iters == 25
    assert not args.record_memory_history  # the recipe's profile switch also records memory history: not here


def test_megatron_parser_accepts_the_memory_snapshot_run(exp_root, megatron_parse):
    plan = _plan(exp_root, recipe="7b", layers=8, seq=8192, variants=["bf16", "fp8-blockwise"], memory_snapshot=True)
    for vp in plan.variants:
        args = megatron_parse(adjust_megatron_argv(vp.launch.megatron_args, apex_available=False)[0])
        assert args.record_memory_history and not args.profile  # history only: no profiler trace
        assert args.memory_snapshot_path == str(plan.root / vp.name / "memory_snapshot.pickle")
    assert any(w.key == "--memory-snapshot" and "slows every iteration" in w.message for w in plan.warnings)


def test_cuda_graphs_beside_expandable_segments_need_nccl_graph_register_0(exp_root, megatron_parse, monkeypatch):
    """Megatron asserts NCCL_GRAPH_REGISTER=0 at start-up for TE CUDA graphs when the allocator uses expandable
    segments (the shipped recipes do): infir2 reports it before launching, and with the variable set both
    infir2 and Megatron accept the run."""
    monkeypatch.delenv("NCCL_GRAPH_REGISTER", raising=False)
    graphs = "fp8-graph:base=fp8-blockwise,--cuda-graph-impl=transformer_engine"
    with pytest.raises(BenchError) as err:
        _plan(exp_root, recipe="7b", layers=8, variants=[], variant_specs=[graphs])
    (problem,) = err.value.problems
    assert problem.key == "[fp8-graph] env.NCCL_GRAPH_REGISTER" and "--set env.NCCL_GRAPH_REGISTER=0" in problem.message
    vp = _plan(exp_root, recipe="7b", layers=8, variants=[], variant_specs=[graphs + ",env.NCCL_GRAPH_REGISTER=0"]).variants[0]
    argv = adjust_megatron_argv(vp.launch.megatron_args, apex_available=False)[0]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", vp.launch.env["PYTORCH_CUDA_ALLOC_CONF"])
    with pytest.raises(AssertionError, match="NCCL_GRAPH_REGISTER=0"):  # the rule infir2 mirrors
        megatron_parse(argv)
    monkeypatch.setenv("NCCL_GRAPH_REGISTER", vp.launch.env["NCCL_GRAPH_REGISTER"])
    assert megatron_parse(argv).cuda_graph_impl == "transformer_engine"


def test_no_checkpoint_is_written_megatron_config(exp_root, tmp_path):
    """Megatron's config container (what pretrain() reads) carries no save directory, so both the
    interval saves (`if args.save and ...`) and the final save (`cfg.checkpoint.save and iteration %
    save_interval != 0`) are off. Run in a child process: Megatron's global state is set once per process."""
    vp = _by_name(_plan(exp_root, recipe="tiny", variants=["bf16-nopao"]))["bf16-nopao"]
    argv, _ = adjust_megatron_argv(vp.launch.megatron_args + ["--no-rope-fusion", "--transformer-impl", "local"],
                                   apex_available=False)  # no TE on the CPU
    code = textwrap.dedent(f"""
        import json, sys
        sys.argv = ["entry"] + {argv!r}
        from megatron.training.arguments import parse_and_validate_args
        from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
        args = parse_and_validate_args()
        cfg = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
        print(json.dumps({{"save": cfg.checkpoint.save, "interval": cfg.checkpoint.save_interval,
                           "skip_train": cfg.validation.skip_train}}))
    """)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["save"] and not result["skip_train"]


def test_fidelity_uses_the_dataset_tokenizer_seed_and_recipe_schedule(exp_root, tmp_path):
    prefix = tmp_path / "toy_text_document"
    for suffix in (".bin", ".idx"):
        Path(str(prefix) + suffix).write_bytes(b"")
    (tmp_path / "tok").mkdir()
    plan = _plan(exp_root, recipe="tiny", fidelity=True, data=str(prefix), tokenizer=str(tmp_path / "tok"), seed=7)
    assert plan.mode == "fidelity" and plan.train_iters == 500 and [v.name for v in plan.variants] == ["bf16", "fp8-blockwise"]
    for vp in plan.variants:
        argv = vp.launch.megatron_args
        assert _value(argv, "--data-path") == str(prefix) and "--mock-data" not in argv
        assert _value(argv, "--tokenizer-type") == "HuggingFaceTokenizer"
        assert _value(argv, "--tokenizer-model") == str(tmp_path / "tok")
        assert _value(argv, "--seed") == "7" and _value(argv, "--train-iters") == "500"
        assert _value(argv, "--lr-warmup-iters") == "30" and _value(argv, "--lr-wsd-decay-iters") == "60"  # tiny's
        assert _value(argv, "--global-batch-size") == "16" and _value(argv, "--seq-length") == "1024"
        assert "--save" not in argv
    short = _plan(exp_root, recipe="tiny", fidelity=True, data=str(prefix), tokenizer=str(tmp_path / "tok"), steps=50)
    argv = short.variants[0].launch.megatron_args
    assert (_value(argv, "--lr-warmup-iters"), _value(argv, "--lr-wsd-decay-iters")) == ("5", "10")


def test_fidelity_from_a_trained_model_loads_it_in_every_variant(exp_root, tmp_path):
    """Continual pre-training from a base model is the steady fidelity test: --set checkpoint.pretrained reaches
    every variant as a first launch from it (FP8: masters copied from the base model's BF16 weights)."""
    prefix = tmp_path / "toy_text_document"
    for suffix in (".bin", ".idx"):
        Path(str(prefix) + suffix).write_bytes(b"")
    base = tmp_path / "base" / "checkpoints"
    (base / "iter_0001000").mkdir(parents=True)
    (base / "latest_checkpointed_iteration.txt").write_text("1000")
    for name in (".metadata", "__0_0.distcp"):
        (base / "iter_0001000" / name).write_bytes(b"")
    plan = _plan(exp_root, recipe="tiny", fidelity=True, data=str(prefix), tokenizer=str(tmp_path),
                 sets=[f"checkpoint.pretrained={base}"])
    assert not [w for w in plan.warnings if w.key == "--fidelity"]
    for vp in plan.variants:
        argv = vp.launch.megatron_args
        assert _value(argv, "--pretrained-checkpoint") == str(base) and "--save" not in argv
        assert ("--load-main-params-from-ckpt" in argv) == (vp.name == "fp8-blockwise"), vp.name


def test_fidelity_over_seeds_runs_each_variant_once_per_seed_and_checks_the_seeds(exp_root, tmp_path):
    prefix = tmp_path / "toy_text_document"
    for suffix in (".bin", ".idx"):
        Path(str(prefix) + suffix).write_bytes(b"")
    data = {"fidelity": True, "data": str(prefix), "tokenizer": str(tmp_path)}
    plan = _plan(exp_root, recipe="tiny", seeds=["3", "4", "5"], **data)
    assert [vp.name for vp in plan.variants] == [f"{v}.seed{s}" for s in (3, 4, 5) for v in ("bf16", "fp8-blockwise")]
    assert [_value(vp.launch.megatron_args, "--seed") for vp in plan.variants] == ["3", "3", "4", "4", "5", "5"]
    assert not [w for w in plan.warnings if w.key == "--baseline"]  # bf16 is among the runs, under its seeds' names
    assert [w.key for w in plan.warnings] == ["--fidelity"]  # from random weights: the drift is said
    for seeds, extra, message in ((["3", "x"], {}, "must be non-negative integers"),
                                  (["3"], {}, "needs two or more different seeds"),
                                  (["3", "3"], {}, "needs two or more different seeds"),
                                  (["3", "4"], {"seed": 7}, "give either --seed or --seeds")):
        with pytest.raises(BenchError, match=message):
            _plan(exp_root, recipe="tiny", seeds=seeds, **data, **extra)
    with pytest.raises(BenchError, match="--seeds: only with --fidelity"):
        _plan(exp_root, recipe="tiny", seeds=["3", "4"])
    with pytest.raises(BenchError, match="--parallel: only with --fidelity"):
        _plan(exp_root, recipe="tiny", parallel=2)
    with pytest.raises(BenchError, match="--parallel: must be >= 1"):
        _plan(exp_root, recipe="tiny", parallel=0, **data)
    assert len(_plan(exp_root, recipe="tiny", parallel=4, seeds=["1", "2"], **data).variants) == 4


def _fid_result(name: str, final: float | None, status: str = "ok") -> VariantResult:
    return VariantResult(name=name, description="", sets=[], extra_args=[], command=[], fp8=None, status=status,
                         exit_code=0, seconds=1.0, metrics=VariantMetrics(final_loss_window=final, final_loss=final))


def test_over_seeds_each_run_meets_the_baseline_of_its_seed_and_variants_compare_by_their_means():
    results = [_fid_result("bf16.seed1", 4.00), _fid_result("fp8.seed1", 4.04), _fid_result("bf16.seed2", 4.02),
               _fid_result("fp8.seed2", 4.00), _fid_result("lossy.seed1", 4.20), _fid_result("lossy.seed2", None,
                                                                                            "failed (exit 1)")]
    apply_baseline(results, "bf16", fidelity=True)
    by = {r.name: r for r in results}
    assert by["fp8.seed1"].fidelity.relative_gap == pytest.approx(0.01)  # against bf16.seed1, not bf16.seed2
    assert by["fp8.seed2"].fidelity.relative_gap == pytest.approx(4.00 / 4.02 - 1)
    bf16, fp8, lossy = seed_summaries(results, "bf16")
    assert (bf16.mean_final_loss, bf16.spread) == (pytest.approx(4.01), pytest.approx(0.02 / 4.01))
    assert fp8.gap == pytest.approx(4.02 / 4.01 - 1) and fp8.within_target and not fp8.beyond_baseline_spread
    assert (lossy.seeds_ok, lossy.seeds, lossy.spread) == (1, 2, None)
    assert lossy.gap == pytest.approx(4.20 / 4.01 - 1) and not lossy.within_target and lossy.beyond_baseline_spread
    table = format_seed_table([bf16, fp8, lossy], "bf16")
    assert "| bf16 | 2/2 | 4.0100 | 0.50 % | +0.00 % | (baseline) | - |" in table
    assert "| fp8 | 2/2 | 4.0200 | 1.00 % | +0.25 % | yes | no |" in table
    assert "| lossy | 1/2 | 4.2000 | - | +4.74 % | NO | yes |" in table
    assert seed_summaries([_fid_result("bf16", 4.0)], "bf16") == []  # runs without seeds: no summary


def test_multi_gpu_bench_keeps_tensor_parallel_and_scales_the_batch(exp_root):
    plan = _plan(exp_root, recipe="7b", layers=8, seq=8192, nproc_per_node=8, micro_batch=2)
    argv = plan.variants[0].launch.megatron_args
    assert _value(argv, "--tensor-model-parallel-size") == "4" and "--sequence-parallel" in argv
    assert _value(argv, "--global-batch-size") == str(2 * 2 * 8)  # micro 2 x DP 2 x 8 micro-batches
    assert plan.variants[0].world_size == 8


def test_invalid_requests_report_every_problem(exp_root):
    with pytest.raises(BenchError) as err:
        _plan(exp_root, recipe="7b", tensor_parallel=3, variants=["bf16", "nope"], variant_specs=["bad name:x"])
    text = str(err.value)
    assert "unknown variant" in text and "'nope'" in text
    assert "NAME must be one folder name" in text and "item 'x'" in text
    assert "[bf16] parallel.tensor_parallel: must divide model.num_attention_heads=28" in text
    with pytest.raises(BenchError) as err:
        _plan(exp_root, recipe="tiny", steps=0, warmup_steps=-1, fidelity=True)
    keys = [p.key for p in err.value.problems]
    assert {"--steps", "--warmup-steps", "--data", "--tokenizer"} <= set(keys)
    with pytest.raises(BenchError) as err:
        _plan(exp_root, recipe="tiny", data="/x")
    assert [p.key for p in err.value.problems] == ["--data"]
    with pytest.raises(BenchError) as err:  # a variant's own override that infir2's validation refuses
        _plan(exp_root, recipe="tiny", variants=[], variant_specs=["odd:parallel.micro_batch_size=3"])
    assert "[odd] parallel.global_batch_size: must be a multiple of micro_batch_size" in str(err.value)


def test_existing_experiment_folder_is_refused_for_a_real_run(exp_root):
    (exp_root / "bench-x" / "bf16").mkdir(parents=True)
    with pytest.raises(BenchError) as err:
        plan_bench(BenchRequest(recipe="tiny", exp_name="bench-x", variants=["bf16"]),
                   LaunchEnv.read({**os.environ, "INFIR2_ENTRY": str(FAKE_ENTRY), "INFIR2_GPU_CHECK": "0"}))
    assert "already exists" in str(err.value)


CANDIDATES = REPO / "benchmarks" / "bench_candidates.yaml"
UNTIED_ONLY = {"fp8-lmhead", "fp8-speed", "fp8-all", "fp8-all-moments", "fp8-all-tod",  # the FP8 LM head: 7B only
               "fp8-next", "fp8-next-rem", "fp8-next-hp", "fp8-next-hp-rem"}


@pytest.mark.parametrize("recipe,seq", [("7b", 8192), ("1.5b", 8192)])
def test_candidate_variants_pass_megatron_validation(recipe, seq, exp_root, megatron_parse):
    """Every candidate of benchmarks/bench_candidates.yaml is a valid run: none wastes GPU time
    on a parse error."""
    names = [v.name for v in load_variants_file(CANDIDATES, BUILTIN_VARIANTS)
             if not (recipe == "1.5b" and v.name in UNTIED_ONLY)]
    plan = _plan(exp_root, recipe=recipe, layers=8 if recipe == "7b" else None, seq=seq,
                 variants_file=str(CANDIDATES), variants=["bf16", "fp8-blockwise", *names])
    assert len(plan.variants) == len(names) + 2
    for vp in plan.variants:
        args = megatron_parse(adjust_megatron_argv(vp.launch.megatron_args, apex_available=False)[0])
        assert args.save is None and args.seq_length == seq and args.global_batch_size == 8, vp.name
        assert (args.fp8 is None) == vp.name.startswith("bf16"), vp.name
    by = _by_name(plan)
    assert "--cross-entropy-loss-fusion" in by["fp8-ce-mbs2"].launch.megatron_args
    assert _value(by["fp8-ce-mbs2"].launch.megatron_args, "--micro-batch-size") == "2"
    assert _value(by["bf16-ce-bf16states"].launch.megatron_args, "--exp-avg-dtype") == "bf16"


# --------------------------------------------------------------------------- --variant and --variants-file


def test_variant_spec_items():
    known = dict(BUILTIN_VARIANTS)
    v = parse_variant_spec("name=fp8-mbs2:precision.fp8=blockwise,parallel.micro_batch_size=2", known)
    assert v == Variant("fp8-mbs2", ("precision.fp8=blockwise", "parallel.micro_batch_size=2"), (),
                        "precision.fp8=blockwise, parallel.micro_batch_size=2")
    v = parse_variant_spec("ce:base=fp8-blockwise,parallel.cross_entropy_fusion=native,data.split=98,2,0,"
                           "--manual-gc,--manual-gc-interval=100", known)
    assert v.sets == (*BUILTIN_VARIANTS["fp8-blockwise"].sets, "parallel.cross_entropy_fusion=native",
                      "data.split=98,2,0")
    assert v.extra_args == ("--manual-gc", "--manual-gc-interval=100")
    assert v.description.startswith("fp8-blockwise + ")
    assert parse_variant_spec("plain", known) == Variant("plain", (), (), "the recipe as is")
    with pytest.raises(BenchError) as err:
        parse_variant_spec("bad name:base=nope", known)
    assert len(err.value.problems) == 2


def test_variants_file(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text(textwrap.dedent("""
        variants:
          fp8-ce:
            base: fp8-blockwise
            set: {parallel.cross_entropy_fusion: native}
          fp8-ce-gc:
            base: fp8-ce
            set: ["parallel.micro_batch_size=2"]
            args: ["--manual-gc", "--manual-gc-interval", "100"]
            description: CE fusion, micro batch 2, manual GC
    """))
    out = load_variants_file(path, BUILTIN_VARIANTS)
    assert [v.name for v in out] == ["fp8-ce", "fp8-ce-gc"]
    assert out[0].sets[-1] == 'parallel.cross_entropy_fusion="native"'
    assert out[1].sets[-2:] == ('parallel.cross_entropy_fusion="native"', "parallel.micro_batch_size=2")
    assert out[1].extra_args == ("--manual-gc", "--manual-gc-interval", "100")
    assert out[1].description == "CE fusion, micro batch 2, manual GC"
    chosen = select_variants(["bf16", "fp8-ce-gc"], definitions=out)  # a file's variant runs when named
    assert [v.name for v in chosen] == ["bf16", "fp8-ce-gc"]
    spec = parse_variant_spec("cli:base=fp8-ce", {**BUILTIN_VARIANTS, **{v.name: v for v in out}})
    chosen = select_variants(["fp8-ce"], always=[spec], definitions=out)  # a --variant always runs
    assert [v.name for v in chosen] == ["fp8-ce", "cli"]
    (tmp_path / "bad.yaml").write_text("variants: {x: {base: nope}, y: {sett: 1}}")
    with pytest.raises(BenchError) as err:
        load_variants_file(tmp_path / "bad.yaml", BUILTIN_VARIANTS)
    assert len(err.value.problems) == 2


def test_variants_file_without_variants_runs_defaults_and_the_whole_file(exp_root, tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("variants:\n  fp8-ce: {base: fp8-blockwise, set: [parallel.cross_entropy_fusion=native]}\n")
    plan = _plan(exp_root, recipe="tiny", variants_file=str(path))
    assert [v.name for v in plan.variants] == ["bf16", "fp8-blockwise", "fp8-tensorwise", "fp8-ce"]
    plan = _plan(exp_root, recipe="tiny", variants_file=str(path), variants=["bf16", "fp8-ce"])
    assert [v.name for v in plan.variants] == ["bf16", "fp8-ce"]
    assert "--cross-entropy-loss-fusion" in plan.variants[1].launch.megatron_args


# --------------------------------------------------------------------------- Megatron's log -> figures

# Lines as megatron/training/training.py training_log and utils/common_utils.py report_memory print them
# (log_interval 1, --log-throughput), with the noise around them.
MEGATRON_LOG = """\
 > padded vocab (size: 151665) with 399 dummy tokens (new size: 152064)
[after dataloaders are built] datetime: 2026-11-28 12:00:01
Theoretical memory footprints: weight and optimizer=52123.45 MB
 [2026-11-28 12:00:10.000001] iteration        1/      12 | consumed samples:            8 | elapsed time per iteration (ms): 9123.4 | throughput per GPU (TFLOP/s/GPU): 114.0 | learning rate: 2.000000E-05 | global batch size:     8 | lm loss: 1.193000E+01 | loss scale: 1.0 | grad norm: 7.501 | number of skipped iterations:   0 | number of nan iterations:   0 |
[Rank 0] (after 1 iterations) memory (MB) | allocated: 30000.00 | max allocated: 60000.00 | reserved: 62000.00 | max reserved: 62000.00
 [2026-11-28 12:00:12.000001] iteration        2/      12 | consumed samples:           16 | elapsed time per iteration (ms): 5000.0 | throughput per GPU (TFLOP/s/GPU): 208.0 | learning rate: 4.000000E-05 | global batch size:     8 | lm loss: 1.180000E+01 | loss scale: 1.0 | grad norm: 6.000 | number of skipped iterations:   0 | number of nan iterations:   0 |
[Rank 0] (after 2 iterations) memory (MB) | allocated: 40000.00 | max allocated: 69000.00 | reserved: 71000.00 | max reserved: 71000.00
"""
for _i, _ms in zip(range(3, 13), (1990.0, 1986.0, 1988.0, 2100.0, 1987.0, 1989.0, 1988.0, 1985.0, 1991.0, 1988.0)):
    MEGATRON_LOG += (f" [2026-11-28 12:00:{10 + _i}.000001] iteration {_i:8d}/      12 | consumed samples: {8 * _i:12d} |"
                     f" elapsed time per iteration (ms): {_ms:.1f} | throughput per GPU (TFLOP/s/GPU): "
                     f"{1039.760042754048e12 / (_ms / 1000) / 1e12:.1f} | learning rate: 1.000000E-04 |"
                     f" global batch size:     8 | lm loss: {11.9 - 0.1 * _i:.6E} | loss scale: 1.0 |"
                     f" grad norm: 2.000 | number of skipped iterations:   0 | number of nan iterations:   0 |\n")
MEGATRON_LOG += """\
[Rank 0] (after 12 iterations) memory (MB) | allocated: 40000.00 | max allocated: 69530.50 | reserved: 71000.00 | max reserved: 72482.00
[after training is done] datetime: 2026-11-28 12:00:40
"""


def test_metrics_from_megatron_log_lines():
    log = parse_log(MEGATRON_LOG)
    assert len(log.iterations) == 12 and log.saved == []
    assert padded_vocab_from_log(MEGATRON_LOG) == 152064
    shape = ModelShape(8, 3584, 18944, 28, 4, 8192, 152064)
    flops = shape.flops_per_iteration(8)
    m = variant_metrics(log, warmup_steps=2, tokens_per_iteration=8 * 8192, world_size=1,
                        flops_per_iteration=flops, peak_tflops=989.0, loss_window=5)
    assert m.timed_iterations == 10  # iterations 1 and 2 (compilation, Megatron's averaged 2nd line) left out
    assert m.step_ms == 1988.0 and m.step_ms_max == 2100.0 and m.step_ms_min == 1985.0
    assert m.tokens_per_s_per_gpu == pytest.approx(8 * 8192 / 1.988)
    assert m.model_tflops_per_gpu == pytest.approx(flops / 1.988 / 1e12)
    assert m.model_tflops_per_gpu == pytest.approx(523.0, abs=0.1)  # the BF16 figure measured at 1988 ms (benchmarks/2026-11-28-h200)
    assert m.megatron_tflops_per_gpu == pytest.approx(523.0, abs=0.1)
    assert m.mfu == pytest.approx(m.model_tflops_per_gpu / 989.0)
    assert m.max_allocated_gib == pytest.approx(69530.5 / 1024)  # the largest report, at the end of the run
    assert m.max_reserved_gib == pytest.approx(72482.0 / 1024)
    assert m.first_loss == pytest.approx(11.93) and m.final_loss == pytest.approx(10.7)
    assert m.final_loss_window == pytest.approx(sum(11.9 - 0.1 * i for i in range(8, 13)) / 5)


def test_a_variant_whose_steps_spread_is_flagged_as_noisy():
    """The 2100 ms step among ~1988 ms ones (5.8 %) is more than a GPU of its own shows (1-2.5 % on an H200)."""
    m = variant_metrics(parse_log(MEGATRON_LOG), warmup_steps=2, tokens_per_iteration=8 * 8192, world_size=1,
                        flops_per_iteration=None, peak_tflops=None)
    assert m.step_ms_spread == step_spread(m) == pytest.approx((2100 - 1985) / 1988)
    warning = noise_warning("fp8", m)
    assert warning and warning.startswith("fp8: timed steps spread 6% (fastest 1985 ms, slowest 2100 ms")
    assert "re-run it alone" in warning and "host-bound" in warning
    steady = dataclasses.replace(m, step_ms_max=2010.0)
    steady.step_ms_spread = step_spread(steady)
    assert noise_warning("fp8", steady) is None
    assert noise_warning("fp8", VariantMetrics()) is None
    result = VariantResult(name="fp8", description="", sets=[], extra_args=[], command=[], fp8="blockwise",
                           status="ok", exit_code=0, seconds=1.0, metrics=m, warnings=[warning])
    assert "| fp8 | ok (noisy) | 1988.0 | 5.8 % | 1985.0 |" in format_table([result], "fp8", "H200 SXM")


def test_ratios_mfu_and_fidelity_gap():
    base = VariantMetrics(step_ms=2000.0, step_ms_min=1900.0, tokens_per_s_per_gpu=100.0, megatron_tflops_per_gpu=500.0,
                          max_allocated_gib=70.0, max_reserved_gib=80.0, final_loss_window=3.0, final_loss=3.0)
    fp8 = VariantMetrics(step_ms=1600.0, step_ms_min=1425.0, tokens_per_s_per_gpu=125.0, megatron_tflops_per_gpu=625.0,
                         max_allocated_gib=63.0, max_reserved_gib=None, final_loss_window=3.012, final_loss=2.97)
    q = ratios(fp8, base)
    assert dataclasses.asdict(q) == pytest.approx({"step_time": 0.8, "fastest_step_time": 0.75, "tokens_per_s": 1.25,
                                                   "tflops": 1.25, "max_allocated": 0.9, "max_reserved": None})
    gap = fidelity_gap(fp8, base)
    assert gap.relative_gap == pytest.approx(0.004) and gap.within_target
    assert gap.relative_gap_last == pytest.approx(-0.01)
    assert not fidelity_gap(dataclasses.replace(fp8, final_loss_window=3.018), base).within_target
    assert peak_for(gpu_peak("NVIDIA H200"), "blockwise") == 1979
    assert peak_for(gpu_peak("NVIDIA H200"), None) == 989
    assert peak_for(None, "blockwise") is None


@pytest.mark.parametrize("name,label,bf16,fp8", [
    ("NVIDIA H200", "H200 SXM", 989, 1979),
    ("NVIDIA H200 NVL", "H200 NVL", 835, 1671),
    ("NVIDIA H100 80GB HBM3", "H100/H800 SXM", 989, 1979),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756, 1513),
    ("NVIDIA H800", "H100/H800 SXM", 989, 1979),
    ("NVIDIA H20", "H20", 148, 296),
    ("NVIDIA B200", "B200", 2250, 4500),
    ("NVIDIA A100-SXM4-80GB", "A100", 312, None),
])
def test_gpu_peaks(name, label, bf16, fp8):
    peak = gpu_peak(name)
    assert peak is not None and (peak.label, peak.bf16_tflops, peak.fp8_tflops) == (label, bf16, fp8)


def test_unknown_gpu_has_no_peak():
    assert gpu_peak("Tesla T4") is None and gpu_peak(None) is None


# --------------------------------------------------------------------------- FLOPs against Megatron's own count


@pytest.mark.parametrize("recipe,layers,seq,gbs", [("7b", 8, 8192, 8), ("7b", 28, 32768, 128), ("1.5b", 28, 8192, 8),
                                                   ("tiny", None, None, 16)])
def test_flop_formula_matches_megatron(recipe, layers, seq, gbs, exp_root, megatron_parse):
    training = pytest.importorskip("megatron.training.training")
    vp = _plan(exp_root, recipe=recipe, layers=layers, seq=seq, global_batch=gbs, variants=["bf16"]).variants[0]
    args = megatron_parse(vp.launch.megatron_args)
    if args.padded_vocab_size is None:  # set by the tokenizer at run time; the NullTokenizer's, padded
        args.padded_vocab_size = vp.shape.padded_vocab_size
    assert vp.shape.padded_vocab_size == args.padded_vocab_size
    ours = vp.shape.flops_per_iteration(gbs)
    theirs = training.num_floating_point_operations(args, gbs)
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_flop_parts_of_the_7b_layer():
    shape = ModelShape(1, 3584, 18944, 28, 4, 8192, 152064)
    parts = shape.flops_per_sequence()
    s, h = 8192, 3584
    assert parts["mlp"] == 6 * s * 3 * h * 18944
    assert parts["attention_projections"] == 6 * s * h * (3584 + 2 * 512 + 3584)
    assert parts["attention_core"] == 6 * s * s * 3584
    assert parts["logits"] == 6 * s * h * 152064
    assert shape.flops_per_iteration(2) == 2 * sum(parts.values())


# --------------------------------------------------------------------------- table, JSON, PNG


def _result(name: str, fp8, step_ms: float, alloc: float, losses: list[float]) -> VariantResult:
    metrics = VariantMetrics(step_ms=step_ms, tokens_per_s_per_gpu=65536 / step_ms * 1000,
                             megatron_tflops_per_gpu=1.04e6 / step_ms, model_tflops_per_gpu=1.04e6 / step_ms, mfu=0.5,
                             max_allocated_gib=alloc, max_reserved_gib=alloc + 2, first_loss=losses[0],
                             final_loss=losses[-1], final_loss_window=sum(losses[-2:]) / 2, loss_window=2)
    return VariantResult(name=name, description=name, sets=[], extra_args=[], command=["infir2"], fp8=fp8,
                         status="ok", exit_code=0, seconds=1.0, metrics=metrics,
                         iterations=[{"iteration": i + 1, "loss": loss, "iter_ms": step_ms, "tflops": 1.0}
                                     for i, loss in enumerate(losses)])


def test_table_json_and_plots(tmp_path):
    results = [_result("bf16", None, 1988.0, 67.9, [11.0, 5.0, 3.0, 2.9]),
               _result("fp8-blockwise", "blockwise", 1590.0, 61.0, [11.0, 5.1, 3.01, 2.91])]
    apply_baseline(results, "bf16", fidelity=True)
    assert results[1].ratios.step_time == pytest.approx(1590 / 1988)
    assert results[1].fidelity.within_target
    table = format_table(results, "bf16", "H200 SXM")
    assert table.splitlines()[0].startswith("| variant | status | step ms")
    assert "| fp8-blockwise | ok | 1590.0 | - |" in table and "| 0.800 |" in table
    fidelity = format_table(results, "bf16", "H200 SXM", fidelity=True)
    assert "(baseline)" in fidelity and "+0.34 %" in fidelity
    write_json(tmp_path / "bench.json", {"variants": [dataclasses.asdict(r) for r in results]})
    assert json.loads((tmp_path / "bench.json").read_text())["variants"][1]["name"] == "fp8-blockwise"
    for plot in (plot_speed(results, "bf16", tmp_path / "speed.png", "t"),
                 plot_fidelity(results, "bf16", tmp_path / "fid.png", "t")):
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_breakdowns(results, tmp_path / "none.png", "t") is None  # nothing profiled


# --------------------------------------------------------------------------- profiler trace breakdown


def _trace(steps: int = 2) -> dict:
    events = []
    for step in range(steps):
        t0 = step * 10_000.0
        events.append({"ph": "X", "cat": "user_annotation", "name": f"ProfilerStep#{7 + step}", "ts": t0, "dur": 9000.0})
        events.append({"ph": "X", "cat": "gpu_user_annotation", "name": f"ProfilerStep#{7 + step}", "ts": t0, "dur": 9000.0})
        kernels = [
            ("nvjet_sm90_qqtst_128x256_64x4_2x1_v_bz_e4m3_gemm", 3000.0),  # FP8 GEMM (cuBLASLt)
            ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", 1000.0),  # logits
            ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", 1500.0),
            ("transformer_engine::quantize_transpose_vector_blockwise::block_scaled_1d_cast_transpose_kernel", 500.0),
            ("multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>", 400.0),
            ("void at::native::vectorized_elementwise_kernel<4, at::native::AUnaryFunctor>", 200.0),
        ]
        t = t0
        for name, dur in kernels:
            events.append({"ph": "X", "cat": "kernel", "name": name, "ts": t, "dur": dur, "args": {"stream": 7}})
            t += dur
        # NCCL on its own stream: 600 us of it overlaps the last compute kernel by 200 us
        events.append({"ph": "X", "cat": "kernel", "name": "ncclDevKernel_ReduceScatter_Sum_f32_RING_LL",
                       "ts": t - 200.0, "dur": 600.0, "args": {"stream": 20}})
        events.append({"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "ts": t + 500.0, "dur": 100.0})
        events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": t0, "dur": 50.0})  # CPU side: ignored
    return {"schemaVersion": 1, "traceEvents": events}


def test_trace_breakdown_by_category(tmp_path):
    path = tmp_path / "rank-0.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(_trace(), f)
    b = trace_breakdown(path)
    assert b["steps"] == 2 and b["step_wall_ms"] == 9.0
    cats = {k: v["ms_per_step"] for k, v in b["categories"].items()}
    assert cats == pytest.approx({"gemm fp8": 3.0, "gemm bf16": 1.0, "attention": 1.5, "quantize/cast": 0.5,
                                  "optimizer": 0.4, "communication": 0.6, "memcpy/memset": 0.1, "other": 0.2})
    assert b["kernel_ms_per_step"] == pytest.approx(7.3)
    assert sum(v["share"] for v in b["categories"].values()) == pytest.approx(1.0)
    # busy: 6.6 ms of compute, then NCCL adds 0.4 past it, then the memset 0.1 (after a gap)
    assert b["gpu_busy_ms_per_step"] == pytest.approx(7.1)
    assert b["exposed_communication_ms_per_step"] == pytest.approx(0.4)
    assert b["top_kernels"]["gemm fp8"][0] == ["nvjet_sm90_qqtst_128x256_64x4_2x1_v_bz_e4m3_gemm", 3.0]
    text = format_trace_breakdown(b)
    assert "| gemm fp8 | 3.00 | 41.1 % |" in text


@pytest.mark.parametrize("name,category", [
    ("ncclDevKernel_AllGather_RING_LL", "communication"),
    ("void multi_tensor_apply_kernel<TensorListMetadata<2>, L2NormFunctor<float>>", "optimizer"),
    ("flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", "attention"),
    ("transformer_engine::detail::cast_transpose_kernel<...>", "quantize/cast"),
    ("transformer_engine::fp8_block_scaling_recipe::fp8_block_scaling_compute_partial_amax_kernel", "quantize/cast"),
    ("sm90_xmma_gemm_e4m3e4m3_e4m3f32_f32_tn_n_tilesize128x128x128", "gemm fp8"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_NNT", "gemm bf16"),
    ("cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16>", "gemm bf16"),
    ("void at::native::reduce_kernel<512, 1>", "other"),
])
def test_kernel_classification(name, category):
    assert classify_kernel(name) == category


def test_breakdown_cli(cli, tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(_trace(1)))
    result = cli("trace-breakdown", str(path))
    assert result.exit_code == 0, result.output
    assert "| attention | 1.50 |" in result.stdout
    assert cli("bench", "--breakdown", str(path)).stdout == result.stdout  # the older spelling still works
    (tmp_path / "bad.json").write_text("{}")
    bad = cli("trace-breakdown", str(tmp_path / "bad.json"))
    assert bad.exit_code == 2 and "infir2: cannot read the trace" in bad.stderr and "not a Chrome trace" in bad.stderr
    assert cli("bench", "--breakdown", str(tmp_path / "bad.json")).exit_code == 2


# --------------------------------------------------------------------------- CLI


def test_cli_dry_run_prints_every_variant_command(cli, exp_root):
    result = cli("bench", "--recipe", "7b", "--layers", "8", "--seq", "8192", "--dry-run",
                 "--variant", "fp8-mbs2:base=fp8-blockwise,parallel.micro_batch_size=2")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for name in ("bf16", "fp8-blockwise", "fp8-tensorwise", "fp8-mbs2"):
        assert f"## variant {name}:" in out
    assert out.count("-m infir2_cpt.cli train --recipe 7b") == 4
    assert out.count("-m infir2_cpt.runtime.entry") == 4
    assert "--set parallel.micro_batch_size=2" in out and "--save " not in out
    assert not exp_root.exists()  # a dry run writes nothing


def test_cli_errors_exit_2_before_anything_runs(cli, exp_root):
    result = cli("bench", "--recipe", "1.5b", "--tensor-parallel", "4", "--variants", "bf16,fp8-blockwise", "--dry-run")
    assert result.exit_code == 2
    assert "[bf16] parallel.tensor_parallel: must divide model.num_query_groups=2" in result.stderr
    assert "[fp8-blockwise]" in result.stderr
    assert cli("bench", "--recipe", "nope").exit_code == 2
    assert cli("bench").exit_code == 2  # no recipe
    assert cli("bench", "--recipe", "tiny", "--set", "model.bogus=1", "--dry-run").exit_code == 2
    assert not exp_root.exists()


def test_cli_lists_variants(cli):
    result = cli("bench-variants")
    assert result.exit_code == 0
    for name in BUILTIN_VARIANTS:
        assert name in result.stdout
    assert cli("bench", "--list-variants").stdout == result.stdout  # the older spelling, without --recipe


def test_no_gpu_exits_2_before_anything_is_written(cli, exp_root, monkeypatch):
    """Without INFIR2_GPU_CHECK=0 the GPU is probed (in a child process) before any variant starts."""
    monkeypatch.delenv("INFIR2_GPU_CHECK", raising=False)
    calls = []

    def probe(checks):
        calls.append(checks)
        return None, [Problem("gpu", "no CUDA GPU is visible on this host")]

    monkeypatch.setattr(run, "gpu_check", probe)
    result = cli("bench", "--recipe", "tiny", "--variants", "bf16,fp8-blockwise")
    assert result.exit_code == 2 and "no CUDA GPU is visible" in result.stderr
    assert calls == [[{"nproc": 1, "fp8": None}, {"nproc": 1, "fp8": "blockwise"}]]
    assert not exp_root.exists()


def test_ctrl_c_while_planning_exits_130_without_a_traceback(cli, exp_root, monkeypatch):
    """Ctrl-C can land before the plan exists (the planner parses every variant with Megatron's checks)."""
    def interrupted(req):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_plan, "plan_bench", interrupted)
    result = cli("bench", "--recipe", "tiny")
    assert result.exit_code == 130 and "infir2: bench interrupted" in result.stderr
    assert "results so far" not in result.stderr and not isinstance(result.exception, UnboundLocalError)


def test_a_run_stopped_by_the_timeout_after_its_last_iteration_keeps_its_figures(exp_root):
    """A fidelity run on a shared GPU can reach its last iteration and be stopped while it exits: its figures are
    whole and count (with a warning); one stopped earlier is timed out."""
    plan = _plan(exp_root, recipe="tiny", steps=10, warmup_steps=2)
    assert plan.train_iters == 12
    vp = plan.variants[0]
    whole = run.collect_result(plan, vp, run.VariantRun(name=vp.name, command=[], exit_code=-15, console=MEGATRON_LOG,
                                                        timed_out=True, seconds=1.0), None)
    assert whole.status == "ok" and whole.metrics.step_ms == 1988.0
    assert any("after its last iteration (12)" in w for w in whole.warnings)
    cut = MEGATRON_LOG[:MEGATRON_LOG.index(" [2026-11-28 12:00:17")]
    early = run.collect_result(plan, vp, run.VariantRun(name=vp.name, command=[], exit_code=-15, console=cut,
                                                        timed_out=True, seconds=1.0), None)
    assert early.status == "timed out"


def test_the_curves_script_smooths_with_trailing_means_and_compares_final_values(tmp_path):
    """benchmarks/scripts/tb_curves.py, on the figures docs/conversion.md draws with it."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "scripts" / "tb_curves.py"
    spec = importlib.util.spec_from_file_location("tb_curves", path)
    assert spec is not None and spec.loader is not None
    tb_curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tb_curves)
    points = [[1, 4.0], [2, 2.0], [3, 6.0], [4, 0.0]]
    assert tb_curves.trailing_mean(points, 2) == [[1, 4.0], [2, 3.0], [3, 4.0], [4, 3.0]]
    assert tb_curves.trailing_mean(points, 1) == points
    summary = tb_curves.summarize({"bf16": points, "fp8": [[s, v * 1.01] for s, v in points], "none": []}, "bf16", 2)
    assert summary["bf16"] == {"final": 3.0, "gap": 0.0} and summary["none"] == {"final": None, "gap": None}
    assert summary["fp8"]["gap"] == pytest.approx(0.01)
    tb_curves.plot({"bf16": points, "fp8": points}, "bf16", "lm loss", tmp_path / "c.png", smooth=2)
    assert (tmp_path / "c.png").stat().st_size > 0


def test_rendezvous_ports_come_from_below_the_ephemeral_range(tmp_path: Path) -> None:
    """A port the kernel may hand to another process's connection meanwhile is never chosen, and a taken one is
    skipped."""
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("32768\t60999\n")
    assert ephemeral_low(range_file) == 32768
    assert all(LOWEST_PORT <= free_port(range_file=range_file) < 32768 for _ in range(20))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port(range_file=range_file)))
        taken.listen()
        busy = taken.getsockname()[1]

        class TakenFirst(random.Random):
            def __init__(self) -> None:
                super().__init__(0)
                self.draws = 0

            def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
                self.draws += 1
                return busy if self.draws == 1 else super().randrange(start, stop)

        rng = TakenFirst()
        port = free_port(rng, range_file)
        assert port != busy and LOWEST_PORT <= port < 32768 and rng.draws >= 2
    range_file.write_text("garbage")
    assert ephemeral_low(range_file) == 32768


def test_a_second_baseline_gets_columns_of_its_own() -> None:
    results = [_result("bf16", None, 2000.0, 67.0, [3.0, 2.9]), _result("bf16-seedflags", None, 2100.0, 61.0, [3.0, 2.9]),
               _result("fp8-blockwise", "blockwise", 1600.0, 65.0, [3.0, 2.9])]
    apply_baseline(results, "bf16", fidelity=False, others=["bf16-seedflags"])
    fp8 = results[2]
    assert fp8.ratios.step_time == pytest.approx(0.8)
    assert fp8.other_ratios["bf16-seedflags"].step_time == pytest.approx(1600 / 2100)
    assert fp8.other_ratios["bf16-seedflags"].max_allocated == pytest.approx(65 / 61)
    table = format_table(results, "bf16", "H200 SXM", others=["bf16-seedflags"])
    head, _, *rows = table.splitlines()
    assert head.endswith("| x bf16-seedflags time | x bf16-seedflags alloc |")
    assert rows[2].endswith("| 0.800 | 0.970 | 0.971 | 0.762 | 1.066 |")


def test_a_second_baseline_must_be_run_and_is_for_speed_only(exp_root) -> None:
    with pytest.raises(BenchError, match="'bf16-seedflags' is not among the variants run"):
        plan_bench(BenchRequest(recipe="7b", variants=["bf16", "fp8-blockwise"], also_against=["bf16-seedflags"]))
    data, tokenizer = exp_root.parent / "text_document", exp_root.parent / "tok"
    for suffix in (".bin", ".idx"):
        Path(str(data) + suffix).write_bytes(b"")
    tokenizer.mkdir()
    with pytest.raises(BenchError, match="speed mode only"):
        plan_bench(BenchRequest(recipe="tiny", fidelity=True, data=str(data), tokenizer=str(tokenizer),
                                variants=["bf16", "fp8-blockwise"], also_against=["fp8-blockwise"]))
