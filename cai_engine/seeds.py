"""Deterministic draws that do not depend on what else is in a run: one seeded RNG per item, one stable bucket per key.

The same prompt gets the same principles and the same split whatever other prompts a run (or a shard of it) holds.
"""

from __future__ import annotations

import hashlib
import random


def item_rng(seed: int, key: str) -> random.Random:
    """A random generator for one item: seeded by the run's seed and the item's key."""
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big"))


def bucket(key: str) -> float:
    """A stable number in [0, 1] for ``key`` (a split by key that holds across runs)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
