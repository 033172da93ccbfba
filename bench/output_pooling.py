"""Where an output probe should average: over every token of the exchange (what the probe does today) or over the
reply's tokens only, the request still read as context through attention.

The probe option this measured is `cai classifiers build --output-pooling reply` (and `train --pooling reply`).
Trains a logistic head on the labelled exchanges people wrote (default `builtin:harmless`'s file), with its threshold
set at 5% of the harmless ones by 5-fold cross-validation, for each pooling, depth and L2 penalty, and scores labelled
exchanges written apart (default the reply and guard cases under bench/data): cross-validated AUC on the training
exchanges, AUC and catches / false flags at that threshold on the others, with n and 95% intervals.

    python bench/output_pooling.py
    python bench/output_pooling.py --train my-exchanges.jsonl --cases my-held-out.jsonl --layers 8,12
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from cai_engine.classifiers.data import BUILTIN_EXCHANGES
from cai_engine.classifiers.probe import Encoder, probe_texts
from cai_engine.classifiers.sources import labelled_exchanges
from cai_engine.classifiers.train import auc, fit_head
from cai_engine.stats import format_rate, rate

BENCH = Path(__file__).resolve().parent / "data"


def pooled(encoder: Encoder, rows: list[dict], reply_only: bool, max_tokens: int = 256):
    """``[len(rows), layers, hidden]``: each layer's normed output averaged over the exchange, or over its reply's
    tokens (what ``pooling: reply`` does in a probe)."""
    prompts, replies = [row["prompt"] for row in rows], [row["response"] for row in rows]
    texts, skip = probe_texts("output", "reply" if reply_only else "mean", prompts, replies)
    return encoder.features(texts, max_tokens=max_tokens, skip=skip)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, default=BUILTIN_EXCHANGES["harmless"])
    parser.add_argument("--cases", type=Path, action="append")
    parser.add_argument("--layers", default="6,8,12")
    parser.add_argument("--l2", default="1,3,10")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cases = args.cases or [BENCH / "reply-cases.jsonl", BENCH / "guard-cases.jsonl"]
    train, held = labelled_exchanges([args.train]), labelled_exchanges(cases)
    layers = [int(x) for x in args.layers.split(",")]
    encoder = Encoder("smollm2", max(layers), "float32")
    y = torch.tensor([[float(r["label"])] for r in train])
    labels = [r["label"] for r in held]
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    folds = [set(order[f::5]) for f in range(5)]
    print(f"{len(train)} training exchanges, {len(held)} held out ({sum(labels)} violating)")
    for reply_only in (False, True):
        x_train, x_held = pooled(encoder, train, reply_only), pooled(encoder, held, reply_only)
        for layer in layers:
            for l2 in (float(v) for v in args.l2.split(",")):
                cv = [0.0] * len(train)
                for fold in folds:
                    rest = [i for i in range(len(train)) if i not in fold]
                    mean, scale, weight, bias = fit_head(x_train[rest, layer - 1], y[rest], l2)
                    scores = (((x_train[sorted(fold), layer - 1] - mean) / scale) @ weight.T + bias)[:, 0].tolist()
                    for i, v in zip(sorted(fold), scores):
                        cv[i] = v
                harmless = sorted(v for v, r in zip(cv, train) if not r["label"])
                threshold = harmless[min(len(harmless) - 1, int(0.95 * len(harmless)))]
                mean, scale, weight, bias = fit_head(x_train[:, layer - 1], y, l2)
                scores = (((x_held[:, layer - 1] - mean) / scale) @ weight.T + bias)[:, 0].tolist()
                caught = rate([v > threshold for v, t in zip(scores, labels) if t])
                flags = rate([v > threshold for v, t in zip(scores, labels) if not t])
                print(
                    f"{'reply' if reply_only else 'all'} tokens, layer {layer}, L2 {l2:g}: cross-validated AUC "
                    f"{auc(cv, [r['label'] for r in train]):.3f}; held out AUC {auc(scores, labels):.3f}, caught "
                    f"{format_rate(caught)}, false flags {format_rate(flags)}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
