"""Policy-compliance configuration: which constitutions a deployment applies, with local overrides, and how the
runtime guard acts on a violation. A pydantic model, the source of ``schemas/policy.schema.json``.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from cai_engine.checks.rules import RULES
from cai_engine.constitution.load import (
    RawConstitution,
    check_counts,
    is_constitution_path,
    lint,
    locate,
    resolve_with_origins,
    schema_problems,
    unknown_checks,
)
from cai_engine.constitution.model import NAME_PATTERN, Constitution, Phase, Principle, Stance
from cai_engine.constitution.problems import (
    PolicyProblems,
    Problem,
    did_you_mean,
    json_path,
    line_of,
    problems_of,
    sort_problems,
)
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
        0.5,
        gt=0,
        lt=1,
        description="For screen 'request': P(Yes) above which a request counts as asking for harm. The classifier "
        "critic hands over its scores re-centred on its calibrated threshold, so 0.5 is that threshold there (and "
        "in a cascade, each deciding critic's own); with it, leave this at 0.5 and move the classifier's own "
        "`threshold` option, which moves its uncertain band too.",
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
        description="Run the runtime principles' rules and plugin checks on every string the model will read: "
        "every message and role, tool calls and results, and the request's `tools` (deterministic only, "
        "milliseconds).",
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
    _source: str | None = PrivateAttr(None)  # the file it was read from, for messages
    _lines: Any = PrivateAttr(None)  # that file's map from JSON paths to lines

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


def load_policy(source: str | os.PathLike[str] | dict[str, Any], *, registry: Any = None) -> tuple[Policy, Path | None]:
    """Parse and validate a policy file or mapping. Every schema problem is in the raised :class:`PolicyProblems`,
    each naming the file, the line and the JSON path, with "did you mean" for a misspelt key; given the ``registry``,
    constitution and check names it does not know are reported with them (``resolve_policy`` finds them
    otherwise, once the schema is right)."""
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
    problems = schema_problems(data, Policy, source=label, lines=lines, schema="schemas/policy.schema.json")
    if problems:
        if registry is not None:
            problems += _name_problems(data, registry, label, lines)
        raise PolicyProblems(sort_problems(problems))
    policy = Policy.model_validate(data)
    policy._source = None if isinstance(source, dict) else label
    policy._lines = lines
    return policy, base


def _name_problems(data: dict[str, Any], registry: Any, source: str, lines: Any) -> list[Problem]:
    """Constitution names and check names of a policy's raw data that the registry does not know."""
    problems: list[Problem] = []

    def add(message: str, *loc: Any) -> None:
        problems.append(Problem(message, source=source, path=json_path(loc), line=line_of(loc, lines)))

    names = data.get("constitutions")
    known = registry.constitution_names()
    for index, name in enumerate(names if isinstance(names, list) else []):
        if isinstance(name, str) and not is_constitution_path(name) and name not in known:
            add(
                f"unknown constitution {name!r}{did_you_mean(name, known, listing='known constitutions')}",
                "constitutions",
                index,
            )
    unknown_checks(data.get("add"), registry.names("critic"), "add", add)
    return problems


class _PolicyLines(Mapping[tuple[Any, ...], int]):
    """A policy file's line map seen as the constitution :func:`resolve_policy` builds from it: that constitution's
    ``extends`` is the policy's ``constitutions`` and its ``principles`` are the policy's ``add``."""

    KEYS = {"extends": "constitutions", "principles": "add"}

    def __init__(self, lines: Mapping[tuple[Any, ...], int]) -> None:
        self.lines = lines

    def __getitem__(self, key: tuple[Any, ...]) -> int:
        if key and key[0] in self.KEYS:
            return self.lines[(self.KEYS[key[0]],) + key[1:]]  # noqa: RUF005 - mypy reads (*a, b) here as 3.11 syntax
        raise KeyError(key)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        inverse = {v: k for k, v in self.KEYS.items()}
        return ((inverse[k[0]], *k[1:]) for k in self.lines if k and k[0] in inverse)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _as_policy_problem(problem: Problem, source: str) -> Problem:
    """A problem of the constitution built from a policy, told in the policy's own terms."""
    if problem.source != source:
        return problem  # in one of the constitution files it uses
    head, _, rest = problem.path.partition("[")
    path = _PolicyLines.KEYS.get(head, head) + (f"[{rest}" if rest else "")
    message = problem.message.replace("unknown parent constitution", "unknown constitution")
    message = message.replace("cannot load parent", "cannot load constitution")
    return replace(problem, path=path, message=message)


def resolve_policy(policy: Policy, registry: Any, base_dir: Path | None = None) -> Constitution:
    """The policy's effective constitution: combined, overridden, disabled and linted. Every problem found is in the
    raised :class:`PolicyProblems`: constitutions that do not exist, ids and tags no principle has, check names no
    plugin registered, lint errors; each with its file and line where the policy came from a file."""
    source = policy._source or f"policy {policy.name!r}"
    lines = policy._lines
    data = {
        "name": policy.name,
        "version": policy.version,
        "extends": list(policy.constitutions),
        "principles": [p.model_dump(by_alias=True, exclude_defaults=False) for p in policy.add],
    }
    raw = RawConstitution(
        data=data, source=source, base_dir=base_dir, lines=_PolicyLines(lines) if lines is not None else None
    )
    try:
        combined, origins = resolve_with_origins(raw, registry.raw_constitution)
    except ConstitutionError as exc:
        raise PolicyProblems([_as_policy_problem(p, source) for p in problems_of(exc)]) from None

    problems: list[Problem] = []

    def add(message: str, *loc: Any) -> None:
        problems.append(Problem(message, source=source, path=json_path(loc), line=line_of(loc, lines)))

    known = {p.id for p in combined.principles}
    for index, pid in enumerate(policy.disable):
        if pid not in known:
            hint = did_you_mean(pid, known, listing="known ids")
            add(f"names principle {pid!r}, which none of its constitutions defines{hint}", "disable", index)
    for pid in policy.override:
        if pid not in known:
            hint = did_you_mean(pid, known, listing="known ids")
            add(f"names principle {pid!r}, which none of its constitutions defines{hint}", "override", pid)
    tags = {t for p in combined.principles for t in p.tags}
    for index, tag in enumerate(policy.disable_tags):
        if tag not in tags:
            hint = did_you_mean(tag, tags, listing="known tags")
            add(
                f"names {tag!r}, which no principle carries (a typo would leave principles on){hint}",
                "disable_tags",
                index,
            )
    principles = []
    for principle in combined.principles:
        if principle.id in policy.disable or set(principle.tags) & set(policy.disable_tags):
            continue
        change = policy.override.get(principle.id)
        if change:
            principle = principle.model_copy(update=change.model_dump(exclude_none=True))
        principles.append(principle)
    if not principles and not problems:
        raise PolicyProblems([Problem("every principle is disabled", source=source)])
    resolved = combined.model_copy(
        update={
            "principles": principles,
            "stance": policy.stance or combined.stance,
            "description": policy.description or combined.description,
        }
    )
    resolved = Constitution.model_validate(resolved.model_dump(by_alias=True))
    checks = registry.names("critic") if hasattr(registry, "names") else None
    for issue in lint(resolved, checks=checks):
        if issue.level == "error":
            problems.append(_as_policy_problem(locate(issue, raw, origins), source))
    if problems:
        raise PolicyProblems(sort_problems(problems))
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
