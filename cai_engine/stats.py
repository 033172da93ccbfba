"""Small statistics every reported rate carries: the count, the sample size and a 95% interval."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval for a proportion (sound at small n and at 0% or 100%); None when n is 0."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(values: Iterable[bool | float | None]) -> dict[str, Any]:
    """``{"rate", "k", "n", "ci95"}`` over the values that are not None (None = no signal, never counted)."""
    kept = [float(v) for v in values if v is not None]
    n = len(kept)
    k = sum(kept)
    interval = wilson_interval(k, n)
    return {
        "rate": round(k / n, 4) if n else None,
        "k": round(k, 4),
        "n": n,
        "ci95": [round(interval[0], 4), round(interval[1], 4)] if interval else None,
    }


def format_rate(entry: dict[str, Any] | None) -> str:
    """``0.62 (n=40, 95% CI 0.47-0.76)`` for a table cell; ``n/a`` when nothing was measured."""
    if not entry or entry.get("rate") is None:
        return "n/a"
    low, high = entry["ci95"]
    return f"{entry['rate']:.2f} (n={entry['n']}, 95% CI {low:.2f}-{high:.2f})"
