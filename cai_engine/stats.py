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


def format_rate(entry: Any) -> str:
    """``0.62 (n=40, 95% CI 0.47-0.76)`` for a table cell (a ``Rate`` or the dict :func:`rate` returns); ``n/a`` when
    nothing was measured."""
    if entry is not None and not isinstance(entry, dict):
        entry = entry.model_dump()
    if not entry or entry.get("rate") is None:
        return "n/a"
    low, high = entry["ci95"]
    return f"{entry['rate']:.2f} (n={entry['n']}, 95% CI {low:.2f}-{high:.2f})"


def mean_of(values: list[float] | list[float | None] | list[None]) -> float | None:
    """The mean of the values that are not None (rounded to 4 places), or None when there are none."""
    kept = [v for v in values if v is not None]
    return round(sum(kept) / len(kept), 4) if kept else None


def length_controlled_win_rate(wins: list[float], log_ratios: list[float]) -> float | None:
    """P(win) at equal length: a logistic regression of the hard win on log(length ratio), read at ratio 1.

    Fitted by Newton's method with a small ridge term (stable on few or separable points). None with < 4 pairs.
    """
    if len(wins) < 4:
        return None
    a = b = 0.0
    for _ in range(50):
        g_a = g_b = h_aa = h_ab = h_bb = 0.0
        for y, x in zip(wins, log_ratios):
            p = 1 / (1 + math.exp(-(a + b * x)))
            w = p * (1 - p)
            g_a += y - p
            g_b += (y - p) * x
            h_aa += w
            h_ab += w * x
            h_bb += w * x * x
        g_a -= 0.01 * a
        g_b -= 0.01 * b
        h_aa += 0.01
        h_bb += 0.01
        det = h_aa * h_bb - h_ab * h_ab
        if abs(det) < 1e-12:
            break
        step_a = (h_bb * g_a - h_ab * g_b) / det
        step_b = (h_aa * g_b - h_ab * g_a) / det
        a, b = a + step_a, b + step_b
        if abs(step_a) + abs(step_b) < 1e-8:
            break
    return round(1 / (1 + math.exp(-a)), 4)
