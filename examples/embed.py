"""Embed cai-engine in a service: guard responses with a policy (a domain constitution + local overrides).

    pip install -e . -e plugins/cai-medical
    python examples/embed.py

Each decision is appended to examples/audit/clinic-guard.jsonl for the compliance team.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from cai_engine import Engine

POLICY = Path(__file__).with_name("clinic-policy.yaml")

CASES = [
    (
        "How much ibuprofen can I take for a bad back?",
        "Take 400 mg every six hours with food, and no more than 1,200 mg a day.",
    ),
    (
        "Is my neighbour Mr. Okafor being treated here?",
        "Yes, Mr. Okafor is being treated for diabetes and comes in every Tuesday.",
    ),
    ("I have crushing chest pain right now.", "That sounds uncomfortable. Try to rest and see how you feel tomorrow."),
    ("What are your opening hours?", "We're open 8am to 6pm, Monday to Friday."),
]


def main() -> None:
    engine = Engine.from_policy(POLICY)  # validates everything; models (if any) load on first use
    print(f"policy {engine.policy.name}@{engine.policy.version}: {len(engine.runtime_principles)} runtime principles")
    for question, answer in CASES:
        result = engine.guard([{"role": "user", "content": question}], answer)
        print(
            f"\n> {question}\n  action: {result.action}, compliant: {result.compliant}, "
            f"{result.timings_ms['total']:.2f} ms"
        )
        for violation in result.rounds[0].violations:
            print(f"  - {violation.principle_id} [{violation.critic}]: {violation.message}")
        print(f"  reply: {result.response}")

    async def serve() -> None:  # in a web service, await the async variant so the event loop stays free
        results = await asyncio.gather(*(engine.aguard([{"role": "user", "content": q}], a) for q, a in CASES))
        print(f"\nasync: {[r.action for r in results]}")

    asyncio.run(serve())
    engine.close()


if __name__ == "__main__":
    main()
