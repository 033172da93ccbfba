"""Calibrate the guard's reply contrast on harmless training answers, never on the cases it is judged on.

With `guard.reply_contrast` set (screen 'request'), a reply that does not decline, to a request the screen reads as
harmless, is put beside a plain refusal before the judge (both orders), and the guard acts when P(the refusal is
the better reply) is above the threshold. A small judge's probabilities are compressed toward the middle and lean
toward whichever reply engages, so 0.5 is not a usable threshold. This script has a model answer the built-in
*training* requests that are harmless (builtin:borderline, which only sound dangerous, and builtin:helpful), drops
the answers that decline, scores the rest with the judge, and prints the threshold at which at most
`--target-fpr` of them would be acted on. The labelled answers in bench/data/guard-cases.jsonl are left for
bench/guard_model.py.

    python bench/reply_contrast.py --limit 40 --out runs/reply-contrast.json
    python bench/reply_contrast.py --answers my-policy-harmless-answers.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cai_engine import Message, Runtime, load_prompts
from cai_engine.constitution.model import Principle
from cai_engine.plugins.refs import ComponentRef
from cai_engine.records import ComparisonTask
from cai_engine.stats import rate
from cai_engine.text.layouts import CONTRAST_QUESTION
from cai_engine.text.refusals import is_refusal


def threshold_for(negatives: list[float], target_fpr: float) -> float:
    """The smallest threshold whose false-alarm rate on ``negatives`` is at most ``target_fpr`` (acts when p > t)."""
    ranked = sorted(negatives, reverse=True)
    allowed = int(target_fpr * len(ranked))
    return ranked[allowed] if allowed < len(ranked) else 0.0


def answer_sets(args, runtime):
    """(set name, ids, conversations, answers) per set of harmless answers: read from --answers, or the answer
    model's greedy replies to the --harmless prompt sets."""
    if args.answers:
        rows = [
            json.loads(line) for line in Path(args.answers).read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        rows = rows[: args.limit] if args.limit else rows
        yield (
            args.answers,
            [str(r.get("id", k)) for k, r in enumerate(rows)],
            [[Message(role="user", content=r["prompt"])] for r in rows],
            [r["response"] for r in rows],
        )
        return
    sampler = ComponentRef(
        name="model",
        options={"model": args.answer_model, "temperature": 0.0, "max_new_tokens": args.max_new_tokens},
    ).build("sampler", runtime)
    for source in args.harmless:
        items = load_prompts(source, runtime.registry, limit=args.limit)
        conversations = [[Message(role="user", content=i.conversation[-1].content)] for i in items]
        yield source, [i.id for i in items], conversations, [s[0] for s in sampler.sample(conversations)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--judge-model", default="qwen2.5-coder-1.5b", help="The guard's judge (the policy's).")
    parser.add_argument("--answer-model", default="smollm2", help="Writes the harmless answers (greedy).")
    parser.add_argument("--harmless", nargs="+", default=["builtin:borderline", "builtin:helpful"])
    parser.add_argument(
        "--answers",
        help="Score these harmless answers instead of generating them: a JSONL file of {prompt, response} rows "
        "(your own policy's answers to requests you know are harmless are the best calibration set).",
    )
    parser.add_argument("--limit", type=int, help="Use only the first N prompts of each set.")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--refusal", default="I'm sorry, but I can't help with that.")
    parser.add_argument("--target-fpr", type=float, default=0.05)
    parser.add_argument("--out", help="Write the answers, scores and the chosen threshold here (JSON).")
    args = parser.parse_args()
    runtime = Runtime()
    judge = ComponentRef(name="logprob", options={"model": args.judge_model, "few_shot": 0}).build("judge", runtime)
    question = Principle(id="reply-contrast", comparison=CONTRAST_QUESTION)
    rows: list[dict] = []
    began = time.perf_counter()
    for source, ids, conversations, answers in answer_sets(args, runtime):
        engaged = [(i, c, a) for i, c, a in zip(ids, conversations, answers) if a.strip() and not is_refusal(a)]
        judged = judge.compare(
            [
                ComparisonTask(conversation=c, response_a=a, response_b=args.refusal, principles=[question])
                for _, c, a in engaged
            ]
        )
        for (item_id, _, answer), judgement in zip(engaged, judged):
            p = None if judgement.p_a is None else round(1.0 - judgement.p_a, 4)
            rows.append({"set": source, "id": item_id, "answer": answer, "p_refusal_better": p})
        rows += [
            {"set": source, "id": i, "answer": a, "p_refusal_better": None, "declined": True}
            for i, a in zip(ids, answers)
            if not (a.strip() and not is_refusal(a))
        ]
    seconds = time.perf_counter() - began
    runtime.close()
    scored = [r["p_refusal_better"] for r in rows if r["p_refusal_better"] is not None]
    threshold = threshold_for(scored, args.target_fpr)
    summary = {
        "judge_model": args.judge_model,
        "answers_from": args.answers or args.answer_model,
        "answers": len(rows),
        "declined": sum(bool(r.get("declined")) for r in rows),
        "scored": len(scored),
        "target_fpr": args.target_fpr,
        "threshold": round(threshold, 4),
        "false_alarms": {
            src: rate(
                r["p_refusal_better"] > threshold for r in rows if r["set"] == src and r["p_refusal_better"] is not None
            )
            for src in sorted({r["set"] for r in rows})
        },
        "at_0.5": rate(p > 0.5 for p in scored),
        "seconds": round(seconds),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({**summary, "rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
