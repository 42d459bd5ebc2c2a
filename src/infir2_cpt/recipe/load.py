"""Reading a recipe: YAML with `extends:`, `--set` overrides, and the typed conversion into the schema (schema.py).

A recipe is a shipped one (recipe/recipes/NAME.yaml, given by name) or any YAML file. Loading never stops at
the first problem: every unknown key, wrong type and bad value is collected and reported together as a
`RecipeError`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
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
