"""The text table of Ding et al.'s tests (Tables 2 and 3) and strict-JSON values."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .params import DISPLAY, DingParams
from .stats import mark


def format_table(title: str, summary: dict[str, dict], measures: Sequence[str], params: DingParams,
                 footer: str = "") -> str:
    lines = [title, f"{'measure':14} {'τ':>8} {'ρ':>8}"]
    for m in measures:
        s = summary[m]
        lines.append(f"{DISPLAY.get(m, m):14} {mark(s['tau'], s['significant_tau']):>8} "
                     f"{mark(s['rho'], s['significant_rho']):>8}")
    test = "one-sided, Ding et al.'s convention" if params.significance == "ding" else "permutation"
    lines.append(f"≈ 0: not significant at α = {params.alpha:g} ({test}); the values are in the JSON")
    if footer:
        lines.append(footer)
    return "\n".join(lines)


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (strict JSON; NaN marks an undefined value)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
