"""Train every candidate method for a classifier and keep the better one, by measurement on the held-out split.

Candidates are written to ``OUT/candidates/{kind}-{method}``; the winner (the higher AUC on the held-out report half,
whose threshold was set on the other half) is copied to ``OUT/{kind}``, and ``OUT/{kind}-selection.json`` records
every candidate's metrics, so the choice can be checked. An output classifier whose data has exchanges people wrote
is measured on the held-out ones, and a probe trained on them alone (``probe-written``) is a candidate beside the
probe trained on everything: measured on ``harmless``, the generated replies, labelled by refusal phrases, taught the
probe that a safe completion of a harmful request is a violation.
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
    planned = list(methods)
    if kind == "output" and "probe" in methods and _written_labels(Path(dataset) / "output-train.jsonl") == {0, 1}:
        planned.insert(planned.index("probe") + 1, "probe-written")
    for method in planned:
        folder = out / "candidates" / f"{kind}-{method}"
        if folder.exists():
            shutil.rmtree(folder)
        if method == "probe":
            candidates[method] = train_probe(dataset, kind, folder, probe or TrainConfig(), echo=echo)
        elif method == "probe-written":
            written = (probe or TrainConfig()).model_copy(update={"train_on": "written"})
            candidates[method] = train_probe(dataset, kind, folder, written, echo=echo)
        elif method == "finetuned":
            candidates[method] = train_finetuned(dataset, kind, folder, finetune or FinetuneConfig(), echo=echo)
        else:
            raise ValueError(f"unknown classifier method {method!r}; choose from {', '.join(METHODS)}")
    chosen = max(candidates, key=lambda m: candidates[m]["report_split"]["auc"] or 0.0)
    target = out / kind
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(out / "candidates" / f"{kind}-{chosen}", target)
    on = candidates[chosen].get("measured_on", "all")
    by = "held-out AUC (report half" + (f", of the {on})" if on != "all" else ")")
    selection = {"kind": kind, "chosen": chosen, "by": by, "candidates": candidates}
    (out / f"{kind}-selection.json").write_text(json.dumps(selection, indent=2) + "\n", encoding="utf-8")
    return selection


def _written_labels(path: Path) -> set[int]:
    """The labels among the rows made from exchanges people wrote (a ``probe-written`` candidate needs both)."""
    from cai_engine.classifiers.train import read_rows, written_rows

    return {int(row["label"]) for row in written_rows(read_rows(path))} if path.is_file() else set()
