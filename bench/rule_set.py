"""The guard's rules at scale: one search per rule against one RE2 set over every rule (`RuleIndex`), on a policy of
3,000 added forbid rules (10 principles of 300) plus `harmless`'s own, for an ASCII reply and one with Unicode
respellings to fold. Prints the median time of the guard's deterministic check over 30 calls each.

    python bench/rule_set.py
"""

from __future__ import annotations

import statistics
import time

from cai_engine import Engine, Message
from cai_engine.checks.rules import RuleIndex

ADDED = [
    {
        "id": f"s-{p}",
        "phases": ["runtime"],
        "rules": [
            {"id": f"r-{p}-{i}", "kind": "forbid", "pattern": rf"\bcode{p}x{i}\b", "message": "m", "fix": "[x]"}
            for i in range(300)
        ],
    }
    for p in range(10)
]
REPLIES = {
    "ascii": "Take 500 mg of paracetamol every six hours if you need it, and see a doctor if the fever lasts. " * 3,
    "unicode": "Take 500\u202fmg of paracétamol every six hours, and see a doctor \u2014 if the fever lasts. " * 3,
}


def main() -> None:
    conversation = [Message(role="user", content="hi")]
    for label, min_rules in (("one search per rule", 10**9), ("one RE2 set", 16)):
        RuleIndex.MIN_RULES = min_rules
        engine = Engine.from_policy({"name": "wide", "constitutions": ["harmless"], "model": "none", "add": ADDED})
        rules = sum(len(p.rules) for p in engine.components.principles)
        for name, reply in REPLIES.items():
            engine.components.deterministic_violations(conversation, reply)  # warm: compiles and folds once
            times = []
            for _ in range(30):
                start = time.perf_counter()
                engine.components.deterministic_violations(conversation, reply)
                times.append(time.perf_counter() - start)
            median = statistics.median(times) * 1000
            print(f"{label:20s} {name:8s} median {median:6.2f} ms over 30 calls ({rules:,} rules)")


if __name__ == "__main__":
    main()
