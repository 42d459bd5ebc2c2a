"""The runtime options the training entry installs (fp8_options.py), against megatron-core's own code on the
CPU: the option list, the config fields reaching Megatron's TransformerConfig, the LM-head choice Megatron
makes, and the attention wrapper's contract. What needs Transformer Engine and a GPU (the FP8 kernels
themselves) is measured by `infir2 bench` and recorded in benchmarks/."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import pytest

import torch

from infir2_cpt.runtime.fp8_options import (OPTIONS_ENV, RuntimeOptions, install_transpose_on_demand,
                                            set_config_fields, transpose_on_demand, wrap_in_context)


def test_options_parse_and_round_trip() -> None:
    options = RuntimeOptions.parse("fp8_output_layer, fused_qkv_rope")
    assert options.fp8_output_layer and options.fused_qkv_rope and not options.fp8_attention
    assert RuntimeOptions.parse(options.env_value()) == options
    assert RuntimeOptions.from_env({}) == RuntimeOptions()


def test_an_unknown_option_is_an_error_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=rf"{OPTIONS_ENV}: unknown option\(s\) fp8_lm_head; known: fp8_output_layer"):
        RuntimeOptions.parse("fp8_lm_head")


class _Recorder:
    def __init__(self) -> None:
        self.entered = 0
        self.exited = 0

    @contextlib.contextmanager
    def context(self) -> Any:
        self.entered += 1
        try:
            yield
        finally:
            self.exited += 1


def test_attention_wrapper_enters_its_context_only_under_fp8_and_always_leaves_it() -> None:
    calls: list[tuple[Any, ...]] = []
    fp8 = {"on": False}
    recorder = _Recorder()

    def forward(self: Any, q: int, k: int, *, mask: str) -> int:
        calls.append((self, q, k, mask, recorder.entered - recorder.exited))
        if mask == "boom":
            raise RuntimeError("boom")
        return q + k

    wrapped = wrap_in_context(forward, lambda: fp8["on"], recorder.context)
    assert wrapped("m", 1, 2, mask="causal") == 3 and recorder.entered == 0
    fp8["on"] = True
    assert wrapped("m", 3, 4, mask="causal") == 7
    assert calls[-1] == ("m", 3, 4, "causal", 1)  # ran inside the context
    with pytest.raises(RuntimeError):
        wrapped("m", 0, 0, mask="boom")
    assert recorder.entered == recorder.exited == 2
    assert wrapped.__name__ == "forward" and wrapped.__infir2_fp8_attention__


def test_attention_wrapper_reports_once_after_the_first_fp8_call() -> None:
    reports: list[str] = []
    recorder = _Recorder()
    fp8 = {"on": False}
    wrapped = wrap_in_context(lambda self: "out", lambda: fp8["on"], recorder.context,
                              lambda: reports.append("backend"))
    wrapped("m")
    assert reports == []  # not under FP8: nothing to report yet
    fp8["on"] = True
    assert wrapped("m") == "out" and wrapped("m") == "out"
    assert reports == ["backend"]


@pytest.fixture(scope="module")
def megatron_arguments():
    return pytest.importorskip("megatron.training.arguments")


def _tiny_args(megatron_arguments: Any, monkeypatch: pytest.MonkeyPatch, extra: list[str]) -> argparse.Namespace:
    from infir2_cpt.launch.plan import LaunchRequest, plan_run

    monkeypatch.setattr(megatron_arguments, "get_device_arch_version", lambda: 9)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True))
    parser = megatron_arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args([*plan.megatron_args, "--no-rope-fusion", *extra])  # no TE RoPE kernel on the CPU
    args.rank, args.world_size = 0, 1
    megatron_arguments.validate_args(args, {})
    return args


def test_config_fields_reach_megatrons_transformer_config(exp_root, megatron_arguments, monkeypatch) -> None:
    from megatron.training.argument_utils import gpt_config_from_args

    args = _tiny_args(megatron_arguments, monkeypatch, ["--use-te-activation-func", "--no-bias-swiglu-fusion"])
    notes = set_config_fields(args, RuntimeOptions(fp8_activation_store=True, fused_qkv_rope=True))
    assert len(notes) == 2
    config = gpt_config_from_args(args).transformer
    assert config.activation_func_fp8_input_store and config.fused_single_qkv_rope
    assert config.use_te_activation_func and not config.bias_activation_fusion

    plain = gpt_config_from_args(_tiny_args(megatron_arguments, monkeypatch, [])).transformer
    assert not plain.activation_func_fp8_input_store and not plain.fused_single_qkv_rope
    assert not plain.use_transformer_engine_op_fuser


def test_the_op_fuser_reaches_the_config_megatrons_layer_spec_reads(exp_root, megatron_arguments,
                                                                    monkeypatch) -> None:
    """Megatron's GPT builder picks its TEFusedMLP from config.use_transformer_engine_op_fuser (no flag for it)."""
    from megatron.training.argument_utils import gpt_config_from_args

    args = _tiny_args(megatron_arguments, monkeypatch, [])
    assert set_config_fields(args, RuntimeOptions(te_op_fuser=True)) == [
        "MLPs built with Transformer Engine's operation fuser (use_transformer_engine_op_fuser)"]
    config = gpt_config_from_args(args)
    assert config.use_transformer_engine_op_fuser and config.transformer.use_transformer_engine_op_fuser


def test_fp8_output_layer_makes_megatron_choose_the_te_head_for_blockwise(exp_root, megatron_arguments,
                                                                         monkeypatch) -> None:
    import megatron.core.fp8_utils as fp8_utils
    import megatron.core.models.gpt.gpt_model as gpt_model
    from megatron.training.argument_utils import gpt_config_from_args

    from infir2_cpt.runtime.fp8_options import install_fp8_output_layer

    fp8_config = gpt_config_from_args(_tiny_args(megatron_arguments, monkeypatch, [])).transformer
    assert fp8_config.fp8 and fp8_config.fp8_recipe == "blockwise"
    assert not gpt_model.is_mxfp8_output_proj_active(fp8_config)  # Megatron's own rule: MXFP8 only
    bf16_args = _tiny_args(megatron_arguments, monkeypatch, [])
    bf16_args.fp8, bf16_args.fp8_param, bf16_args.fp8_param_gather = None, False, False
    bf16_config = gpt_config_from_args(bf16_args).transformer

    for module in (fp8_utils, gpt_model):  # restored after the test
        monkeypatch.setattr(module, "is_mxfp8_output_proj_active", module.is_mxfp8_output_proj_active)
    monkeypatch.setattr(fp8_utils, "HAVE_TE", False)
    with pytest.raises(RuntimeError, match="needs Transformer Engine"):
        install_fp8_output_layer()
    monkeypatch.setattr(fp8_utils, "HAVE_TE", True)
    install_fp8_output_layer()
    for predicate in (gpt_model.is_mxfp8_output_proj_active, fp8_utils.is_mxfp8_output_proj_active):
        assert predicate(fp8_config) and not predicate(bf16_config)


# --------------------------------------------------------------------------- FP8 weights, transposed on demand


class _Quantizer:
    def __init__(self) -> None:
        self.rowwise_usage, self.columnwise_usage = True, True

    def set_usage(self, *, rowwise: bool | None = None, columnwise: bool | None = None) -> None:
        self.rowwise_usage = self.rowwise_usage if rowwise is None else rowwise
        self.columnwise_usage = self.columnwise_usage if columnwise is None else columnwise


def _blockwise_weight(rows: int = 4, cols: int = 3) -> torch.nn.Parameter:
    """A parameter with what infir2 uses of Transformer Engine's Float8BlockwiseQTensor: 2-D scaling, the two
    copies and update_usage with its rule (a copy is freed when its usage is False, rebuilt when True)."""
    param = torch.nn.Parameter(torch.randn(rows, cols))
    param._is_2D_scaled = True
    param._quantizer = _Quantizer()
    param._rowwise_data = param.data
    param._columnwise_data = param.data.t().contiguous()

    def update_usage(rowwise_usage: bool | None = None, columnwise_usage: bool | None = None) -> None:
        assert rowwise_usage in (None, True)
        if columnwise_usage is False:
            param._columnwise_data = None
        elif columnwise_usage and param._columnwise_data is None:
            param._columnwise_data = param.data.t().contiguous()

    param.update_usage = update_usage
    return param


def test_a_weights_transpose_lives_only_through_its_backward() -> None:
    weight, plain = _blockwise_weight(), torch.nn.Parameter(torch.randn(3))
    model = torch.nn.Module()
    model.weight, model.bias = weight, plain
    seen_in_backward = []

    class _Gemm(torch.autograd.Function):  # backward asks for the transpose, as TE's dgrad does
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x)
            ctx.w = w
            return x @ w

        @staticmethod
        def backward(ctx, grad):
            w = ctx.w
            w.update_usage(columnwise_usage=True)
            seen_in_backward.append(w._columnwise_data is not None)
            (x,) = ctx.saved_tensors
            return grad @ w._columnwise_data, x.t() @ grad

    assert transpose_on_demand([model]) == 1  # the blockwise weight, not the plain bias
    assert weight._columnwise_data is None and not weight._quantizer.columnwise_usage
    assert plain.grad is None
    inputs = [torch.randn(2, 4, requires_grad=True) for _ in range(2)]
    for x in inputs:  # two micro-batches: rebuilt in each backward, freed after each
        (_Gemm.apply(x, weight) + plain).sum().backward()
        assert seen_in_backward[-1] and weight._columnwise_data is None
    assert seen_in_backward == [True, True]
    # the gradients are untouched by the hook: both micro-batches accumulated
    assert torch.allclose(weight.grad, sum(x.t() @ torch.ones(2, 3) for x in inputs))
    assert torch.allclose(inputs[0].grad, torch.ones(2, 3) @ weight.detach().t())


def test_after_the_all_gather_blockwise_weights_drop_their_transpose_and_others_go_to_megatron(monkeypatch) -> None:
    buffers = pytest.importorskip("megatron.core.distributed.param_and_grad_buffer")
    handed_on: list[list[Any]] = []
    monkeypatch.setattr(buffers, "post_all_gather_processing", lambda params: handed_on.append(params))
    install_transpose_on_demand()
    install_transpose_on_demand()  # once only: the second call must not wrap the wrapper
    weight, other = _blockwise_weight(), torch.nn.Parameter(torch.randn(2))
    buffers.post_all_gather_processing([weight, other])
    assert weight._columnwise_data is None
    assert handed_on == [[other]]
    buffers.post_all_gather_processing(_blockwise_weight())  # a single tensor, as Megatron may pass
    assert handed_on == [[other]]


def test_the_launch_says_which_head_and_which_mlps_the_model_got() -> None:
    """What the built model really has, in one line per option (the head's and the MLPs' class names)."""
    from infir2_cpt.runtime.fp8_options import describe_model

    class TEFusedMLP(torch.nn.Module):
        pass

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = TEFusedMLP()

    chunk = torch.nn.Module()
    chunk.layers = torch.nn.ModuleList([Layer(), Layer()])
    chunk.output_layer = torch.nn.Linear(2, 2)
    assert describe_model([chunk], RuntimeOptions(fp8_output_layer=True, te_op_fuser=True)) == [
        "LM head: Linear (weight: Parameter)", "MLPs: TEFusedMLP"]
    assert describe_model([chunk], RuntimeOptions()) == []


def test_attention_scales_from_the_last_step_or_the_largest_of_a_history() -> None:
    from infir2_cpt.runtime.fp8_options import ATTENTION_AMAX_HISTORY_ENV, attention_amax_history, attention_scaling

    assert attention_amax_history({}) == 1
    assert attention_amax_history({ATTENTION_AMAX_HISTORY_ENV: "1024"}) == 1024
    for bad in ("0", "-3", "many"):
        with pytest.raises(ValueError, match="at least 1"):
            attention_amax_history({ATTENTION_AMAX_HISTORY_ENV: bad})
    assert attention_scaling(1) == {"amax_history_len": 1, "amax_compute_algo": "most_recent"}
    assert attention_scaling(16) == {"amax_history_len": 16, "amax_compute_algo": "max"}


def test_the_fp8_head_can_be_built_in_megatrons_fp8_parameter_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """Megatron enters get_fp8_context(config, is_init=True) around each transformer layer, not around the head:
    with the option the head's constructor runs inside it too (Transformer Engine then makes its weight FP8)."""
    pytest.importorskip("megatron.core")
    import megatron.core.extensions.transformer_engine as te_extension
    import megatron.core.fp8_utils as fp8_utils

    from infir2_cpt.runtime.fp8_options import install_fp8_output_layer_param

    entered: list[tuple[object, bool]] = []
    inside = [False]

    @contextlib.contextmanager
    def fp8_context(config: object, layer_no: int = -1, is_init: bool = False):
        entered.append((config, is_init))
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    class Head:  # stands in for TELMHeadColumnParallelLinear (Transformer Engine is not installed here)
        def __init__(self, input_size: int, output_size: int, *, config: object, bias: bool = True) -> None:
            self.sizes, self.bias, self.built_in_fp8_init = (input_size, output_size), bias, inside[0]

    monkeypatch.setattr(te_extension, "TELMHeadColumnParallelLinear", None, raising=False)
    with pytest.raises(RuntimeError, match="needs Transformer Engine"):
        install_fp8_output_layer_param()
    monkeypatch.setattr(te_extension, "TELMHeadColumnParallelLinear", Head, raising=False)
    monkeypatch.setattr(fp8_utils, "get_fp8_context", fp8_context, raising=False)
    install_fp8_output_layer_param()
    install_fp8_output_layer_param()  # once only
    config = object()
    head = Head(8, 16, config=config, bias=False)
    assert head.built_in_fp8_init and head.sizes == (8, 16) and head.bias is False
    assert entered == [(config, True)]
