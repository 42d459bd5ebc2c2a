"""What a command asks for, declared once.

Each command that plans something takes a request: a dataclass in the module that plans it (LaunchRequest in
launch/plan.py, BenchRequest, SbatchRequest, the convert requests). A field the user gives on the command line
is declared with option() or argument(): its flags and help text sit beside its type and default, and cli/
turns the fields into the command's options (cli/options.py). The planner, a test or another command (bench
plans `infir2 train` runs) builds the same request in code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

# Help texts several requests share.
RECIPE_HELP = "Shipped recipe name (see `infir2 recipes`) or a YAML path."
SET_HELP = ("Override a recipe key: --set section.key=value (repeatable), e.g. --set parallel.tensor_parallel=2.")
EXP_HELP = "Experiment name: outputs in exp/<name>/ (default: the recipe's name)."
EXTRA_HELP = "Megatron flags after `--`, appended last (last one wins)."


@dataclass(frozen=True)
class Flag:
    """How a request field is given on the command line."""

    decls: tuple[str, ...]  # option names ("--layers"); empty for a positional argument
    help: str
    argument: bool = False
    metavar: str | None = None
    show_default: bool = True
    min: int | None = None
    parse: Callable[[str], Any] | None = None  # the option's text -> the field's value (default: the field's type)


def option(*decls: str, help: str, default: Any = dataclasses.MISSING,
           default_factory: Any = dataclasses.MISSING, metavar: str | None = None, show_default: bool = True,
           min: int | None = None, parse: Callable[[str], Any] | None = None) -> Any:
    """A request field that is a command-line option (no default: a required option)."""
    flag = Flag(decls, help, metavar=metavar, show_default=show_default, min=min, parse=parse)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"cli": flag})


def argument(help: str, *, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING,
             metavar: str | None = None, show_default: bool = True) -> Any:
    """A request field that is a positional command-line argument."""
    flag = Flag((), help, argument=True, metavar=metavar, show_default=show_default)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"cli": flag})


def comma_list(text: str) -> list[str]:
    """`a, b,c` -> ["a", "b", "c"]."""
    return [item.strip() for item in text.split(",") if item.strip()]
