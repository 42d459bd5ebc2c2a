"""What infir2 reports when it refuses: a list of problems, each with its key, its bad value and what would be
valid, all found before anything runs and reported together.

Every refusal is an Infir2Error (or one of the kinds below, which differ only in their title and exit status);
the command line catches it in one place (cli/app.py), prints the title and every problem, and exits with the
error's exit status (2: the request or the recipe is wrong; 1: something failed while running).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe, a command line or the machine: where, what was given, what would be valid."""

    key: str
    message: str
    value: Any = None

    def __str__(self) -> str:
        shown = "" if self.value is None else f" (got {_as_given(self.value)})"
        return f"{self.key}: {self.message}{shown}"


def _as_given(value: Any) -> str:
    """A value the way the user wrote it: a mapping or list in YAML's flow style, not as a Python repr."""
    if isinstance(value, (dict, list)):
        import yaml

        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return repr(value)


class Infir2Error(Exception):
    """Every problem found, reported together under `title`; the command exits with `exit_code`.

    The exception's args are (problems, title), so it pickles across processes (prepare-data's workers)."""

    title = "infir2: cannot run"
    exit_code = 2

    def __init__(self, problems: Sequence[Problem], title: str | None = None) -> None:
        super().__init__(list(problems), title)
        self.problems = list(problems)
        if title is not None:
            self.title = title

    def __str__(self) -> str:
        lines = [f"{self.title}: {len(self.problems)} problem(s)"]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)


class RecipeError(Infir2Error):
    """A recipe that cannot be found, read or typed (with every key that is wrong)."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None) -> None:
        super().__init__(problems, "infir2: invalid recipe" + (f" {source}" if source else ""))
        self.source = source or "recipe"


class LaunchError(Infir2Error):
    """A launch refused before anything started; `warnings` are the machine problems a dry run only warns about."""

    title = "infir2: cannot launch"

    def __init__(self, problems: Sequence[Problem], warnings: Sequence[Problem] = ()) -> None:
        super().__init__(problems)
        self.warnings = list(warnings)


class LockError(Infir2Error):
    """The experiment is written by another launch (or its lock cannot be read)."""

    title = "infir2: cannot launch"

    def __init__(self, message: str) -> None:
        super().__init__([Problem("exp", message)])


class ReportError(Infir2Error):
    title = "infir2: cannot report checkpoints"


class DataError(Infir2Error):
    """A problem with the inputs, the tokenizer or the output of prepare-data; nothing final was written."""

    title = "infir2: cannot prepare data (nothing written)"


class WorkerError(Infir2Error):
    """A prepare-data worker died or failed unexpectedly (a bug or the machine, not the inputs)."""

    title = "infir2: prepare-data failed (nothing written)"
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__([Problem("worker", message)])


class ConversionError(Infir2Error):
    title = "infir2: cannot convert"


class BenchError(Infir2Error):
    title = "infir2: cannot run the benchmark"


class SlurmError(Infir2Error):
    title = "infir2: cannot write the batch script"
