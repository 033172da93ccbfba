"""How long the runtime guard takes per response with rule critics only (no model).

    python bench/guard_rules.py                 # 2,000 responses, the customer-service policy below
    python bench/guard_rules.py --n 10000

Prints the median and 95th-percentile milliseconds per response, for compliant responses (check only) and for
violating ones (check, repair, re-check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from cai_engine import Message
from cai_engine.engine import Engine

POLICY = {
    "name": "bench", "constitutions": ["customer-service"],
    "add": [{"id": "bench-001", "title": "Sign-off", "phases": ["runtime"],
             "rules": [{"id": "sign", "kind": "require", "pattern": "— Support", "message": "No sign-off.",
                        "fix": "— Support"}]}],
    "guard": {"model_critics": False},
}
CONV = [Message(role="user", content="Why was I charged twice this month?")]
CLEAN = ("I'm sorry about the double charge. I've asked billing to reverse the duplicate on the card ending 1111; "
         "you'll get an email once it's done, usually within three working days.\n\n— Support")
DIRTY = "I'm sorry! Your card 4111 1111 1111 1111 was charged twice, I'll fix it."


def measure(engine: Engine, response: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        began = time.perf_counter()
        engine.guard(CONV, response)
        times.append((time.perf_counter() - began) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    engine = Engine.from_policy(POLICY)
    for label, response in (("compliant", CLEAN), ("violating", DIRTY)):
        measure(engine, response, 50)  # warm up
        times = sorted(measure(engine, response, args.n))
        print(json.dumps({"responses": label, "n": args.n, "median_ms": round(statistics.median(times), 3),
                          "p95_ms": round(times[int(0.95 * len(times)) - 1], 3),
                          "rules_checked": sum(len(p.rules) for p in engine.runtime_principles)}))


if __name__ == "__main__":
    main()
