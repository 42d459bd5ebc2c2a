"""The recipe's rules: every configuration problem, found from the recipe alone, before anything is launched.

Two kinds of problems are collected in Findings:
- configuration problems (the recipe or command line is wrong): always fatal, exit 2; the rules are here;
- machine problems (a file, tokenizer or GPU missing *here*): fatal for a launch, warnings in --dry-run, since a
  dry run is often made on a login node that lacks them; those checks are the launch's (launch/preflight.py).
Every rule runs; nothing stops at the first problem. A new recipe key's rule is a few lines in one of the
check_* functions below, or a new one listed in check_config.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from ..errors import Problem
from .schema import FP8_RECIPES, WSD_DECAY_STYLES, Recipe, remainders_apply

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "NullTokenizer")
FP8_BLOCK = 128
_ENDPOINT_RE = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})$")


def is_loopback_host(host: str) -> bool:
    """localhost, or a literal address in 127.0.0.0/8 or ::1 (names are not resolved here)."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass
class Findings:
    config: list[Problem] = field(default_factory=list)
    machine: list[Problem] = field(default_factory=list)

    def add(self, key: str, message: str, value: object = None) -> None:
        self.config.append(Problem(key, message, value))

    def at_least(self, key: str, value: float, low: float, why: str = "") -> bool:
        """A configuration problem unless value >= low; True when there was none."""
        if value >= low:
            return True
        self.add(key, f"must be >= {low:g}" + (f" {why}" if why else ""), value)
        return False

    def add_machine(self, key: str, message: str, value: object = None) -> None:
        self.machine.append(Problem(key, message, value))

    def extend(self, other: "Findings") -> None:
        self.config.extend(other.config)
        self.machine.extend(other.machine)


def parse_endpoint(endpoint: str) -> tuple[str, int] | None:
    """HOST:PORT -> (HOST, PORT), an IPv6 HOST keeping its brackets; None unless the port is in 1-65535. The one
    reading of a rendezvous endpoint: the recipe's rule, the lock's rendezvous-host test and torchrun's wait."""
    match = _ENDPOINT_RE.match(endpoint.strip())
    if not match:
        return None
    port = int(match.group("port"))
    if not 1 <= port <= 65535:
        return None
    return match.group("host"), port


# --------------------------------------------------------------------------- configuration rules


def check_parallel(recipe: Recipe, out: Findings) -> None:
    m, par, launch = recipe.model, recipe.parallel, recipe.launch
    tp, pp, cp = par.tensor_parallel, par.pipeline_parallel, par.context_parallel
    for key, value in (("parallel.tensor_parallel", tp), ("parallel.pipeline_parallel", pp),
                       ("parallel.context_parallel", cp), ("parallel.micro_batch_size", par.micro_batch_size),
                       ("parallel.global_batch_size", par.global_batch_size)):
        out.at_least(key, value, 1)
    if min(tp, pp, cp, par.micro_batch_size) < 1:
        return
    if m.num_attention_heads % tp:
        out.add("parallel.tensor_parallel",
                f"must divide model.num_attention_heads={m.num_attention_heads}; "
                f"valid: {_divisors(m.num_attention_heads)}", tp)
    if m.num_query_groups % tp:
        out.add("parallel.tensor_parallel",
                f"must divide model.num_query_groups={m.num_query_groups} (each TP rank needs whole key/value "
                f"heads); valid: {_divisors(m.num_query_groups)}", tp)
    if m.num_attention_heads % max(m.num_query_groups, 1):
        out.add("model.num_query_groups", f"must divide model.num_attention_heads={m.num_attention_heads}",
                m.num_query_groups)
    world = launch.nnodes * launch.nproc_per_node
    model_parallel = tp * pp * cp
    if world >= 1 and world % model_parallel:
        out.add("parallel", f"world size {world} (nnodes {launch.nnodes} x nproc_per_node "
                f"{launch.nproc_per_node}) is not divisible by TP x PP x CP = {model_parallel}")
    elif world >= 1:
        dp = world // model_parallel
        if par.global_batch_size % (par.micro_batch_size * dp):
            out.add("parallel.global_batch_size",
                    f"must be a multiple of micro_batch_size x data-parallel size = {par.micro_batch_size} x {dp} "
                    f"= {par.micro_batch_size * dp}", par.global_batch_size)
    if par.sequence_parallel and tp == 1:
        out.add("parallel.sequence_parallel",
                "needs tensor_parallel > 1 (Megatron would silently turn it off); set it to false", True)
    if par.overlap_param_gather and not (par.distributed_optimizer and par.overlap_grad_reduce):
        out.add("parallel.overlap_param_gather", "needs distributed_optimizer and overlap_grad_reduce", True)
    if cp > 1 and m.seq_length % (2 * cp):
        out.add("model.seq_length", f"must be divisible by 2 x context_parallel = {2 * cp}", m.seq_length)
    if par.cuda_graph not in (None, "transformer_engine", "local"):
        out.add("parallel.cuda_graph", "must be null, transformer_engine or local", par.cuda_graph)
    bad_modules = [x for x in par.cuda_graph_modules if x not in ("attn", "mlp")]
    if bad_modules:
        out.add("parallel.cuda_graph_modules", "entries must be attn or mlp", par.cuda_graph_modules)
    elif par.cuda_graph_modules and not par.cuda_graph:
        out.add("parallel.cuda_graph_modules", "has no effect without parallel.cuda_graph", par.cuda_graph_modules)
    if par.cross_entropy_fusion not in (None, "native", "lean"):
        out.add("parallel.cross_entropy_fusion",
                "must be null, 'native' or 'lean' (megatron-core 0.19.2 refuses 'te' as unstable)",
                par.cross_entropy_fusion)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_model(recipe: Recipe, out: Findings) -> None:
    m = recipe.model
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "seq_length", "vocab_size"):
        out.at_least(f"model.{key}", getattr(m, key), 1)
    if m.max_position_embeddings < m.seq_length:
        out.add("model.max_position_embeddings", f"must be >= model.seq_length={m.seq_length}",
                m.max_position_embeddings)
    if m.num_attention_heads >= 1 and m.hidden_size % m.num_attention_heads:
        out.add("model.hidden_size", f"must be divisible by num_attention_heads={m.num_attention_heads}",
                m.hidden_size)
    if m.attention_backend not in ("auto", "fused", "flash", "unfused", "local"):
        out.add("model.attention_backend", "must be one of auto, fused, flash, unfused, local", m.attention_backend)
    # Megatron (language_module._set_attention_backend) asserts each NVTE_*_ATTN variable is unset or equal
    # to the value the backend implies; an empty string is "set" too.
    enabled = {"auto": ("FLASH", "FUSED", "UNFUSED"), "fused": ("FUSED",), "flash": ("FLASH",),
               "unfused": ("UNFUSED",), "local": ()}.get(m.attention_backend)
    for kind in ("FLASH", "FUSED", "UNFUSED") if enabled is not None else ():
        name, expected = f"NVTE_{kind}_ATTN", "1" if kind in enabled else "0"
        if name in recipe.env and recipe.env[name] != expected:
            out.add(f"env.{name}", f"must be {expected} (or absent) when model.attention_backend="
                    f"{m.attention_backend!r}: Megatron asserts it (--set env.{name}={expected})", recipe.env[name])


def check_precision(recipe: Recipe, out: Findings) -> None:
    p, m, tp = recipe.precision, recipe.model, max(recipe.parallel.tensor_parallel, 1)
    if p.fp8 is not None and p.fp8 not in FP8_RECIPES:
        out.add("precision.fp8", f"must be one of {', '.join(FP8_RECIPES)} or null (BF16)", p.fp8)
    if p.fp8_format not in ("e4m3", "hybrid"):
        out.add("precision.fp8_format", "must be e4m3 or hybrid", p.fp8_format)
    if p.fp8 and p.fp8_param_gather and not recipe.parallel.distributed_optimizer:
        out.add("precision.fp8_param_gather", "needs parallel.distributed_optimizer: true", True)
    if p.fp8 == "delayed" and p.first_last_layers_bf16:
        out.add("precision.first_last_layers_bf16", "is not supported with the delayed FP8 recipe", True)
    # With precision.fp8 null the run is BF16 throughout: the FP8 recipe's options do nothing there, and the FP8
    # weights' options (head parameter, remainders) only where FP8 parameters are (both said at launch), so that
    # `--set precision.fp8=null` turns an FP8 recipe into its BF16 baseline. The rest is checked with FP8 only.
    if p.fp8 and p.fp8_activation_store_blockwise:
        if p.fp8_activation_store:
            out.add("precision.fp8_activation_store_blockwise", "choose one way to keep the SwiGLU input in FP8: this "
                    "or precision.fp8_activation_store", True)
        swiglu_flags = [a.split("=", 1)[0] for a in recipe.megatron_extra_args
                        if a.split("=", 1)[0] in ("--no-bias-swiglu-fusion", "--use-te-activation-func")]
        if swiglu_flags:
            out.add("precision.fp8_activation_store_blockwise", f"needs Megatron's fused SwiGLU, which "
                    f"{' and '.join(swiglu_flags)} in megatron_extra_args turn off", True)
        tp = max(recipe.parallel.tensor_parallel, 1)
        width = 2 * m.ffn_hidden_size / tp  # the SwiGLU input on each GPU, quantized in tiles of 128 values
        if width % 128:
            out.add("precision.fp8_activation_store_blockwise", f"needs the SwiGLU input's width on each GPU, "
                    f"2 x model.ffn_hidden_size / parallel.tensor_parallel = {width:g}, to be a multiple of 128",
                    True)
    if m.te_op_fuser and recipe.parallel.overlap_param_gather:
        out.add("model.te_op_fuser", "cannot be used with parallel.overlap_param_gather: true: Megatron's overlapped "
                "parameter all-gather stopped on an assertion in its forward hooks with the fused MLPs (7B shape, "
                "third iteration); set parallel.overlap_param_gather=false with it", True)
    if m.te_op_fuser and p.fp8 and p.fp8_activation_store_blockwise:
        out.add("model.te_op_fuser", "builds the MLP from Transformer Engine's operations, which do not call the "
                "SwiGLU that precision.fp8_activation_store_blockwise replaces: turn one of them off", True)
    if m.te_op_fuser and p.fp8 and p.fp8_activation_store:
        out.add("model.te_op_fuser", "cannot take precision.fp8_activation_store: that option hands Megatron Transformer "
                "Engine's SwiGLU module, which the fuser's MLP refuses at the first forward (SwiGLU is not one of its "
                "operations); turn one of them off", True)
    if p.fp8 and p.fp8_output_layer and not m.untie_embeddings:
        out.add("precision.fp8_output_layer", "needs model.untie_embeddings: true (Megatron's FP8 LM head cannot "
                "share the input embedding's weight)", True)
    if p.fp8_attention_amax_history < 1:
        out.add("precision.fp8_attention_amax_history", "must be at least 1 (steps)", p.fp8_attention_amax_history)
    elif p.fp8_attention_amax_history != 1 and not (p.fp8 and p.fp8_attention):
        out.add("precision.fp8_attention_amax_history", "has no effect without FP8 attention: set "
                "precision.fp8_attention: true or leave it at 1", p.fp8_attention_amax_history)
    if p.fp8 and p.fp8_attention:
        head_dim = m.hidden_size / max(m.num_attention_heads, 1)
        if head_dim != 128:
            out.add("precision.fp8_attention", f"cuDNN's FP8 attention trains with head dim 128 only; this model's is "
                    f"{head_dim:g} (hidden_size / num_attention_heads)", True)
        if m.seq_length % 128:
            out.add("model.seq_length", "FP8 attention needs a multiple of 128", m.seq_length)
        if recipe.parallel.context_parallel > 1:
            out.add("precision.fp8_attention", "is not supported with context_parallel > 1", True)
        if recipe.parallel.cuda_graph and "attn" in (recipe.parallel.cuda_graph_modules or ["attn"]):
            out.add("parallel.cuda_graph_modules", "with precision.fp8_attention, attention must stay out of the "
                    "CUDA graphs (a replayed graph never updates its FP8 scales): use [mlp]",
                    recipe.parallel.cuda_graph_modules)
    if remainders_apply(recipe) and any(a.startswith("--dist-ckpt-optim-fully-reshardable")
                                           for a in recipe.megatron_extra_args):
        out.add("precision.fp8_bf16_param_remainders", "cannot be used with --dist-ckpt-optim-fully-reshardable "
                "(megatron-core gathers that format in FP32 and cannot load int16 remainders back)", True)
    if p.adam_moments not in ("fp32", "bf16"):
        out.add("precision.adam_moments", "must be fp32 or bf16", p.adam_moments)
    elif p.adam_moments != "fp32" and not (p.precision_aware_optimizer and recipe.parallel.distributed_optimizer):
        out.add("precision.adam_moments", "bf16 moments need precision.precision_aware_optimizer and "
                "parallel.distributed_optimizer", p.adam_moments)
    if p.fp8 == "blockwise":
        kv = m.hidden_size // max(m.num_attention_heads, 1)
        qkv = (m.num_attention_heads + 2 * m.num_query_groups) * kv
        # (key reported, its value, what must be a multiple of 128 and how it is computed)
        shapes = [("model.hidden_size", m.hidden_size, m.hidden_size, "model.hidden_size"),
                  ("model.ffn_hidden_size", m.ffn_hidden_size, m.ffn_hidden_size, "model.ffn_hidden_size")]
        if tp > 1:  # per-rank shards (at TP 1 they are the whole widths, checked above)
            shapes += [("model.ffn_hidden_size", m.ffn_hidden_size, m.ffn_hidden_size / tp,
                        f"model.ffn_hidden_size / tensor_parallel = {m.ffn_hidden_size} / {tp}"),
                       ("precision.fp8", p.fp8, qkv / tp, f"QKV width / tensor_parallel = {qkv} / {tp}")]
        for key, value, size, how in shapes:
            if size != int(size) or int(size) % FP8_BLOCK:
                out.add(key, f"blockwise FP8 quantizes in 128-wide blocks: {how} = {size:.6g} is not a multiple "
                        "of 128", value)


def check_schedule(recipe: Recipe, out: Findings) -> None:
    s = recipe.schedule
    out.at_least("schedule.train_iters", s.train_iters, 1)
    out.at_least("schedule.warmup_iters", s.warmup_iters, 0)
    out.at_least("schedule.decay_iters", s.decay_iters, 1, "(WSD needs a decay length)")
    if s.warmup_iters + s.decay_iters > s.train_iters:
        out.add("schedule", f"warmup_iters + decay_iters = {s.warmup_iters + s.decay_iters} exceeds "
                f"train_iters = {s.train_iters}")
    if s.decay_style not in WSD_DECAY_STYLES:
        out.add("schedule.decay_style", f"must be one of {', '.join(WSD_DECAY_STYLES)}", s.decay_style)
    if s.min_lr > s.lr:
        out.add("schedule.min_lr", f"must be <= schedule.lr={s.lr}", s.min_lr)
    if s.lr <= 0:
        out.add("schedule.lr", "must be > 0", s.lr)


def check_logging_and_checkpoint(recipe: Recipe, out: Findings) -> None:
    lg, c = recipe.logging, recipe.checkpoint
    for key, value in (("logging.log_interval", lg.log_interval), ("logging.eval_interval", lg.eval_interval),
                       ("checkpoint.save_interval", c.save_interval)):
        out.at_least(key, value, 1)
    out.at_least("logging.eval_iters", lg.eval_iters, 0)
    check_retention(recipe, out)
    if c.format != "torch_dist":
        out.add("checkpoint.format", "must be torch_dist (resume detection checks torch_dist completeness)",
                c.format)
    if lg.nan_check not in ("micro_batch", "step"):
        out.add("logging.nan_check", "must be micro_batch or step", lg.nan_check)
    if lg.profile and lg.profile_step_end <= lg.profile_step_start:
        out.add("logging.profile_step_end", f"must be > profile_step_start={lg.profile_step_start}",
                lg.profile_step_end)


def check_retention(recipe: Recipe, out: Findings) -> None:
    c = recipe.checkpoint
    if c.keep_last is not None and c.keep_last < 1:
        out.add("checkpoint.keep_last", "must be >= 1 (null keeps every checkpoint)", c.keep_last)
    if c.keep_every is None:
        return
    if c.keep_every < 1:
        out.add("checkpoint.keep_every", "must be >= 1, or null", c.keep_every)
    elif c.keep_last is None:
        out.add("checkpoint.keep_every", "has no effect without checkpoint.keep_last (null keeps every "
                "checkpoint): set keep_last, or clear keep_every", c.keep_every)
    elif c.save_interval >= 1 and c.keep_every % c.save_interval:
        nearest = c.save_interval * max(1, c.keep_every // c.save_interval)
        out.add("checkpoint.keep_every", f"must be a multiple of checkpoint.save_interval={c.save_interval}, or "
                f"no checkpoint is ever saved at one (e.g. {nearest})", c.keep_every)


def check_data_and_tokenizer(recipe: Recipe, out: Findings) -> None:
    d, tok = recipe.data, recipe.tokenizer
    if not d.mock and not d.blend:
        out.add("data.blend", "is empty: list indexed-dataset prefixes, or set data.mock: true")
    if d.mock and d.blend:
        out.add("data.mock", "mock data and data.blend are exclusive; clear one", True)
    for i, entry in enumerate(d.blend):
        if entry.weight <= 0:
            out.add(f"data.blend[{i}].weight", "must be > 0", entry.weight)
        if not entry.path:
            out.add(f"data.blend[{i}].path", "must not be empty")
    for i, entry in enumerate(d.valid_blend):
        if entry.weight <= 0:
            out.add(f"data.valid_blend[{i}].weight", "must be > 0", entry.weight)
        if not entry.path:
            out.add(f"data.valid_blend[{i}].path", "must not be empty")
    if d.mock and d.valid_blend:
        out.add("data.valid_blend", "needs data.blend (mock data has no held-out set): clear it or set "
                "data.mock: false", [e.path for e in d.valid_blend])
    parts = d.split.split(",")
    if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
        out.add("data.split", "must be three comma-separated weights, like 90,5,5", d.split)
    if tok.type not in TOKENIZER_TYPES:
        out.add("tokenizer.type", f"must be one of {', '.join(TOKENIZER_TYPES)}", tok.type)
    if tok.type == "HuggingFaceTokenizer" and not tok.model:
        out.add("tokenizer.model", "HuggingFaceTokenizer needs a tokenizer directory")


def check_launch(recipe: Recipe, out: Findings) -> None:
    launch = recipe.launch
    out.at_least("launch.nnodes", launch.nnodes, 1)
    out.at_least("launch.nproc_per_node", launch.nproc_per_node, 1)
    out.at_least("launch.stop_grace_seconds", launch.stop_grace_seconds, 1)
    endpoint = parse_endpoint(launch.rdzv_endpoint)
    if endpoint is None:
        out.add("launch.rdzv_endpoint", "must be HOST:PORT with a port in 1-65535", launch.rdzv_endpoint)
    elif launch.nnodes > 1 and is_loopback_host(endpoint[0]):
        out.add("launch.rdzv_endpoint", f"is a loopback address but nnodes={launch.nnodes}: other hosts can never "
                "reach it; give the first node's hostname or IP", launch.rdzv_endpoint)
    out.at_least("launch.join_timeout", launch.join_timeout, 1, "second")
    if launch.exit_duration_minutes is not None:
        out.at_least("launch.exit_duration_minutes", launch.exit_duration_minutes, 1)
    out.at_least("launch.max_restarts", launch.max_restarts, 0)


def drop_consequences(found: Findings, type_problems: list[Problem]) -> Findings:
    """`found` without the problems that only follow from a key whose value had the wrong type: that key fell
    back to its default, so rules about it (or naming it) would report things the user never wrote, like
    "sequence_parallel needs tensor_parallel > 1" after `tensor_parallel: four`. The type problem is the one
    to fix; the rest are checked again on the next run."""
    keys = {p.key.removeprefix("--set ").split("[")[0] for p in type_problems if p.key != "--set"}
    patterns = [re.compile(rf"(?<![\w.]){re.escape(k)}(?![\w])") for k in keys]
    patterns += [re.compile(rf"(?<![\w]){re.escape(k.rsplit('.', 1)[-1])}(?![\w])") for k in keys if "." in k]

    def follows(problem: Problem) -> bool:
        return (any(problem.key == k or problem.key.startswith(k + ".") for k in keys)
                or any(p.search(problem.message) for p in patterns))

    kept = Findings()
    kept.config = [p for p in found.config if not follows(p)]
    kept.machine = list(found.machine)
    return kept


EXP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}$")


def check_name(recipe: Recipe, out: Findings) -> None:
    """The experiment name is one folder under exp/: no '/', '..', absolute path or empty name, which would
    put checkpoints outside exp/ or into another experiment's folders."""
    if not EXP_NAME_RE.match(recipe.name):
        out.add("name", "the experiment name (recipe name or --exp) must be one folder name: letters, digits and "
                "._+=- (starting with a letter or digit, at most 200 characters)", recipe.name)


def check_config(recipe: Recipe) -> Findings:
    out = Findings()
    for rule in (check_model, check_parallel, check_precision, check_schedule, check_logging_and_checkpoint,
                 check_data_and_tokenizer, check_launch, check_name):
        rule(recipe, out)
    return out
