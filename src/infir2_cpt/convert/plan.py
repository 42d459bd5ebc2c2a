"""`infir2 convert ...`: everything checked on the CPU first, then one torchrun process (runtime/convert_entry.py).

plan_*() read the recipe, the HF folder (config.json and the safetensors headers) or the checkpoint's tensor
metadata, collect every problem, and build the torchrun command; they write nothing. run_plan() starts it.
Configuration problems always stop (exit 2); a missing GPU stops a real run and is a warning in --dry-run.

The checkpoint is written at TP=1: torch_dist checkpoints hold global (unsharded) tensors and Megatron
reshards them when a run with another TP (or PP) loads them, so one conversion serves every TP size.
`--tp` only checks that the training TP divides the heads, query groups, FFN size and padded vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checkpoints as ck
from ..errors import ConversionError, Problem, RecipeError
from ..launch.execute import flag_lines
from ..launch.megatron_args import model_args
from ..launch.plan import resolve_env
from ..launch.preflight import check_gpu, nearest_existing
from ..layout import RECIPE_FILE
from ..recipe.load import load_recipe
from ..recipe.schema import Recipe
from ..recipe.shape import ModelShape
from ..requests import SET_HELP, option
from ..runtime.torchrun import GRACE_ENV
from .mapping import (
    SOURCE_CONFIG_FILE,
    check_hf_state_shapes,
    compare_hf_config_with_recipe,
    hf_tensor_shapes,
    read_hf_config,
    recipe_padded_vocab,
    tensor_parallel_problems,
)

ENTRY_MODULE = "infir2_cpt.runtime.convert_entry"


CONVERT_RECIPE_HELP = "Recipe whose model section the checkpoint follows (name or YAML path)."
CONVERT_DRY_RUN_HELP = "Check everything, print the torchrun command, and exit; writes nothing."


@dataclass
class HfToMegatronRequest:
    """`infir2 convert hf-to-megatron`."""

    hf: str = option("--hf", help="Hugging Face Qwen2 folder: config.json and *.safetensors.", show_default=False)
    out: str = option("--out", help="New (or empty) folder for the Megatron checkpoint.", show_default=False)
    recipe: str = option("--recipe", "-r", help="Recipe that will train from the checkpoint.", default="7b")
    sets: list[str] = option("--set", "-s", help=SET_HELP, default_factory=list, metavar="KEY=VALUE")
    tp: int | None = option(
        "--tp", help="Training TP to check the shapes against (default: the recipe's). The checkpoint is written "
        "unsharded; Megatron reshards it on load.", show_default=False, default=None)
    no_verify: bool = option("--no-verify", help="Do not read the written checkpoint back.", default=False)
    dry_run: bool = option("--dry-run", help=CONVERT_DRY_RUN_HELP, default=False)


@dataclass
class MegatronToHfRequest:
    """`infir2 convert megatron-to-hf`."""

    ckpt: str = option("--ckpt", help="An iter_NNNNNNN or release folder (or a checkpoints directory: its tracker's "
                       "folder).", show_default=False)
    out: str = option("--out", help="New (or empty) folder for the Hugging Face model.", show_default=False)
    recipe: str | None = option("--recipe", "-r", help=CONVERT_RECIPE_HELP, show_default=False, default=None)
    sets: list[str] = option("--set", "-s", help=SET_HELP, default_factory=list, metavar="KEY=VALUE")
    tokenizer: str | None = option(
        "--tokenizer", help="Copy the tokenizer files (and generation_config.json) of this folder.",
        show_default=False, default=None)
    hf_config: str | None = option(
        "--hf-config", help="The source model's config.json (or its folder): vocab_size and token ids come from it "
        "(default: the copy kept beside the recipe's checkpoint.pretrained).", show_default=False, default=None)
    vocab_size: int | None = option(
        "--vocab-size", help="Embedding rows to keep (default: the source config's vocab_size).",
        show_default=False, default=None)
    dry_run: bool = option("--dry-run", help=CONVERT_DRY_RUN_HELP, default=False)


@dataclass
class CheckLogitsRequest:
    """`infir2 convert check-logits`."""

    hf: str = option("--hf", help="Hugging Face Qwen2 folder (the reference).", show_default=False)
    ckpt: str = option("--ckpt", help="Megatron iter_NNNNNNN or release folder.", show_default=False)
    recipe: str | None = option("--recipe", "-r", help=CONVERT_RECIPE_HELP, show_default=False, default=None)
    sets: list[str] = option("--set", "-s", help=SET_HELP, default_factory=list, metavar="KEY=VALUE")
    dtype: str = option("--dtype", help="bf16 or fp32, for both models.", default="bf16")
    batch: int = option("--batch", help="Sequences of random tokens.", default=2)
    seq: int = option("--seq", help="Tokens per sequence.", default=256)
    seed: int = option("--seed", help="Seed of the random tokens.", default=1234)
    max_rel: float = option("--max-rel", help="Largest accepted max |difference| / max |HF logit|.", default=0.05)
    report: str | None = option("--report", help="Also write the figures as JSON here.", show_default=False,
                                default=None)
    dry_run: bool = option("--dry-run", help=CONVERT_DRY_RUN_HELP, default=False)


@dataclass
class ConvertPlan:
    command: list[str]
    env: dict[str, str]
    notes: list[str]
    warnings: list[Problem]
    shape: ModelShape


# --------------------------------------------------------------------------- shared pieces


def load_request_recipe(name: str, sets: list[str], problems: list[Problem]) -> Recipe | None:
    """The recipe, or None with its problems added to `problems` (reported with everything else)."""
    try:
        return load_recipe(name, sets).recipe
    except RecipeError as exc:
        problems.extend(exc.problems)
        return None


def check_out_dir(out: str | None, key: str, problems: list[Problem]) -> Path | None:
    """A new folder, or an existing empty one, under a writable parent."""
    if not out:
        problems.append(Problem(key, "is required"))
        return None
    path = Path(out).absolute()
    if path.exists() and not path.is_dir():
        problems.append(Problem(key, "exists and is not a folder", out))
    elif path.is_dir() and any(path.iterdir()):
        problems.append(Problem(key, "exists and is not empty (nothing is overwritten; remove it or pick another)", out))
    else:
        parent = nearest_existing(path)
        if not os.access(parent, os.W_OK):
            problems.append(Problem(key, f"{parent} is not writable", out))
    return path


def gpu_problems() -> list[Problem]:
    """The launch preflight's GPU check, for the one GPU a conversion builds the Megatron model on."""
    return check_gpu(1, None, "this conversion builds the Megatron model on one GPU").machine


def conversion_megatron_args(recipe: Recipe, vocab_size: int, padded_vocab: int, save: Path | None = None,
                             dtype: str = "bf16") -> list[str]:
    """Megatron arguments for building the recipe's model on one GPU: model_args() of the recipe (so the model
    is the one training builds) with the checkpoint's vocabulary, plus the least that parse_and_validate_args
    needs: TP=PP=CP=1, no distributed optimizer, BF16 weights and no FP8 (TE's blockwise FP8 parameters do not
    support plain view/copy)."""
    model = dataclasses.replace(recipe.model, vocab_size=vocab_size, padded_vocab_size=padded_vocab)
    args = model_args(dataclasses.replace(recipe, model=model))
    args += ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
             "--context-parallel-size", "1", "--micro-batch-size", "1", "--global-batch-size", "1",
             "--train-iters", "1", "--lr", "0.0", "--min-lr", "0.0", "--seed", str(recipe.schedule.seed),
             "--init-method-std", repr(float(recipe.model.init_method_std)),
             "--mock-data", "--tokenizer-type", "NullTokenizer", "--eval-interval", "1", "--eval-iters", "0",
             "--ckpt-format", "torch_dist", "--no-save-optim", "--no-save-rng", "--no-load-optim", "--no-load-rng",
             "--distributed-timeout-minutes", str(recipe.parallel.distributed_timeout_minutes)]
    if dtype == "bf16":
        args += ["--bf16"]
    if save is not None:
        args += ["--save", str(save), "--save-interval", "1"]
    return args


def torchrun_command(entry_args: list[str], megatron_args: list[str] | None = None) -> list[str]:
    """One process on this host (--standalone picks a free rendezvous port)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=1",
               "-m", ENTRY_MODULE, *entry_args]
    if megatron_args:
        command += ["--", *megatron_args]
    return command


def shape_json(shape: ModelShape) -> str:
    return json.dumps(dataclasses.asdict(shape), separators=(",", ":"))


def conversion_env(recipe: Recipe) -> dict[str, str]:
    """The recipe's environment (a variable the user set wins), without the training-only stop grace."""
    env, _ = resolve_env(recipe, dict(os.environ))
    env.pop(GRACE_ENV, None)
    return env


# --------------------------------------------------------------------------- HF side


@dataclass
class HfSource:
    path: Path
    config: dict[str, Any]
    tensor_shapes: dict[str, tuple[int, ...]]


def read_hf_source(hf: str | None, key: str, problems: list[Problem]) -> HfSource | None:
    if not hf:
        problems.append(Problem(key, "is required"))
        return None
    path = Path(hf).absolute()
    if not path.is_dir():
        problems.append(Problem(key, "is not a folder", hf))
        return None
    try:
        return HfSource(path, read_hf_config(path), hf_tensor_shapes(path))
    except ConversionError as exc:
        problems.extend(Problem(key if p.key == "--hf" else p.key, p.message, p.value) for p in exc.problems)
    except Exception as exc:  # a truncated or foreign safetensors file
        problems.append(Problem(key, f"cannot read the safetensors headers: {exc}", hf))
    return None


def hf_shape(source: HfSource, recipe: Recipe, padded: int | None, tp: int | None,
             problems: list[Problem]) -> ModelShape | None:
    """The recipe's shape with the HF vocabulary, after every config check and then every tensor check."""
    config_problems = compare_hf_config_with_recipe(source.config, recipe, padded, tp)
    problems.extend(config_problems)
    vocab = source.config.get("vocab_size")
    if padded is None or not isinstance(vocab, int) or vocab <= 0 or vocab > padded:
        return None
    shape = ModelShape.from_recipe(recipe, padded_vocab_size=padded, vocab_size=vocab)
    if not config_problems:  # tensor shapes of a model that is already known to differ are noise
        problems.extend(check_hf_state_shapes(source.tensor_shapes, shape))
    return shape


# --------------------------------------------------------------------------- Megatron side


def resolve_checkpoint_folder(ckpt: str | None, problems: list[Problem], notes: list[str]) -> Path | None:
    """An iter_NNNNNNN or release folder; a checkpoints directory resolves through its tracker."""
    if not ckpt:
        problems.append(Problem("--ckpt", "is required"))
        return None
    path = Path(ckpt).absolute()
    if not path.is_dir():
        problems.append(Problem("--ckpt", "is not a folder", ckpt))
        return None
    if ck.parse_iteration_dir(path.name) is None and path.name != ck.RELEASE:
        tracker = ck.read_tracker(path)
        if tracker.problem is not None:
            problems.append(Problem("--ckpt", f"is neither an iter_NNNNNNN or release folder nor a checkpoints "
                                    f"directory with a usable {ck.TRACKER} ({tracker.problem})", ckpt))
            return None
        path = path / (ck.RELEASE if tracker.release else ck.iter_dir_name(tracker.iteration or 0))
        notes.append(f"{ck.TRACKER} names {path.name}: converting {path}")
    folder = ck.CheckpointFolder(path, None if path.name == ck.RELEASE else ck.parse_iteration_dir(path.name))
    if not folder.complete:
        problems.append(Problem("--ckpt", f"is not a complete torch_dist checkpoint (no {', '.join(folder.missing)})",
                                str(path)))
        return None
    return path


def recipe_for_checkpoint(recipe: str | None, folder: Path | None, notes: list[str],
                          problems: list[Problem]) -> str | None:
    """--recipe, else the recipe.yaml that `infir2 train` recorded in exp/<name>/ (two levels above iter_*)."""
    if recipe:
        return recipe
    if folder is not None:
        recorded = folder.parent.parent / RECIPE_FILE
        if recorded.is_file():
            notes.append(f"model shape from the experiment's recorded recipe {recorded}")
            return str(recorded)
    problems.append(Problem("--recipe", "is required (the checkpoint is not inside an experiment folder with a "
                            f"recorded {RECIPE_FILE})"))
    return None


def checkpoint_tensor_shapes(folder: Path, problems: list[Problem]) -> dict[str, tuple[int, ...]] | None:
    try:
        from ..runtime.convert_entry import checkpoint_tensor_shapes as read_shapes

        return read_shapes(folder)
    except Exception as exc:
        problems.append(Problem("--ckpt", f"cannot read the checkpoint's tensor metadata: {exc}", str(folder)))
        return None


def checkpoint_padded_vocab(recipe: Recipe, found: dict[str, tuple[int, ...]], problems: list[Problem]) -> int | None:
    """The checkpoint's embedding rows, which the recipe must agree with when it states or implies them."""
    dims = found.get("embedding.word_embeddings.weight")
    rows = dims[0] if dims else None
    padded, _ = recipe_padded_vocab(recipe)
    if padded is not None and rows is not None and rows != padded:
        problems.append(Problem("model.padded_vocab_size", f"the recipe gives {padded} embedding rows, the "
                                f"checkpoint has {rows}", padded))
    return rows if rows is not None else padded


def source_config_for(req: MegatronToHfRequest, recipe: Recipe, folder: Path, notes: list[str],
                      problems: list[Problem]) -> tuple[Path | None, dict[str, Any] | None]:
    """--hf-config (a config.json or a folder with one), else the copy hf-to-megatron kept beside the checkpoint
    (converting a converted checkpoint back) or beside the recipe's checkpoint.pretrained (a CPT run from it)."""
    candidates: list[tuple[Path, bool]] = []
    if req.hf_config:
        given = Path(req.hf_config).absolute()
        candidates.append((given / "config.json" if given.is_dir() else given, True))
    else:
        candidates.append((folder.parent / SOURCE_CONFIG_FILE, False))
        if recipe.checkpoint.pretrained:
            candidates.append((Path(recipe.checkpoint.pretrained).absolute() / SOURCE_CONFIG_FILE, False))
    for path, required in candidates:
        if not path.is_file():
            if required:
                problems.append(Problem("--hf-config", "not found", str(path)))
            continue
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            problems.append(Problem("--hf-config", f"cannot read {path}: {exc}", str(path)))
            continue
        if not isinstance(config, dict):
            problems.append(Problem("--hf-config", f"{path} is not a JSON object", str(path)))
            continue
        notes.append(f"config.json keys (token ids, vocab_size, ...) from {path}")
        return path, config
    return None, None


def export_vocab(req: MegatronToHfRequest, recipe: Recipe, base: dict[str, Any] | None, padded: int,
                 notes: list[str]) -> int:
    """Rows kept in the HF export: --vocab-size, the source config's vocab_size, the NullTokenizer's
    vocabulary, or every row of the checkpoint."""
    if req.vocab_size is not None:
        return req.vocab_size
    if base and isinstance(base.get("vocab_size"), int):
        return base["vocab_size"]
    if recipe.tokenizer.type == "NullTokenizer" and recipe.model.vocab_size <= padded:
        notes.append(f"vocab_size {recipe.model.vocab_size} from the recipe's NullTokenizer (model.vocab_size)")
        return recipe.model.vocab_size
    notes.append(f"no source config.json: keeping all {padded} embedding rows as vocab_size (give --hf-config or "
                 f"--vocab-size to drop padding rows)")
    return padded


# --------------------------------------------------------------------------- plans


def plan_hf_to_megatron(req: HfToMegatronRequest) -> ConvertPlan:
    problems: list[Problem] = []
    notes: list[str] = []
    recipe = load_request_recipe(req.recipe, req.sets, problems)
    source = read_hf_source(req.hf, "--hf", problems)
    out = check_out_dir(req.out, "--out", problems)
    shape = None
    if recipe is not None:
        padded, why = recipe_padded_vocab(recipe)
        if why:
            problems.append(why)
        if source is not None:
            shape = hf_shape(source, recipe, padded, req.tp, problems)
        else:
            problems.extend(tensor_parallel_problems(recipe, padded, req.tp))
    if problems or shape is None or recipe is None or source is None or out is None:
        raise ConversionError(problems or [Problem("--hf", "cannot derive the model shape")],
                              "infir2: cannot convert HF -> Megatron")
    tp = req.tp if req.tp is not None else recipe.parallel.tensor_parallel
    notes.append(f"{source.path} -> {out}/release (torch_dist, written unsharded; Megatron reshards it for "
                 f"TP={tp} when a run loads it)")
    if shape.padded_vocab_size > shape.vocab_size:
        notes.append(f"vocabulary padded with {shape.padded_vocab_size - shape.vocab_size} zero rows: "
                     f"{shape.vocab_size} -> {shape.padded_vocab_size}")
    entry = ["hf-to-megatron", "--shape", shape_json(shape), "--hf", str(source.path), "--out", str(out)]
    if req.no_verify:
        entry.append("--no-verify")
    command = torchrun_command(entry, conversion_megatron_args(recipe, shape.vocab_size, shape.padded_vocab_size,
                                                               save=out))
    notes.append(f"then: infir2 train --recipe {req.recipe} --set checkpoint.pretrained={out}")
    return _finish(command, recipe, notes, shape, req.dry_run)


def checkpoint_and_recipe(req: MegatronToHfRequest | CheckLogitsRequest, problems: list[Problem],
                          notes: list[str]) -> tuple[Path | None, Recipe | None]:
    """The iter_* folder named by --ckpt and the recipe that describes it (--recipe, else the run's own)."""
    folder = resolve_checkpoint_folder(req.ckpt, problems, notes)
    recipe_ref = recipe_for_checkpoint(req.recipe, folder, notes, problems)
    recipe = load_request_recipe(recipe_ref, req.sets, problems) if recipe_ref else None
    return folder, recipe


def plan_megatron_to_hf(req: MegatronToHfRequest) -> ConvertPlan:
    problems: list[Problem] = []
    notes: list[str] = []
    folder, recipe = checkpoint_and_recipe(req, problems, notes)
    out = check_out_dir(req.out, "--out", problems)
    if req.tokenizer and not Path(req.tokenizer).is_dir():
        problems.append(Problem("--tokenizer", "is not a folder", req.tokenizer))
    found = checkpoint_tensor_shapes(folder, problems) if folder is not None else None
    shape = None
    source_path = None
    if recipe is not None and found is not None:
        padded = checkpoint_padded_vocab(recipe, found, problems)
        source_path, base = source_config_for(req, recipe, folder, notes, problems)
        if padded is not None:
            if base is not None:
                vocab_keys = ("config.json vocab_size", "model.padded_vocab_size")
                problems.extend(p for p in compare_hf_config_with_recipe(base, recipe, padded, 1)
                                if req.vocab_size is None or p.key not in vocab_keys)
            vocab = export_vocab(req, recipe, base, padded, notes)
            if vocab > padded or vocab <= 0:
                problems.append(Problem("--vocab-size", f"must be between 1 and the checkpoint's {padded} rows", vocab))
            else:
                shape = ModelShape.from_recipe(recipe, padded_vocab_size=padded, vocab_size=vocab)
                from ..runtime.convert_entry import checkpoint_shape_problems

                problems.extend(Problem("--ckpt", p) for p in checkpoint_shape_problems(found, shape))
    if problems or shape is None or recipe is None or folder is None or out is None:
        raise ConversionError(problems or [Problem("--ckpt", "cannot derive the model shape")],
                              "infir2: cannot convert Megatron -> HF")
    entry = ["megatron-to-hf", "--shape", shape_json(shape), "--ckpt", str(folder), "--out", str(out)]
    if source_path is not None:
        entry += ["--source-config", str(source_path)]
    if req.tokenizer:
        entry += ["--tokenizer", str(Path(req.tokenizer).absolute())]
    notes.append(f"{folder} -> {out} (safetensors + config.json, {shape.vocab_size} of {shape.padded_vocab_size} "
                 f"vocabulary rows kept; no GPU needed)")
    return _finish(torchrun_command(entry), recipe, notes, shape, req.dry_run, needs_gpu=False)


def plan_check_logits(req: CheckLogitsRequest) -> ConvertPlan:
    problems: list[Problem] = []
    notes: list[str] = []
    folder, recipe = checkpoint_and_recipe(req, problems, notes)
    source = read_hf_source(req.hf, "--hf", problems)
    found = checkpoint_tensor_shapes(folder, problems) if folder is not None else None
    for key, value in (("--batch", req.batch), ("--seq", req.seq)):
        if value < 1:
            problems.append(Problem(key, "must be at least 1", value))
    if req.dtype not in ("bf16", "fp32"):
        problems.append(Problem("--dtype", "must be bf16 or fp32", req.dtype))
    shape = None
    if recipe is not None and source is not None and found is not None:
        padded = checkpoint_padded_vocab(recipe, found, problems)
        shape = hf_shape(source, recipe, padded, 1, problems)
        if shape is not None:
            from ..runtime.convert_entry import checkpoint_shape_problems

            problems.extend(Problem("--ckpt", p) for p in checkpoint_shape_problems(found, shape))
        if req.seq > recipe.model.max_position_embeddings:
            problems.append(Problem("--seq", f"exceeds model.max_position_embeddings "
                                    f"({recipe.model.max_position_embeddings})", req.seq))
    if problems or shape is None or recipe is None or folder is None or source is None:
        raise ConversionError(problems or [Problem("--ckpt", "cannot derive the model shape")],
                              "infir2: cannot compare logits")
    entry = ["check-logits", "--shape", shape_json(shape), "--hf", str(source.path), "--ckpt", str(folder),
             "--dtype", req.dtype, "--batch", str(req.batch), "--seq", str(req.seq), "--seed", str(req.seed),
             "--max-rel", repr(req.max_rel)]
    if req.report:
        entry += ["--report", str(Path(req.report).absolute())]
    notes.append(f"{folder} (Megatron, {req.dtype}) vs {source.path} (transformers, {req.dtype}) on {req.batch} x "
                 f"{req.seq} random tokens")
    command = torchrun_command(entry, conversion_megatron_args(recipe, shape.vocab_size, shape.padded_vocab_size,
                                                               dtype=req.dtype))
    return _finish(command, recipe, notes, shape, req.dry_run)


def _finish(command: list[str], recipe: Recipe, notes: list[str], shape: ModelShape, dry_run: bool,
            needs_gpu: bool = True) -> ConvertPlan:
    machine = gpu_problems() if needs_gpu else []
    if machine and not dry_run:
        raise ConversionError(machine, "infir2: cannot convert on this host")
    return ConvertPlan(command=command, env=conversion_env(recipe), notes=notes, warnings=machine, shape=shape)


# --------------------------------------------------------------------------- printing and running


def format_plan(plan: ConvertPlan) -> str:
    """The notes, the environment and the command, shell-quoted, one option (with its value) per line."""
    lines = [f"# {note}" for note in plan.notes]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in plan.env.items()]
    rendered = flag_lines(plan.command, prefix="-")
    lines += [("    " if i else "") + text + (" \\" if i < len(rendered) - 1 else "") for i, text in enumerate(rendered)]
    return "\n".join(lines)


def run_plan(plan: ConvertPlan) -> int:
    """Run the torchrun command in the foreground; its exit status is ours."""
    for note in plan.notes:
        print(f"# {note}", file=sys.stderr)
    env = {**os.environ, **plan.env}
    try:
        return subprocess.call(plan.command, env=env)
    except KeyboardInterrupt:
        return 130
