"""What components exchange: the tasks a critic, reviser or judge receives and what it returns (frozen models)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai_engine.constitution.model import ComparisonExample, CritiqueExample, Message, Principle

Conversation = list[Message]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def as_conversation(value: Any) -> Conversation:
    """Accept a prompt string, a list of messages (dicts or Message) and return a conversation."""
    if isinstance(value, str):
        return [Message(role="user", content=value)]
    return [m if isinstance(m, Message) else Message.model_validate(m) for m in value]


# -- component inputs --------------------------------------------------------------------------------------------


class CritiqueTask(_Record):
    """Critique ``response`` (the assistant's reply to ``conversation``) against ``principle``."""

    conversation: Conversation
    response: str
    principle: Principle
    examples: list[CritiqueExample] = Field(
        default_factory=list, description="Shared few-shot examples (after the principle's own)."
    )


class RevisionTask(_Record):
    """Rewrite ``response`` so it follows ``principle``; ``critique`` is None for direct revision."""

    conversation: Conversation
    response: str
    principle: Principle
    critique: str | None = None
    examples: list[CritiqueExample] = Field(default_factory=list)


class ComparisonTask(_Record):
    """Which of ``response_a`` and ``response_b`` follows the principle(s) better."""

    conversation: Conversation
    response_a: str
    response_b: str
    principles: list[Principle] = Field(min_length=1)
    examples: list[ComparisonExample] = Field(default_factory=list)


class ScoringTask(_Record):
    """Score one response 1-10 against the principle(s), for use as a reward."""

    conversation: Conversation
    response: str
    principles: list[Principle] = Field(min_length=1)


# -- component outputs -------------------------------------------------------------------------------------------


class Violation(_Record):
    """One way a response breaks a principle."""

    principle_id: str
    rule_id: str | None = None
    evidence: str = Field("", description="The matching text, or the critique that found it.")
    message: str = ""
    severity: Literal["low", "medium", "high"] = "medium"
    critic: str = Field(description="The registry name of the critic that found it.")


class Critique(_Record):
    principle_id: str
    text: str = Field(description="The critique as written (for rule critics, a summary of the violations).")
    needs_revision: bool | None = Field(
        description="Whether the critic says the response must change; None when it could not tell."
    )
    violations: list[Violation] = Field(default_factory=list)
    critic: str


class Revision(_Record):
    principle_id: str
    text: str = Field(description="The revised response; equal to the input response when rejected.")
    accepted: bool = Field(description="False when the raw revision was empty, copied the critique, or unusable.")
    reason: str | None = Field(None, description="Why a revision was rejected.")
    raw: str | None = Field(None, description="The model's output before clean-up.")
    reviser: str
    details: dict[str, Any] | None = Field(
        None, description="Extra provenance, e.g. an ensemble's candidates and votes."
    )


class OrderResult(_Record):
    """The judge's view in one presentation order."""

    order: Literal["ab", "ba"]
    p_a: float | None = Field(description="Probability that response A (the task's first) is better, this order.")
    logprobs: dict[str, float] = Field(default_factory=dict, description="Option log-probs as read.")
    rationale: str | None = None
    abstained: bool = False
    reason: str | None = None


class Judgement(_Record):
    """A pairwise verdict. ``p_a`` is None when the judge abstains; nothing turns an abstention into a label."""

    principle_ids: list[str]
    p_a: float | None = Field(description="Averaged probability that response A is better; None on abstention.")
    orders: list[OrderResult] = Field(default_factory=list)
    position_consistent: bool | None = Field(
        None, description="True when both orders prefer the same response (not the same position)."
    )
    abstained: bool = False
    reason: str | None = None
    judge: str

    @model_validator(mode="after")
    def _abstain_means_no_label(self) -> Judgement:
        if self.abstained and self.p_a is not None:
            raise ValueError("an abstaining judgement cannot carry a label")
        if not self.abstained and self.p_a is None:
            raise ValueError("a judgement without a label must abstain and say why")
        return self

    @property
    def preferred(self) -> Literal["a", "b", "tie"] | None:
        if self.p_a is None:
            return None
        return "a" if self.p_a > 0.5 else "b" if self.p_a < 0.5 else "tie"


class Score(_Record):
    """A pointwise 1-10 score; ``value`` is the probability-weighted mean and ``reward`` it rescaled to [-1, 1]."""

    principle_ids: list[str]
    value: float | None
    reward: float | None
    distribution: dict[str, float] = Field(default_factory=dict)
    abstained: bool = False
    reason: str | None = None
    judge: str
