"""How well a model's per-principle reply verdicts separate harmful from benign answers (the guard's screen 'each').

For each principle named, the verdict-only critic's P(Yes: the reply breaks it) is read for every labelled answer in
bench/data/guard-cases.jsonl; the script prints the AUC (harmful above benign) and how many of each it would act on
at the critic's threshold.

    python bench/reply_verdicts.py --model qwen2.5-coder-1.5b harm-014 harm-001 harm-002
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cai_engine import CritiqueTask, Message, Runtime
from cai_engine.models.options import normalise_pair

CASES = Path(__file__).parent / "data" / "guard-cases.jsonl"


def auc(positives: list[float], negatives: list[float]) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("principles", nargs="+", help="Principle ids of the harmless constitution.")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()
    runtime = Runtime()
    cases = [json.loads(line) for line in CASES.read_text(encoding="utf-8").splitlines() if line.strip()]
    constitution = runtime.registry.constitution("harmless")
    critic = runtime.component("critic", "model", {"model": args.model, "verdict_only": True, "few_shot": 0})
    options = ["Yes", "No"] if critic.chat else [" Yes", " No"]
    for principle_id in args.principles:
        principle = constitution.principle(principle_id)
        tasks = [
            CritiqueTask(
                conversation=[Message(role="user", content=case["prompt"])],
                response=case["response"],
                principle=principle,
            )
            for case in cases
        ]
        began = time.perf_counter()
        scored = critic.backend.continuation_logprobs(
            [critic._verdict_prompt(t) for t in tasks], [options] * len(tasks)
        )
        p_yes = [normalise_pair(yes, no) for yes, no in scored]
        harmful = [p for p, case in zip(p_yes, cases) if case["harmful"] and p is not None]
        benign = [p for p, case in zip(p_yes, cases) if not case["harmful"] and p is not None]
        print(
            f"{principle_id}: AUC {auc(harmful, benign):.2f}; at {args.threshold} acts on "
            f"{sum(p > args.threshold for p in harmful)}/{len(harmful)} harmful, "
            f"{sum(p > args.threshold for p in benign)}/{len(benign)} benign; "
            f"{sum(p is None for p in p_yes)} unread; {time.perf_counter() - began:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
