"""The built-in principle choice: one principle per round, weighted by ``weight``, with replacement."""

from __future__ import annotations

from cai_engine import hookimpl


@hookimpl(trylast=True)
def cai_select_principles(constitution, candidates, item, phase, round, rng):
    # Independent draws every round, with replacement (CAI-SPEC §2.2: 25 of 66 repo samples reuse a principle).
    return rng.choices(candidates, weights=[p.weight for p in candidates], k=1)
