"""How long the runtime guard takes per response with rule critics only (no model).

    python bench/guard_rules.py                 # 2,000 responses, the customer-service policy below
    python bench/guard_rules.py --n 10000
    python bench/guard_rules.py --policy domains   # the three domain plugins' checks (medical, financial, legal)

Prints the median and 95th-percentile milliseconds per response, for compliant responses (check only) and for
violating ones (check, repair, re-check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from cai_engine import Message
from cai_engine.guard.engine import Engine

POLICY = {
    "name": "bench",
    "constitutions": ["customer-service"],
    "add": [
        {
            "id": "bench-001",
            "title": "Sign-off",
            "phases": ["runtime"],
            "rules": [
                {"id": "sign", "kind": "require", "pattern": "— Support", "message": "No sign-off.", "fix": "— Support"}
            ],
        }
    ],
    "guard": {"model_critics": False},
}
CONV = [Message(role="user", content="Why was I charged twice this month?")]
CLEAN = (
    "I'm sorry about the double charge. I've asked billing to reverse the duplicate on the card ending 1111; "
    "you'll get an email once it's done, usually within three working days.\n\n— Support"
)
DIRTY = "I'm sorry! Your card 4111 1111 1111 1111 was charged twice, I'll fix it."


# Every deterministic check of the three domain plugins at once: PHI, clinician caveat, promised returns,
# disclosure, jurisdiction and counsel (rules-only, as a clinic, bank or law-firm deployment runs them).
DOMAINS = {"name": "domains", "constitutions": ["medical", "financial", "legal"], "guard": {"model_critics": False}}
DOMAIN_CONV = [Message(role="user", content="My mother was diagnosed last year. What should we do now?")]
DOMAIN_CLEAN = (
    "Most people manage type 2 diabetes with diet, activity and, when needed, medication. Her GP or "
    "diabetes nurse can set targets with her, and a pharmacist can check her other medicines."
)
DOMAIN_DIRTY = (
    "Karen Whitfield was diagnosed with type 2 diabetes last March. Take 1,000 mg of metformin twice a day; "
    "you don't need to ask your doctor. Put her savings into VTI, it's guaranteed to return 9% a year."
)


def measure(engine: Engine, response: str, n: int, conversation=CONV) -> list[float]:
    times = []
    for _ in range(n):
        began = time.perf_counter()
        engine.guard(conversation, response)
        times.append((time.perf_counter() - began) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument(
        "--policy",
        choices=["customer-service", "domains"],
        default="customer-service",
        help="customer-service: the core's rules; domains: every domain plugin check (needs the "
        "plugins installed: make setup)",
    )
    args = parser.parse_args()
    if args.policy == "domains":
        engine, conversation, cases = (
            Engine.from_policy(DOMAINS),
            DOMAIN_CONV,
            (("compliant", DOMAIN_CLEAN), ("violating", DOMAIN_DIRTY)),
        )
    else:
        engine, conversation, cases = Engine.from_policy(POLICY), CONV, (("compliant", CLEAN), ("violating", DIRTY))
    for label, response in cases:
        measure(engine, response, 50, conversation)  # warm up
        times = sorted(measure(engine, response, args.n, conversation))
        result = engine.guard(conversation, response)
        print(
            json.dumps(
                {
                    "policy": args.policy,
                    "responses": label,
                    "n": args.n,
                    "median_ms": round(statistics.median(times), 3),
                    "p95_ms": round(times[int(0.95 * len(times)) - 1], 3),
                    "rules_checked": sum(len(p.rules) for p in engine.runtime_principles),
                    "checks": sorted({c for p in engine.runtime_principles for c in p.checks}),
                    "action": result.action,
                }
            )
        )


if __name__ == "__main__":
    main()
