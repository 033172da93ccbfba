"""What a stage writes and the next stage reads: run records, exported rows, export manifests, the judge gate.

Runs store these as JSONL lines or JSON files; every writer builds the model and every reader validates into it, so
a key is spelled in one place. Stored records keep keys they do not know (written by another version). The records a
stage function also returns (the export manifests, the gate) are stage results (:class:`StageResult`), like the
summaries in :mod:`cai_engine.records.results`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cai_engine.constitution.model import Message
from cai_engine.records.tasks import Conversation


class StoredRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    def to_json(self) -> dict[str, Any]:
        """The JSON form (what the file holds and what ``cai_on_record`` sinks receive)."""
        return self.model_dump(mode="json")


class StageResult(StoredRecord):
    """What a stage function returns (and most also write): a record whose fields read as attributes.

    Stages used to return their JSON form as a dict, so a result also reads by key, in that JSON form:
    ``summary["written"]``, ``summary.get("example")``, ``"steps" in summary``, ``result["models"]["base"]`` (a
    nested record reads as its JSON too). Each read dumps the record: use attributes in loops.
    """

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.to_json()

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` in the JSON form, or ``default`` when the JSON form has no such key."""
        return self.to_json().get(key, default)

    def __eq__(self, other: object) -> bool:
        """Equal to another record as pydantic says, and to a mapping that is its JSON form."""
        if isinstance(other, Mapping):
            return self.to_json() == dict(other)
        return super().__eq__(other)


class SLRound(StoredRecord):
    """One critique-and-revision round of a phase-1 item."""

    round: int
    principle_id: str
    critique: str | None = None
    needs_revision: bool | None = None
    revision: str | None = Field(None, description="The accepted revision; None when rejected or not attempted.")
    accepted: bool = False
    reason: str | None = None
    candidate: str | None = Field(None, description="A usable revision that the verifier or a check turned down.")
    unchanged: bool = False
    verify_p_revision: float | None = None


class SLRecord(StoredRecord):
    """One phase-1 item (``records.jsonl`` of an ``sl`` run): a red-team item with its rounds, or a helpful sample."""

    key: str
    id: str
    kind: Literal["red-team", "helpful"]
    category: str | None = None
    conversation: Conversation
    initial_response: str | None = None
    rounds: list[SLRound] = Field(default_factory=list)
    final_response: str | None = None
    revised: bool = False
    error: str | None = Field(None, description="Why the item could not be processed; it has no responses then.")
    provenance: dict[str, Any] = Field(default_factory=dict)
    created: str | None = None

    @property
    def prompt(self) -> str:
        return self.conversation[-1].content


class StoredJudgement(StoredRecord):
    """A judge's verdict as kept in a preference record (None ``p_a`` and ``abstained`` when there is no label)."""

    p_a: float | None = None
    abstained: bool = False
    reason: str | None = None
    position_consistent: bool | None = None
    principle_ids: list[str] = Field(default_factory=list)
    orders: list[dict[str, Any]] = Field(default_factory=list)
    judge: str | None = None


class PreferenceRecord(StoredRecord):
    """One labelled pair (``records.jsonl`` of an ``rl`` run). ``label`` is P(response_a is better), or None."""

    key: str
    id: str
    category: str | None = None
    source: Literal["ai", "revision", "intent"]
    conversation: Conversation
    response_a: str
    response_b: str
    principle_ids: list[str] = Field(default_factory=list)
    label: float | None = Field(None, ge=0, le=1)
    judgement: StoredJudgement = Field(default_factory=StoredJudgement)
    provenance: dict[str, Any] = Field(default_factory=dict)
    created: str | None = None


class SFTExample(StoredRecord):
    """A row of an SFT export: TRL's conversational format (``messages``) plus where it came from."""

    messages: list[Message]
    prompt_id: str
    source: Literal["revision", "helpful", "written"]
    round: int | None = None
    principle_id: str | None = None


class PreferenceRow(StoredRecord):
    """A row of a preference export: TRL's conversational preference format plus a soft label."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    chosen_probability: float = Field(ge=0, le=1)
    source: Literal["ai", "revision", "human", "human-review", "intent"]
    prompt_id: str
    principle_ids: list[str] = Field(default_factory=list)


class ReviewItem(StoredRecord):
    """A pair handed to a reviewer (a line of ``cai rl review export``'s file); they fill in ``human_choice``."""

    key: str
    conversation: Conversation
    response_a: str
    response_b: str
    ai_p_a: float | None = None
    position_consistent: bool | None = None
    principle_ids: list[str] = Field(default_factory=list)
    human_choice: str | float | None = Field(None, description='"a", "b", or the probability that A is better.')


class Review(StoredRecord):
    """A reviewer's label for one pair of an ``rl`` run (a line of its ``reviews.jsonl``)."""

    key: str
    p_a: float = Field(ge=0, le=1)
    reviewed: str | None = None


class GateResult(StageResult):
    """A judge measured on labelled pairs (``gate.json``); the trainers refuse AI labels from a judge below it."""

    pairs: int
    scored: int
    abstained: int
    scored_share: float | None = None
    accuracy: float | None = None
    accuracy_ci95: list[float] | None = None
    position_consistency: float | None = None
    same_position_rate: float | None = None
    expected_calibration_error: float | None = None
    judge: dict[str, Any] | None = None
    pairs_source: str | None = None
    measured: str | None = None


class SFTExportManifest(StageResult):
    """``export.json`` beside an SFT export, and what :func:`~cai_engine.phase1.export.export_sft` returns."""

    format: Literal["trl-conversational"] = "trl-conversational"
    source_run: str
    train: int
    test: int
    revisions: int
    helpful: int
    duplicates_dropped: int = 0
    repeats_dropped: int = 0
    refusals_dropped: int = Field(0, description="Targets that refused a prompt listed in ``must_answer``.")
    compliance_dropped: int = Field(
        0, description="Targets without a refusal phrase for a prompt listed in ``must_decline``."
    )
    helpful_available: int = 0
    helpful_wanted: int = 0
    written: int = Field(0, description="Targets from labelled exchanges people wrote (``written``), after the drops.")
    written_dropped: dict[str, int] = Field(
        default_factory=dict, description="Written exchanges not used as targets, by reason."
    )
    options: dict[str, Any] = Field(default_factory=dict)
    constitution: dict[str, Any] | None = None


class PreferenceExportManifest(StageResult):
    """``export.json`` beside a preference export, and what
    :func:`~cai_engine.phase2.preferences.export_preferences` returns; carries the labelling judge's gate result for
    the trainers."""

    format: Literal["trl-conversational-preference"] = "trl-conversational-preference"
    source_run: str
    train: int
    test: int
    sources: dict[str, int] = Field(default_factory=dict)
    abstained_excluded: int = 0
    filtered_low_confidence: int = 0
    intent_labelled: int = Field(
        0, description="AI-labelled pairs relabelled by their prompt's intent (``must_decline``/``must_answer``)."
    )
    intent_overrode: int = Field(0, description="Of those, pairs whose AI label had preferred the other reply.")
    refusals_borrowed: int = Field(
        0,
        description="Answers to harmless prompts paired with a refusal written for a harmful one (borrow_refusals), "
        "before any balance.",
    )
    balanced_dropped: int = Field(0, description="Pairs dropped to balance refusal-preferring and answer-preferring.")
    options: dict[str, Any] = Field(default_factory=dict)
    judge_gate: GateResult | None = None
    judge_gate_matches: bool | None = None
    constitution: dict[str, Any] | None = None
