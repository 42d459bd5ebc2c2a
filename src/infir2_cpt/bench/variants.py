"""Bench variants: named sets of recipe overrides (`--set`) and extra Megatron flags, built in or defined on the
command line (--variant NAME:ITEMS) or in a YAML file (--variants-file)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from ..errors import BenchError, Problem
from ..recipe.load import format_set
from ..recipe.validate import EXP_NAME_RE


SEED_MARK = ".seed"  # a variant run once per seed of --seeds is named NAME.seedSEED


def seeded_from(name: str) -> tuple[str, str | None]:
    """'fp8-blockwise.seed7' -> ('fp8-blockwise', '7'); a name without a seed -> (name, None)."""
    base, mark, seed = name.rpartition(SEED_MARK)
    return (base, seed) if mark and base and seed.isdigit() else (name, None)


def with_seed(variant: Variant, seed: int) -> Variant:
    """The variant run with that seed, named NAME.seedSEED."""
    return replace(variant, name=f"{variant.name}{SEED_MARK}{seed}", sets=(*variant.sets, f"schedule.seed={seed}"),
                   description=f"{variant.description} (seed {seed})")


@dataclass(frozen=True)
class Variant:
    """A named set of recipe overrides (`--set` assignments) and extra Megatron flags."""

    name: str
    sets: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    description: str = ""


_SEED_FP8_FLAGS = ("precision.fp8_param_gather=true", "precision.precision_aware_optimizer=true")

BUILTIN_VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("bf16", ("precision.fp8=null",),
            description="BF16: no FP8; the recipe's optimizer settings (precision-aware optimizer as the recipe)"),
    Variant("bf16-nopao", ("precision.fp8=null", "precision.precision_aware_optimizer=false"),
            description="BF16 with the plain distributed optimizer (no precision-aware optimizer)"),
    Variant("fp8-blockwise", ("precision.fp8=blockwise", "precision.fp8_format=e4m3", *_SEED_FP8_FLAGS),
            description="FP8 blockwise E4M3 (1x128 activations, 128x128 weights) + the seed's flags: "
                        "--fp8-param-gather --use-precision-aware-optimizer; the recipe's other precision keys "
                        "(the shipped recipes: transposes on demand, the projection's BF16 input)"),
    Variant("fp8-tensorwise", ("precision.fp8=tensorwise", "precision.fp8_format=e4m3", *_SEED_FP8_FLAGS),
            description="FP8 per-tensor current scaling E4M3 + the seed's flags"),
    Variant("fp8-delayed", ("precision.fp8=delayed", "precision.fp8_format=hybrid", *_SEED_FP8_FLAGS),
            description="FP8 delayed scaling, hybrid format (E4M3 forward, E5M2 gradients) + the seed's flags"),
    Variant("fp8-mxfp8", ("precision.fp8=mxfp8", "precision.fp8_format=e4m3", *_SEED_FP8_FLAGS),
            description="MXFP8 (Blackwell only) + the seed's flags"),
)}
DEFAULT_SPEED_VARIANTS = ("bf16", "fp8-blockwise", "fp8-tensorwise")
DEFAULT_FIDELITY_VARIANTS = ("bf16", "fp8-blockwise")

# An item of a --variant spec starts a new item at a comma only when what follows looks like one:
# `section.key=`, `base=` or `--flag`; so values may hold commas (`data.split=99,1,0`).
_ITEM_SPLIT_RE = re.compile(r",(?=\s*(?:--|[A-Za-z_][\w.]*\s*=))")


def parse_variant_spec(spec: str, known: Mapping[str, Variant]) -> Variant:
    """`[name=]NAME:ITEM,ITEM,...` -> Variant. An ITEM is `section.key=value` (a recipe override, as --set),
    `--megatron-flag` or `--megatron-flag=value` (passed to Megatron verbatim), or `base=VARIANT` (start
    from that variant's overrides; a built-in or an earlier --variant). `NAME` alone is a variant with no
    overrides: the recipe as it is, under the bench's shape."""
    text = spec.strip()
    if text.startswith("name="):
        text = text[len("name="):]
    name, _, body = text.partition(":")
    name = name.strip()
    problems: list[Problem] = []
    if not EXP_NAME_RE.match(name):
        problems.append(Problem("--variant", "NAME must be one folder name (letters, digits, ._+=-)", spec))
    sets: list[str] = []
    extra: list[str] = []
    base_names: list[str] = []
    for item in (i.strip() for i in _ITEM_SPLIT_RE.split(body) if i.strip()) if body.strip() else ():
        if item.startswith("--"):
            extra.append(item)
        elif item.startswith("base="):
            base_name = item[len("base="):].strip()
            base = known.get(base_name)
            if base is None:
                problems.append(Problem("--variant", f"unknown base variant '{base_name}' (known: "
                                        f"{', '.join(known)})", spec))
                continue
            sets = [*base.sets, *sets]
            extra = [*base.extra_args, *extra]
            base_names.append(base.name)
        elif "=" in item:
            sets.append(item)
        else:
            problems.append(Problem("--variant", f"item '{item}' is neither SECTION.KEY=VALUE, base=VARIANT "
                                    "nor a --megatron-flag", spec))
    if problems:
        raise BenchError(problems)
    own = [i.strip() for i in _ITEM_SPLIT_RE.split(body) if i.strip() and not i.strip().startswith("base=")]
    shown = " + ".join([*base_names, ", ".join(own)] if own else base_names) or "the recipe as is"
    return Variant(name, tuple(sets), tuple(extra), description=shown)


def load_variants_file(path: Path, known: Mapping[str, Variant]) -> list[Variant]:
    """Variants from YAML:

        variants:
          fp8-mbs2:
            base: fp8-blockwise          # optional: start from this variant
            set: {parallel.micro_batch_size: 2}   # or a list of "section.key=value"
            args: ["--manual-gc"]        # extra Megatron flags
            description: micro batch 2
    """
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BenchError([Problem("--variants-file", f"cannot read: {exc}", str(path))]) from None
    entries = data.get("variants") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise BenchError([Problem("--variants-file", "expected a mapping `variants: {NAME: {base, set, args}}`",
                                  str(path))])
    known = dict(known)
    out: list[Variant] = []
    problems: list[Problem] = []
    for name, body in entries.items():
        body = body or {}
        where = f"{path.name}: variants.{name}"
        if not isinstance(body, dict) or set(body) - {"base", "set", "args", "description"}:
            problems.append(Problem(where, "expected a mapping with keys base, set, args, description"))
            continue
        sets, extra = [], []
        if body.get("base") is not None:
            base = known.get(str(body["base"]))
            if base is None:
                problems.append(Problem(where, f"unknown base variant '{body['base']}'"))
                continue
            sets, extra = list(base.sets), list(base.extra_args)
        raw_sets = body.get("set") or []
        if isinstance(raw_sets, dict):
            sets += [format_set(k, v) for k, v in raw_sets.items()]
        elif isinstance(raw_sets, list):
            sets += [str(s) for s in raw_sets]
        else:
            problems.append(Problem(where, "set: expected a mapping or a list of SECTION.KEY=VALUE"))
        raw_args = body.get("args") or []
        if not isinstance(raw_args, list):
            problems.append(Problem(where, "args: expected a list of Megatron flags"))
        else:
            extra += [str(a) for a in raw_args]
        if not EXP_NAME_RE.match(str(name)):
            problems.append(Problem(where, "the name must be one folder name (letters, digits, ._+=-)"))
        variant = Variant(str(name), tuple(sets), tuple(extra),
                          str(body.get("description") or ", ".join([*sets, *extra]) or "the recipe as is"))
        known[variant.name] = variant
        out.append(variant)
    if problems:
        raise BenchError(problems)
    return out


def select_variants(names: Sequence[str], always: Sequence[Variant] = (),
                    definitions: Sequence[Variant] = ()) -> list[Variant]:
    """The variants to run, in order: the named ones (built-in, or defined in `definitions` or `always`), then
    the `always` ones (command-line --variant) not named. A definition (from --variants-file) runs only when
    named."""
    defined = [*definitions, *always]
    known = {**BUILTIN_VARIANTS, **{v.name: v for v in defined}}
    problems = [Problem("--variants", f"unknown variant (built-in: {', '.join(BUILTIN_VARIANTS)}; or define it "
                        "with --variant NAME:ITEMS or in --variants-file)", n) for n in names if n not in known]
    names_defined = [v.name for v in defined]
    problems += [Problem("--variant", "defined twice", d) for d in sorted({n for n in names_defined
                                                                          if names_defined.count(n) > 1})]
    chosen = list(dict.fromkeys([*(n for n in names if n in known), *(v.name for v in always)]))
    if not chosen and not problems:
        problems.append(Problem("--variants", "no variant selected"))
    if problems:
        raise BenchError(problems)
    return [known[n] for n in chosen]


def list_variants() -> str:
    width = max(len(n) for n in BUILTIN_VARIANTS)
    return "\n".join(f"{v.name:<{width}}  {v.description}\n{'':<{width}}  --set {' --set '.join(v.sets)}"
                     for v in BUILTIN_VARIANTS.values())
