"""What ``cai eval`` writes (``results.json``) and the report, the CLI and the pipeline read: typed, one place.

Every rate carries its count, sample size and 95% Wilson interval (:class:`Rate`); a metric that was not measured
is None, never zero.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from cai_engine.records.stages import GateResult, StageResult, StoredRecord


class Rate(StoredRecord):
    """A proportion over the values that gave a signal: ``k`` of ``n``, with its 95% Wilson interval."""

    rate: float | None = None
    k: float = 0
    n: int = 0
    ci95: list[float] | None = None


class HarmfulMetrics(StoredRecord):
    """Held-out harmful prompts: refusal markers (a weak signal) and the judge's pointwise harm score."""

    refusal_marker_rate: float | None = None
    attack_success_rate_markers: float | None = None
    harm_score: float | None = None
    safe_rate: float | None = None
    scores: list[float | None] = Field(default_factory=list)


class Evasiveness(StoredRecord):
    signal: str = ""
    safe_answers: int = 0
    refuse_only_share: float | None = None
    engaged_share: float | None = None


class OverRefusal(StoredRecord):
    """Benign prompts that only sound dangerous: how often the model refuses them (string markers)."""

    rate: float | None = None
    full_refusal_rate_xstest: float | None = None
    rate_ci: Rate | None = None


class Pairwise(StoredRecord):
    """A model against the baseline on one aspect, judged in both orders."""

    soft_win_rate: float | None = None
    win_rate: float | None = None
    win_rate_ci: Rate | None = None
    length_controlled_win_rate: float | None = None
    position_consistency: float | None = None
    judged: int = 0
    abstained: int = 0


class JudgedRates(StoredRecord):
    """The judge model's single-reply verdicts (None rates where a classifier was not run)."""

    harmful_rate: Rate | None = None
    safe_rate: Rate | None = None
    over_refusal_benign: Rate | None = None
    refusal_rate_harmful: Rate | None = None
    refusal_rate_helpful: Rate | None = None
    evasive_share_of_safe: Rate | None = None
    harmful_verdicts: list[bool | None] = Field(default_factory=list)
    benign_refusal_verdicts: list[bool | None] = Field(default_factory=list)


class EngagedRates(StoredRecord):
    """Harmful prompts answered by engaging (declining the harm while explaining why or offering something safe)
    rather than by a bare refusal. The judged rates are None unless the run asked the judge (``engaged: true``)."""

    engaged: Rate | None = Field(None, description="Replies the judge says engage (Yes to the engaged question).")
    bare_refusal: Rate | None = Field(None, description="Replies with a refusal marker the judge says do not engage.")
    declined_or_engaged: Rate | None = Field(
        None, description="Harmful refusal or safe completion (judged): a refusal marker, or engaged."
    )
    engaged_structural: Rate | None = Field(
        None,
        description="Judge-free cross-check: a refusal marker and at least 15 words outside the refusing sentences.",
    )


class SourceRates(StoredRecord):
    """One source of the harmful or benign set on its own: its refusal rate (markers), the judge's rate where the run
    classified, and, for harmful sources, how its refusals engage."""

    set: Literal["harmful", "benign"]
    source: str
    refusal: Rate
    judged_safe: Rate | None = Field(None, description="Harmful sources: the judge's safe rate (with classify).")
    judged_refusal: Rate | None = Field(None, description="Benign sources: the judge's refusal rate (with classify).")
    engaged: EngagedRates | None = None


class ModelResult(StoredRecord):
    """Everything measured for one model."""

    model: Any
    harmful: HarmfulMetrics
    evasiveness: Evasiveness
    over_refusal: OverRefusal
    refusal_on_harmful: Rate | None = None
    mean_length: dict[str, float | None] = Field(default_factory=dict)
    vs_baseline: dict[str, Pairwise] | None = None
    principle_violation_rates: dict[str, float | None] | None = None
    judged: JudgedRates | None = None
    engaged: EngagedRates | None = None
    by_source: list[SourceRates] = Field(
        default_factory=list, description="Each harmful and each benign source on its own (the pooled figures above)."
    )


class Example(StoredRecord):
    set: str
    prompt: str
    responses: dict[str, str]


class EvalResults(StageResult):
    """``results.json`` of an evaluation, and what :func:`~cai_engine.evaluation.run.evaluate` returns."""

    created: str
    config: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    judge: dict[str, Any] | None = None
    constitution: dict[str, Any]
    prompt_counts: dict[str, int] = Field(default_factory=dict)
    models: dict[str, ModelResult] = Field(default_factory=dict)
    judge_quality: GateResult | None = None
    harm_by_round: dict[str, Any] | None = None
    policy_comparison: dict[str, Any] | None = None
    examples: list[Example] = Field(default_factory=list)


class PairOutcome(StoredRecord):
    """One pairwise comparison of a model's answer (A) with the baseline's (B), both orders averaged."""

    p_a: float | None = None
    position_consistent: bool | None = None
    log_length_ratio: float = 0.0


class ItemOutcome(StoredRecord):
    """Everything measured about one model's answer to one prompt (a line of ``items.jsonl``): the metrics are
    aggregates of these, so the outcomes of shards add up to the outcomes of the whole run."""

    model: str
    set: Literal["harmful", "benign", "helpful"]
    id: str
    response: str
    source: str | None = None  # the prompt source the item came from (None in items written before sources were kept)
    harm_score: float | None = None
    harmful_verdict: bool | None = None
    benign_refusal_verdict: bool | None = None
    evasive_verdict: bool | None = None
    refusal_verdict: bool | None = None
    engaged_verdict: bool | None = None
    principle_verdicts: dict[str, bool | None] = Field(default_factory=dict)
    pairwise: dict[str, PairOutcome] = Field(default_factory=dict)
