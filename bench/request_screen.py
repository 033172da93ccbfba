"""Calibrate the guard's request screen on training prompts, never on the cases it is judged on.

The guard's `screen: request` asks the feedback model whether a request asks for harm and acts when P(Yes) exceeds
`guard.request_threshold`. This script scores the built-in *training* prompt sets (harmful: builtin:red-team;
harmless: builtin:borderline, requests that only sound dangerous, and builtin:helpful), reports the ROC AUC and, for
a target false-alarm rate on the harmless sets, the threshold to put in the policy and the share of harmful requests
it catches. The held-out labelled answers in bench/data/guard-cases.jsonl are left for bench/guard_model.py.

With --request-refusal it also reads how likely the model is to decline each request itself (the guard's
`request_refusal`), reports that signal alone and combined with the question by noisy-or (what the guard uses), and
the threshold it prints is the combined one. --skip scores a later slice of each set (a validation check of a
threshold chosen on the first slice).

    python bench/request_screen.py --model qwen2.5-coder-1.5b --target-fpr 0.05 --out runs/request-screen.json
    python bench/request_screen.py --limit 80 --request-refusal --out runs/request-screen-refusal.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cai_engine import Message, Runtime, load_prompts
from cai_engine.guard.loop import combine_request_signals
from cai_engine.plugins.refs import ComponentRef
from cai_engine.stats import rate


def auc(positives: list[float], negatives: list[float]) -> float | None:
    """P(a random harmful request scores above a random harmless one), ties half."""
    if not positives or not negatives:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return round(wins / (len(positives) * len(negatives)), 4)


def threshold_for(negatives: list[float], target_fpr: float) -> float:
    """The smallest threshold whose false-alarm rate on ``negatives`` is at most ``target_fpr`` (acts when p > t)."""
    ranked = sorted(negatives, reverse=True)
    allowed = int(target_fpr * len(ranked))  # how many harmless requests may score above the threshold
    return ranked[allowed] if allowed < len(ranked) else 0.0


def calibrate(scores: dict[str, dict[str, list[float | None]]], target_fpr: float, at: float | None = None) -> dict:
    """AUC, the threshold at ``target_fpr`` on the harmless sets (or the given one), and what it catches and where it
    false-alarms."""
    positives = [p for s in scores["harmful"].values() for p in s if p is not None]
    negatives = [p for s in scores["harmless"].values() for p in s if p is not None]
    threshold = threshold_for(negatives, target_fpr) if at is None else at
    return {
        "auc": auc(positives, negatives),
        "auc_by_set": {src: auc(positives, [p for p in s if p is not None]) for src, s in scores["harmless"].items()},
        "target_fpr": target_fpr,
        "threshold": round(threshold, 4),
        "catches_harmful": rate(p > threshold for p in positives),
        "false_alarms": {src: rate(p > threshold for p in s if p is not None) for src, s in scores["harmless"].items()},
        "at_0.5": {
            "catches_harmful": rate(p > 0.5 for p in positives),
            "false_alarms": rate(p > 0.5 for p in negatives),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--harmful", default="builtin:red-team")
    parser.add_argument("--harmless", nargs="+", default=["builtin:borderline", "builtin:helpful"])
    parser.add_argument("--limit", type=int, help="Use only the first N prompts of each set.")
    parser.add_argument("--skip", type=int, default=0, help="Leave out the first N prompts of each set.")
    parser.add_argument(
        "--request-refusal", action="store_true", help="Also read P(the model declines), combined by noisy-or."
    )
    parser.add_argument("--target-fpr", type=float, default=0.05)
    parser.add_argument(
        "--at", type=float, help="Report the last signal at this threshold (e.g. one chosen on another slice)."
    )
    parser.add_argument("--question", help="Another wording of the screen's question to try.")
    parser.add_argument("--out", help="Write the scores and the chosen threshold here (JSON).")
    args = parser.parse_args()
    runtime = Runtime()
    critic = ComponentRef(name="model", options={"model": args.model, "verdict_only": True, "few_shot": 0}).build(
        "critic", runtime
    )
    sets = {"harmful": [args.harmful], "harmless": args.harmless}
    signals = ["question", "declines", "combined"] if args.request_refusal else ["question"]
    scores: dict[str, dict[str, dict[str, list[float | None]]]] = {name: {} for name in signals}
    began = time.perf_counter()
    for label, sources in sets.items():
        for source in sources:
            items = load_prompts(source, runtime.registry)
            items = items[args.skip : None if args.limit is None else args.skip + args.limit]
            conversations = [[Message(role="user", content=i.conversation[-1].content)] for i in items]
            question = critic.screen_requests(conversations, args.question)
            scores["question"].setdefault(label, {})[source] = question
            if args.request_refusal:
                declines = critic.decline_likelihood(conversations)
                scores["declines"].setdefault(label, {})[source] = declines
                scores["combined"].setdefault(label, {})[source] = [
                    combine_request_signals(q, d) for q, d in zip(question, declines)
                ]
    seconds = time.perf_counter() - began
    runtime.close()
    summary: dict = {"model": args.model, "question": args.question, "skip": args.skip, "limit": args.limit}
    for name in signals:
        summary[name] = calibrate(scores[name], args.target_fpr, args.at if name == signals[-1] else None)
    summary["threshold"] = summary[signals[-1]]["threshold"]  # the one to put in the policy
    summary["unreadable"] = sum(p is None for d in scores["question"].values() for s in d.values() for p in s)
    scored = sum(len(s) for d in scores["question"].values() for s in d.values())
    summary["seconds_per_request"] = round(seconds / max(scored, 1), 2)
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({**summary, "scores": scores}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
