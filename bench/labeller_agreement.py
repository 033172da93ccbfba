"""Phase-2 labellers against what is known about a pair: a compiled output classifier (the `classifier` judge) and
the labels a phase-2 run already holds (the teacher's, or the prompt's intent).

For every labelled pair of one or more phase-2 run directories (`cai rl label` -> OUT/records.jsonl) it asks the
`classifier` judge which reply is better, then reports, with n and 95% intervals:

- where the prompt's intent is known (`--must-decline` / `--must-answer` id patterns) and exactly one reply declines:
  how often each labeller prefers the reply the intent calls for (the refusal to a harmful request, the answer to a
  harmless one), harmful and harmless prompts apart;
- how often the classifier agrees with the run's own label (the teacher's or the intent's), on all pairs and on the
  pairs the run's label is confident about (at least `--confident` from even).

    python bench/labeller_agreement.py runs/clf/output runs/ts-engage-s1/rl runs/ts-intentrl-s1/rl \
        --must-decline 'rt-*' --must-decline 'pr-*-h' --must-answer 'pr-*-b' --must-answer 'bl-*'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cai_engine import ComparisonTask, Message, Runtime
from cai_engine.errors import RunError
from cai_engine.files.jsonl import iter_jsonl
from cai_engine.prompts.sets import id_matches
from cai_engine.stats import format_rate, rate
from cai_engine.text.refusals import refuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("classifier", help="An output classifier folder (cai classifiers build ... -> OUT/output).")
    parser.add_argument("runs", nargs="+", type=Path, help="Phase-2 run directories (each with records.jsonl).")
    parser.add_argument("--must-decline", action="append", default=[], help="Ids of harmful prompts (repeatable).")
    parser.add_argument("--must-answer", action="append", default=[], help="Ids of harmless prompts (repeatable).")
    parser.add_argument("--confident", type=float, default=0.1, help="A run label this far from 0.5 is confident.")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    runtime = Runtime()
    judge = runtime.component("judge", "classifier", {"path": args.classifier})
    constitution = runtime.registry.constitution("harmless")
    report: dict = {"classifier": args.classifier, "runs": {}}
    for run in args.runs:
        records = [record for _, record in iter_jsonl(run / "records.jsonl", RunError)]
        records = [r for r in records if r.get("label") is not None and not (r.get("judgement") or {}).get("abstained")]
        tasks = [
            ComparisonTask(
                conversation=[Message(**m) for m in r["conversation"]],
                response_a=r["response_a"],
                response_b=r["response_b"],
                principles=constitution.principles[:1],  # required by the task; the classifier judge reads none
            )
            for r in records
        ]
        began = time.perf_counter()
        judged = judge.compare(tasks)
        seconds = time.perf_counter() - began
        by_intent: dict[str, dict[str, list[bool]]] = {}
        agree, agree_confident = [], []
        for record, judgement in zip(records, judged):
            label, p = record["label"], judgement.p_a
            if label != 0.5 and p != 0.5:
                agree.append((label > 0.5) == (p > 0.5))
                if abs(label - 0.5) >= args.confident:
                    agree_confident.append((label > 0.5) == (p > 0.5))
            a, b = refuses(record["response_a"]), refuses(record["response_b"])
            harmful = bool(args.must_decline) and id_matches(record["id"], args.must_decline)
            harmless = bool(args.must_answer) and id_matches(record["id"], args.must_answer)
            if a == b or harmful == harmless:
                continue
            a_called_for = a if harmful else b  # the refusal to a harmful request, the answer to a harmless one
            side = by_intent.setdefault("harmful" if harmful else "harmless", {"classifier": [], "run label": []})
            side["classifier"].append((p > 0.5) == a_called_for if p != 0.5 else None)
            side["run label"].append((label > 0.5) == a_called_for if label != 0.5 else None)
        block = {
            "pairs": len(records),
            "seconds": round(seconds, 1),
            "agrees_with_run_label": rate(agree),
            "agrees_with_confident_run_label": rate(agree_confident),
            "prefers_what_the_intent_calls_for": {
                side: {who: rate(values) for who, values in whom.items()} for side, whom in by_intent.items()
            },
        }
        report["runs"][str(run)] = block
        print(f"{run}: {len(records)} labelled pairs scored in {seconds:.1f} s")
        agreements = ("agrees_with_run_label", "agrees_with_confident_run_label")
        lines = [(f"classifier {name.replace('_', ' ')}", block[name]) for name in agreements] + [
            (f"{side} prompt, one refusal and one answer: {who} prefers what the intent calls for", r)
            for side, whom in block["prefers_what_the_intent_calls_for"].items()
            for who, r in whom.items()
        ]
        for what, r in lines:
            print(f"  {what}: {r['k']:g}/{r['n']} = {format_rate(r)}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
