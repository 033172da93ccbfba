"""Which source of phase-1 targets gives the best SFT data with a small teacher? (the feedback-model issue)

Runs one SL-CAI round on the same red-team prompts with the same policy samples four ways, with the feedback model
as critic/reviser, and scores every final response with the feedback model's judged classifiers (harmful? refusal?)
and its pairwise preference over the policy's original answer:

- ``critique``: the paper's critique -> revision;
- ``direct``: revision without a critique (CAI-SPEC §2.5);
- ``rewrite``: the reply the assistant should have given, written from scratch under the principle;
- ``best``: an ensemble whose judge picks the better of ``critique`` and ``rewrite`` for each item (best-of-n).

    python bench/phase1_sources.py --limit 24 --out runs/phase1-sources
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cai_engine import Runtime
from cai_engine.constitution.model import Message
from cai_engine.evaluation.rubrics import HARMFUL_RUBRIC, REFUSAL_RUBRIC
from cai_engine.phase1.revise import run_sl
from cai_engine.records import ComparisonTask, CritiqueTask
from cai_engine.stats import format_rate, rate
from cai_engine.store.runs import RunDirectory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=24, help="Red-team prompts (the first N of builtin:red-team).")
    parser.add_argument("--feedback-model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--policy", default="smollm2")
    parser.add_argument("--methods", default="critique,direct,rewrite,best")
    parser.add_argument("--out", default="runs/phase1-sources")
    args = parser.parse_args()
    runtime = Runtime()
    out = Path(args.out)
    feedback = {"model": args.feedback_model, "few_shot": 0}
    policy = {"backend": "llamacpp", "model": args.policy} if args.policy == "smollm2" else args.policy
    methods = {
        "critique": {
            "critic": {"name": "model", "options": feedback},
            "reviser": {"name": "model", "options": feedback},
        },
        "direct": {"critique": False, "reviser": {"name": "model", "options": feedback}},
        "rewrite": {"critique": False, "reviser": {"name": "rewrite", "options": feedback}},
        "best": {
            "critique": False,
            "reviser": {
                "name": "ensemble",
                "options": {
                    "members": [
                        {
                            "critic": {"name": "model", "options": feedback},
                            "reviser": {"name": "model", "options": feedback},
                        },
                        {"reviser": {"name": "rewrite", "options": feedback}},
                    ],
                    "judges": [{"name": "logprob", "options": feedback}],
                },
            },
        },
    }
    judge = runtime.component("judge", "logprob", feedback)
    classifier = runtime.component("critic", "model", {**feedback, "verdict_only": True})
    harm = runtime.registry.constitution("harmless").principle("harm-001")
    report = {}
    for name in args.methods.split(","):
        began = time.perf_counter()
        config = {
            "prompts": "builtin:red-team",
            "limit": args.limit,
            "rounds": 1,
            "helpful_prompts": None,
            "model": policy,
            "sampler": {"name": "model", "options": {"max_new_tokens": 160}},
            "batch_size": 16,
            **methods[name],
        }
        run_sl(config, out / name, runtime=runtime, progress=False)
        seconds = time.perf_counter() - began
        records = [r for r in RunDirectory(out / name, "sl").records() if r.get("kind") == "red-team"]
        convs = [[Message.model_validate(m) for m in r["conversation"]] for r in records]
        finals = [r["final_response"] for r in records]
        initials = [r["initial_response"] for r in records]
        verdicts = {}
        for label, rubric in (("harmful", HARMFUL_RUBRIC), ("refusal", REFUSAL_RUBRIC)):
            verdicts[label] = [
                c.needs_revision
                for c in classifier.critique(
                    [CritiqueTask(conversation=c, response=t or " ", principle=rubric) for c, t in zip(convs, finals)]
                )
            ]
        changed = [(c, f, i) for c, f, i in zip(convs, finals, initials) if f != i]
        prefs = (
            judge.compare(
                [ComparisonTask(conversation=c, response_a=f, response_b=i, principles=[harm]) for c, f, i in changed]
            )
            if changed
            else []
        )
        report[name] = {
            "seconds": round(seconds, 1),
            "items": len(records),
            "revised": sum(bool(r.get("revised")) for r in records),
            "safe_rate": rate(None if v is None else not v for v in verdicts["harmful"]),
            "refusal_rate": rate(verdicts["refusal"]),
            "preferred_over_original": rate(None if j.p_a is None else j.p_a > 0.5 for j in prefs),
            "mean_length": round(sum(len(t) for t in finals) / max(len(finals), 1)),
        }
        if name == args.methods.split(",")[0]:
            base = [
                c.needs_revision
                for c in classifier.critique(
                    [
                        CritiqueTask(conversation=c, response=t or " ", principle=HARMFUL_RUBRIC)
                        for c, t in zip(convs, initials)
                    ]
                )
            ]
            report["original"] = {"safe_rate": rate(None if v is None else not v for v in base)}
        print(name, json.dumps(report[name]), flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\n{'source':<10} {'safe rate':<36} {'refusal rate':<36} {'preferred over original':<36} seconds")
    for name, row in report.items():
        print(
            f"{name:<10} {format_rate(row.get('safe_rate')):<36} {format_rate(row.get('refusal_rate')):<36} "
            f"{format_rate(row.get('preferred_over_original')):<36} {row.get('seconds', '')}"
        )


if __name__ == "__main__":
    main()
