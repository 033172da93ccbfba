"""The runtime guard's records: what each round found, and the decision it returns (a response's progress between
rounds is the guard's own state, :class:`cai_engine.guard.loop.GuardState`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cai_engine.records.tasks import Violation


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
        "value; from a classifier critic, its probability re-centred on its threshold, which maps to 0.5, or where "
        "it escalated the request, the slower critic's value).",
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
