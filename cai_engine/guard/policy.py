"""Policy-compliance configuration: which constitutions a deployment applies, with local overrides, and how the
runtime guard acts on a violation. A pydantic model, the source of ``schemas/policy.schema.json``.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cai_engine.checks.rules import RULES
from cai_engine.constitution.load import RawConstitution, check_counts, json_path, lint, resolve
from cai_engine.constitution.model import NAME_PATTERN, Constitution, Phase, Principle, Stance
from cai_engine.errors import ConfigError, ConstitutionError
from cai_engine.files.inputs import parse_document, read_text
from cai_engine.models.runtime import DEFAULT_MODEL, ModelRef
from cai_engine.plugins.refs import ComponentRef

NO_MODEL = "none"  # `model: none`: no model may ever run in the guard's request path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PrincipleOverride(_Strict):
    """Per-deployment changes to one inherited principle."""

    weight: float | None = Field(None, gt=0, description="New weight.")
    authority: int | None = Field(None, ge=0, le=100, description="New authority (precedence).")
    phases: list[Phase] | None = Field(None, min_length=1, description="New phases.")


class GuardSettings(_Strict):
    action: Literal["revise", "refuse", "flag"] = Field(
        "revise", description="On a violation: revise until compliant, refuse with an explanation, or only flag."
    )
    max_rounds: int = Field(2, ge=0, le=10, description="Critique/revision rounds before giving up.")
    on_failure: Literal["refuse", "return"] = Field(
        "refuse", description="If still not compliant after max_rounds: refuse, or return the best revision flagged."
    )
    model_critics: bool = Field(True, description="Also critique with the model (rule critics always run first).")
    model_principles: Literal["all"] | int = Field(
        "all", description="Which runtime principles the model critiques each round: 'all', or N drawn by weight."
    )
    threshold: float = Field(0.5, gt=0, lt=1, description="P(needs revision) above which the model critic flags.")
    screen: Literal["each", "combined", "request"] = Field(
        "each",
        description="'each': one model verdict per principle and response; 'combined': one verdict per "
        "response against all the principles at once (listed first, so the prefix is shared), "
        "then the letter of the principle it breaks, only where it fires; 'request': one verdict "
        "on the person's request alone (`request_question`, after worked examples), and where the "
        "request asks for harm, a reply that does not refuse is a violation of the principle the "
        "critic names. Rules and plugin checks run on every response either way. 'combined' and "
        "'request' need a critic with `screen` (or `screen_requests` and `attribute`) methods, as "
        "the built-in `model` critic has.",
    )
    request_question: str | None = Field(
        None,
        description="For screen 'request': the Yes/No question about the request (Yes = it asks for harm). "
        "None: the built-in question.",
    )
    request_threshold: float = Field(
        0.5, gt=0, lt=1, description="For screen 'request': P(Yes) above which a request counts as asking for harm."
    )
    request_refusal: bool = Field(
        False,
        description="For screen 'request': also read how likely the critic model is to decline the request itself "
        "(P(its own reply opens with a refusal), from log-probs) and combine it with the screen's P(Yes) by "
        "noisy-or, 1 - (1 - P(Yes)) * (1 - P(declines)); the request asks for harm when that is above "
        "request_threshold, which must then be calibrated for the combined value (bench/request_screen.py "
        "--request-refusal). A model that declines a request it calls harmless, or the reverse, is a second "
        "opinion the question alone misses.",
    )
    reply_contrast: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="For screen 'request': also put every reply that does not open by declining, whatever its "
        "request, beside a plain refusal (`contrast_refusal`) before the policy's judge, both orders, asking "
        "`contrast_question`; where P(the refusal is the better reply) is above this, the reply breaks the "
        "principle the critic names. It catches harm that lives in the answer to an innocent-sounding request. "
        "None: off. Calibrate it on harmless answers (bench/reply_contrast.py), not on the cases you test on.",
    )
    contrast_question: str | None = Field(
        None,
        description="For reply_contrast: the judge's pairwise question. None: the built-in one (the less harmful "
        "reply that still does as much as it safely can).",
    )
    contrast_refusal: str = Field(
        "I'm sorry, but I can't help with that.",
        min_length=1,
        description="For reply_contrast: the refusal each reply is compared with.",
    )
    on_abstain: Literal["flag", "revise", "pass"] = Field(
        "flag",
        description="When the model critic cannot give a verdict: flag the response, revise it as if it broke "
        "the principle, or let it pass. Recorded in the audit either way.",
    )
    refusal: str = Field(
        "I can't help with that as asked, because it would conflict with: {principles}. I'm happy to help with a "
        "safer version of the request.",
        description="Refusal text; {principles} becomes the titles of the violated principles (the only "
        "placeholder; write {{ and }} for literal braces).",
    )
    seed: int = Field(0, description="Seeds principle draws when model_principles is a number.")

    @field_validator("refusal")
    @classmethod
    def _one_placeholder(cls, value: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            raise ValueError(f"not a valid template ({exc}); write {{{{ and }}}} for literal braces") from None
        unknown = sorted({f for f in fields if f != "principles"})
        if unknown:
            raise ValueError(
                f"unknown placeholder {{{unknown[0]}}}; the only one is {{principles}} (write {{{{ and "
                "}} for literal braces)"
            )
        return value

    @model_validator(mode="after")
    def _request_screen_options(self) -> GuardSettings:
        if self.reply_contrast is not None and self.screen != "request":
            raise ValueError(f"reply_contrast works with screen 'request', not {self.screen!r}")
        if self.request_refusal and self.screen != "request":
            raise ValueError(f"request_refusal works with screen 'request', not {self.screen!r}")
        return self


class InputSettings(_Strict):
    """Checks on the person's message before it reaches the model (input rails)."""

    check: bool = Field(
        False,
        description="Run the runtime principles' rules and plugin checks on the last user "
        "message (deterministic only, milliseconds).",
    )
    action: Literal["refuse", "redact", "flag"] = Field(
        "refuse",
        description="On a violation: answer with the refusal and never call the model; redact it with the "
        "rules' and checks' repairs and send the redacted message (refuse what cannot be "
        "repaired); or only flag it in the response and the audit.",
    )
    non_text: Literal["pass", "refuse"] = Field(
        "pass",
        description="Message parts the input rail cannot read (images, audio, files, any part type it does not "
        "know): pass them to the model unchecked, or refuse the request with an error naming the part. Applies "
        "whether or not `check` is on; a part is never dropped.",
    )


class AuditSettings(_Strict):
    path: str | None = Field(
        None,
        description="JSONL file every guard decision is appended to (relative paths are "
        "relative to the policy file). None: no file, events still fire.",
    )
    include_text: bool = Field(True, description="Write the conversation and responses; off keeps only hashes.")


class Policy(_Strict):
    """One deployment's policy."""

    schema_: str | None = Field(None, alias="$schema", description="Path or URL of the JSON Schema, for editors.")
    name: str = Field(pattern=NAME_PATTERN, description="The policy's name, written to audit records.")
    version: str = Field("1", min_length=1, description="Bump on every change; audit records carry it.")
    description: str = ""
    constitutions: list[str] = Field(
        min_length=1,
        description="Constitutions to combine (names or paths), in order; "
        "a later one overrides an earlier principle by id.",
    )
    stance: Stance | None = Field(None, description="Override the combined constitution's stance.")
    disable: list[str] = Field(default_factory=list, description="Principle ids to switch off.")
    disable_tags: list[str] = Field(default_factory=list, description="Switch off every principle with these tags.")
    add: list[Principle] = Field(default_factory=list, description="Principles added inline for this deployment.")
    override: dict[str, PrincipleOverride] = Field(
        default_factory=dict, description="Changes to inherited principles, by id."
    )
    model: ModelRef = Field(
        DEFAULT_MODEL,
        description="The model for every role that does not name its own. `none`: no model may ever run in the "
        "guard's request path: rules and plugin checks only (guard.model_critics is then false), and a reply they "
        "cannot repair ends as guard.on_failure says instead of going to a model reviser; `cai policy validate` "
        "names each rule without a fix and each repair that could fail, and fails unless guard.on_failure is "
        "written out. (A model folder called none is ./none.)",
    )
    critic: ComponentRef = Field(default_factory=lambda: ComponentRef(name="model"))
    reviser: ComponentRef = Field(default_factory=lambda: ComponentRef(name="model"))
    judge: ComponentRef = Field(default_factory=lambda: ComponentRef(name="logprob"))
    guard: GuardSettings = Field(default_factory=GuardSettings)
    input: InputSettings = Field(default_factory=InputSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)

    @field_validator("model", mode="before")
    @classmethod
    def _none_spelling(cls, value: Any) -> Any:
        return NO_MODEL if isinstance(value, str) and value.strip().lower() == NO_MODEL else value

    @model_validator(mode="after")
    def _model_free(self) -> Policy:
        """``model: none`` turns the model critic off unless the policy asks for it, which is then a contradiction;
        so is a role that names its own model."""
        if not self.model_free:
            return self
        if "model_critics" not in self.guard.model_fields_set:
            self.guard.model_critics = False
        elif self.guard.model_critics:
            raise ValueError(
                "model: none, but guard.model_critics is true, which needs a model critic; set it to false, or "
                "name a model"
            )
        for role in ("critic", "reviser", "judge"):
            named = getattr(self, role).options.get("model")
            if named is not None:
                raise ValueError(
                    f"model: none, but {role}.options.model names {named!r}; remove it, or name the model at the top"
                )
        return self

    @property
    def model_free(self) -> bool:
        """True when the policy says no model may run in the guard's request path (``model: none``)."""
        return self.model == NO_MODEL

    def role(self, ref: ComponentRef, kind: str, runtime: Any, **defaults: Any) -> ComponentRef:
        """``ref`` with the policy's model filled in, by the one rule every stage uses (see ``with_model``).

        With ``model: none`` the critic and reviser roles are the deterministic ``rules`` components whatever the
        policy names: the engine only asks the reviser for what rules and checks could not repair, and the ``rules``
        reviser declines what it cannot fix, so such a reply ends as ``guard.on_failure`` says and no model loads.
        The judge keeps its own settings (only ``Engine.compare`` uses it, never the guard without a model critic).
        """
        from cai_engine.models.options import with_model

        if not self.model_free:
            return with_model(ref, kind, runtime, self.model, **defaults)
        if kind in ("critic", "reviser"):
            return ComponentRef(name=RULES)
        return ComponentRef(name=ref.name, options=dict(ref.options))


def policy_json_schema() -> dict[str, Any]:
    schema = Policy.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://cai-engine.dev/schemas/policy.schema.json"
    schema["title"] = "cai-engine policy"
    return schema


def load_policy(source: str | os.PathLike[str] | dict[str, Any]) -> tuple[Policy, Path | None]:
    """Parse and validate a policy file or mapping; errors name the file, the JSON path and the line."""
    if isinstance(source, dict):
        data, label, base, lines = source, "<policy>", None, None
    else:
        path = Path(source)
        try:
            text = read_text(path)
        except ConstitutionError as exc:
            raise ConfigError(str(exc)) from None
        if not text.strip():
            raise ConfigError(f"{path}: the policy file is empty")
        try:
            data, lines = parse_document(text, str(path), json_only=path.suffix.lower() == ".json")
        except ConstitutionError as exc:
            raise ConfigError(str(exc)) from None
        label, base = str(path), path.parent
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: a policy must be a mapping")
    try:  # counted before anything is validated: 100,000 inline principles fail in a fraction of a second
        check_counts(data.get("add"), label, "add")
    except ConstitutionError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return Policy.model_validate(data), base
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = tuple(error["loc"])
        if not loc:  # a check across fields (model: none against the guard's settings)
            raise ConfigError(f"{label}: {error['msg'].removeprefix('Value error, ')}") from None
        where = json_path(loc)
        if lines:
            probe = loc
            while probe and probe not in lines:
                probe = probe[:-1]
            if probe in lines:
                where += f" (line {lines[probe]})"
        message = (
            "unknown key; check its spelling against schemas/policy.schema.json"
            if error["type"] == "extra_forbidden"
            else error["msg"].removeprefix("Value error, ")
        )
        raise ConfigError(f"{label}: {where}: {message}") from None


def resolve_policy(policy: Policy, registry: Any, base_dir: Path | None = None) -> Constitution:
    """The policy's effective constitution: combined, overridden, disabled and linted."""
    label = f"policy {policy.name!r}"
    data = {
        "name": policy.name,
        "version": policy.version,
        "extends": list(policy.constitutions),
        "principles": [p.model_dump(by_alias=True, exclude_defaults=False) for p in policy.add],
    }
    raw = RawConstitution(data=data, source=label, base_dir=base_dir)
    try:
        combined = resolve(raw, registry.raw_constitution)
    except ConstitutionError as exc:
        raise ConfigError(str(exc)) from None
    known = {p.id for p in combined.principles}
    for field, ids in (("disable", policy.disable), ("override", list(policy.override))):
        for pid in ids:
            if pid not in known:
                raise ConfigError(
                    f"{label}: {field} names principle {pid!r}, which none of its constitutions defines; "
                    f"known ids: {', '.join(sorted(known))}"
                )
    tags = {t for p in combined.principles for t in p.tags}
    for tag in policy.disable_tags:
        if tag not in tags:
            raise ConfigError(
                f"{label}: disable_tags names {tag!r}, which no principle carries (a typo would leave "
                f"principles on); known tags: {', '.join(sorted(tags)) or '(none)'}"
            )
    principles = []
    for principle in combined.principles:
        if principle.id in policy.disable or set(principle.tags) & set(policy.disable_tags):
            continue
        change = policy.override.get(principle.id)
        if change:
            principle = principle.model_copy(update=change.model_dump(exclude_none=True))
        principles.append(principle)
    if not principles:
        raise ConfigError(f"{label}: every principle is disabled")
    resolved = combined.model_copy(
        update={
            "principles": principles,
            "stance": policy.stance or combined.stance,
            "description": policy.description or combined.description,
        }
    )
    resolved = Constitution.model_validate(resolved.model_dump(by_alias=True))
    errors = [i for i in lint(resolved) if i.level == "error"]
    if errors:
        raise ConfigError(f"{label}: {errors[0].where}: {errors[0].message}")
    return resolved


def model_fallbacks(policy: Policy, constitution: Constitution, registry: Any) -> list[str]:
    """Where the guard would hand a reply to the model reviser because no deterministic repair is sure to remove
    the violation: a runtime rule without a ``fix``, a plugin check with no reviser of its own, a plugin check whose
    repair can decline (a plugin's reviser may hand back what it could not fix). Empty when the guard never revises
    (``action`` refuse or flag, or ``max_rounds: 0``). Model critics are not counted: with them, any principle can
    go to the model."""
    if policy.guard.action != "revise" or policy.guard.max_rounds == 0:
        return []
    revisers = set(registry.names("reviser"))
    found = []
    for principle in constitution.for_phase(Phase.runtime):
        for rule in principle.rules:
            if rule.fix is None:
                found.append(f"rule {rule.id} ({principle.id}) has no fix")
        for check in principle.checks:
            if check not in revisers or check == policy.critic.name:
                found.append(f"check {check} ({principle.id}) has no repair of its own")
            else:
                found.append(f"the repair of check {check} ({principle.id}) can decline")
    return found


def model_free_problem(policy: Policy, constitution: Constitution, registry: Any) -> str | None:
    """Why a ``model: none`` policy would need a model, or None. Without a model, a reply that rules and checks
    cannot repair ends as ``guard.on_failure`` says; the policy must say so itself (write ``on_failure`` out) before
    it validates, so that nobody expects a rewrite that will not happen."""
    if not policy.model_free:
        return None
    found = model_fallbacks(policy, constitution, registry)
    if not found or "on_failure" in policy.guard.model_fields_set:
        return None
    shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
    return (
        f"model: none, but a reply could need a model to rewrite it: {shown}. Give each rule a fix, or write "
        "guard.on_failure (refuse, or return to pass the reply on flagged) to say what happens to such a reply "
        "without a model"
    )


def unchecked_without_model(policy: Policy, constitution: Constitution) -> list[str]:
    """Ids of runtime principles that only a model critic checks (no rules, no checks), when the policy runs none:
    nothing checks them at runtime."""
    if policy.guard.model_critics:
        return []
    return [p.id for p in constitution.for_phase(Phase.runtime) if not p.rules and not p.checks]
