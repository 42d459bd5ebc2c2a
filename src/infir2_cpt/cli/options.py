"""Commands whose options are the fields of their request (requests.py), so each option is declared once.

from_request(run) makes the typer command for `run(req: SomeRequest)`: one option (or argument) per field
declared with requests.option / requests.argument, in field order, with the field's type, default, flags and
help; the command builds the request from what was given and calls run with it. run's docstring is the help.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Sequence

import typer
from typer.core import TyperCommand

from ..requests import RECIPE_HELP, SET_HELP, Flag


class Command(TyperCommand):
    """Every infir2 command: a value is shown as N, X, TEXT or PATH unless its option names its own (typer would
    show `<str>`, `<list[str]>`), and an argument by its metavar alone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "argument" and param.metavar:
                param.display_type_rich = lambda ctx=None: None  # type: ignore[method-assign]
            elif param.param_type_name == "option" and param.metavar is None and not getattr(param, "is_flag", False):
                descriptor = getattr(param, "type_descriptor", None)  # typer >= 0.29; older ones keep click's type
                param.metavar = (default_metavar(descriptor.annotation) if descriptor is not None
                                 else _CLICK_METAVARS.get(getattr(param.type, "name", ""), "TEXT"))


class PassThroughCommand(Command):
    """A command whose trailing argument collects Megatron flags: only the words after `--` go there.

    click puts every word that is not an option into the variadic argument, before `--` as after it, so a
    stray word (`--dry-run true`, a mistyped option value) would silently become a Megatron argument. Here
    the words before `--` are parsed alone, and any positional word among them is a usage error (exit 2)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        passthrough = next((p for p in self.params if p.param_type_name == "argument" and p.nargs == -1), None)
        if passthrough is None or passthrough.name is None:
            return super().parse_args(ctx, args)
        before, after = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
        rest = super().parse_args(ctx, before)
        stray = ctx.params.get(passthrough.name) or ()
        if stray:
            ctx.fail(f"unexpected word {stray[0]!r}: options take one value each, and Megatron flags go after "
                     f"`--` (for example `infir2 {ctx.info_name} --recipe tiny -- --recompute-granularity selective`)")
        ctx.params[passthrough.name] = tuple(after) or None
        return rest


# What a value looks like in --help when the field does not say: by its type, as torchrun and argparse show them.
_METAVARS = {int: "N", float: "X", str: "TEXT", bool: None}
_CLICK_METAVARS = {"integer": "N", "float": "X", "text": "TEXT", "path": "PATH"}


def default_metavar(annotation: Any) -> str | None:
    """N, X, TEXT or PATH for a field's type (the element type of a list; the inner type of an Optional)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (list, tuple) or (args and len(args) == 1):
        return default_metavar(args[0]) if args else "TEXT"
    return "PATH" if annotation is Path or getattr(annotation, "__name__", "") == "Path" else _METAVARS.get(annotation, "TEXT")


def _typer_info(flag: Flag, annotation: Any) -> Any:
    metavar = flag.metavar if flag.metavar is not None else default_metavar(annotation)
    if flag.argument:
        return typer.Argument(help=flag.help, metavar=metavar, show_default=flag.show_default)
    return typer.Option(*flag.decls, help=flag.help, metavar=metavar, show_default=flag.show_default, min=flag.min)


def from_request(run: Callable[[Any], None], *, exclude: Sequence[str] = (), required: Sequence[str] = (),
                 extra: Sequence[inspect.Parameter] = ()) -> Callable[..., None]:
    """The command for run(req). `exclude`: request fields this command does not offer; `required`: fields this
    command requires although the request has a default; `extra`: more parameters that are not request fields
    (their values are not passed on), such as eager options that act and exit."""
    request_cls = next(iter(typing.get_type_hints(run).values()))
    hints = typing.get_type_hints(request_cls)
    params: list[inspect.Parameter] = []
    factories: dict[str, Callable[[], Any]] = {}
    parsers: dict[str, Callable[[str], Any]] = {}
    for field in dataclasses.fields(request_cls):
        flag = field.metadata.get("cli")
        if flag is None or field.name in exclude:
            continue
        annotation = str if flag.parse is not None else hints[field.name]
        if field.name in required:
            default: Any = inspect.Parameter.empty
        elif field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:  # a list: typer gives None when it is not used
            default, annotation = None, Optional[annotation]
            factories[field.name] = field.default_factory
        else:
            default = inspect.Parameter.empty
        if flag.parse is not None:
            parsers[field.name] = flag.parse
            annotation = Optional[str] if default is None else str
        info = _typer_info(flag, hints[field.name])
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[annotation, info]))
    extra_names = {p.name for p in extra}

    @functools.wraps(run)
    def command(**given: Any) -> None:
        values = {}
        for name, value in given.items():
            if name in extra_names:
                continue
            if value is None and name in factories:
                value = factories[name]()
            elif value is not None and name in parsers:
                value = parsers[name](value)
            values[name] = value
        run(request_cls(**values))

    del command.__wrapped__  # typer must read the signature below, not run's
    command.__signature__ = inspect.Signature([*params, *extra])  # type: ignore[attr-defined]
    command.__annotations__ = {}
    return command


# Options of the commands that take no request (their signature is their only declaration).
RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help=RECIPE_HELP, metavar="NAME|FILE")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help=SET_HELP, metavar="KEY=VALUE")]
DecayFromOpt = Annotated[Optional[int], typer.Option(
    "--decay-from", metavar="K",
    help="Show the run of `infir2 decay --load iter_K`: train_iters K + decay_iters, no warmup, anneal from K.")]
