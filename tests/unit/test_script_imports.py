"""The GPU scripts under benchmarks/scripts import infir2 by name, often from Python embedded in a shell script that
only runs on a GPU host. A module moved in the package must not be found out there: every `from infir2_cpt... import`
in them names a module and attributes that exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "scripts"
IMPORT = re.compile(r"^\s*from (infir2_cpt(?:\.\w+)*) import \(?([\w, ]+)\)?\s*$", re.MULTILINE)


def script_imports() -> list[tuple[str, str, str]]:
    """(script, module, name) for every infir2 import line of the scripts."""
    found = []
    for path in sorted(SCRIPTS.iterdir()):
        if path.suffix not in (".sh", ".py"):
            continue
        for module, names in IMPORT.findall(path.read_text()):
            found += [(path.name, module, name.strip()) for name in names.split(",") if name.strip()]
    return found


def test_the_scripts_import_infir2() -> None:
    scripts = {script for script, _, _ in script_imports()}
    assert {"convert_proof.sh", "remainders_check.py", "heldout_loss.py"} <= scripts


@pytest.mark.parametrize(("script", "module", "name"), script_imports())
def test_every_name_a_script_imports_exists(script: str, module: str, name: str) -> None:
    loaded = importlib.import_module(module)
    if not hasattr(loaded, name):  # `from package import submodule`
        importlib.import_module(f"{module}.{name}")
