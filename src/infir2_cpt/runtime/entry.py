"""The training entry point torchrun starts on every GPU: Megatron's own training loop from the
megatron-core wheel, with infir2's forward step, loss and dataset provider (no Megatron-LM checkout).

Launched as `python -m torch.distributed.run ... -m infir2_cpt.runtime.entry <megatron args>` by `infir2 train`.
Three traps of the megatron-core 0.19.2 wheel are handled here, before Megatron sees the arguments
(see wheel_workarounds.py): the dataset-helper `make`, gradient-accumulation fusion without APEX, and
the refused TE cross-entropy fusion.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from typing import Any, Callable, Iterator

from . import fp8_options, lean_cross_entropy, masters, optimizer_remainders, swiglu_store, wgrad_fusion
from .fp8_options import RuntimeOptions
from .wheel_workarounds import adjust_megatron_argv, skip_dataset_helper_compilation

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
_OPTIONS = RuntimeOptions()  # set by main() from the launcher's INFIR2_RUNTIME_OPTIONS


def _megatron():
    """Imported lazily: importing megatron.training is slow and needs CUDA-capable torch."""
    import torch
    from megatron.core import parallel_state as mpu
    from megatron.training import get_args, get_timers

    return torch, mpu, get_args, get_timers


# --------------------------------------------------------------------------- batches


def _read_batch_on_tp_source(data_iterator: Iterator[dict[str, Any]]) -> dict[str, Any]:
    torch, _, _, _ = _megatron()
    sample = next(data_iterator)
    return {key: sample[key].cuda(non_blocking=True) for key in BATCH_KEYS}


def _broadcast_batch_to_tp_group(batch: dict[str, Any] | None, micro_batch_size: int, seq_length: int) -> dict[str, Any]:
    """TP rank 0 read the batch; every other rank of its tensor-parallel group receives a copy.

    All ranks of a TP group must feed identical tokens to the sharded model. Only rank 0 builds the
    dataset (see is_dataset_built_on_rank), so it broadcasts fixed-shape tensors to the rest.
    """
    torch, mpu, _, _ = _megatron()
    group = mpu.get_tensor_model_parallel_group()
    source = mpu.get_tensor_model_parallel_src_rank()
    dtypes = {"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32, "position_ids": torch.int64}
    if batch is None:
        batch = {key: torch.empty((micro_batch_size, seq_length), dtype=dtypes[key],
                                  device=torch.cuda.current_device()) for key in BATCH_KEYS}
    else:
        batch = {key: batch[key].to(dtypes[key]).contiguous() for key in BATCH_KEYS}
    for key in BATCH_KEYS:
        torch.distributed.broadcast(batch[key], source, group=group)
    return batch


def get_batch(data_iterator: Iterator[dict[str, Any]] | None, vp_stage: int | None = None) -> dict[str, Any] | None:
    """This rank's micro-batch: read on TP rank 0, broadcast over TP, then split for context parallelism."""
    torch, mpu, get_args, _ = _megatron()
    from megatron.training.utils.common_utils import is_first_or_last_pipeline_stage

    if not is_first_or_last_pipeline_stage(vp_stage):
        return None  # middle pipeline stages receive activations, not tokens
    args = get_args()
    local = _read_batch_on_tp_source(data_iterator) if mpu.get_tensor_model_parallel_rank() == 0 else None
    if mpu.get_tensor_model_parallel_world_size() > 1:
        batch = _broadcast_batch_to_tp_group(local, args.micro_batch_size, args.seq_length)
    else:
        batch = local
    if args.context_parallel_size > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank({**batch, "cu_seqlens": None}, is_hybrid_cp=False,
                                          cp_group=mpu.get_context_parallel_group())
    return batch


# --------------------------------------------------------------------------- loss and forward


def loss_func(loss_mask, output_tensor):
    """Token-summed LM loss and its token count; Megatron divides by the tokens of the whole step."""
    torch, _, get_args, _ = _megatron()
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    if get_args().check_for_nan_in_loss_and_grad and not _OPTIONS.nan_check_per_step:
        from megatron.core.rerun_state_machine import get_rerun_state_machine

        checker = get_rerun_state_machine()
        checker.validate_result(result=loss, rejection_func=torch.isnan,
                                message="NaN in the local forward loss", tolerance=0.0, fatal=True)
        checker.validate_result(result=loss, rejection_func=torch.isinf,
                                message="Inf in the local forward loss", tolerance=0.0, fatal=True)
    report = torch.cat([loss.detach().view(1), num_tokens.view(1).float()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    _, _, _, get_timers = _megatron()
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator)
    timers("batch-generator").stop()
    if batch is None:  # middle pipeline stage
        output = model(None, None, None)
        return output, None
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


# --------------------------------------------------------------------------- datasets


def is_dataset_built_on_rank(vp_stage: int | None = None) -> bool:
    _, mpu, _, _ = _megatron()
    from megatron.training.utils.common_utils import is_first_or_last_pipeline_stage

    return mpu.get_tensor_model_parallel_rank() == 0 and is_first_or_last_pipeline_stage(vp_stage)


def dataset_config():
    _, mpu, get_args, _ = _megatron()
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training import get_tokenizer
    from megatron.training.utils.common_utils import get_blend_and_blend_per_split

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        mmap_bin_files=args.mmap_bin_files,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        context_parallel_size=args.context_parallel_size,
        data_parallel_size=mpu.get_data_parallel_world_size(),
        sequence_parallel_size=args.tensor_model_parallel_size * int(args.sequence_parallel),
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """GPTDataset over the recipe's blend, or MockGPTDataset with --mock-data."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, print_rank_0

    args = get_args()
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"> building {dataset_type.__name__} train/valid/test: {train_val_test_num_samples} samples")
    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, partial(is_dataset_built_on_rank, vp_stage=vp_stage),
        dataset_config(),
    ).build()


# Every rank must call the provider: build() ends in a global barrier, so with only TP rank 0
# calling it (Megatron's default) TP > 1 would hang.
train_valid_test_datasets_provider.is_distributed = True  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- main


def die_with_launcher() -> None:
    """Ask Linux to SIGKILL this worker when torchrun dies.

    torchrun starts workers in sessions of their own, so a SIGKILL to the launcher's process group (an
    OOM killer, `kill -9`, a crashed node agent) would leave them training, holding the GPUs and writing
    checkpoints beside the next launch. A worker outliving its launcher is never wanted.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() == 1:  # the launcher already died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _say(note: str) -> None:
    print(f"infir2.entry: {note}", flush=True)


def _install_after_setup(options: RuntimeOptions) -> None:
    """Work on the built and loaded model before training: options that act on modules, then the
    master-weight diagnostics (masters.py) when asked for."""
    import megatron.training.training as training

    original = training.setup_model_and_optimizer

    def setup_model_and_optimizer(*args: Any, **kwargs: Any) -> Any:
        model, optimizer, scheduler = original(*args, **kwargs)
        if options.fp8_proj_original_input:
            _say(f"attention output projections keep their BF16 input: {fp8_options.keep_original_proj_input(model)}")
        if options.fp8_transpose_on_demand:
            count = fp8_options.transpose_on_demand(model)
            _say(f"FP8 weights keep no transposed copy outside their backward: {count}")
        for note in fp8_options.describe_model(model, options):
            _say(note)
        if options.fp8_bf16_param_remainders:
            _say(optimizer_remainders.describe(optimizer))
        optimizer_remainders.dump_masters_after_step_if_asked(model, optimizer)
        from megatron.training import get_args

        masters.after_setup(model, optimizer, get_args())
        return model, optimizer, scheduler

    training.setup_model_and_optimizer = setup_model_and_optimizer


def main(argv: list[str] | None = None, before_pretrain: Callable[[], None] | None = None) -> None:
    """before_pretrain: called last before Megatron's pretrain() (the evaluation entry installs its loop there,
    after the workarounds above that must precede Megatron's imports)."""
    global _OPTIONS
    die_with_launcher()
    argv = list(sys.argv[1:] if argv is None else argv)
    _OPTIONS = options = RuntimeOptions.from_env()
    if wgrad_fusion.install_if_enabled():  # before megatron.core looks for APEX's module
        _say("gradient-accumulation fusion kept on with infir2's stand-in for APEX's "
             f"{wgrad_fusion.MODULE_NAME}")
    argv, notes = adjust_megatron_argv(argv)
    argv, restart_notes = masters.drop_first_load_flags_on_restart(argv, masters.tracker_exists)
    for note in notes + restart_notes:
        _say(note)
    skip_dataset_helper_compilation()
    sys.argv = [sys.argv[0], *argv]  # Megatron parses sys.argv

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args()
    for note in fp8_options.set_config_fields(args, options):
        _say(note)
    if options.fp8_output_layer:
        fp8_options.install_fp8_output_layer()
        _say("LM head in FP8 with the run's recipe")
    if options.fp8_output_layer_param:
        fp8_options.install_fp8_output_layer_param()
        _say("LM head's weight built as an FP8 parameter, as the layers' are")
    if options.fp8_attention:
        history = fp8_options.attention_amax_history()
        fp8_options.install_fp8_attention(fp8_options.tensor_parallel_amax_group, history)
        _say(f"core attention in FP8 (delayed scaling over {history} step(s), cuDNN fused attention) inside the "
             "blockwise layers")
    if options.fp8_transpose_on_demand:
        fp8_options.install_transpose_on_demand()
    if options.fp8_activation_store_blockwise:  # before the model is built: Megatron's MLP calls it by name
        swiglu_store.install()
        _say("SwiGLU input kept for backward in FP8 with one scale per 128 values")
    if options.fp8_bf16_param_remainders:  # before Megatron builds its optimizer config
        optimizer_remainders.install_bf16_remainders()
        _say("BF16 parameters: BF16 + 16-bit remainder in Transformer Engine's fused Adam, no FP32 master copy")
    if options.lean_cross_entropy:  # before the model runs: Megatron's language model calls it by name
        lean_cross_entropy.install()
        _say("cross entropy without FP32 copies of the logits (infir2's lean loss in place of Megatron's fused one)")
    if options.nan_check_per_step:
        _say("NaN/Inf: checked once per step on the gradients, not per micro-batch on the loss")
    _install_after_setup(options)
    config = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
    if before_pretrain is not None:
        before_pretrain()
    pretrain(config, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step)


if __name__ == "__main__":
    from infir2_cpt.runtime.exit_guard import run_bounded

    run_bounded(main)
