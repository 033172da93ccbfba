"""Train every candidate method for a classifier and keep the better one, by measurement on the held-out split.

Candidates are written to ``OUT/candidates/{kind}-{method}``; the winner (the higher AUC on the held-out report half,
whose threshold was set on the other half) is copied to ``OUT/{kind}``, and ``OUT/{kind}-selection.json`` records
every candidate's metrics, so the choice can be checked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from cai_engine.classifiers.finetune import FinetuneConfig, train_finetuned
from cai_engine.classifiers.train import TrainConfig, train_probe

METHODS = ("probe", "finetuned")


def train_and_select(
    dataset: str | Path,
    out: str | Path,
    kind: str,
    *,
    methods: tuple[str, ...] = METHODS,
    probe: TrainConfig | None = None,
    finetune: FinetuneConfig | None = None,
    echo=print,
) -> dict[str, Any]:
    """Train ``methods`` for ``kind`` ('input' or 'output'); returns ``{"chosen", "candidates": {method: metrics}}``."""
    out = Path(out)
    candidates: dict[str, dict[str, Any]] = {}
    for method in methods:
        folder = out / "candidates" / f"{kind}-{method}"
        if folder.exists():
            shutil.rmtree(folder)
        if method == "probe":
            candidates[method] = train_probe(dataset, kind, folder, probe or TrainConfig(), echo=echo)
        elif method == "finetuned":
            candidates[method] = train_finetuned(dataset, kind, folder, finetune or FinetuneConfig(), echo=echo)
        else:
            raise ValueError(f"unknown classifier method {method!r}; choose from {', '.join(METHODS)}")
    chosen = max(candidates, key=lambda m: candidates[m]["report_split"]["auc"] or 0.0)
    target = out / kind
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(out / "candidates" / f"{kind}-{chosen}", target)
    selection = {"kind": kind, "chosen": chosen, "by": "held-out AUC (report half)", "candidates": candidates}
    (out / f"{kind}-selection.json").write_text(json.dumps(selection, indent=2) + "\n", encoding="utf-8")
    return selection
