"""The stages that run sharded and merge: phase 1 (``sl``), preference labelling (``rl``) and evaluation (``eval``).

Each :class:`Stage` names its config model, the function that runs one shard and the function that merges shards;
``cai sl/rl label/eval --shards N`` and ``cai merge`` look stages up here, so the shard machinery in
``store.shards`` knows no stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from cai_engine.errors import ConfigError
from cai_engine.evaluation.config import EvalConfig
from cai_engine.evaluation.run import evaluate
from cai_engine.evaluation.summary import merge_evals
from cai_engine.phase1.revise import SLConfig, run_sl
from cai_engine.phase2.labels import LabelConfig, run_labels
from cai_engine.records import MergeSummary
from cai_engine.store import shards as sharding


@dataclass(frozen=True)
class Stage:
    """A stage that can run as shards: ``run(config, out)`` runs one shard without progress bars (a module-level
    function, so Ray can send it to a worker) and returns its summary's JSON form, which the merge lists as
    ``shard_summaries``; ``merge(out, shard_dirs)`` joins the shards into one result."""

    name: str
    config: type[BaseModel]
    run: Callable[[dict[str, Any], str], dict[str, Any]]
    merge: Callable[[str | Path, Sequence[str | Path]], MergeSummary]


def run_sl_shard(config: dict[str, Any], out: str) -> dict[str, Any]:
    """One phase-1 shard."""
    return run_sl(config, out, progress=False).to_json()


def run_labels_shard(config: dict[str, Any], out: str) -> dict[str, Any]:
    """One labelling shard."""
    return run_labels(config, out, progress=False).to_json()


def run_eval_shard(config: dict[str, Any], out: str) -> dict[str, Any]:
    """One evaluation shard (its summary names the models; the metrics come from the merge)."""
    return {"models": list(evaluate(config, out, progress=False).models)}


STAGES: dict[str, Stage] = {
    "sl": Stage("sl", SLConfig, run_sl_shard, sharding.merge_runs),
    "rl": Stage("rl", LabelConfig, run_labels_shard, sharding.merge_runs),
    "eval": Stage("eval", EvalConfig, run_eval_shard, merge_evals),
}


def stage(name: str) -> Stage:
    """The stage called ``name``."""
    try:
        return STAGES[name]
    except KeyError:
        raise ConfigError(f"no stage {name!r}; the stages are {', '.join(STAGES)}") from None


def run_sharded(
    name: Literal["sl", "rl", "eval"],
    config: dict[str, Any],
    out: str | Path,
    shards: int,
    *,
    executor: Literal["local", "ray"] = "local",
    ray_address: str | None = None,
) -> MergeSummary:
    """Run stage ``name`` as ``shards`` shards here or on Ray, then merge them into ``out``
    (see :func:`cai_engine.store.shards.run_sharded`)."""
    chosen = stage(name)
    config = chosen.config.model_validate(config).model_dump(mode="json")  # every shard gets a valid config
    return sharding.run_sharded(
        chosen.run, chosen.merge, config, out, shards, executor=executor, ray_address=ray_address
    )


def merge(out: str | Path, shard_dirs: Sequence[str | Path]) -> MergeSummary:
    """Merge the shards of one ``cai sl``, ``cai rl label`` or ``cai eval`` run into ``out``: evaluation shards
    (answers without a run manifest) by the evaluation's merge, run directories by :func:`merge_runs`."""
    if shard_dirs and all(
        (Path(f) / "items.jsonl").exists() and not (Path(f) / "run.json").exists() for f in shard_dirs
    ):
        return STAGES["eval"].merge(out, shard_dirs)
    return sharding.merge_runs(out, shard_dirs)
