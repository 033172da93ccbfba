"""The constitution data model: the source of truth for ``schemas/constitution.schema.json``.

A constitution is data, never code. Domain reviewers edit YAML or JSON; these models say what is valid, and the
JSON Schema generated from them (``cai constitutions schema``) lets editors and plain ``jsonschema`` check the same.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)

ID_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"

NonEmpty = Annotated[str, Field(min_length=1)]


class Phase(str, Enum):
    """Where a principle is used: SL-CAI critique/revision, RL-CAI comparisons, the runtime guard."""

    sl = "sl"
    rl = "rl"
    runtime = "runtime"


class Stance(str, Enum):
    """How a constitution trades harmlessness against helpfulness when they pull apart."""

    harmlessness_first = "harmlessness-first"
    balanced = "balanced"
    helpfulness_first = "helpfulness-first"


class Message(BaseModel):
    """One turn of a conversation, in the shape TRL and chat templates use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"] = Field(description="Who speaks this turn.")
    content: str = Field(description="What is said.")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CritiqueExample(_Strict):
    """A worked critique/revision example shown to the model before its own task (few-shot)."""

    conversation: list[Message] = Field(
        min_length=1, description="The conversation up to the response, ending with a user turn."
    )
    response: NonEmpty = Field(description="The assistant response that is critiqued.")
    critique: NonEmpty = Field(description="A critique of the response against the principle.")
    revision: NonEmpty = Field(
        description="The revised response; identical to `response` when nothing needed changing."
    )
    needs_revision: bool = Field(True, description="False for examples that teach 'no change needed'.")

    @field_validator("conversation")
    @classmethod
    def _ends_with_user(cls, value: list[Message]) -> list[Message]:
        if value[-1].role != "user":
            raise ValueError("the conversation must end with a user turn")
        return value


class ComparisonExample(_Strict):
    """A labelled pair shown to a judge before its own comparison (few-shot)."""

    conversation: list[Message] = Field(min_length=1, description="The conversation, ending with a user turn.")
    better: NonEmpty = Field(description="The reply that follows the principle better.")
    worse: NonEmpty = Field(description="The reply that follows it worse.")


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str, *, ignore_case: bool = True) -> Any:
    """Compile a deployer's regular expression with RE2, whose matching time is linear in the text.

    Python's ``re`` backtracks, so a pattern like ``(a+)+$`` can take hours on a 40-character response; RE2 cannot.
    A pattern RE2 does not support (backreferences, lookaround) is a ``ValueError`` that says so.
    """
    import re2

    options = re2.Options()
    options.log_errors = False  # RE2 would print its own copy of the error to stderr
    options.case_sensitive = not ignore_case
    options.max_mem = 8 << 20
    try:
        return re2.compile(pattern, options=options)
    except re2.error as exc:
        detail = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        unsupported = any(k in pattern for k in ("(?=", "(?!", "(?<=", "(?<!")) or re.search(r"\\[1-9]", pattern)
        hint = (
            "; rules use RE2 syntax (linear-time): no lookaround or backreferences"
            if unsupported
            else "; rules use RE2 syntax"
        )
        raise ValueError(f"not a valid regular expression: {detail}{hint}") from None


class Rule(_Strict):
    """A deterministic, checkable policy: a regular expression a response must not, or must, contain.

    A ``require`` rule with a ``when`` pattern applies only to responses (or conversations) that match ``when``:
    for example "a response that names a dose must tell the reader to consult a clinician".
    """

    id: str = Field(pattern=ID_PATTERN, description="Stable id, unique within the constitution.")
    kind: Literal["forbid", "require"] = Field(
        description="`forbid`: the pattern must not occur; `require`: it must occur (when `when` matches)."
    )
    pattern: NonEmpty = Field(
        description=(
            "A regular expression in RE2 syntax, searched in the response. RE2 matches in linear time, so no pattern can "
            "hang the guard; it has no backreferences and no lookaround (`(?=`, `(?!`, `(?<=`, `(?<!`). Classes such "
            "as `\\d`, `\\w` and `\\b` are ASCII; write `(?s)` for a dot that matches newlines."
        )
    )
    when: str | None = Field(
        None,
        description="Optional regular expression (RE2 syntax, as `pattern`); the rule applies only where it "
        "matches (see `when_in`).",
    )
    when_in: Literal["response", "conversation", "either"] = Field("response", description="Where `when` is searched.")
    ignore_case: bool = Field(True, description="Match without regard to case.")
    message: NonEmpty = Field(description="What is wrong, shown to users and written to audit records.")
    fix: str | None = Field(
        None,
        description=(
            "Repair without a model. For `forbid`: text that replaces each match (e.g. '[redacted]'). "
            "For `require`: text appended to the response."
        ),
    )
    fix_at: Literal["end", "start"] = Field(
        "end", description="For `require`: where the fix goes (`start` for what must come first, e.g. emergencies)."
    )
    severity: Literal["low", "medium", "high"] = Field("medium", description="How serious a violation is.")
    _compiled: Any = PrivateAttr(None)

    @field_validator("pattern", "when")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            compile_pattern(value, ignore_case=False)
        return value

    def compiled(self) -> tuple[Any, Any | None]:
        """The rule's ``pattern`` and ``when`` compiled by RE2 (linear-time matching), kept with the rule: a policy
        with more rules than the shared cache holds does not recompile on every response. (Read from the private
        dict directly: this runs for every rule on every response.)"""
        key = (self.pattern, self.when, self.ignore_case)
        private = self.__pydantic_private__
        cached = private.get("_compiled") if private is not None else None
        if cached is None or cached[0] != key:  # a model_copy with another pattern does not reuse the old one
            cached = (
                key,
                (
                    compile_pattern(self.pattern, ignore_case=self.ignore_case),
                    compile_pattern(self.when, ignore_case=self.ignore_case) if self.when else None,
                ),
            )
            if private is not None:
                private["_compiled"] = cached
        return cached[1]


class Principle(_Strict):
    """One principle of a constitution."""

    id: str = Field(pattern=ID_PATTERN, description="Stable id, e.g. `harm-003` or `med-001`; never reuse one.")
    title: str | None = Field(None, description="A short human-readable name.")
    critique_request: str | None = Field(
        None, description="Asks the model to critique a response against this principle (SL and runtime)."
    )
    revision_request: str | None = Field(
        None, description="Asks the model to rewrite the response so it follows this principle."
    )
    comparison: str | None = Field(
        None, description="A pairwise question for judges: which of two replies follows the principle better."
    )
    violation_question: str | None = Field(
        None,
        description="A yes/no question about one reply where Yes means the reply breaks this principle; "
        "verdict-only critics (the guard's screening, evaluation) ask it and read P(Yes).",
    )
    phases: list[Phase] = Field(
        default_factory=lambda: [Phase.sl, Phase.rl, Phase.runtime],
        min_length=1,
        description="Where the principle is used.",
    )
    tags: list[str] = Field(default_factory=list, description="Free-form labels: topics, domains, traits.")
    weight: float = Field(1.0, gt=0, description="Relative chance of being drawn when principles are sampled.")
    authority: int = Field(
        50, ge=0, le=100, description="Precedence when principles conflict: the higher authority wins."
    )
    conflicts_with: list[str] = Field(
        default_factory=list,
        description="Ids or tags of principles this one can pull against; lint checks that authority settles it.",
    )
    examples: list[CritiqueExample] = Field(default_factory=list, description="Few-shot critique/revision examples.")
    comparison_examples: list[ComparisonExample] = Field(
        default_factory=list, description="Few-shot labelled pairs for judges."
    )
    rules: list[Rule] = Field(default_factory=list, description="Deterministic checks that enforce this principle.")
    red_team: list[Annotated[str, StringConstraints(strip_whitespace=True, min_length=8)]] = Field(
        default_factory=list,
        description="Requests, in the authors' own words, that this principle tells an assistant to decline. Used only "
        "by `cai classifiers build`, which rewrites them into this principle's harmful training requests (principles "
        "without any share the build's harmful example set); give at least a few different targets, and never "
        "evaluation prompts (a near-copy of one is refused). Phase 1, phase 2 and the guard do not read them.",
    )
    checks: list[str] = Field(
        default_factory=list,
        description="Registry names of deterministic critics (usually from the plugin shipping this constitution) "
        "that check this principle without a model; a reviser registered under the same name repairs it.",
    )

    def applies_to(self, phase: Phase | str) -> bool:
        return Phase(phase) in self.phases


class Constitution(_Strict):
    """A named, versioned set of principles."""

    schema_: str | None = Field(None, alias="$schema", description="Path or URL of the JSON Schema, for editors.")
    name: str = Field(pattern=NAME_PATTERN, description="The name users select it by, e.g. `harmless`.")
    version: str = Field(min_length=1, description="The constitution's own version; bump it on every change.")
    description: str = Field("", description="What the constitution is for.")
    extends: Annotated[
        list[str],
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
    ] = Field(
        default_factory=list,
        description=(
            "Parent constitutions (registered names, or paths relative to this file). Parents merge first, in "
            "order; principles here override a parent's principle with the same id."
        ),
    )
    remove: list[str] = Field(default_factory=list, description="Ids of inherited principles to drop.")
    stance: Stance = Field(Stance.balanced, description="How harmlessness and helpfulness are traded.")
    principles: list[Principle] = Field(default_factory=list, description="The principles.")
    examples: list[CritiqueExample] = Field(
        default_factory=list, description="Few-shot critique/revision examples shared by all principles."
    )
    comparison_examples: list[ComparisonExample] = Field(
        default_factory=list, description="Few-shot labelled pairs shared by all principles."
    )

    @field_validator("extends", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _unique_ids(self) -> Constitution:
        seen: dict[str, int] = {}
        for index, principle in enumerate(self.principles):
            if principle.id in seen:
                raise ValueError(
                    f"duplicate principle id {principle.id!r} (principles[{seen[principle.id]}] and "
                    f"principles[{index}]); ids must be unique"
                )
            seen[principle.id] = index
        return self

    def principle(self, principle_id: str) -> Principle:
        for principle in self.principles:
            if principle.id == principle_id:
                return principle
        known = ", ".join(p.id for p in self.principles)
        raise KeyError(f"constitution {self.name!r} has no principle {principle_id!r}; it has: {known}")

    def for_phase(self, phase: Phase | str) -> list[Principle]:
        return [p for p in self.principles if p.applies_to(phase)]

    def content_hash(self) -> str:
        """A sha256 over the canonical JSON of the constitution (without ``$schema``), for provenance."""
        data = self.model_dump(mode="json", exclude={"schema_"}, by_alias=True)
        for principle in data["principles"]:
            # fields added after hashes were recorded count only when used, so unchanged constitutions keep theirs
            if not principle["red_team"]:
                del principle["red_team"]
        blob = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def constitution_json_schema() -> dict:
    """The JSON Schema of a constitution file, as committed in ``schemas/constitution.schema.json``."""
    schema = Constitution.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://cai-engine.dev/schemas/constitution.schema.json"
    schema["title"] = "cai-engine constitution"
    return schema
