"""What the stage functions return: a phase-1 run's and a labelling run's summary, a trainer's result, and the
whole pipeline's summary, each a :class:`~cai_engine.records.stages.StageResult`.

The exports return their manifests (:class:`~cai_engine.records.stages.SFTExportManifest`,
:class:`~cai_engine.records.stages.PreferenceExportManifest`), the judge gate a
:class:`~cai_engine.records.stages.GateResult` and an evaluation its
:class:`~cai_engine.records.evaluation.EvalResults`; those live beside what they are stored with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, PrivateAttr, SerializerFunctionWrapHandler, ValidationError, model_serializer

from cai_engine.errors import PluginError
from cai_engine.records.evaluation import JudgedRates
from cai_engine.records.stages import (
    GateResult,
    PreferenceExportManifest,
    SFTExportManifest,
    StageResult,
    StoredRecord,
)


class SLExample(StoredRecord):
    """One revised red-team item of a phase-1 run, before and after its revisions."""

    prompt: str
    before: str | None = None
    after: str | None = None


class SLCounts(StageResult):
    """What a phase-1 run directory holds (:func:`~cai_engine.phase1.revise.summarise`)."""

    red_team_items: int = Field(description="Red-team items processed without an error.")
    helpful_items: int = Field(description="Helpfulness samples.")
    items_revised: int = Field(description="Red-team items with at least one accepted revision.")
    accepted_revisions: int = Field(description="Accepted revisions over every round.")
    error_items: int = Field(description="Items that could not be processed (their records carry the error).")
    principles_used: dict[str, int] = Field(default_factory=dict, description="Rounds per principle id.")
    example: SLExample | None = Field(None, description="The first revised red-team item, if any.")


class SLSummary(StageResult):
    """What :func:`~cai_engine.phase1.revise.run_sl` returns: what this call wrote, then the run's counts (the
    fields of :class:`SLCounts`)."""

    written: int = Field(description="Records written by this call.")
    skipped_done: int = Field(description="Items skipped because the run already held their records.")
    errors: int = Field(description="Records written by this call that carry an error.")
    resumed: bool = Field(description="True when the run directory already existed (the run was resumed).")
    run_dir: str
    seconds: float
    red_team_items: int
    helpful_items: int
    items_revised: int
    accepted_revisions: int
    error_items: int
    principles_used: dict[str, int] = Field(default_factory=dict)
    example: SLExample | None = None


class LabelCounts(StageResult):
    """What a labelling run directory holds (:func:`~cai_engine.phase2.labels.summarise_preferences`)."""

    pairs: int
    labelled: int = Field(description="Pairs with a label (an abstention has none).")
    abstained: int
    by_source: dict[str, int] = Field(default_factory=dict, description="Pairs per source ('ai', 'revision').")
    position_consistency: float | None = Field(
        None, description="Share of the judged pairs whose two orders agreed (None: no judge saw an order)."
    )


class LabelSummary(LabelCounts):
    """What :func:`~cai_engine.phase2.labels.run_labels` returns: the run's counts, then what this call wrote."""

    written: int = Field(description="Records written by this call.")
    resumed: bool = Field(description="True when the run directory already existed (the run was resumed).")
    run_dir: str
    seconds: float


class TrainingResult(StageResult):
    """What :meth:`~cai_engine.plugins.components.Trainer.train` returns, and what the built-in trainers write as
    ``cai_training.json`` beside the checkpoint (the model card is drawn from it).

    A trainer adds what only it reports as further keys: the built-ins add the dataset and its sizes, their TRL
    settings, the judge gate they checked (``reward``, ``dpo``), the held-out pairwise accuracy (``reward``), the KL
    coefficient and judge rewards (``grpo``), and under ``accelerate launch`` the world size and replica digests.
    """

    trainer: str = Field(description="The trainer's registered name.")
    base_model: str | None = Field(None, description="The model training started from (its id).")
    steps: int | None = Field(None, description="Optimiser steps taken (None: the trainer did not say).")
    seconds: float | None = Field(None, description="Wall-clock time of the training loop (None: not reported).")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Final training (and evaluation) metrics.")
    log_history: list[dict[str, Any]] = Field(default_factory=list, description="What the trainer logged, by step.")
    checkpoint: str = Field(description="The folder holding the trained model.")
    checkpoint_check: dict[str, Any] | None = Field(
        None,
        description="How closely the saved folder, read back, reproduced the trained model on a fixed sentence "
        "(None on the processes of a distributed run that did not write it).",
    )
    dtype: str | None = Field(None, description="The dtype the weights were saved in.")

    _order: list[str] = PrivateAttr(default_factory=list)

    @classmethod
    def of(cls, value: Any, *, trainer: str, checkpoint: str) -> TrainingResult:
        """What a trainer's ``train`` returned, as a result: a :class:`TrainingResult` as it is, or the summary
        dict trainers returned before there was one (its ``trainer`` and ``checkpoint`` filled in when missing)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            try:
                return cls(**{"trainer": trainer, "checkpoint": checkpoint, **value})
            except ValidationError as exc:
                raise PluginError(f"trainer {trainer!r} returned an invalid summary: {exc}") from None
        raise PluginError(f"trainer {trainer!r} returned {type(value).__name__}; return a cai_engine.TrainingResult")

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        self._order = list(data)

    @model_serializer(mode="wrap")
    def _in_given_order(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # the JSON form keeps the order the trainer gave its keys in (as cai_training.json always did), not the
        # declared fields first
        data = handler(self)
        rank = {key: index for index, key in enumerate(self._order)}
        return {key: data[key] for key in sorted(data, key=lambda key: rank.get(key, len(rank)))}


class MergeSummary(StageResult):
    """What a merge of shards made (``cai merge``, ``--shards N``): the merged run, its kind, how many shards and
    records it joined, and, when the shards ran here or on Ray, each shard's own summary."""

    run_dir: str
    kind: str
    shards: int
    records: int
    shard_summaries: list[dict[str, Any]] | None = None


class ReviewExport(StageResult):
    """``cai rl review export``: how many pairs went to the reviewers, and where."""

    exported: int
    out: str


class ReviewMerge(StageResult):
    """``cai rl review merge``: how many reviewed labels were merged, and how many pairs came back unreviewed."""

    merged: int
    skipped_unreviewed: int


class EvalSummary(StageResult):
    """The pipeline's evaluation stage: where its results and report are, and each model's judged rates."""

    results: str
    report: str
    judged: dict[str, JudgedRates | None] = Field(default_factory=dict)


class PipelineSummary(StageResult):
    """What :func:`~cai_engine.pipeline.run_pipeline` returns and writes as ``pipeline-summary.json``: one entry per
    stage that ran this time, in pipeline order (a stage that did not run, or found its checkpoint and was skipped,
    has none: its field stays None, and the JSON form leaves it out)."""

    out: str
    seed: int | None = Field(None, description="The pipeline's seed (None: each section's own).")
    machine: dict[str, Any] = Field(
        default_factory=dict, description="CPU and its instruction-set features, library versions, model hashes."
    )
    stage_seconds: dict[str, float] = Field(default_factory=dict, description="Seconds per stage that ran.")
    sl: SLSummary | None = None
    sft_dataset: SFTExportManifest | None = None
    decisions_dataset: dict[str, Any] | None = Field(
        None, description="The decision targets' manifest (`decisions-dataset/export.json`), where `decisions` is set."
    )
    sft_mix: dict[str, Any] | None = Field(
        None, description="The SFT stage's mixed data (`sft-mix/export.json`), where `decisions` is set."
    )
    sft: TrainingResult | None = None
    gate: GateResult | None = None
    rl: LabelSummary | None = None
    preference_dataset: PreferenceExportManifest | None = None
    reward: TrainingResult | None = None
    policy: TrainingResult | None = None
    eval: EvalSummary | None = None

    @model_serializer(mode="wrap")
    def _stages_that_ran(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}
