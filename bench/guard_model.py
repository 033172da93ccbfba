"""The runtime guard with a model critic, on labelled harmful and benign answers (bench/data/guard-cases.jsonl).

Each case is a prompt, an answer and a label (harmful or not; the benign ones include answers to prompts that only
sound dangerous, ordinary help, and safe refusals). The guard runs once over every case in flag mode (detection
only, so no revision is generated) and the script prints how often it acts on each kind, with n and a 95% Wilson
interval, plus the time per response. Per-principle firing counts show which principle causes false positives.

    python bench/guard_model.py --policy examples/feedback-guard-policy.yaml
    python bench/guard_model.py --policy examples/feedback-guard-policy.yaml --threshold 0.7 --out guard.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cai_engine import Message, Runtime
from cai_engine.guard.engine import Engine
from cai_engine.guard.policy import load_policy
from cai_engine.stats import format_rate, rate

CASES = Path(__file__).parent / "data" / "guard-cases.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="examples/feedback-guard-policy.yaml")
    parser.add_argument("--cases", default=str(CASES))
    parser.add_argument("--threshold", type=float, help="Override the policy's guard threshold.")
    parser.add_argument(
        "--reply-contrast", type=float, help="Override the policy's guard.reply_contrast (screen 'request')."
    )
    parser.add_argument(
        "--request-refusal",
        choices=["on", "off"],
        help="Override the policy's guard.request_refusal (screen 'request'); with --request-threshold.",
    )
    parser.add_argument("--request-threshold", type=float, help="Override the policy's guard.request_threshold.")
    parser.add_argument("--out", help="Write the per-case results here (JSON).")
    args = parser.parse_args()
    cases = [json.loads(line) for line in Path(args.cases).read_text(encoding="utf-8").splitlines() if line.strip()]
    policy, base = load_policy(args.policy)
    update: dict = {"action": "flag"}
    if args.threshold is not None:
        update["threshold"] = args.threshold
    if args.reply_contrast is not None:
        update["reply_contrast"] = args.reply_contrast
    if args.request_refusal is not None:
        update["request_refusal"] = args.request_refusal == "on"
    if args.request_threshold is not None:
        update["request_threshold"] = args.request_threshold
    guard = policy.guard.model_copy(update=update)
    policy = policy.model_copy(update={"guard": guard})
    engine = Engine(policy, runtime=Runtime(), base_dir=base)
    began = time.perf_counter()
    results = engine.guard_batch([([Message(role="user", content=c["prompt"])], c["response"]) for c in cases])
    seconds = time.perf_counter() - began
    rows = []
    fired: dict[str, dict[str, int]] = {}
    for case, result in zip(cases, results):
        acted = result.action != "none"
        principles = sorted({v.principle_id for r in result.rounds for v in r.violations})
        for pid in principles:
            fired.setdefault(pid, {"harmful": 0, "benign": 0})["harmful" if case["harmful"] else "benign"] += 1
        rows.append(
            {
                "id": case["id"],
                "harmful": case["harmful"],
                "kind": case["kind"],
                "acted": acted,
                "principles": principles,
                "request_p": result.rounds[0].request_p,
                "request_refusal_p": result.rounds[0].request_refusal_p,
                "contrast_p": result.rounds[0].contrast_p,
            }
        )
    harmful = rate(r["acted"] for r in rows if r["harmful"])
    benign = rate(r["acted"] for r in rows if not r["harmful"])
    kinds = sorted({r["kind"] for r in rows if not r["harmful"]})
    summary = {
        "policy": args.policy,
        "threshold": guard.threshold,
        "cases": len(rows),
        "acts_on_harmful": harmful,
        "acts_on_benign": benign,
        "acts_on_benign_by_kind": {k: rate(r["acted"] for r in rows if r["kind"] == k) for k in kinds},
        "fired_by_principle": fired,
        "reply_contrast": guard.reply_contrast,
        "contrast_acted": {
            label: sum(
                r["contrast_p"] is not None and r["contrast_p"] > guard.reply_contrast
                for r in rows
                if r["harmful"] == (label == "harmful")
            )
            if guard.reply_contrast is not None
            else 0
            for label in ("harmful", "benign")
        },
        "seconds": round(seconds, 1),
        "seconds_per_response": round(seconds / max(len(rows), 1), 2),
    }
    print(
        f"policy {args.policy} (threshold {guard.threshold}), {len(rows)} labelled answers, {seconds:.0f} s "
        f"({summary['seconds_per_response']} s per response, batched)"
    )
    print(f"acts on harmful answers: {format_rate(harmful)}")
    print(f"acts on benign answers:  {format_rate(benign)}")
    for kind, value in summary["acts_on_benign_by_kind"].items():
        print(f"  benign / {kind:<13} {format_rate(value)}")
    print(
        "fired by principle (harmful, benign):",
        ", ".join(f"{p} {v['harmful']}/{v['benign']}" for p, v in sorted(fired.items())),
    )
    if guard.reply_contrast is not None:
        acted = summary["contrast_acted"]
        print(
            f"of these, acted on by the reply contrast (P(refusal better) > {guard.reply_contrast}): "
            f"{acted['harmful']} harmful, {acted['benign']} benign"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "cases": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
