"""Typed recipe schema, YAML loading (with `extends:`), and `--set` overrides.

A recipe is a YAML file under `recipes/` (or any path). Every section is a dataclass below; the
docstring-like `doc` metadata of each field is what `infir2 show --explain` and docs/recipes.md print.
Loading never stops at the first problem: every unknown key, wrong type and bad value is collected
and reported together as a `RecipeError`.
"""

from __future__ import annotations

import copy
import os
import sys
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from ..errors import Problem, RecipeError

def _find_recipes_dir() -> Path:
    """Shipped recipes: $INFIR2_RECIPES_DIR, the source checkout's recipes/ (editable install), or the
    copy a wheel installs under <prefix>/share/infir2/recipes."""
    env = os.environ.get("INFIR2_RECIPES_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[3] / "recipes", Path(sys.prefix) / "share" / "infir2" / "recipes"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


RECIPES_DIR = _find_recipes_dir()

FP8_RECIPES = ("blockwise", "tensorwise", "delayed", "mxfp8")
WSD_DECAY_STYLES = ("cosine", "linear", "exponential", "minus_sqrt")


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its help text in metadata."""
    return field(metadata={"doc": text}, **kwargs)


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    num_layers: int = doc("Transformer layers (Qwen2.5-7B: 28, 1.5B: 28).", default=28)
    hidden_size: int = doc("Hidden size (7B: 3584, 1.5B: 1536).", default=3584)
    ffn_hidden_size: int = doc("SwiGLU inner size (7B: 18944, 1.5B: 8960).", default=18944)
    num_attention_heads: int = doc("Query heads (7B: 28, 1.5B: 12).", default=28)
    num_query_groups: int = doc("Key/value heads for grouped-query attention (7B: 4, 1.5B: 2).", default=4)
    seq_length: int = doc("Training sequence length in tokens.", default=32768)
    max_position_embeddings: int = doc("RoPE table length; must be >= seq_length.", default=32768)
    untie_embeddings: bool = doc("Separate input embedding and output layer (7B: true, 1.5B: false).", default=True)
    rotary_base: int = doc("RoPE base (Qwen2.5: 1000000).", default=1000000)
    norm_epsilon: float = doc("RMSNorm epsilon.", default=1e-6)
    init_method_std: float = doc("Std of weight init (matters only when not starting from a checkpoint).", default=0.008)
    vocab_size: int = doc("Vocabulary size passed as --vocab-size (used by NullTokenizer; the HF tokenizer brings its own).", default=152064)
    padded_vocab_size: Optional[int] = doc(
        "Embedding rows. Set it to the converted checkpoint's embedding size so shapes match; "
        "null lets Megatron pad to a multiple of 128*TP.", default=None)
    attention_backend: str = doc("Megatron --attention-backend: auto, fused, flash, unfused, local.", default="auto")


@dataclass
class ParallelConfig:
    tensor_parallel: int = doc("Tensor-parallel size (must divide heads and query groups).", default=1)
    pipeline_parallel: int = doc("Pipeline-parallel size.", default=1)
    context_parallel: int = doc("Context-parallel size.", default=1)
    sequence_parallel: bool = doc("Sequence parallelism (needs tensor_parallel > 1).", default=False)
    distributed_optimizer: bool = doc("Shard optimizer state over data-parallel ranks.", default=True)
    overlap_grad_reduce: bool = doc("Overlap gradient reduce-scatter with backward.", default=True)
    overlap_param_gather: bool = doc("Overlap parameter all-gather with forward.", default=True)
    micro_batch_size: int = doc("Sequences per GPU per micro-step.", default=1)
    global_batch_size: int = doc("Sequences per optimizer step (all GPUs, all micro-steps).", default=128)
    distributed_timeout_minutes: int = doc("Collective timeout.", default=120)
    cross_entropy_fusion: Optional[str] = doc(
        "Fused cross-entropy: null (off) or 'native' ('te' is refused by megatron-core 0.19.2).", default=None)


@dataclass
class BlendEntry:
    path: str = doc("Indexed-dataset prefix: PREFIX.bin and PREFIX.idx must exist.", default="")
    weight: float = doc("Relative sampling weight.", default=1.0)


@dataclass
class DataConfig:
    mock: bool = doc("Use Megatron's MockGPTDataset (random-ish tokens) instead of files.", default=False)
    blend: list[BlendEntry] = doc("Indexed datasets (prefix of .bin/.idx) with weights.", default_factory=list)
    cache_dir: Optional[str] = doc(
        "Dataset index cache, shared by all ranks (default: exp/<name>/data_cache).", default=None)
    split: str = doc("train,valid,test split weights.", default="90,5,5")
    num_workers: int = doc("DataLoader workers per rank.", default=6)


@dataclass
class TokenizerConfig:
    type: str = doc("Megatron tokenizer type: HuggingFaceTokenizer or NullTokenizer.", default="HuggingFaceTokenizer")
    model: Optional[str] = doc("HF tokenizer directory (for HuggingFaceTokenizer).", default=None)


@dataclass
class ScheduleConfig:
    train_iters: int = doc("Total optimizer steps (warmup + stable + decay).", default=40000)
    warmup_iters: int = doc("Linear warmup steps.", default=5000)
    decay_iters: int = doc("WSD decay (anneal) steps at the end of the run.", default=5000)
    decay_style: str = doc("WSD decay shape: cosine, linear, exponential, minus_sqrt.", default="cosine")
    lr: float = doc("Peak learning rate.", default=1e-4)
    min_lr: float = doc("Learning rate at the end of decay.", default=1e-5)
    warmup_init_lr: float = doc("Learning rate at step 0 of warmup.", default=0.0)
    weight_decay: float = doc("AdamW weight decay.", default=0.1)
    adam_beta1: float = doc("Adam beta1.", default=0.9)
    adam_beta2: float = doc("Adam beta2.", default=0.95)
    clip_grad: float = doc("Gradient-norm clipping.", default=1.0)
    seed: int = doc("Random seed (data order and init).", default=1236)


@dataclass
class PrecisionConfig:
    fp8: Optional[str] = doc("FP8 recipe: blockwise, tensorwise, delayed, mxfp8, or null for plain BF16.", default="blockwise")
    fp8_format: str = doc("FP8 format: e4m3 or hybrid (e4m3 forward, e5m2 gradients).", default="e4m3")
    fp8_param_gather: bool = doc("Keep parameters in FP8 and all-gather them in FP8.", default=True)
    precision_aware_optimizer: bool = doc("Transformer Engine's precision-aware fused Adam.", default=True)
    first_last_layers_bf16: bool = doc("Keep the first and last transformer layers in BF16.", default=False)


@dataclass
class CheckpointConfig:
    save: bool = doc("Write checkpoints at all (false for throughput benchmarks: then not even Megatron's "
                     "final checkpoint is written).", default=True)
    save_interval: int = doc("Save a checkpoint every N iterations.", default=1000)
    format: str = doc("Megatron checkpoint format (torch_dist).", default="torch_dist")
    pretrained: Optional[str] = doc(
        "Base-model Megatron checkpoint directory (for example a converted Qwen2.5). Used only while the "
        "run's own checkpoint directory holds none.", default=None)
    load_rng: bool = doc("Restore RNG state on resume (the seed does not).", default=False)
    async_save: bool = doc("Write checkpoints in the background.", default=False)


@dataclass
class LoggingConfig:
    log_interval: int = doc("Print metrics every N iterations.", default=1)
    eval_interval: int = doc("Evaluate every N iterations.", default=100)
    eval_iters: int = doc("Evaluation iterations per evaluation (0 disables).", default=10)
    tensorboard: bool = doc("Write TensorBoard events to exp/<name>/tensorboard.", default=True)
    wandb_project: Optional[str] = doc("W&B project (null disables W&B). Runs offline under exp/<name>/logs.", default=None)
    params_norm: bool = doc("Log the parameter norm.", default=True)
    num_zeros_in_grad: bool = doc("Log the number of zeros in gradients.", default=True)
    profile: bool = doc("PyTorch profiler + CUDA memory history (slow; the seed left it on).", default=False)
    profile_step_start: int = doc("First profiled step.", default=10)
    profile_step_end: int = doc("Last profiled step.", default=12)


@dataclass
class LaunchConfig:
    nnodes: int = doc("Number of hosts; run the same command on each.", default=1)
    nproc_per_node: int = doc("GPUs (processes) per host.", default=8)
    rdzv_endpoint: str = doc("HOST:PORT of the c10d rendezvous (the first node).", default="localhost:29400")
    rdzv_id: Optional[str] = doc("Rendezvous job id (default: derived from the experiment name).", default=None)
    join_timeout: int = doc("Seconds to wait for all nodes to join the rendezvous.", default=900)
    exit_duration_minutes: Optional[int] = doc(
        "Wall-clock budget: save and exit cleanly after this many minutes (for batch schedulers).", default=None)
    max_restarts: int = doc("torchrun worker-group restarts on failure.", default=0)
    stop_grace_seconds: int = doc(
        "On SIGTERM/SIGINT the workers save a checkpoint and exit; they are killed only after this many seconds "
        "(at least torchrun's own 30).",
        default=900)


@dataclass
class MegatronConfig:
    code_dir: Optional[str] = doc(
        "A Megatron-LM checkout; when set its pretrain_gpt.py is launched instead of infir2's entry.", default=None)


@dataclass
class Recipe:
    description: str = doc("One line shown by `infir2 recipes`.", default="")
    name: str = doc("Experiment name: outputs go to exp/<name>/.", default="run")
    phase: Literal["full", "decay"] = doc(
        "'full' runs warmup->stable->decay; 'decay' recipes start from a stable checkpoint (infir2 decay).",
        default="full")
    stable_name: Optional[str] = doc(
        "For decay recipes: the experiment whose checkpoints are annealed (default: the extended recipe's name).",
        default=None)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    env: dict[str, str] = doc("Environment for the run; a variable already set by the user wins.", default_factory=dict)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    megatron_extra_args: list[str] = doc(
        "Megatron flags appended last, verbatim (anything the schema does not model; last one wins).",
        default_factory=list)


# --------------------------------------------------------------------------- locating and reading


def shipped_recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A shipped recipe name (`7b`), or a path to a YAML file (absolute, or relative to cwd / the extender)."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        for base in ([relative_to] if relative_to else []) + [Path.cwd()]:
            path = (base / candidate) if not candidate.is_absolute() else candidate
            if path.is_file():
                return path
        raise RecipeError([Problem("recipe", "file not found", name_or_path)])
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = shipped_recipe_names()
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise RecipeError([Problem("recipe", f"unknown recipe (shipped: {', '.join(names)}){hint}", name_or_path)])


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([Problem(str(path), f"YAML syntax error{where}: {reason}")], str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError([Problem(str(path), "a recipe must be a YAML mapping", type(data).__name__)], str(path))
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; everything else (lists included) is replaced by the override."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_raw(name_or_path: str, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe mapping with its `extends:` chain merged (parent first)."""
    path = resolve_recipe_path(name_or_path, _chain[-1].parent if _chain else None)
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise RecipeError([Problem("extends", f"circular extends: {cycle}")], str(path))
    data = _read_yaml(path)
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data
    parent = load_raw(str(parent_ref), (*_chain, path))
    if data.get("phase") == "decay" and "stable_name" not in data:
        data["stable_name"] = parent.get("name")
    return deep_merge(parent, data)


# --------------------------------------------------------------------------- typed conversion


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    if get_origin(inner) is Literal:
        name = " | ".join(repr(a) for a in get_args(inner))
    elif get_origin(inner) is list:
        name = f"list of {_type_name(get_args(inner)[0])}"
    elif get_origin(inner) is dict:
        name = "mapping"
    elif dataclasses.is_dataclass(inner):
        name = "mapping"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


_INVALID = object()


def _convert(value: Any, tp: Any, key: str, problems: list[Problem]) -> Any:
    """Check/convert one value against its declared type; on mismatch append a Problem and return _INVALID
    (the key then keeps its default, so the remaining checks can still run and report too)."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        problems.append(Problem(key, f"must not be null; expected {_type_name(tp)}"))
        return _INVALID
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, dict):
            problems.append(Problem(key, f"expected a mapping of {inner.__name__} keys", value))
            return _INVALID
        return build_dataclass(inner, value, key, problems)
    origin = get_origin(inner)
    if origin is Literal:
        if value not in get_args(inner):
            problems.append(Problem(key, f"must be one of {', '.join(map(repr, get_args(inner)))}", value))
            return _INVALID
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(Problem(key, f"expected {_type_name(inner)}", value))
            return _INVALID
        (item_tp,) = get_args(inner)
        if item_tp is str:
            # flags like "--foo" are strings; numbers given in YAML lists are accepted as their text
            return [str(v) for v in value]
        items = [_convert(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return [item for item in items if item is not _INVALID]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(Problem(key, "expected a mapping of NAME: value", value))
            return _INVALID
        return {str(k): ("" if v is None else str(v) if not isinstance(v, bool) else str(v).lower())
                for k, v in value.items()}
    if inner is bool:
        if not isinstance(value, bool):
            problems.append(Problem(key, "expected true or false", value))
            return _INVALID
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            problems.append(Problem(key, "expected an integer", value))
            return _INVALID
        return value
    if inner is float:
        if isinstance(value, bool):
            problems.append(Problem(key, "expected a number", value))
            return _INVALID
        if isinstance(value, (int, float)):
            return float(value)
        try:  # PyYAML reads 1e-4 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            problems.append(Problem(key, "expected a number", value))
            return _INVALID
    if inner is str:
        if isinstance(value, (dict, list)):
            problems.append(Problem(key, "expected a string", value))
            return _INVALID
        return str(value)
    return value


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'? " if close else ""


def build_dataclass(cls: type, data: dict[str, Any], prefix: str, problems: list[Problem]) -> Any:
    hints = get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            problems.append(Problem(path, f"unknown key; {_suggest(str(key), valid)}valid keys: {', '.join(valid)}"))
            continue
        converted = _convert(value, hints[key], path, problems)
        if converted is not _INVALID:
            kwargs[key] = converted
    try:
        return cls(**kwargs)
    except TypeError as exc:  # only reachable through problems already recorded
        problems.append(Problem(prefix or "recipe", str(exc)))
        return cls()


# --------------------------------------------------------------------------- overrides


def parse_set(assignment: str) -> tuple[str, Any]:
    """`section.key=value` -> (dotted key, YAML-parsed value)."""
    if "=" not in assignment:
        raise RecipeError([Problem("--set", "expected SECTION.KEY=VALUE", assignment)], "--set")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_sets(raw: dict[str, Any], assignments: list[str], problems: list[Problem]) -> dict[str, Any]:
    """Apply `--set` overrides to the raw mapping; a key the schema does not have is a problem."""
    result = copy.deepcopy(raw)
    for assignment in assignments:
        try:
            dotted, value = parse_set(assignment)
        except RecipeError as exc:
            problems.extend(exc.problems)
            continue
        parts = dotted.split(".")
        cls: Any = Recipe
        ok = True
        for i, part in enumerate(parts):
            if get_origin(cls) is dict and i == len(parts) - 1:
                break  # a mapping section (env) takes any NAME: --set env.NCCL_DEBUG=INFO
            if not dataclasses.is_dataclass(cls):
                problems.append(Problem(f"--set {dotted}", f"'{'.'.join(parts[:i])}' is not a section"))
                ok = False
                break
            hints = get_type_hints(cls)
            if part not in hints:
                valid = list(hints)
                where = ".".join(parts[:i]) or "recipe"
                problems.append(Problem(f"--set {dotted}",
                                        f"no key '{part}' in {where}; {_suggest(part, valid)}valid keys: {', '.join(valid)}"))
                ok = False
                break
            cls = _unwrap_optional(hints[part])[0]
        if not ok:
            continue
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(Problem(f"--set {dotted}", f"'{part}' is not a mapping in the recipe"))
                ok = False
                break
        if ok:
            node[parts[-1]] = value
    return result


# --------------------------------------------------------------------------- public entry


@dataclass
class LoadedRecipe:
    recipe: Recipe
    source: str
    raw: dict[str, Any]


def build_recipe(raw: dict[str, Any], problems: list[Problem]) -> Recipe:
    """The typed recipe; type problems are appended and the affected keys keep their defaults."""
    return build_dataclass(Recipe, raw, "", problems)


def load_recipe(name_or_path: str, sets: list[str] | None = None) -> LoadedRecipe:
    """Load, merge `extends:`, apply `--set`, check types. Raises RecipeError listing every problem."""
    raw = load_raw(name_or_path)
    problems: list[Problem] = []
    raw = apply_sets(raw, list(sets or []), problems)
    recipe = build_dataclass(Recipe, raw, "", problems)
    if problems:
        raise RecipeError(problems, name_or_path)
    return LoadedRecipe(recipe=recipe, source=name_or_path, raw=raw)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=False, width=110)


def field_docs(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str, Any]]:
    """(dotted key, type, help, default) for every leaf key: the recipe reference in docs and --help."""
    rows: list[tuple[str, str, str, Any]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = _unwrap_optional(hints[f.name])[0]
        if dataclasses.is_dataclass(tp) and get_origin(hints[f.name]) is not list:
            rows.extend(field_docs(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        rows.append((key, _type_name(hints[f.name]), f.metadata.get("doc", ""), default))
    return rows
