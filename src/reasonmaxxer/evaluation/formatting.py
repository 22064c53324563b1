"""How numbers print in every report (markdown tables, the HTML fork view, the console)."""

from __future__ import annotations

from typing import Any


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)
