"""Reading a recipe: YAML with `extends:`, `--set` overrides, and the typed conversion into the schema (schema.py).

A recipe is a shipped one (recipe/recipes/NAME.yaml, given by name) or any YAML file. Loading never stops at
the first problem: every unknown key, wrong type and bad value is collected and reported together as a
`RecipeError`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from ..errors import Problem, RecipeError
from .schema import Recipe


# The shipped recipes are package data: the same folder in a source checkout and in an installed package.
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"

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


@dataclass(frozen=True)
class _Layer:
    """One recipe file's own keys (`extends:` removed); path None for the decay layer `infir2 decay` derives."""

    path: Path | None
    data: dict[str, Any]


def _lineage(ref: str, relative_to: Path | None = None, chain: tuple[Path, ...] = ()) -> list[_Layer]:
    """REF and the recipes it extends, the root ancestor first."""
    path = resolve_recipe_path(ref, relative_to)
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise RecipeError([Problem("extends", f"circular extends: {cycle}")], str(path))
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    ancestors = _lineage(str(parent), path.parent, (*chain, path)) if parent is not None else []
    return [*ancestors, _Layer(path, data)]


def _merge(layers: list[_Layer]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer.data)
    return merged


def _stable_part(layers: list[_Layer]) -> list[_Layer] | None:
    """For a decay recipe, the layers of the run it anneals: its lineage up to the nearest ancestor that is not a
    decay recipe. None for a full recipe (or a decay recipe that extends no full one)."""
    if _merge(layers).get("phase") != "decay":
        return None
    return next((layers[:k] for k in range(len(layers) - 1, 0, -1)
                 if _merge(layers[:k]).get("phase") != "decay"), None)


def _decay_lineage(ref: str) -> list[_Layer]:
    """The recipe `infir2 decay --recipe REF` runs: REF itself when it is a decay recipe, else the REF-decay recipe
    shipped (or written) beside it, else REF turned into one: its own experiment REF_decay, no warmup."""
    layers = _lineage(ref)
    merged = _merge(layers)
    if merged.get("phase") == "decay":
        return layers
    path = layers[-1].path
    assert path is not None
    sibling = path.with_name(f"{path.stem}-decay{path.suffix}")
    if sibling.is_file():
        return _lineage(str(sibling))
    derived = {"name": f"{merged.get('name', 'run')}_decay", "phase": "decay", "schedule": {"warmup_iters": 0}}
    return [*layers, _Layer(None, derived)]


def _raw(layers: list[_Layer]) -> dict[str, Any]:
    """The merged mapping; a decay recipe's stable_name defaults to the name of the run it anneals."""
    raw = _merge(layers)
    stable = _stable_part(layers)
    if stable is not None and "stable_name" not in raw:
        raw["stable_name"] = _merge(stable).get("name")
    return raw


def load_raw(name_or_path: str) -> dict[str, Any]:
    """The recipe mapping with its `extends:` chain merged (parent first), before --set and typing."""
    return _raw(_lineage(name_or_path))


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


def _list_example(list_tp: Any) -> str:
    """For a list of mappings, what one looks like: `, e.g. [{path: ..., weight: ...}]`."""
    (item_tp,) = get_args(list_tp)
    if not dataclasses.is_dataclass(item_tp):
        return ""
    return ", e.g. [{" + ", ".join(f"{f.name}: ..." for f in dataclasses.fields(item_tp)) + "}]"


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
            problems.append(Problem(key, f"expected {_type_name(inner)}{_list_example(inner)}", value))
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


def format_set(key: str, value: Any) -> str:
    """The --set assignment that parse_set reads back as exactly (key, value): the value written as JSON, which
    is YAML."""
    return f"{key}={json.dumps(value)}"


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


# --------------------------------------------------------------------------- the one way a recipe is read


@dataclass
class ResolvedRecipe:
    """A recipe as every command reads it (resolve): typed, with the mapping it was built from."""

    recipe: Recipe
    raw: dict[str, Any]  # the merged mapping with --set applied
    source: str  # the name or path asked for
    problems: list[Problem] = field(default_factory=list)  # type problems; those keys kept their defaults
    stable: Recipe | None = None  # a decay recipe: the recipe of the run it anneals (same --set), when it types

    def checked(self) -> ResolvedRecipe:
        """This recipe, or RecipeError listing every type problem."""
        if self.problems:
            raise RecipeError(self.problems, self.source)
        return self


def build_recipe(raw: dict[str, Any], problems: list[Problem]) -> Recipe:
    """The typed recipe; type problems are appended and the affected keys keep their defaults."""
    return build_dataclass(Recipe, raw, "", problems)


def resolve(ref: str, sets: list[str] | tuple[str, ...] = (), *, decay: bool = False) -> ResolvedRecipe:
    """Find REF (a shipped name or a YAML path), merge its `extends:` chain, apply --set, and type it.

    decay=True reads it as `infir2 decay --recipe REF` does (_decay_lineage). For a decay recipe, `stable` is
    the recipe of the run it anneals, read the same way. Type problems are collected in `problems` (so that a
    caller can report them with everything else, or call checked()); a recipe that cannot be found or parsed
    raises RecipeError."""
    layers = _decay_lineage(ref) if decay else _lineage(ref)
    problems: list[Problem] = []
    raw = apply_sets(_raw(layers), list(sets), problems)
    recipe = build_recipe(raw, problems)
    stable = None
    stable_layers = _stable_part(layers)
    if stable_layers is not None:
        stable_problems: list[Problem] = []
        candidate = build_recipe(apply_sets(_raw(stable_layers), list(sets), stable_problems), stable_problems)
        stable = None if stable_problems else candidate
    return ResolvedRecipe(recipe=recipe, raw=raw, source=ref, problems=problems, stable=stable)


def load_recipe(name_or_path: str, sets: list[str] | None = None) -> ResolvedRecipe:
    """resolve(), refusing a recipe with type problems (RecipeError listing every one)."""
    return resolve(name_or_path, sets or []).checked()


def recorded_recipe(path: Path) -> Recipe | None:
    """The recipe a launch recorded (exp/<name>/recipe.yaml), or None where there is none or it no longer reads
    as a recipe (a later infir2 may have renamed a key): checks that compare with it then have nothing to say."""
    if not path.is_file():
        return None
    try:
        resolved = resolve(str(path))
    except RecipeError:
        return None
    return None if resolved.problems else resolved.recipe


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
