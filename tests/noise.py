"""Comparing two computation paths by the model's own noise on the running machine, not a tolerance from one CPU."""

from __future__ import annotations

NOISE_MULTIPLE = 3


def bound(noise: float, floor: float) -> float:
    """How far two paths may differ: a multiple of the noise measured in the test, plus a floor for rounding."""
    return NOISE_MULTIPLE * noise + floor


def deviation(a, b, tokens=None) -> float:
    """The largest difference between two paths' log-probs (positions x vocabulary, numpy or torch) over the tokens
    that decide anything: at each position the token each path ranks first, and ``tokens[position]`` if given."""
    worst = 0.0
    for p in range(len(a)):
        chosen = {int(a[p].argmax()), int(b[p].argmax())} | ({int(tokens[p])} if tokens is not None else set())
        worst = max(worst, max(abs(float(a[p][t]) - float(b[p][t])) for t in chosen))
    return worst
