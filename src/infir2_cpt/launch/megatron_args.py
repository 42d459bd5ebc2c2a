"""Recipe -> Megatron argument list.

The list is grouped the way the seed scripts group it (data, parallel, model, training, precision,
checkpoint, logging) so `--dry-run` reads like them. Deliberate differences from the seed are listed,
with reasons, in docs/recipes.md; tests/unit/test_golden_seed.py holds us to that list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..layout import ExperimentPaths
from ..retention import RETENTION_ENV, RetentionPolicy
from ..recipe.schedule import WSDSchedule
from ..runtime.fp8_options import ATTENTION_AMAX_HISTORY_ENV, OPTIONS_ENV, RuntimeOptions
from ..recipe.schema import BlendEntry, Recipe, head_param_applies, remainders_apply


@dataclass(frozen=True)
class LoadPlan:
    """What the launch loads, decided by the checkpoint logic (launch/plan.py) before exec."""

    load_dir: Path
    ckpt_step: int | None = None
    pretrained: Path | None = None
    expect_checkpoint: bool = False
    override_scheduler: bool = False  # a decay run: its own schedule replaces the checkpoint's
    masters_from_checkpoint: bool = False  # first launch from a base model with FP8 parameters


# Megatron's copy of the FP32 masters from the loaded BF16 weights. It needs --no-load-optim (there is no
# optimizer state in a base model), and the loaded weights must not be streamed into the FP8 parameters,
# or the copy reads them back quantized.
MASTERS_FROM_CHECKPOINT_FLAGS = ["--no-load-optim", "--load-main-params-from-ckpt", "--no-stream-ckpt-dequant"]


@dataclass(frozen=True)
class ArgGroup:
    """Megatron arguments of one kind, printed together by --dry-run."""

    name: str
    args: list[str]


def _flag(enabled: bool, name: str) -> list[str]:
    return [name] if enabled else []


def _num(value: float) -> str:
    """Integers stay integers; floats in Python's shortest round-trip form (1e-05, 0.0001)."""
    return str(value) if isinstance(value, int) else repr(float(value))


def blend_values(entries: list[BlendEntry]) -> list[str]:
    """A blend as Megatron's data-path options take it: the prefix alone, or weight prefix pairs."""
    if len(entries) == 1:
        return [entries[0].path]
    return [item for e in entries for item in (_num(e.weight), e.path)]


def data_args(recipe: Recipe, paths: ExperimentPaths, valid_only: list[BlendEntry] | None = None) -> list[str]:
    """The data group. With data.valid_blend Megatron gets per-split blends (all of `blend` trains, `valid_blend`
    validates) instead of --data-path and --split. valid_only: only these validate, nothing trains
    (`infir2 eval`)."""
    data, tok = recipe.data, recipe.tokenizer
    args: list[str] = []
    per_split = valid_only is not None or bool(data.valid_blend)
    if valid_only is not None:
        args += ["--valid-data-path", *blend_values(valid_only)]
    elif data.mock:
        args += ["--mock-data"]
    elif data.valid_blend:
        args += ["--train-data-path", *blend_values(data.blend), "--valid-data-path", *blend_values(data.valid_blend)]
    elif data.blend:
        args += ["--data-path", *blend_values(data.blend)]
    args += ["--data-cache-path", str(Path(data.cache_dir) if data.cache_dir else paths.data_cache)]
    args += ["--tokenizer-type", tok.type]
    if tok.model:
        args += ["--tokenizer-model", tok.model]
    if not per_split:  # Megatron refuses a split beside per-split blends
        args += ["--split", data.split]
    args += ["--num-workers", str(data.num_workers), "--no-create-attention-mask-in-dataloader"]
    return args


def parallel_args(recipe: Recipe) -> list[str]:
    par = recipe.parallel
    args = [
        "--distributed-timeout-minutes", str(par.distributed_timeout_minutes),
        "--micro-batch-size", str(par.micro_batch_size),
        "--global-batch-size", str(par.global_batch_size),
        "--tensor-model-parallel-size", str(par.tensor_parallel),
        "--pipeline-model-parallel-size", str(par.pipeline_parallel),
        "--context-parallel-size", str(par.context_parallel),
    ]
    args += _flag(par.distributed_optimizer, "--use-distributed-optimizer")
    args += _flag(par.sequence_parallel, "--sequence-parallel")
    args += _flag(par.overlap_grad_reduce, "--overlap-grad-reduce")
    args += _flag(par.overlap_param_gather, "--overlap-param-gather")
    if par.cross_entropy_fusion:  # lean: Megatron calls its fused loss, which the entry replaces with infir2's
        impl = "native" if par.cross_entropy_fusion == "lean" else par.cross_entropy_fusion
        args += ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", impl]
    if par.cuda_graph:
        args += ["--cuda-graph-impl", par.cuda_graph]
        if par.cuda_graph_modules:
            args += ["--cuda-graph-modules", *par.cuda_graph_modules]
    return args


def model_args(recipe: Recipe) -> list[str]:
    m = recipe.model
    args = ["--transformer-impl", "transformer_engine"]
    if m.attention_backend != "auto":
        args += ["--attention-backend", m.attention_backend]
    args += ["--disable-bias-linear", "--add-qkv-bias"]
    args += _flag(m.untie_embeddings, "--untie-embeddings-and-output-weights")
    args += [
        "--position-embedding-type", "rope",
        "--rotary-percent", "1.0",
        "--rotary-base", str(m.rotary_base),
        "--rotary-seq-len-interpolation-factor", "1",
        "--normalization", "RMSNorm",
        "--norm-epsilon", _num(m.norm_epsilon),
        "--swiglu",
        "--seq-length", str(m.seq_length),
        "--max-position-embeddings", str(m.max_position_embeddings),
        "--num-layers", str(m.num_layers),
        "--hidden-size", str(m.hidden_size),
        "--ffn-hidden-size", str(m.ffn_hidden_size),
        "--num-attention-heads", str(m.num_attention_heads),
        "--group-query-attention",
        "--num-query-groups", str(m.num_query_groups),
        "--attention-dropout", "0.0",
        "--hidden-dropout", "0.0",
        "--initial-loss-scale", "262144",
        "--vocab-size", str(m.vocab_size),
    ]
    if m.padded_vocab_size is not None:
        args += ["--padded-vocab-size", str(m.padded_vocab_size)]
    return args


def training_args(recipe: Recipe, schedule: WSDSchedule, plan: LoadPlan) -> list[str]:
    s = recipe.schedule
    args = [
        "--train-iters", str(schedule.train_iters),
        "--seed", str(s.seed),
        "--lr", _num(schedule.lr),
        "--weight-decay", _num(s.weight_decay),
        "--adam-beta1", _num(s.adam_beta1),
        "--adam-beta2", _num(s.adam_beta2),
        "--clip-grad", _num(s.clip_grad),
        "--lr-decay-style", "WSD",
        "--lr-warmup-iters", str(schedule.warmup_iters),
        "--lr-wsd-decay-style", schedule.decay_style,
        "--lr-wsd-decay-iters", str(schedule.decay_iters),
        "--min-lr", _num(schedule.min_lr),
        "--init-method-std", _num(recipe.model.init_method_std),
    ]
    if schedule.warmup_init_lr:
        args += ["--lr-warmup-init", _num(schedule.warmup_init_lr)]
    args += _flag(plan.override_scheduler, "--override-opt_param-scheduler")
    return args


def precision_args(recipe: Recipe) -> list[str]:
    p = recipe.precision
    args = ["--bf16"]
    if p.fp8:
        args += ["--fp8-format", p.fp8_format, "--fp8-recipe", p.fp8]
        args += _flag(p.fp8_param_gather, "--fp8-param-gather")
        args += _flag(p.first_last_layers_bf16, "--first-last-layers-bf16")
        # The SwiGLU input is stored by Transformer Engine's SwiGLU (a scaled FP8 copy), not Megatron's fused one
        args += ["--use-te-activation-func", "--no-bias-swiglu-fusion"] if p.fp8_activation_store else []
    args += _flag(p.precision_aware_optimizer, "--use-precision-aware-optimizer")
    if p.adam_moments != "fp32":
        args += ["--exp-avg-dtype", p.adam_moments, "--exp-avg-sq-dtype", p.adam_moments]
    return args


def checkpoint_args(recipe: Recipe, paths: ExperimentPaths, plan: LoadPlan) -> list[str]:
    c = recipe.checkpoint
    args = ["--save", str(paths.checkpoints), "--save-interval", str(c.save_interval)] if c.save else []
    args += ["--ckpt-format", c.format, "--load", str(plan.load_dir)]
    args += _flag(not c.load_rng, "--no-load-rng")
    if plan.ckpt_step is not None:
        args += ["--ckpt-step", str(plan.ckpt_step)]
    if plan.pretrained is not None:
        args += ["--pretrained-checkpoint", str(plan.pretrained)]
    if plan.masters_from_checkpoint:
        args += MASTERS_FROM_CHECKPOINT_FLAGS
    args += _flag(plan.expect_checkpoint, "--exit-on-missing-checkpoint")
    if c.async_save:
        # megatron-core's own background writer: its default (nvrx) needs nvidia-resiliency-ext, which the wheel
        # does not bring, and the run would stop at start-up
        args += ["--async-save", "--use-persistent-ckpt-worker", "--async-strategy", "mcore"]
    args += ["--exit-signal-handler"]
    if recipe.launch.exit_duration_minutes is not None:
        args += ["--exit-duration-in-mins", str(recipe.launch.exit_duration_minutes)]
    return args


def logging_args(recipe: Recipe, paths: ExperimentPaths) -> list[str]:
    lg = recipe.logging
    args = [
        "--log-interval", str(lg.log_interval),
        "--eval-interval", str(lg.eval_interval),
        "--eval-iters", str(lg.eval_iters),
        "--log-throughput",
    ]
    if lg.tensorboard:
        args += ["--tensorboard-dir", str(paths.tensorboard), "--log-timers-to-tensorboard",
                 "--log-memory-to-tensorboard"]
    args += _flag(lg.params_norm, "--log-params-norm")
    args += _flag(lg.num_zeros_in_grad, "--log-num-zeros-in-grad")
    if lg.wandb_project:
        args += ["--wandb-project", lg.wandb_project, "--wandb-exp-name", paths.name,
                 "--wandb-save-dir", str(paths.logs)]
    if lg.profile:
        args += ["--profile", "--use-pytorch-profiler", "--record-memory-history",
                 "--profile-step-start", str(lg.profile_step_start), "--profile-step-end", str(lg.profile_step_end)]
    return args


def master_weights(recipe: Recipe) -> str:
    """How the optimizer keeps the master weights, i.e. what a checkpoint's optimizer state holds. megatron-core
    0.19.2 keeps the BF16 parameters plus 16-bit remainders (TE's fused Adam) only with its precision-aware
    optimizer and no FP8 recipe but delayed scaling; otherwise FP32 copies."""
    p = recipe.precision
    if not (p.precision_aware_optimizer and recipe.parallel.distributed_optimizer):
        return "FP32 copies of all parameters"
    fp8_params = p.fp8 is not None and p.fp8_param_gather
    if p.fp8 is None or (p.fp8 == "delayed" and not fp8_params):
        return "the BF16 parameters with 16-bit remainders"
    if p.fp8 == "delayed" or remainders_apply(recipe):  # delayed: Transformer Engine's Adam keeps the FP32 copies
        return "FP32 copies of the FP8 weights, the BF16 parameters with 16-bit remainders"
    return "FP32 copies of all parameters"


def exact_fp8_memory_options(recipe: Recipe) -> tuple[bool, bool, list[str]]:
    """Whether the two memory options that change no arithmetic apply (the projection's BF16 input, transposes on
    demand), and a note for each one the recipe asks for where it cannot apply. They are settings of the FP8
    weights: a recipe keeps them on when it is switched to BF16, another FP8 recipe or CUDA graphs, and they then
    do nothing (said at launch) instead of refusing the switch."""
    p, notes = recipe.precision, []
    proj = p.fp8_proj_bf16_input and p.fp8 is not None
    tod = p.fp8_transpose_on_demand and p.fp8 == "blockwise" and p.fp8_param_gather and not recipe.parallel.cuda_graph
    if p.fp8_proj_bf16_input and not proj:
        notes.append("precision.fp8_proj_bf16_input has no effect without FP8 (precision.fp8 is null)")
    if p.fp8_transpose_on_demand and not tod:
        why = ("without FP8 (precision.fp8 is null)" if p.fp8 is None else
               f"with precision.fp8={p.fp8} (it needs blockwise)" if p.fp8 != "blockwise" else
               "without FP8 parameters (precision.fp8_param_gather is false)" if not p.fp8_param_gather else
               "with CUDA graphs (a captured graph keeps the memory it saw; the transposed copies come and go in "
               "backward)")
        keep = "" if p.fp8 is None else ": the FP8 weights keep their transposed copies"
        notes.append(f"precision.fp8_transpose_on_demand has no effect {why}{keep}")
    return proj, tod, notes


FP8_ONLY_OPTIONS = ("fp8_output_layer", "fp8_output_layer_param", "fp8_attention", "fp8_activation_store",
                    "fp8_activation_store_blockwise", "fp8_bf16_param_remainders")


def unapplied_fp8_options(recipe: Recipe) -> list[str]:
    """Launch notes for the FP8 options a recipe keeps on where they cannot apply. They follow the FP8 weights: a
    recipe switched to BF16 (`--set precision.fp8=null`), to another FP8 recipe or to BF16 parameters keeps them,
    and they then do nothing, said here, instead of refusing the switch."""
    p = recipe.precision
    if p.fp8 is None:
        unused = [f"precision.{name}" for name in FP8_ONLY_OPTIONS if getattr(p, name)]
        return [f"{', '.join(unused)}: no effect without FP8 (precision.fp8 is null): this run is BF16 "
                f"throughout"] if unused else []
    notes = []
    if p.fp8_output_layer_param and not head_param_applies(recipe):
        why = "without the FP8 head (precision.fp8_output_layer)" if not p.fp8_output_layer else \
            "without FP8 parameters (precision.fp8_param_gather)"
        notes.append(f"precision.fp8_output_layer_param has no effect {why}: the head's weight stays BF16")
    if p.fp8_bf16_param_remainders and not remainders_apply(recipe):
        notes.append(f"precision.fp8_bf16_param_remainders has no effect with precision.fp8={p.fp8}, "
                     f"fp8_param_gather={str(p.fp8_param_gather).lower()}, precision_aware_optimizer="
                     f"{str(p.precision_aware_optimizer).lower()}, parallel.distributed_optimizer="
                     f"{str(recipe.parallel.distributed_optimizer).lower()} (it applies to blockwise FP8 parameters "
                     f"with the precision-aware, distributed optimizer): the masters are {master_weights(recipe)}")
    return notes


def runtime_options(recipe: Recipe) -> RuntimeOptions:
    """What the training entry installs beyond Megatron's flags (runtime/fp8_options.py), from the recipe."""
    p, fp8 = recipe.precision, recipe.precision.fp8 is not None
    proj, tod, _ = exact_fp8_memory_options(recipe)
    return RuntimeOptions(
        fp8_output_layer=fp8 and p.fp8_output_layer,
        fp8_output_layer_param=head_param_applies(recipe),
        fp8_attention=fp8 and p.fp8_attention,
        fp8_activation_store=fp8 and p.fp8_activation_store,
        fp8_activation_store_blockwise=fp8 and p.fp8_activation_store_blockwise,
        fp8_proj_original_input=proj,
        fp8_transpose_on_demand=tod,
        fp8_bf16_param_remainders=remainders_apply(recipe),
        fused_qkv_rope=recipe.model.fused_qkv_rope,
        te_op_fuser=recipe.model.te_op_fuser,
        lean_cross_entropy=recipe.parallel.cross_entropy_fusion == "lean",
        nan_check_per_step=recipe.logging.nan_check == "step",
    )


def runtime_env(recipe: Recipe) -> dict[str, str]:
    """The environment the recipe's runtime options and CUDA graphs need (before the user's own values)."""
    env = {}
    options = runtime_options(recipe)
    names = options.env_value()
    if names:
        env[OPTIONS_ENV] = names
    policy = RetentionPolicy.of(recipe.checkpoint.keep_last, recipe.checkpoint.keep_every)
    if recipe.checkpoint.save and policy.active:  # the launcher prunes as checkpoints complete
        env[RETENTION_ENV] = policy.env_value()
    if options.fp8_attention and recipe.precision.fp8_attention_amax_history != 1:
        env[ATTENTION_AMAX_HISTORY_ENV] = str(recipe.precision.fp8_attention_amax_history)
    if recipe.parallel.cuda_graph == "transformer_engine":
        # Megatron asserts it beside expandable segments (the recipes' allocator): NCCL must not register
        # graph-captured buffers that the allocator may remap
        env["NCCL_GRAPH_REGISTER"] = "0"
    return env


def build_arg_groups(recipe: Recipe, paths: ExperimentPaths, plan: LoadPlan, extra: list[str] | None = None,
                     schedule: WSDSchedule | None = None) -> list[ArgGroup]:
    """The argument list in groups. `schedule` is what Megatron's scheduler is given (default: the recipe's whole
    run; a decay run's is WSDSchedule.decay_from)."""
    schedule = WSDSchedule.of(recipe) if schedule is None else schedule
    groups = [
        ArgGroup("data", data_args(recipe, paths)),
        ArgGroup("parallel", parallel_args(recipe)),
        ArgGroup("model", model_args(recipe)),
        ArgGroup("training", training_args(recipe, schedule, plan)),
        ArgGroup("precision", precision_args(recipe)),
        ArgGroup("checkpoint", checkpoint_args(recipe, paths, plan)),
        ArgGroup("logging", logging_args(recipe, paths)),
    ]
    passthrough = list(recipe.megatron_extra_args) + list(extra or [])
    if passthrough:
        groups.append(ArgGroup("pass-through (last one wins)", passthrough))
    return groups


def build_megatron_args(recipe: Recipe, paths: ExperimentPaths, plan: LoadPlan, extra: list[str] | None = None,
                        schedule: WSDSchedule | None = None) -> list[str]:
    return [arg for group in build_arg_groups(recipe, paths, plan, extra, schedule) for arg in group.args]
