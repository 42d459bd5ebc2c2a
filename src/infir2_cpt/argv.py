"""Megatron argument lists, read the way Megatron's argparse parser reads them: a flag's value is given as
`--flag VALUE` or `--flag=VALUE`, and when a flag is repeated the last one wins (infir2 appends the
recipe's megatron_extra_args and the command line's `-- ...` after its own flags for that reason).

Used on the launch host (the preflight checks) and inside the training entry (the wheel workarounds)."""

from __future__ import annotations


def _last(args: list[str], flag: str) -> tuple[int, bool] | None:
    """Where the value of the last `flag` is: (index of VALUE, False) or (index of `flag=VALUE`, True)."""
    found = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            found = (i + 1, False)
        elif arg.startswith(flag + "="):
            found = (i, True)
    return found


def last_value(args: list[str], flag: str) -> str | None:
    """The value the last `flag VALUE` or `flag=VALUE` gives; None when the flag is absent."""
    found = _last(args, flag)
    if found is None:
        return None
    index, inline = found
    return args[index].split("=", 1)[1] if inline else args[index]


def with_last_value(args: list[str], flag: str, value: str) -> list[str]:
    """A copy of `args` in which the last `flag` has `value`, written the way it was (no-op when absent)."""
    out = list(args)
    found = _last(out, flag)
    if found is not None:
        index, inline = found
        out[index] = f"{flag}={value}" if inline else value
    return out
