"""precision.fp8_bf16_param_remainders on the CPU: the patch against megatron-core 0.19.2's own methods.

DistributedOptimizer needs CUDA and process groups to be built, and TE's FusedAdam needs CUDA, so the methods
run here on objects made with DistributedOptimizer.__new__ and the attributes those methods read, on CPU
parameters that report a CUDA type (Megatron sorts parameters by `param.type()`), with a FusedAdam stand-in whose
methods have TE 2.20.2's signatures and remainder semantics. What runs is the wheel's code under the patch's
wrappers. Numerics of TE's kernels are for the GPU check (benchmarks/scripts/remainders_check.py).
"""

from __future__ import annotations

import ast
import pathlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import megatron.core.optimizer as optimizer_package
from megatron.core.optimizer import distrib_optimizer as distopt_module
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer, Range
from megatron.core.optimizer.optimizer_config import OptimizerConfig

from infir2_cpt.runtime import optimizer_remainders as rem

CUDA_TYPES = {torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float16: "torch.cuda.HalfTensor",
              torch.float32: "torch.cuda.FloatTensor"}


class CudaTyped(torch.nn.Parameter):
    """A CPU parameter that answers `type()` as its CUDA twin (what Megatron's master build switches on)."""

    def type(self, *args, **kwargs):  # noqa: A003
        return super().type(*args, **kwargs) if args or kwargs else CUDA_TYPES[self.dtype]


class StandInFusedAdam:
    """TE 2.20.2 FusedAdam's state API (fused_adam.py: initialize_state, _initialize_state, get_unscaled_state,
    set_scaled_state) with its remainder rules: a BF16 param's `master_param` is an int16 remainder."""

    def __init__(self, params, master_weights=True, store_param_remainders=True):
        self.param_groups = [{"params": list(params)}]
        self.state = defaultdict(dict)
        self.master_weights = master_weights
        self.store_param_remainders = store_param_remainders and master_weights

    def initialize_state(self, param, store_param_remainders):
        self._initialize_state(param, "exp_avg", zero_buffer=True)
        self._initialize_state(param, "exp_avg_sq", zero_buffer=True)
        if self.master_weights:
            self._initialize_state(param, "master_param", zero_buffer=False,
                                   store_param_remainders=store_param_remainders)
            if not store_param_remainders:
                self.state[param]["master_param"].copy_(param.float())

    def _initialize_state(self, param, state_name, zero_buffer, store_param_remainders=False):
        dtype = torch.int16 if store_param_remainders else torch.float32
        self.state[param][state_name] = torch.zeros_like(param, dtype=dtype) if (zero_buffer or store_param_remainders) \
            else torch.empty_like(param, dtype=dtype)

    def get_unscaled_state(self, param, state_name, skip_unscale=False):
        return self.state[param][state_name]

    def set_scaled_state(self, param, state_name, unscaled_state):
        remainder = self.store_param_remainders and state_name == "master_param" and param.dtype == torch.bfloat16
        assert unscaled_state.dtype == (torch.int16 if remainder else torch.float32)
        if state_name not in self.state[param]:
            self._initialize_state(param, state_name, False, remainder)
        self.state[param][state_name].copy_(unscaled_state)


@pytest.fixture
def installed():
    rem.install_bf16_remainders(adam_class=StandInFusedAdam)
    yield
    rem.uninstall()


def remainders_config(**fields):
    """A real OptimizerConfig as the patch leaves a qualifying one (built without the precision-aware optimizer:
    its checks import TE)."""
    config = OptimizerConfig(bf16=True, fp8_recipe="blockwise", use_distributed_optimizer=True, **fields)
    config.use_precision_aware_optimizer = True
    assert rem.qualifies(config)
    setattr(config, rem.FLAG, True)
    setattr(config, rem.REMAINDERS_ATTR, True)
    return config


def make_params(*specs):
    """specs: (dtype, numel, shard start, shard end). Each param in its own one-bucket buffer, at offset 0."""
    params, gbuf_ranges, gbuf_map, buffers = [], [], {}, []
    for index, (dtype, numel, start, end) in enumerate(specs):
        data = torch.arange(numel, dtype=torch.float32).to(dtype) / 7
        param = CudaTyped(data.view(numel // 2, 2))
        param.main_grad = torch.randn(numel).view(numel // 2, 2)
        rng = {"param": Range(start, end), "gbuf_world_in_bucket": Range(start, end), "gbuf_local": Range(0, end - start)}
        gbuf_ranges.append({dtype: [{"param_map": {param: rng}}]})
        gbuf_map[param] = (index, dtype, 0)
        buffers.append(SimpleNamespace(buckets=[SimpleNamespace(param_data=data)]))
        params.append(param)
    return params, gbuf_ranges, gbuf_map, buffers


def build_optimizer(config, *specs):
    """A DistributedOptimizer (without __init__) holding the groups the wheel's own master build makes."""
    params, gbuf_ranges, gbuf_map, buffers = make_params(*specs)
    index_map, opt_group_ranges = DistributedOptimizer._build_optimizer_group_ranges([{"params": list(params)}],
                                                                                     gbuf_ranges)
    groups = DistributedOptimizer._build_model_and_main_param_groups(gbuf_ranges, gbuf_map, opt_group_ranges, config)
    opt = DistributedOptimizer.__new__(DistributedOptimizer)
    (opt.model_float16_groups, opt.model_fp32_groups, opt.shard_float16_groups, opt.shard_fp32_groups,
     opt.shard_fp32_from_float16_groups) = groups
    opt.config, opt.gbuf_ranges, opt.model_param_gbuf_map, opt.buffers = config, gbuf_ranges, gbuf_map, buffers
    opt.model_param_group_index_map = index_map
    opt.optimizer = optimizer_package.Adam(opt_group_ranges[0]["orig_group"]["params"])  # the patch's subclass
    opt.ddp_config = SimpleNamespace(use_megatron_fsdp=False, fp8_param_gather=False, fp4_param_gather=False)
    opt.is_stub_optimizer = False
    return opt, params


# FP32, BF16 (TE remainder), FP16 (stands for an FP8 weight: a 16-bit param with a Megatron FP32 master), in the
# order Megatron's group index map and its optimizer param list agree on (FP32 params first)
SPECS = ((torch.float32, 4, 0, 4), (torch.bfloat16, 8, 2, 6), (torch.float16, 8, 0, 4))


# --------------------------------------------------------------------------- the wheel, read by the patch


def test_every_read_of_the_flag_in_the_wheel_is_in_the_handled_list():
    root = pathlib.Path(optimizer_package.__file__).parents[1]  # megatron/core
    found: dict[tuple[str, str], int] = defaultdict(int)
    for path in root.rglob("*.py"):
        text = path.read_text()
        if rem.FLAG not in text:
            continue

        def visit(node, names):
            for child in ast.iter_child_nodes(node):
                inner = names + [child.name] if isinstance(child, (ast.FunctionDef, ast.ClassDef)) else names
                if isinstance(child, ast.Attribute) and child.attr == rem.FLAG:
                    assert path.parent.name == "optimizer", path
                    found[(path.name, ".".join(inner))] += 1
                visit(child, inner)

        visit(ast.parse(text), [])
    assert dict(found) == {key: count for key, (count, _) in rem.FLAG_READS.items()}


def test_the_wrapped_methods_have_the_signatures_they_were_read_with():
    assert rem.signature_problems(DistributedOptimizer, rem.DISTOPT_METHODS) == []
    assert rem.signature_problems(StandInFusedAdam, rem.TE_ADAM_METHODS) == []

    class Other:
        def initialize_state(self, param):
            pass

    problems = rem.signature_problems(Other, rem.TE_ADAM_METHODS)
    assert "Other.initialize_state('self', 'param') (expected ('self', 'param', 'store_param_remainders'))" in problems
    assert any("_initialize_state is missing" in p for p in problems)


def test_install_refuses_another_megatron_core_and_a_fused_adam_not_from_transformer_engine():
    with pytest.raises(RuntimeError, match="written against megatron-core 0.19.2, this is 0.20.0"):
        rem.install_bf16_remainders(adam_class=StandInFusedAdam, core_version="0.20.0")
    with pytest.raises(RuntimeError, match="needs Transformer Engine's FusedAdam"):
        rem.install_bf16_remainders()  # the CPU wheel falls back to torch's AdamW
    assert not getattr(OptimizerConfig.__post_init__, "__infir2_bf16_remainders__", False)


def test_install_wraps_the_methods_and_uninstall_restores_them(installed):
    assert getattr(OptimizerConfig.__post_init__, "__infir2_bf16_remainders__")
    assert optimizer_package.Adam.__name__ == "Infir2RemainderStandInFusedAdam"
    for name in rem.DISTOPT_METHODS:
        assert getattr(getattr(DistributedOptimizer, name), "__infir2_bf16_remainders__", False), name
    rem.install_bf16_remainders(adam_class=StandInFusedAdam)  # idempotent
    assert len(rem._INSTALLED) == 2 + len(rem.DISTOPT_METHODS)
    rem.uninstall()
    assert not hasattr(DistributedOptimizer.zero_grad, "__infir2_bf16_remainders__")
    assert isinstance(DistributedOptimizer.__dict__["_build_model_and_main_param_groups"], classmethod)
    assert optimizer_package.Adam is torch.optim.AdamW


# --------------------------------------------------------------------------- decisions


def test_a_qualifying_config_gets_the_flag_and_others_are_refused_or_left_alone():
    post_init = rem.wrap_post_init(lambda self: None)
    config = OptimizerConfig(bf16=True, fp8_recipe="blockwise", use_distributed_optimizer=True)
    assert getattr(config, rem.FLAG) is False
    post_init(config)  # precision-aware optimizer off: untouched
    assert getattr(config, rem.FLAG) is False and not hasattr(config, rem.REMAINDERS_ATTR)
    config.use_precision_aware_optimizer = True
    post_init(config)
    assert getattr(config, rem.FLAG) is True and getattr(config, rem.REMAINDERS_ATTR) is True
    for change in ({"fp8_recipe": "mxfp8"}, {"bf16": False}, {"store_param_remainders": False},
                   {"main_params_dtype": torch.float16}, {"optimizer_cpu_offload": True}):
        other = OptimizerConfig(bf16=True, fp8_recipe="blockwise", use_distributed_optimizer=True)
        other.use_precision_aware_optimizer = True
        for key, value in change.items():
            setattr(other, key, value)
        with pytest.raises(ValueError, match="not blockwise FP8"):
            post_init(other)


def test_te_holds_the_master_of_plain_bf16_params_only(monkeypatch):
    bf16, fp16, fp32 = (torch.zeros(4, dtype=d) for d in (torch.bfloat16, torch.float16, torch.float32))
    assert rem.holds_remainder(bf16) and not rem.holds_remainder(fp16) and not rem.holds_remainder(fp32)
    quantized = torch.zeros(4, dtype=torch.bfloat16)  # an FP8 parameter reports its nominal dtype, bfloat16
    monkeypatch.setattr(distopt_module, "is_float8tensor", lambda t: t is quantized)
    assert not rem.holds_remainder(quantized) and rem.holds_remainder(bf16)


def test_flag_reads_restores_the_value_after_an_error():
    config = SimpleNamespace(**{rem.FLAG: True})
    with pytest.raises(KeyError):
        with rem.flag_reads(config, False):
            assert getattr(config, rem.FLAG) is False
            raise KeyError
    assert getattr(config, rem.FLAG) is True


# --------------------------------------------------------------------------- the master build


def test_the_wheels_master_build_keeps_fp32_masters_only_for_params_te_does_not_hold(installed):
    config = remainders_config()
    opt, (fp32, bf16, fp16) = build_optimizer(config, *SPECS)
    assert getattr(config, rem.FLAG) is True  # restored after the build ran with False
    params = opt.optimizer.param_groups[0]["params"]
    # FusedAdam's params, in Megatron's order [FP32 params..., 16-bit params...]: the BF16 shard itself (a view of
    # the parameter), the FP16 param's FP32 master, the FP32 param's shard
    assert [p.dtype for p in params] == [torch.float32, torch.bfloat16, torch.float32]
    shard = params[1]
    assert shard is opt.shard_float16_groups[0][0] and shard.numel() == 4
    assert shard.data_ptr() == bf16.view(-1)[2:6].data_ptr()
    assert opt.shard_fp32_from_float16_groups[0] == [None, opt.shard_fp32_from_float16_groups[0][1]]
    assert bf16.main_param is None and bf16.main_param_sharded is True
    assert fp16.main_param is params[2] and fp16.main_param.dtype == torch.float32
    assert torch.equal(fp16.main_param, fp16.detach().view(-1)[0:4].float())


def test_without_the_option_the_master_build_is_the_wheels(installed):
    config = remainders_config()
    setattr(config, rem.REMAINDERS_ATTR, False)
    setattr(config, rem.FLAG, False)
    opt, (_, bf16, _) = build_optimizer(config, *SPECS)
    assert [p.dtype for p in opt.optimizer.param_groups[0]["params"]] == [torch.float32] * 3
    assert bf16.main_param is not None


# --------------------------------------------------------------------------- per-parameter state (checkpoints)


def test_checkpoint_state_is_the_remainder_for_bf16_params_and_the_fp32_master_for_others(installed):
    opt, (fp32, bf16, fp16) = build_optimizer(remainders_config(), *SPECS)
    adam = opt.optimizer
    for p in adam.param_groups[0]["params"]:
        adam.initialize_state(p, p.dtype == torch.bfloat16)  # as TE's step does: remainders for BF16 params
    shard = opt.shard_float16_groups[0][0]
    adam.state[shard]["master_param"].fill_(-3)
    got = opt._get_main_param_and_optimizer_states(bf16)
    assert set(got) == {"param", "exp_avg", "exp_avg_sq"} and got["param"].dtype == torch.int16
    assert torch.equal(got["param"], torch.full((4,), -3, dtype=torch.int16))
    got = opt._get_main_param_and_optimizer_states(fp16)
    assert got["param"] is fp16.main_param and "master_param" not in got

    opt._set_main_param_and_optimizer_states(bf16, {"param": torch.full((4,), 5, dtype=torch.int16),
                                                    "exp_avg": torch.ones(4), "exp_avg_sq": torch.ones(4)})
    assert adam.state[shard]["master_param"].tolist() == [5] * 4 and adam.state[shard]["exp_avg"].tolist() == [1.0] * 4
    opt._set_main_param_and_optimizer_states(fp16, {"param": torch.full((4,), 2.0), "exp_avg": torch.ones(4),
                                                    "exp_avg_sq": torch.ones(4)})
    assert fp16.main_param.tolist() == [2.0] * 4
    assert getattr(opt.config, rem.FLAG) is True


def test_load_state_dict_runs_with_fp32_masters_then_gives_bf16_shards_a_zero_remainder(installed):
    opt, _ = build_optimizer(remainders_config(), *SPECS)
    seen = []

    def original(self, state_dict):
        seen.append(getattr(self.config, rem.FLAG))
        for p in self.optimizer.param_groups[0]["params"]:  # the dummy state Megatron allocates: moments only
            self.optimizer.state[p] = {"exp_avg": torch.zeros_like(p, dtype=torch.float32)}

    rem.wrap_load_state_dict(original)(opt, {})
    assert seen == [False]
    states = [opt.optimizer.state[p] for p in opt.optimizer.param_groups[0]["params"]]
    assert ["master_param" in s for s in states] == [False, True, False]
    assert states[1]["master_param"].dtype == torch.int16 and not states[1]["master_param"].any()


# --------------------------------------------------------------------------- gradients


def test_every_gradient_shard_goes_to_decoupled_grad(installed):
    opt, (fp32, bf16, fp16) = build_optimizer(remainders_config(), *SPECS)
    opt._copy_model_grads_to_main_grads()
    shard, master, fp32_shard = opt.shard_float16_groups[0][0], fp16.main_param, opt.shard_fp32_groups[0][0]
    assert shard.decoupled_grad.data_ptr() == bf16.main_grad.view(-1)[2:6].data_ptr()
    assert torch.equal(master.decoupled_grad, fp16.main_grad.view(-1)[0:4])
    assert torch.equal(fp32_shard.decoupled_grad, fp32.main_grad.view(-1))
    assert shard.grad is None and master.grad is None

    opt.zero_grad(set_to_none=True)
    assert shard.decoupled_grad is None and master.decoupled_grad is None and fp32_shard.decoupled_grad is None


# --------------------------------------------------------------------------- copies between model and masters


def test_main_to_model_copies_megatrons_masters_and_leaves_te_written_bf16_shards(installed):
    opt, (fp32, bf16, fp16) = build_optimizer(remainders_config(), *SPECS)
    before = bf16.detach().clone()
    fp16.main_param.fill_(0.5)
    opt._copy_main_params_to_model_params()
    assert torch.equal(fp16.detach().view(-1)[0:4], torch.full((4,), 0.5, dtype=torch.float16))
    assert torch.equal(bf16.detach(), before)
    assert getattr(opt.config, rem.FLAG) is True and opt.model_float16_groups[0][0] is bf16  # restored


def test_model_to_main_refreshes_fp32_masters_and_zeroes_the_remainders(installed):
    opt, (fp32, bf16, fp16) = build_optimizer(remainders_config(), *SPECS)
    shard = opt.shard_float16_groups[0][0]
    opt.optimizer.state[shard]["master_param"] = torch.full((4,), 9, dtype=torch.int16)
    fp16.main_param.fill_(0.0)
    opt._copy_model_params_to_main_params()
    assert torch.equal(fp16.main_param, fp16.detach().view(-1)[0:4].float())
    assert not opt.optimizer.state[shard]["master_param"].any()


# --------------------------------------------------------------------------- TE's FusedAdam


def test_fused_adam_keeps_no_second_master_of_fp32_params():
    adam = rem.remainder_adam_class(StandInFusedAdam)([])
    fp32, bf16 = torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)
    adam.initialize_state(fp32, False)
    adam.initialize_state(bf16, True)
    assert set(adam.state[fp32]) == {"exp_avg", "exp_avg_sq"}
    assert set(adam.state[bf16]) == {"exp_avg", "exp_avg_sq", "master_param"}
    assert adam.state[bf16]["master_param"].dtype == torch.int16
    plain = rem.remainder_adam_class(StandInFusedAdam)([], master_weights=False)
    plain.initialize_state(fp32, False)
    assert set(plain.state[fp32]) == {"exp_avg", "exp_avg_sq"}


# --------------------------------------------------------------------------- BF16 + remainder == FP32


def special_fp32() -> torch.Tensor:
    bits = [0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,  # ties with an even / odd high half, both signs
            0x3F807FFF, 0x3F808001, 0x7F7FFFFF, 0x00000001, 0x80000000, 0x3F7FFFFF, 0x477FFFFF]
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(torch.float32)


def test_bf16_and_remainder_give_back_the_fp32_master_bit_for_bit():
    values = torch.cat([torch.randn(100_000) * 10.0 ** torch.randint(-30, 30, (100_000,)).float(), special_fp32()])
    values = values[torch.isfinite(values)]
    bf16, remainder = rem.split_fp32(values)
    assert bf16.dtype == torch.bfloat16 and remainder.dtype == torch.int16
    assert torch.equal(rem.reconstruct_fp32(bf16, remainder).view(torch.int32), values.view(torch.int32))
    # the BF16 half is a nearest BF16 (within half an ulp) ...
    assert ((bf16.float() - values).abs() <= (values.to(torch.bfloat16).float() - values).abs()).all()
    # ... and differs from torch's round-to-nearest-even only on exact ties with an even high half
    differs = bf16.view(torch.int16) != values.to(torch.bfloat16).view(torch.int16)
    ties = (values.view(torch.int32) & 0xFFFF) == 0x8000
    assert (differs <= ties).all()
    specials = rem.split_fp32(special_fp32())[0].view(torch.int16) != special_fp32().to(torch.bfloat16).view(torch.int16)
    assert specials[:4].tolist() == [True, False, True, False]


def test_a_zero_remainder_is_the_bf16_value():
    bf16 = torch.randn(1000).to(torch.bfloat16)
    assert torch.equal(rem.reconstruct_fp32(bf16, torch.zeros(1000, dtype=torch.int16)), bf16.float())


def test_the_dump_reconstructs_the_masters_te_holds(installed):
    opt, (fp32, bf16, fp16) = build_optimizer(remainders_config(), *SPECS)
    shard = opt.shard_float16_groups[0][0]
    master = torch.tensor([1.001, -2.0003, 3.14159, 1e-3])
    high, low = rem.split_fp32(master)
    shard.copy_(high)
    opt.optimizer.state[shard]["master_param"] = low
    rows = rem.bf16_param_masters(SimpleNamespace(chained_optimizers=[opt]))
    assert len(rows) == 1 and rows[0][0] is bf16 and rows[0][2:] == (2, 6)
    assert torch.equal(rows[0][1], master)


def test_the_dump_runs_at_setup_and_after_the_chosen_steps_only(monkeypatch):
    written = []
    monkeypatch.setattr(rem, "dump_bf16_param_masters", lambda model, opt, path: written.append(path) or 0)
    opt = SimpleNamespace(step=lambda: "stepped")
    assert not rem.dump_masters_after_step_if_asked([], opt, {})
    env = {rem.DUMP_ENV: "/x/m@{step}.pt", rem.DUMP_STEP_ENV: "0,2,3"}
    assert rem.dump_masters_after_step_if_asked([], opt, env)
    assert written == ["/x/m@0.pt"]
    assert [opt.step() for _ in range(4)] == ["stepped"] * 4
    assert written == ["/x/m@0.pt", "/x/m@2.pt", "/x/m@3.pt"]


def test_the_gpu_checks_comparisons_pass_on_a_good_run_and_fail_on_a_broken_one(tmp_path):
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "scripts" / "remainders_check.py"
    spec = importlib.util.spec_from_file_location("remainders_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.selftest(tmp_path) == 0
