"""Score a deterministic check (a plugin's critic and reviser) on a labelled file of assistant answers.

A case file is JSONL, one answer per line::

    {"id": "phi-01", "prompt": "...", "response": "...", "violates": true, "why": "...",
     "kind": "full-name", "evidence": ["Karen Whitfield"], "keep": ["starts chemotherapy"]}

``prompt`` (or ``conversation``, a list of messages) is what the person asked; ``violates`` is the label; ``why``
says why, for the people who read the file. ``evidence`` lists the words that carry the violation and ``keep`` the
words a repair must not lose: they are the second, independent test of a repair (written by the person who labelled
the case, not derived from the check). A repair succeeds when the check passes on the repaired answer, none of the
evidence is left, and everything in ``keep`` still is.

The detector is scored by precision, recall and F1, each with n and a 95% interval; with a model, the principle's
model critic (the optional model tier) is scored on the same cases.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cai_engine.constitution.model import Message, Principle
from cai_engine.errors import ConfigError, describe_validation
from cai_engine.models.options import with_model
from cai_engine.plugins.refs import ComponentRef
from cai_engine.records import CritiqueTask, RevisionTask
from cai_engine.stats import rate


class CheckCase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    prompt: str | None = None
    conversation: list[Message] | None = None
    response: str
    violates: bool
    why: str = Field(min_length=1, description="Why the label is what it is.")
    kind: str = Field("", description="Which kind of case this is (the hard case it represents).")
    evidence: list[str] = Field(
        default_factory=list, description="Words that carry the violation (gone after a repair)."
    )
    keep: list[str] = Field(default_factory=list, description="Words a repair must keep.")

    @model_validator(mode="after")
    def _one_question(self) -> CheckCase:
        if self.prompt is not None and self.conversation is not None:
            raise ValueError("give either prompt or conversation, not both")
        return self

    def messages(self) -> list[Message]:
        if self.conversation is not None:
            return list(self.conversation)
        return [Message(role="user", content=self.prompt or "")]


def load_cases(path: str | Path) -> list[CheckCase]:
    from cai_engine.files.inputs import iter_lines

    cases, seen = [], set()
    for number, line in iter_lines(Path(path)):
        if not line.strip():
            continue
        try:
            case = CheckCase.model_validate(json.loads(line))
        except ValueError as exc:  # JSON and validation errors alike
            message = describe_validation(exc, first_only=True) if isinstance(exc, ValidationError) else str(exc)
            raise ConfigError(f"{path}: line {number}: {message}") from None
        if case.id in seen:
            raise ConfigError(f"{path}: line {number}: id {case.id!r} appears twice")
        seen.add(case.id)
        cases.append(case)
    if not cases:
        raise ConfigError(f"{path}: has no cases")
    return cases


def principle_of_check(registry: Any, check: str) -> Principle:
    """The principle that names ``check`` in its ``checks`` list (the first registered constitution that has one)."""
    for name in registry.constitution_names():
        try:
            constitution = registry.constitution(name)
        except Exception:  # a broken constitution is reported by `cai constitutions list`, not here
            continue
        for principle in constitution.principles:
            if check in principle.checks:
                return principle
    raise ConfigError(f"no registered constitution has a principle that uses the check {check!r}")


def _last_user(case: CheckCase) -> str:
    users = [m.content for m in case.messages() if m.role == "user"]
    return users[-1] if users else ""


def _contains(text: str, needle: str) -> bool:
    return needle.casefold() in text.casefold()


def _metrics(labels: list[bool], flags: list[bool | None]) -> dict[str, Any]:
    pairs = [(y, f) for y, f in zip(labels, flags) if f is not None]
    tp = sum(1 for y, f in pairs if y and f)
    fp = sum(1 for y, f in pairs if not y and f)
    fn = sum(1 for y, f in pairs if y and not f)
    tn = sum(1 for y, f in pairs if not y and not f)
    precision = rate([y for y, f in pairs if f])
    recall = rate([bool(f) for y, f in pairs if y])
    p, r = precision["rate"], recall["rate"]
    f1 = (
        round(2 * p * r / (p + r), 4)
        if p is not None and r is not None and p + r
        else (0.0 if p is not None and r is not None else None)
    )
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": rate([y == f for y, f in pairs]),
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "abstained": len(labels) - len(pairs),
    }


def evaluate_check(
    registry: Any,
    check: str,
    cases: list[CheckCase],
    *,
    runtime: Any = None,
    model: Any = None,
    repair: bool = True,
    model_critic: ComponentRef | None = None,
    classifier: Any = None,
) -> dict[str, Any]:
    """Precision, recall and F1 of the check as registered (``deterministic``; for a check its plugin backs with a
    classifier: the rules, then the classifier, and the rules alone as ``rules``), of ``model_critic`` on the
    principle given ``model`` (by default the ``model`` critic in verdict-only mode, given ``model`` by the one
    rule), and how often the check's own repair succeeds on the violating answers it flags. Given ``classifier`` (a loaded output
    classifier: ``predict`` and ``threshold``), also the classifier alone and the check and classifier together (a
    case is flagged when either flags it: the classifier adds recall on wording the check was not written for)."""
    principle = principle_of_check(registry, check)
    critic = registry.critic(check)()
    tasks = [CritiqueTask(conversation=c.messages(), response=c.response, principle=principle) for c in cases]
    began = time.perf_counter()
    critiques = critic.critique(tasks)
    elapsed = time.perf_counter() - began
    flags = [c.needs_revision for c in critiques]
    labels = [c.violates for c in cases]
    result: dict[str, Any] = {
        "check": check,
        "principle": principle.id,
        "cases": len(cases),
        "violating": sum(labels),
        "deterministic": {
            **_metrics(labels, flags),
            "ms_per_case": round(elapsed * 1000 / len(cases), 3),
            "errors": [
                {"id": c.id, "label": c.violates, "flagged": f, "kind": c.kind, "why": c.why}
                for c, f in zip(cases, flags)
                if f != c.violates
            ],
        },
    }
    active = getattr(critic, "classifier_active", None)
    if active is not None and active():
        # a check backed by the classifier its plugin ships: its rules are also scored alone, so a regression in
        # them shows even where the classifier (trained on the shipped cases) would cover it
        rules = critic.rules_only().critique(tasks)
        result["backed_by_classifier"] = str(critic.loaded_folder())
        result["rules"] = _metrics(labels, [c.needs_revision for c in rules])
    if classifier is not None:
        began = time.perf_counter()
        scores = classifier.predict([_last_user(c) for c in cases], [c.response for c in cases])
        classified = [row["violation"] > classifier.threshold() for row in scores]
        ms = round((time.perf_counter() - began) * 1000 / len(cases), 3)
        result["classifier"] = {**_metrics(labels, classified), "ms_per_case": ms}
        result["check_or_classifier"] = _metrics(labels, [bool(a or b) for a, b in zip(flags, classified)])
    if repair:
        result["repair"] = _repairs(registry, check, principle, critic, cases, flags)
    if model is not None:
        ref = model_critic or ComponentRef(name="model", options={"verdict_only": True})
        result["model"] = _model_tier(
            with_model(ref, "critic", runtime, model), runtime, model, principle, cases, labels
        )
    return result


def _repairs(registry, check, principle, critic, cases, flags) -> dict[str, Any]:
    try:
        reviser = registry.reviser(check)()
    except Exception:
        return {"available": False}
    outcomes, failures, handed_over = [], [], 0
    for case, flagged in zip(cases, flags):
        if not (case.violates and flagged):
            continue
        task = RevisionTask(conversation=case.messages(), response=case.response, principle=principle)
        revision = reviser.revise([task])[0]
        if not revision.accepted:
            handed_over += 1
            outcomes.append(False)
            failures.append({"id": case.id, "reason": f"handed over: {revision.reason}"})
            continue
        text = revision.text
        again = critic.critique([CritiqueTask(conversation=case.messages(), response=text, principle=principle)])[0]
        left = [e for e in case.evidence if _contains(text, e)]
        lost = [k for k in case.keep if not _contains(text, k)]
        ok = not again.needs_revision and not left and not lost
        outcomes.append(ok)
        if not ok:
            failures.append(
                {
                    "id": case.id,
                    "still_flagged": again.needs_revision,
                    "evidence_left": left,
                    "lost": lost,
                    "repaired": text,
                }
            )
    return {"available": True, "success": rate(outcomes), "handed_over": handed_over, "failures": failures}


def _model_tier(ref: ComponentRef, runtime, model, principle, cases, labels) -> dict[str, Any]:
    critic = ref.build("critic", runtime)
    tasks = [CritiqueTask(conversation=c.messages(), response=c.response, principle=principle) for c in cases]
    began = time.perf_counter()
    critiques = critic.critique(tasks)
    elapsed = time.perf_counter() - began
    flags = [c.needs_revision for c in critiques]
    return {"model": str(model), **_metrics(labels, flags), "s_per_case": round(elapsed / len(cases), 2)}


def summary_table(results: list[dict[str, Any]]) -> list[str]:
    """A Markdown table: one row per check (and tier)."""
    lines = [
        "| check | tier | n | precision | recall | F1 | repair success |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        backed = "backed_by_classifier" in result
        tiers = [("check: rules, then classifier" if backed else "deterministic", result["deterministic"])] + [
            ({"rules": "rules alone"}.get(tier, tier.replace("_", " ")), result[tier])
            for tier in ("rules", "classifier", "check_or_classifier", "model")
            if tier in result
        ]
        for n, (tier, entry) in enumerate(tiers):
            repair = result.get("repair", {}) if n == 0 else {}  # the repair belongs to the check as registered
            lines.append(
                f"| {result['check']} | {tier} | {result['cases']} | {_cell(entry['precision'])} | "
                f"{_cell(entry['recall'])} | {entry['f1'] if entry['f1'] is not None else 'n/a'} | "
                f"{_cell(repair.get('success')) if repair.get('available') else 'n/a'} |"
            )
    return lines


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("rate") is None:
        return "n/a"
    low, high = entry["ci95"]
    return f"{entry['rate']:.2f} ({entry['k']:g}/{entry['n']}, {low:.2f}-{high:.2f})"


__all__ = ["CheckCase", "evaluate_check", "load_cases", "principle_of_check", "summary_table"]
