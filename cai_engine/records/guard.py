"""The runtime guard's records: each round, the decision it returns, and one response's progress between rounds."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cai_engine.constitution.model import Message
from cai_engine.records.components import Critique, Violation


class GuardRound(BaseModel):
    model_config = ConfigDict(extra="forbid")

    round: int
    violations: list[Violation]
    revisions: list[dict[str, Any]] = Field(default_factory=list)
    abstentions: list[str] = Field(
        default_factory=list,
        description="Principle ids (or 'screen', 'request', 'contrast') the model critic could not give a verdict on.",
    )
    request_p: float | None = Field(
        None,
        description="screen 'request': P(the request asks for harm), if asked (with request_refusal, the combined "
        "value).",
    )
    request_refusal_p: float | None = Field(
        None, description="request_refusal: P(the critic model would itself decline the request), if read."
    )
    contrast_p: float | None = Field(
        None, description="reply_contrast: P(a plain refusal is the better reply), if the judge was asked."
    )


class GuardResult(BaseModel):
    """What the guard decided about one response."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="The audit id of this decision.")
    response: str = Field(description="The response to send: original, revised, or a refusal.")
    original: str
    compliant: bool = Field(description="True when the returned response violates nothing that was checked.")
    action: Literal["none", "revised", "refused", "flagged"]
    violations: list[Violation] = Field(
        description="Violations of the returned response (the original's when flagged or refused)."
    )
    abstained: bool = Field(
        False,
        description="The model critic could not decide on something (see rounds); with "
        "on_abstain 'flag' the response is flagged for review.",
    )
    rounds: list[GuardRound]
    timings_ms: dict[str, float]
    policy: dict[str, str]


@dataclass
class GuardState:
    """One response's progress through the guard's rounds."""

    conversation: list[Message]
    original: str
    current: str
    rng: random.Random
    rounds: list[GuardRound] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    first_violations: list[Violation] | None = None
    critiques: dict[str, Critique] = field(default_factory=dict)
    request_p: float | None = None
    request_asked: bool = False
    rules_ms: float = 0.0
    model_ms: float = 0.0
    done: bool = False
