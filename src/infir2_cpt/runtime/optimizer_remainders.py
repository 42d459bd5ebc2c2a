"""BF16 parameters of an FP8 run kept as a BF16 run keeps them: the BF16 parameter plus a 16-bit remainder in
Transformer Engine's FusedAdam, instead of a 4-byte FP32 master in Megatron's distributed optimizer.

Why: with blockwise FP8 parameters, megatron-core 0.19.2 turns its precision-aware path off for the whole
optimizer (OptimizerConfig.use_precision_aware_optimizer_no_fp8_or_ds_fp8 is False), so the embeddings, the LM
head, the norms and the biases also get FP32 masters. TE's remainder (the low 16 bits of the FP32 master, the
BF16 parameter holding the rounded high 16) gives the same FP32 master in 2 bytes less per parameter.

How (install_bf16_remainders, before Megatron builds the optimizer):
- OptimizerConfig: for a qualifying config (precision-aware optimizer, blockwise FP8, BF16, FP32 masters,
  remainders on) the global flag is set True, so every place that only picks the gradient attribute reads
  `.decoupled_grad` (grad norm, clipping, zero counting, unscaling) and FusedAdam is built with
  master_weights=True, use_decoupled_grad=True, master_weight_dtype=fp32, store_param_remainders=True.
  The config carries REMAINDERS_ATTR = True.
- FusedAdam: a subclass that gives FP32 parameters (Megatron's own masters of the FP8 weights) moments only,
  no second FP32 master.
- DistributedOptimizer: every method that reads the flag to decide about *masters* decides per parameter
  (holds_remainder): the master build (then the BF16 shard replaces the FP32 master among FusedAdam's
  parameters), the checkpoint get/set of one parameter's state, the dummy state before a load, the copies
  model<->main (FP8 masters only), zero_grad, and the gradient copy (replaced: all gradients to
  `.decoupled_grad`).

Every read of the flag in megatron-core 0.19.2 is listed in FLAG_READS with how it is handled; the unit tests
check that list against the installed wheel. Checkpoints store the int16 remainder as the `param` state of
these parameters (as BF16 runs do): a run cannot switch the option on or off across a resume.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Iterator

MEGATRON_CORE_VERSION = "0.19.2"  # every wrapped or replaced method was read in this version
TE_VERSION_PREFIX = "2.20."  # FusedAdam read in 2.20.2
FLAG = "use_precision_aware_optimizer_no_fp8_or_ds_fp8"
REMAINDERS_ATTR = "infir2_bf16_remainders"
_MARK = "__infir2_bf16_remainders__"

# Every read of FLAG in megatron-core 0.19.2 (all below megatron/core/optimizer): (file, function) -> (reads,
# how it is handled). "True" = the global value a qualifying config carries after the patch.
FLAG_READS: dict[tuple[str, str], tuple[int, str]] = {
    ("optimizer_config.py", "OptimizerConfig.__post_init__"): (1, "sets it; wrapped: True for a qualifying config"),
    ("__init__.py", "_get_megatron_optimizer_based_on_param_groups"):
        (1, "True: FusedAdam gets master_weights, use_decoupled_grad, FP32 master dtype (and remainders)"),
    ("distrib_optimizer.py", "DistributedOptimizer._build_model_and_main_param_groups"):
        (2, "wrapped: run with False (FP32 masters for all), then BF16 shards replace the BF16 params' masters"),
    ("distrib_optimizer.py", "DistributedOptimizer.load_state_dict"):
        (1, "wrapped: run with False (dummy moments only), then int16 remainders added for the BF16 shards"),
    ("distrib_optimizer.py", "DistributedOptimizer._get_main_param_and_optimizer_states"):
        (1, "wrapped: per parameter, holds_remainder(param)"),
    ("distrib_optimizer.py", "DistributedOptimizer._set_main_param_and_optimizer_states"):
        (1, "wrapped: per parameter, holds_remainder(param)"),
    ("distrib_optimizer.py", "DistributedOptimizer.zero_grad"):
        (2, "wrapped: True (decoupled grads), then the FP8 masters' decoupled grads as well"),
    ("distrib_optimizer.py", "DistributedOptimizer._collect_main_grad_data_for_unscaling"):
        (1, "True: decoupled grads of all (FP16 loss scaling only; not used with BF16)"),
    ("distrib_optimizer.py", "DistributedOptimizer._get_model_and_main_params_data_float16"):
        (1, "never called on the distributed optimizer (only by Float16Optimizer's copies, which it overrides)"),
    ("distrib_optimizer.py", "DistributedOptimizer._copy_model_grads_to_main_grads"):
        (1, "replaced: every gradient shard to .decoupled_grad"),
    ("distrib_optimizer.py", "DistributedOptimizer._copy_model_grads_to_main_grads.copy_group_grads"):
        (1, "replaced with the method above"),
    ("distrib_optimizer.py", "DistributedOptimizer._copy_main_params_to_model_params"):
        (1, "wrapped: False over the params with FP32 masters (FusedAdam wrote the BF16 shards in place)"),
    ("distrib_optimizer.py", "DistributedOptimizer._copy_model_params_to_main_params"):
        (1, "wrapped: False over the params with FP32 masters; the BF16 shards' remainders set to 0"),
    ("optimizer.py", "MegatronOptimizer._filter_grads_for_norm"): (1, "True: decoupled grads of all"),
    ("optimizer.py", "MegatronOptimizer.clip_grad_norm.use_decoupled_grad"): (1, "True: decoupled grads of all"),
    ("optimizer.py", "MegatronOptimizer.count_zeros"): (1, "True: decoupled grads of all"),
    ("optimizer.py", "ChainedOptimizer.count_zeros"): (1, "True: decoupled grads of all"),
    ("optimizer.py", "ChainedOptimizer.step"): (1, "True: clipping of decoupled grads of all"),
    ("layer_wise_optimizer.py", "LayerWiseDistributedOptimizer.count_zeros"):
        (1, "the layer-wise optimizer (Muon) is not used by infir2"),
}


# --------------------------------------------------------------------------- decisions (pure)


def qualifies(config: Any) -> bool:
    """The FP8 configs whose BF16 parameters can move to TE remainders: precision-aware optimizer with FP32
    masters kept by Megatron because of blockwise FP8, BF16 training, remainders on, no CPU offload."""
    import torch

    return bool(config.use_precision_aware_optimizer and not getattr(config, FLAG)
                and config.fp8_recipe == "blockwise" and config.bf16 and config.store_param_remainders
                and config.main_params_dtype == torch.float32 and not config.optimizer_cpu_offload)


def holds_remainder(model_param: Any) -> bool:
    """TE keeps this parameter's master (BF16 + remainder): a plain BF16 parameter. FP8 parameters report
    dtype bfloat16 too, hence Megatron's own test for quantized parameters."""
    import torch
    from megatron.core.fp4_utils import is_nvfp4tensor
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return (model_param.dtype == torch.bfloat16 and not DistributedOptimizer._is_distopt_quantized_param(model_param)
            and not is_nvfp4tensor(model_param))


def active(optimizer: Any) -> bool:
    return bool(getattr(getattr(optimizer, "config", None), REMAINDERS_ATTR, False))


@contextlib.contextmanager
def flag_reads(config: Any, value: bool) -> Iterator[None]:
    """For the call inside, Megatron's flag reads `value` (restored after, also on an error)."""
    saved = getattr(config, FLAG)
    setattr(config, FLAG, value)
    try:
        yield
    finally:
        setattr(config, FLAG, saved)


def give_bf16_shards_to_te(model_float16_groups: list[list[Any]], shard_float16_groups: list[list[Any]],
                           shard_fp32_from_float16_groups: list[list[Any]], opt_group_ranges: list[dict],
                           holds: Callable[[Any], bool] = holds_remainder) -> int:
    """After Megatron built FP32 masters for all 16-bit params: for each param TE will hold, put its BF16 shard
    (a view of the param buffer) in place of the FP32 master among the optimizer's params and drop the master.
    Positions are kept: model_param_group_index_map indexes into these lists. Returns the number moved."""
    moved = 0
    for models, shards, mains, group_range in zip(model_float16_groups, shard_float16_groups,
                                                  shard_fp32_from_float16_groups, opt_group_ranges):
        params = group_range["orig_group"]["params"]
        for j, model_param in enumerate(models):
            if not holds(model_param):
                continue
            main, shard = mains[j], shards[j]
            if shard is None or main is None:
                raise RuntimeError("BF16 remainders: a BF16 parameter without a shard or an FP32 master")
            position = next(k for k, p in enumerate(params) if p is main)
            params[position] = shard
            mains[j] = None
            model_param.main_param = None  # as Megatron's own precision-aware path (params-norm skips it)
            moved += 1
    return moved


@contextlib.contextmanager
def fp32_masters_only(optimizer: Any, holds: Callable[[Any], bool] = holds_remainder) -> Iterator[None]:
    """For the call inside, the 16-bit groups hold only the params with an FP32 master of Megatron's."""
    models, mains = optimizer.model_float16_groups, optimizer.shard_fp32_from_float16_groups
    keep = [[j for j, p in enumerate(group) if not holds(p)] for group in models]
    optimizer.model_float16_groups = [[g[j] for j in k] for g, k in zip(models, keep)]
    optimizer.shard_fp32_from_float16_groups = [[g[j] for j in k] for g, k in zip(mains, keep)]
    try:
        yield
    finally:
        optimizer.model_float16_groups, optimizer.shard_fp32_from_float16_groups = models, mains


def te_params(optimizer: Any) -> list[Any]:
    """The BF16 shards FusedAdam holds a remainder for (FP8 masters and FP32 params are FP32)."""
    import torch

    return [p for group in optimizer.optimizer.param_groups for p in group["params"] if p.dtype == torch.bfloat16]


def set_zero_remainders(optimizer: Any, only_missing: bool) -> int:
    """Remainder 0 (the FP32 master equals the BF16 param) for the BF16 shards: those without one yet
    (only_missing, after a dummy state was allocated), or all that have one."""
    import torch

    adam, count = optimizer.optimizer, 0
    for p in te_params(optimizer):
        state = adam.state.get(p, {})
        has_remainder = "master_param" in state
        if not state or has_remainder == only_missing:  # no state yet (TE makes it at the first step) / not wanted
            continue
        adam.set_scaled_state(p, "master_param", torch.zeros_like(p, dtype=torch.int16))
        count += 1
    return count


# --------------------------------------------------------------------------- FP32 <-> BF16 + remainder (pure)


def split_fp32(master: Any) -> tuple[Any, Any]:
    """FP32 -> (BF16 rounded as TE's remainder kernel rounds: half away from zero, int16 low bits)."""
    import torch

    bits = master.contiguous().view(torch.int32)
    low = torch.bitwise_and(bits, 0xFFFF)
    high = torch.bitwise_and(torch.bitwise_right_shift(bits, 16), 0xFFFF)
    high = torch.bitwise_and(high + (low >= 0x8000).to(torch.int32), 0xFFFF)
    as_int16 = lambda x: torch.where(x >= 0x8000, x - 0x10000, x).to(torch.int16)  # noqa: E731
    return as_int16(high).view(torch.bfloat16), as_int16(low)


def reconstruct_fp32(bf16: Any, remainder: Any) -> Any:
    """BF16 param + int16 remainder -> the FP32 master, bit for bit (undoes split_fp32's rounding)."""
    import torch

    high = bf16.contiguous().view(torch.int16).to(torch.int32) - (remainder < 0).to(torch.int32)
    bits = torch.bitwise_or(torch.bitwise_left_shift(high, 16), torch.bitwise_and(remainder.to(torch.int32), 0xFFFF))
    return bits.view(torch.float32)


# --------------------------------------------------------------------------- wrappers


def _wrapped(function: Callable[..., Any]) -> Callable[..., Any]:
    setattr(function, _MARK, True)
    return function


def wrap_post_init(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def __post_init__(self: Any) -> None:
        original(self)
        if qualifies(self):
            setattr(self, FLAG, True)
            setattr(self, REMAINDERS_ATTR, True)
        elif self.use_precision_aware_optimizer:
            # the FusedAdam subclass is process-wide: it must not meet a config it was not made for
            raise ValueError("infir2 BF16 remainders are installed, but this optimizer config is not blockwise FP8 "
                             "with BF16, FP32 masters and store_param_remainders (turn the option off)")
    return _wrapped(__post_init__)


def wrap_build(original: Callable[..., Any]) -> Callable[..., Any]:
    """original: the function under DistributedOptimizer._build_model_and_main_param_groups (a classmethod)."""
    def build(cls: Any, gbuf_ranges: Any, param_gbuf_map: Any, opt_group_ranges: Any, config: Any) -> Any:
        if not getattr(config, REMAINDERS_ATTR, False):
            return original(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config)
        with flag_reads(config, False):  # FP32 masters for every 16-bit param (transient for the BF16 ones)
            groups = original(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config)
        model_f16, _, shard_f16, _, shard_fp32_from_f16 = groups
        give_bf16_shards_to_te(model_f16, shard_f16, shard_fp32_from_f16, opt_group_ranges)
        return groups
    return _wrapped(build)


def wrap_per_param(original: Callable[..., Any]) -> Callable[..., Any]:
    """_get/_set_main_param_and_optimizer_states(self, model_param, ...): Megatron's precision-aware branch
    (TE's unscaled/scaled state helpers, `param` = the remainder) for BF16 params, the FP32-master one else."""
    @functools.wraps(original)
    def per_param(self: Any, model_param: Any, *args: Any) -> Any:
        if not active(self):
            return original(self, model_param, *args)
        with flag_reads(self.config, holds_remainder(model_param)):
            return original(self, model_param, *args)
    return _wrapped(per_param)


def wrap_load_state_dict(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def load_state_dict(self: Any, state_dict: Any) -> Any:
        if not active(self):
            return original(self, state_dict)
        with flag_reads(self.config, False):  # dummy moments only: no FP32 `master_param` for the FP8 masters
            result = original(self, state_dict)
        set_zero_remainders(self, only_missing=True)  # what the precision-aware dummy holds for BF16 params
        return result
    return _wrapped(load_state_dict)


def wrap_zero_grad(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def zero_grad(self: Any, set_to_none: bool = True) -> Any:
        result = original(self, set_to_none)
        if active(self) and not self.ddp_config.use_megatron_fsdp and not self.is_stub_optimizer:
            from megatron.core.optimizer.optimizer import _zero_grad_group_helper

            for group in self.shard_fp32_from_float16_groups:  # the FP8 masters (None entries are skipped)
                _zero_grad_group_helper(group, set_to_none, use_decoupled_grad=True)
        return result
    return _wrapped(zero_grad)


def wrap_fp32_masters_only(original: Callable[..., Any], zero_remainders: bool) -> Callable[..., Any]:
    """The copies main->model and model->main, with the flag False, over the params with FP32 masters only.
    zero_remainders (model->main): the BF16 params' masters become the BF16 params themselves, as the copy
    makes them without the option."""
    @functools.wraps(original)
    def copy(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not active(self):
            return original(self, *args, **kwargs)
        with flag_reads(self.config, False), fp32_masters_only(self):
            result = original(self, *args, **kwargs)
        if zero_remainders:
            set_zero_remainders(self, only_missing=False)
        return result
    return _wrapped(copy)


def wrap_copy_grads(original: Callable[..., Any]) -> Callable[..., Any]:
    """Replaces DistributedOptimizer._copy_model_grads_to_main_grads (read in megatron-core 0.19.2) when active:
    FusedAdam reads `.decoupled_grad` of every param, so each gradient shard goes there: as is for a BF16 shard
    (Megatron's precision-aware branch), `.float()` for an FP32 master (its other branch; a no-op on FP32
    gradient buffers)."""
    @functools.wraps(original)
    def copy_model_grads_to_main_grads(self: Any) -> None:
        if not active(self) or self.is_stub_optimizer or self.ddp_config.use_megatron_fsdp:
            return original(self)
        pairs = [(m, s if holds_remainder(m) else f)
                 for ms, ss, fs in zip(self.model_float16_groups, self.shard_float16_groups,
                                       self.shard_fp32_from_float16_groups)
                 for m, s, f in zip(ms, ss, fs)]
        pairs += [(m, s) for ms, ss in zip(self.model_fp32_groups, self.shard_fp32_groups) for m, s in zip(ms, ss)]
        for model_param, opt_param in pairs:
            param_range = self._get_model_param_range_map(model_param)["param"]
            assert param_range.size == opt_param.nelement()
            grad = model_param.main_grad.view(-1)[param_range.start:param_range.end]
            opt_param.decoupled_grad = grad if holds_remainder(model_param) else grad.float()
        return None
    return _wrapped(copy_model_grads_to_main_grads)


def remainder_adam_class(base: type) -> type:
    """TE FusedAdam whose FP32 params (Megatron's masters of the FP8 weights, FP32 model params) get moments
    only: with master_weights=True TE would keep a second FP32 copy of each and never read it (its step updates
    FP32 params in place)."""
    class RemainderFusedAdam(base):  # type: ignore[misc, valid-type]
        def initialize_state(self, param: Any, store_param_remainders: bool) -> None:
            import torch

            if self.master_weights and param.dtype == torch.float32:
                self._initialize_state(param, "exp_avg", zero_buffer=True)
                self._initialize_state(param, "exp_avg_sq", zero_buffer=True)
                return
            super().initialize_state(param, store_param_remainders)

    RemainderFusedAdam.__qualname__ = RemainderFusedAdam.__name__ = f"Infir2Remainder{base.__name__}"
    setattr(RemainderFusedAdam, _MARK, True)
    return RemainderFusedAdam


# --------------------------------------------------------------------------- install

# The wrapped methods' parameter names as read in megatron-core 0.19.2 and TE 2.20.2 (checked at install)
DISTOPT_METHODS: dict[str, list[str]] = {
    "_build_model_and_main_param_groups": ["gbuf_ranges", "param_gbuf_map", "opt_group_ranges", "config"],
    "load_state_dict": ["self", "state_dict"],
    "_get_main_param_and_optimizer_states": ["self", "model_param"],
    "_set_main_param_and_optimizer_states": ["self", "model_param", "tensors"],
    "zero_grad": ["self", "set_to_none"],
    "_copy_model_grads_to_main_grads": ["self"],
    "_copy_main_params_to_model_params": ["self"],
    "_copy_model_params_to_main_params": ["self", "state_dict"],
}
TE_ADAM_METHODS: dict[str, list[str]] = {
    "initialize_state": ["self", "param", "store_param_remainders"],
    "_initialize_state": ["self", "param", "state_name", "zero_buffer", "store_param_remainders"],
    "set_scaled_state": ["self", "param", "state_name", "unscaled_state"],
    "get_unscaled_state": ["self", "param", "state_name", "skip_unscale"],
}
_INSTALLED: list[tuple[Any, str, Any]] = []  # (owner, name, original attribute) for uninstall()


def signature_problems(owner: Any, expected: dict[str, list[str]]) -> list[str]:
    problems = []
    for name, params in expected.items():
        function = getattr(owner, name, None)
        if function is None:
            problems.append(f"{getattr(owner, '__name__', owner)}.{name} is missing")
            continue
        found = list(inspect.signature(function).parameters)
        if found != params:
            problems.append(f"{owner.__name__}.{name}{tuple(found)} (expected {tuple(params)})")
    return problems


def _set(owner: Any, name: str, value: Any) -> None:
    _INSTALLED.append((owner, name, owner.__dict__[name]))
    setattr(owner, name, value)


def install_bf16_remainders(adam_class: type | None = None, core_version: str | None = None) -> None:
    """Install the patch (idempotent). adam_class: the FusedAdam to subclass (default: the one megatron-core
    imported, which must be Transformer Engine's); core_version: for the tests."""
    import megatron.core
    import megatron.core.optimizer as optimizer_package
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer_config import OptimizerConfig

    if getattr(OptimizerConfig.__post_init__, _MARK, False):
        return
    version = core_version or megatron.core.__version__
    if version != MEGATRON_CORE_VERSION:
        raise RuntimeError(f"precision.fp8_bf16_param_remainders: written against megatron-core {MEGATRON_CORE_VERSION}"
                           f", this is {version}: re-read the methods listed in optimizer_remainders.FLAG_READS")
    if adam_class is None:
        adam_class = optimizer_package.Adam
        module = getattr(adam_class, "__module__", "")
        if not module.startswith("transformer_engine"):
            raise RuntimeError(f"precision.fp8_bf16_param_remainders needs Transformer Engine's FusedAdam "
                               f"(megatron-core uses {module}.{adam_class.__name__})")
        import transformer_engine

        if not transformer_engine.__version__.startswith(TE_VERSION_PREFIX):
            raise RuntimeError(f"precision.fp8_bf16_param_remainders: written against Transformer Engine "
                               f"{TE_VERSION_PREFIX}x, this is {transformer_engine.__version__}")
    problems = signature_problems(DistributedOptimizer, DISTOPT_METHODS) + signature_problems(adam_class, TE_ADAM_METHODS)
    if problems:
        raise RuntimeError("precision.fp8_bf16_param_remainders: unexpected methods: " + "; ".join(problems))

    _set(OptimizerConfig, "__post_init__", wrap_post_init(OptimizerConfig.__post_init__))
    _set(optimizer_package, "Adam", remainder_adam_class(adam_class))
    build = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"].__func__
    _set(DistributedOptimizer, "_build_model_and_main_param_groups", classmethod(wrap_build(build)))
    d = DistributedOptimizer
    _set(d, "load_state_dict", wrap_load_state_dict(d.load_state_dict))
    _set(d, "_get_main_param_and_optimizer_states", wrap_per_param(d._get_main_param_and_optimizer_states))
    _set(d, "_set_main_param_and_optimizer_states", wrap_per_param(d._set_main_param_and_optimizer_states))
    _set(d, "zero_grad", wrap_zero_grad(d.zero_grad))
    _set(d, "_copy_model_grads_to_main_grads", wrap_copy_grads(d._copy_model_grads_to_main_grads))
    _set(d, "_copy_main_params_to_model_params",
         wrap_fp32_masters_only(d._copy_main_params_to_model_params, zero_remainders=False))
    _set(d, "_copy_model_params_to_main_params",
         wrap_fp32_masters_only(d._copy_model_params_to_main_params, zero_remainders=True))


def uninstall() -> None:
    """Undo install_bf16_remainders (for the tests)."""
    while _INSTALLED:
        owner, name, original = _INSTALLED.pop()
        setattr(owner, name, original)


# --------------------------------------------------------------------------- what the run has (diagnostics)


def describe(optimizer: Any) -> str:
    """One line: how many BF16 shards TE holds with remainders, how many FP32 masters Megatron keeps."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    te = sum(len(te_params(o)) for o in subs if hasattr(o, "shard_fp32_from_float16_groups"))
    fp32 = sum(1 for o in subs for g in getattr(o, "shard_fp32_from_float16_groups", []) for p in g if p is not None)
    numel = sum(p.numel() for o in subs if hasattr(o, "shard_fp32_from_float16_groups") for p in te_params(o))
    return (f"BF16 params with 16-bit remainders in TE's FusedAdam: {te} shards ({numel / 1e6:.1f} M elements on "
            f"this rank, {2 * numel / 2**30:.2f} GiB less than FP32 masters); FP32 masters kept by Megatron: {fp32}")


DUMP_ENV = "INFIR2_BF16_MASTERS_DUMP"  # FILE, "{step}" replaced: the BF16 params' FP32 masters, written ...
DUMP_STEP_ENV = "INFIR2_BF16_MASTERS_DUMP_STEP"  # ... after these optimizer steps of this launch ("1,20"; 0: at setup)


def bf16_param_masters(optimizer: Any) -> list[tuple[Any, Any, int, int]]:
    """(model param, its FP32 master shard, start, end) for every BF16 (non-FP8) param with a shard on this rank:
    Megatron's FP32 master, or the one TE's BF16 shard and remainder stand for (reconstructed)."""
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for models, shards in zip(getattr(opt, "model_float16_groups", []), getattr(opt, "shard_float16_groups", [])):
            for param, shard in zip(models, shards):
                if not holds_remainder(param):
                    continue
                rng = opt._get_model_param_range_map(param)["param"]
                master = param.main_param
                if master is None:
                    master = reconstruct_fp32(shard, opt.optimizer.state[shard]["master_param"])
                out.append((param, master, rng.start, rng.end))
    return out


def dump_bf16_param_masters(model: list[Any], optimizer: Any, path: str) -> int:
    """{name: {"master": FP32, "param": BF16}} of the BF16 params, the shards of all ranks joined (TP/PP 1)."""
    import torch
    import torch.distributed as dist

    from .masters import _param_names

    names = _param_names(model)
    full: dict[str, dict[str, Any]] = {}
    for param, master, start, end in bf16_param_masters(optimizer):
        flat = torch.zeros(param.numel(), dtype=torch.float32, device=master.device)
        flat[start:end] = master.reshape(-1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)  # every element lives in one rank's shard
        full[names[id(param)]] = {"master": flat.view(param.shape).cpu(), "param": param.detach().cpu().clone()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(full, path)
    return len(full)


def dump_masters_after_step_if_asked(model: list[Any], optimizer: Any, environ: Any = None) -> bool:
    """With DUMP_ENV set: dump the BF16 params' masters after the optimizer steps DUMP_STEP_ENV of this launch (0:
    now, after setup and the checkpoint load). The GPU check compares them between runs with and without the
    option (benchmarks/scripts/remainders_check.py)."""
    import os

    environ = os.environ if environ is None else environ
    path = environ.get(DUMP_ENV)
    if not path:
        return False
    wanted = {int(x) for x in environ.get(DUMP_STEP_ENV, "1").split(",") if x.strip()}
    calls, original = [0], optimizer.step

    def dump(step: int) -> None:
        out = path.replace("{step}", str(step))
        count = dump_bf16_param_masters(model, optimizer, out)
        print(f"infir2.remainders: wrote the FP32 masters of {count} BF16 params (step {step} of this launch) to "
              f"{out}", flush=True)

    if 0 in wanted:
        dump(0)

    @functools.wraps(original)
    def step(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] in wanted:
            dump(calls[0])
        return result

    optimizer.step = step
    return True
