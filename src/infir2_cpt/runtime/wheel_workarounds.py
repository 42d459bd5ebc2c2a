"""Workarounds for traps of the megatron-core 0.19.2 wheel, each seen on an H200. Pure functions where possible,
so the CPU tests can check them.

1. megatron.training's initialize runs `make` in megatron/core/datasets to build the dataset helpers.
   The wheel ships the compiled helpers_cpp module but no Makefile, so rank 0 would exit.
2. --gradient-accumulation-fusion (Megatron's default) needs APEX's fused_weight_gradient_mlp_cuda for
   the output layer; without APEX the first backward raises. With INFIR2_WGRAD_FUSION=1 the entry
   registers infir2's stand-in (wgrad_fusion.py) first and the fusion stays on.
3. --cross-entropy-fusion-impl te is refused by 0.19.2 ("disabled due to stability issues"); native works.
"""

from __future__ import annotations

import importlib.util
import sys

from ..argv import last_value, with_last_value

APEX_WGRAD_MODULE = "fused_weight_gradient_mlp_cuda"


def apex_wgrad_fusion_available() -> bool:
    """APEX's module, or infir2's stand-in for it (wgrad_fusion.py) once registered."""
    return APEX_WGRAD_MODULE in sys.modules or importlib.util.find_spec(APEX_WGRAD_MODULE) is not None


def adjust_megatron_argv(argv: list[str], apex_available: bool | None = None) -> tuple[list[str], list[str]]:
    """Megatron arguments made runnable on the wheel, and a note for every change made."""
    argv = list(argv)
    notes: list[str] = []
    if apex_available is None:
        apex_available = apex_wgrad_fusion_available()
    if not apex_available and "--no-gradient-accumulation-fusion" not in argv:
        argv.append("--no-gradient-accumulation-fusion")
        notes.append(f"APEX's {APEX_WGRAD_MODULE} is not installed: added --no-gradient-accumulation-fusion "
                     "(INFIR2_WGRAD_FUSION=1 keeps the fusion with infir2's stand-in)")
    if last_value(argv, "--cross-entropy-fusion-impl") == "te":
        argv = with_last_value(argv, "--cross-entropy-fusion-impl", "native")
        notes.append("megatron-core 0.19.2 refuses --cross-entropy-fusion-impl te: using native")
    return argv, notes


def skip_dataset_helper_compilation() -> None:
    """Use the wheel's compiled dataset helpers instead of letting Megatron run `make` (no Makefile)."""
    import megatron.core.datasets.utils as dataset_utils

    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "megatron.core.datasets.helpers_cpp is missing from the installed megatron-core; reinstall the "
            "megatron-core==0.19.2 wheel for this Python version") from exc
    dataset_utils.compile_helpers = lambda: None
