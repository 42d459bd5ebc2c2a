"""Plain-text formatting shared by the reports: sizes, counts, learning rates, aligned tables."""

from __future__ import annotations


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def human_count(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("", "K", "M", "B", "T"):
        text = f"{int(value)}" if unit == "" else f"{value:.3g}"
        if unit == "T" or (abs(value) < 1000 and abs(float(text)) < 1000):
            return text + unit
        value /= 1000
    raise AssertionError


def fmt_lr(lr: float) -> str:
    return f"{lr:.3e}"


def table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        lines.append((indent + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths))).rstrip())
    return lines
