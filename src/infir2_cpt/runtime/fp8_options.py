"""What runs in FP8 beyond Megatron's own flags: options the training entry installs before Megatron builds
the model, each switched on by the recipe (the launcher lists them in INFIR2_RUNTIME_OPTIONS).

- fp8_output_layer: the LM head's three GEMMs (logits, their gradient, the weight gradient) in FP8 with the
  run's recipe. megatron-core 0.19.2 ships such a head (TELMHeadColumnParallelLinear) but picks it only for
  MXFP8; the option widens that choice to any FP8 recipe. Its weight stays a BF16 parameter with an FP32
  master. Untied embeddings only (the launcher checks).
- fp8_output_layer_param: that head built inside Megatron's FP8-parameter context, as Megatron builds the
  transformer layers, so that its weight is an FP8 parameter (no BF16 weight, no cached FP8 copies).
- fp8_attention: core attention in FP8 (cuDNN fused attention) inside blockwise layers. Transformer Engine
  refuses FP8 attention under its blockwise recipe, so attention gets an FP8 context of its own with a
  delayed-scaling recipe (E4M3 forward, E5M2 backward), nested in the layer's blockwise one; the scales are
  updated when the layer's context exits, as for any delayed-scaling module.
- fp8_activation_store: the SwiGLU input (the widest activation of a layer) kept in FP8 for the backward
  pass. With Transformer Engine's SwiGLU (the launcher adds --use-te-activation-func
  --no-bias-swiglu-fusion) it is quantized with a per-tensor current scale, so large values stay finite.
- fp8_activation_store_blockwise: the same tensor kept in FP8 with one scale per 128 values, by infir2's SwiGLU
  (swiglu_store.py) in place of Megatron's fused one; forward unchanged.
- fp8_proj_original_input: the attention output projection keeps its BF16 input for backward (attention
  keeps that tensor anyway) instead of an extra FP8 copy.
- fp8_transpose_on_demand: FP8 weights without a persistent transposed copy. Hopper's FP8 GEMMs read both
  operands row-major, so backward needs each weight transposed; Megatron keeps that copy (1 byte per FP8
  weight) alive all the time. With the option it exists only during the layer's backward: Transformer
  Engine rebuilds it from the row-wise data when backward asks (an exact FP8 transpose of 128x128 blocks)
  and infir2 frees it once the weight's gradient is accumulated. Blockwise weights with fp8_param_gather.
- fp8_bf16_param_remainders: the parameters that stay BF16 (embeddings, LM head, norms, biases) keep their
  FP32 master as BF16 + a 16-bit remainder in Transformer Engine's fused Adam, not as a 4-byte FP32 copy in
  Megatron's distributed optimizer (optimizer_remainders.py).
- fused_qkv_rope: RoPE applied to the fused QKV output in one kernel (both precisions).
- te_op_fuser: each MLP built with Transformer Engine's operation fuser (Megatron's TEFusedMLP: te.ops RMSNorm,
  BasicLinear, SwiGLU, BasicLinear over the MLP's own parameters), which can fuse a GEMM input's quantization into
  the kernel that produces it (both precisions).
- lean_cross_entropy: Megatron's fused cross entropy replaced by infir2's, which keeps no FP32 copy of the logits
  (lean_cross_entropy.py; both precisions).
- nan_check_per_step: the loss's NaN/Inf check once per step instead of a device sync per micro-batch.

Config fields are set on Megatron's args before the model config is built from them (the config builder
copies every field that args carries); module patches are installed before the model is built.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields
from typing import Any, Callable

OPTIONS_ENV = "INFIR2_RUNTIME_OPTIONS"
ATTENTION_AMAX_HISTORY_ENV = "INFIR2_FP8_ATTENTION_AMAX_HISTORY"  # precision.fp8_attention_amax_history, when not 1


@dataclass(frozen=True)
class RuntimeOptions:
    fp8_output_layer: bool = False
    fp8_output_layer_param: bool = False
    fp8_attention: bool = False
    fp8_activation_store: bool = False
    fp8_activation_store_blockwise: bool = False
    fp8_proj_original_input: bool = False
    fp8_transpose_on_demand: bool = False
    fp8_bf16_param_remainders: bool = False
    fused_qkv_rope: bool = False
    te_op_fuser: bool = False
    lean_cross_entropy: bool = False
    nan_check_per_step: bool = False

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def parse(cls, text: str) -> "RuntimeOptions":
        """'a,b' -> RuntimeOptions(a=True, b=True); an unknown name is an error, not a silent no-op."""
        chosen = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in cls.names()]
        if unknown:
            raise ValueError(f"{OPTIONS_ENV}: unknown option(s) {', '.join(unknown)}; known: {', '.join(cls.names())}")
        return cls(**{name: True for name in chosen})

    @classmethod
    def from_env(cls, environ: Any = os.environ) -> "RuntimeOptions":
        return cls.parse(environ.get(OPTIONS_ENV, ""))

    def env_value(self) -> str:
        return ",".join(name for name in self.names() if getattr(self, name))


# --------------------------------------------------------------------------- config fields


def set_config_fields(args: Any, options: RuntimeOptions) -> list[str]:
    """Set the TransformerConfig fields Megatron has no flag for on args; returns notes."""
    notes = []
    if options.fp8_activation_store:
        args.activation_func_fp8_input_store = True
        notes.append("SwiGLU input kept in FP8 for backward (activation_func_fp8_input_store)")
    if options.fused_qkv_rope:
        args.fused_single_qkv_rope = True
        notes.append("RoPE fused into the QKV output (fused_single_qkv_rope)")
    if options.te_op_fuser:
        args.use_transformer_engine_op_fuser = True
        notes.append("MLPs built with Transformer Engine's operation fuser (use_transformer_engine_op_fuser)")
    return notes


# --------------------------------------------------------------------------- FP8 LM head


def any_fp8_recipe_output_layer(config: Any) -> bool:
    """Megatron's test for the FP8 LM head, for every FP8 recipe (it asks for MXFP8)."""
    return bool(getattr(config, "fp8", None))


def install_fp8_output_layer() -> None:
    """Widen the choice of the LM head in both places Megatron 0.19.2 makes it (the name was imported)."""
    import megatron.core.fp8_utils as fp8_utils
    import megatron.core.models.gpt.gpt_model as gpt_model

    if not getattr(fp8_utils, "HAVE_TE", False):
        raise RuntimeError("fp8_output_layer needs Transformer Engine")
    fp8_utils.is_mxfp8_output_proj_active = any_fp8_recipe_output_layer
    gpt_model.is_mxfp8_output_proj_active = any_fp8_recipe_output_layer


def install_fp8_output_layer_param() -> None:
    """Build Megatron's FP8 LM head (TELMHeadColumnParallelLinear) inside get_fp8_context(config, is_init=True), the
    FP8-parameter context Megatron enters for each transformer layer but not for the head."""
    import megatron.core.extensions.transformer_engine as te_extension
    import megatron.core.fp8_utils as fp8_utils

    head = getattr(te_extension, "TELMHeadColumnParallelLinear", None)
    if head is None:
        raise RuntimeError("fp8_output_layer_param needs Transformer Engine (Megatron's TELMHeadColumnParallelLinear)")
    original = head.__init__
    if getattr(original, "__infir2_fp8_param__", False):
        return

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, config: Any, **kwargs: Any) -> None:
        with fp8_utils.get_fp8_context(config, is_init=True):
            original(self, *args, config=config, **kwargs)

    __init__.__infir2_fp8_param__ = True  # type: ignore[attr-defined]
    head.__init__ = __init__


# --------------------------------------------------------------------------- FP8 attention


def wrap_in_context(forward: Callable[..., Any], fp8_enabled: Callable[[], bool],
                    make_context: Callable[[], Any],
                    after_first: Callable[[], None] | None = None) -> Callable[..., Any]:
    """forward, run inside make_context() whenever FP8 is on at call time (BF16 layers and FP8-free
    evaluation stay as they are). after_first runs once, after the first call under FP8."""
    pending = [after_first] if after_first is not None else []

    @functools.wraps(forward)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not fp8_enabled():
            return forward(self, *args, **kwargs)
        with make_context():
            out = forward(self, *args, **kwargs)
        while pending:
            pending.pop()()
        return out

    wrapped.__infir2_fp8_attention__ = True  # type: ignore[attr-defined]
    return wrapped


def attention_amax_history(environ: Any = os.environ) -> int:
    """The attention scales' amax history length the launcher set (1 when unset)."""
    text = environ.get(ATTENTION_AMAX_HISTORY_ENV, "1")
    try:
        steps = int(text)
    except ValueError:
        steps = 0
    if steps < 1:
        raise ValueError(f"{ATTENTION_AMAX_HISTORY_ENV}={text!r}: a whole number of steps, at least 1, expected")
    return steps


def attention_scaling(amax_history: int) -> dict[str, Any]:
    """The delayed-scaling settings of attention's FP8 tensors: E4M3 forward, E5M2 backward; each scale from the
    last step's amax, or from the largest of the last amax_history steps'."""
    return {"amax_history_len": amax_history, "amax_compute_algo": "most_recent" if amax_history == 1 else "max"}


def install_fp8_attention(amax_reduction_group: Callable[[], Any] | None = None, amax_history: int = 1) -> None:
    """Core attention (Megatron's TEDotProductAttention) in its own delayed-scaling FP8 context.

    One recipe object for every call: Transformer Engine keys its attention backend cache and scaling state
    on it. Amaxes are reduced over the tensor-parallel group when sequence parallelism splits tokens."""
    import transformer_engine.pytorch as te
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from transformer_engine.common.recipe import DelayedScaling, Format
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    if getattr(TEDotProductAttention.forward, "__infir2_fp8_attention__", False):
        return
    made: dict[str, Any] = {}

    def context() -> Any:
        if not made:  # at the first call: the parallel groups exist by then
            group = amax_reduction_group() if amax_reduction_group else None
            made["group"] = group
            made["recipe"] = DelayedScaling(fp8_format=Format.HYBRID, **attention_scaling(amax_history),
                                            fp8_dpa=True, fp8_mha=False, reduce_amax=group is not None)
        return te.autocast(enabled=True, recipe=made["recipe"], amax_reduction_group=made["group"])

    TEDotProductAttention.forward = wrap_in_context(TEDotProductAttention.forward,
                                                    FP8GlobalStateManager.is_fp8_enabled, context,
                                                    report_attention_backend)


def report_attention_backend() -> None:
    """Say which fused-attention backend Transformer Engine chose for the first FP8 call (FP8 or F16), so a run
    shows that attention really ran in FP8 (an unsupported shape falls back silently)."""
    try:
        import torch.distributed as dist
        from transformer_engine.pytorch.attention.dot_product_attention import dot_product_attention as dpa
        from transformer_engine.pytorch.cpp_extensions.fused_attn import FusedAttnBackend

        backend = dpa._attention_backends.get("fused_attention_backend")
        chosen = FusedAttnBackend(int(backend)).name if backend is not None else "none (not fused attention)"
    except Exception as exc:  # a TE without these internals: say so, do not stop the run
        chosen = f"unknown ({type(exc).__name__}: {exc})"
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"infir2.entry: FP8 attention: Transformer Engine's fused-attention backend is {chosen}", flush=True)


def tensor_parallel_amax_group() -> Any:
    """The TP group when sequence parallelism is on (TE requires the reduction then), else None."""
    from megatron.core import parallel_state as mpu
    from megatron.training import get_args

    if get_args().sequence_parallel and mpu.get_tensor_model_parallel_world_size() > 1:
        return mpu.get_tensor_model_parallel_group()
    return None


# --------------------------------------------------------------------------- after the model is built


def keep_original_proj_input(model: list[Any]) -> int:
    """save_original_input on every attention output projection; returns how many were set."""
    count = 0
    for chunk in model:
        for name, module in chunk.named_modules():
            if name.endswith("self_attention.linear_proj") and hasattr(module, "save_original_input"):
                module.save_original_input = True
                count += 1
    return count


def is_2d_blockwise_weight(param: Any) -> bool:
    """A Transformer Engine Float8BlockwiseQTensor with 128x128 blocks (whose transpose is exact); duck-typed so
    that it holds for any TE build and costs no import."""
    return getattr(param, "_is_2D_scaled", False) is True and hasattr(param, "update_usage") \
        and hasattr(param, "_columnwise_data")


def drop_transpose(param: Any) -> bool:
    """Free a blockwise weight's transposed copy; True if there was one."""
    if param._columnwise_data is None:
        return False
    param.update_usage(rowwise_usage=True, columnwise_usage=False)
    return True


def install_transpose_on_demand() -> None:
    """After the optimizer's all-gather of the FP8 parameters, Megatron asks Transformer Engine to rebuild every
    transposed copy; for 2-D blockwise weights free it instead (backward rebuilds it when needed). Replaces the
    name param_and_grad_buffer imported; other tensors go to the original."""
    import megatron.core.distributed.param_and_grad_buffer as buffers

    original = buffers.post_all_gather_processing
    if getattr(original, "__infir2_transpose_on_demand__", False):
        return

    def post_all_gather_processing(model_params: Any) -> None:
        params = model_params if isinstance(model_params, list) else [model_params]
        others = [p for p in params if not is_2d_blockwise_weight(p)]
        for p in params:
            if is_2d_blockwise_weight(p):
                drop_transpose(p)
        if others:
            original(others)

    post_all_gather_processing.__infir2_transpose_on_demand__ = True  # type: ignore[attr-defined]
    buffers.post_all_gather_processing = post_all_gather_processing


def transpose_on_demand(model: list[Any]) -> int:
    """Make every 2-D blockwise FP8 weight of the model keep no transposed copy between its backward passes:
    its quantizer stops asking for one in forward (so re-quantization and forward leave it out), the copy
    there is now is freed, and a hook that runs once the weight's gradient is accumulated frees the one backward
    rebuilt. Returns the number of weights."""
    count = 0
    for chunk in model:
        handles = []
        for param in chunk.parameters():
            if not is_2d_blockwise_weight(param):
                continue
            param._quantizer.set_usage(rowwise=True, columnwise=False)
            drop_transpose(param)
            # runs once the weight's gradient is accumulated, i.e. after its backward (dgrad and wgrad) finished;
            # a hook on the tensor itself: an FP8 parameter's expand_as has no plain accumulator node to hook
            handles.append(param.register_post_accumulate_grad_hook(_drop_after_backward))
            count += 1
        chunk._infir2_transpose_hooks = handles
    return count


def _drop_after_backward(param: Any) -> None:
    drop_transpose(param)


def describe_model(model: list[Any], options: RuntimeOptions) -> list[str]:
    """One line per option that changes modules, saying what the built model really has."""
    notes = []
    if options.fp8_output_layer:
        heads = {f"{type(m).__name__} (weight: {type(getattr(m, 'weight', None)).__name__})"
                 for chunk in model for n, m in chunk.named_modules() if n.endswith("output_layer")}
        notes.append(f"LM head: {', '.join(sorted(heads)) or 'none on this pipeline stage'}")
    if options.te_op_fuser:
        mlps = {type(m).__name__ for chunk in model for n, m in chunk.named_modules() if n.endswith(".mlp")}
        notes.append(f"MLPs: {', '.join(sorted(mlps)) or 'none on this pipeline stage'}")
    return notes
