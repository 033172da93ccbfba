"""Deterministic rule checks and repairs: a constitution's ``rules`` applied without a model (milliseconds)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .records import Violation
from .schema import Message, Principle, Rule


def _conversation_text(conversation: Sequence[Message]) -> str:
    return "\n".join(m.content for m in conversation)


def rule_applies(rule: Rule, conversation: Sequence[Message], response: str) -> Any:
    """Whether the rule's ``when`` condition holds (True when it has none); returns the match as evidence."""
    _, when = rule.compiled()
    if when is None:
        return True
    places = {
        "response": [response],
        "conversation": [_conversation_text(conversation)],
        "either": [response, _conversation_text(conversation)],
    }[rule.when_in]
    for text in places:
        match = when.search(text)
        if match:
            return match
    return False


def check_rule(
    rule: Rule, principle: Principle, conversation: Sequence[Message], response: str, critic: str
) -> Violation | None:
    applies = rule_applies(rule, conversation, response)
    if not applies:
        return None
    pattern, _ = rule.compiled()
    match = pattern.search(response)
    if rule.kind == "forbid" and match:
        evidence = match.group(0)
    elif rule.kind == "require" and not match:
        evidence = "" if applies is True else applies.group(0)
    else:
        return None
    return Violation(
        principle_id=principle.id,
        rule_id=rule.id,
        evidence=evidence,
        message=rule.message,
        severity=rule.severity,
        critic=critic,
    )


def check_principle(
    principle: Principle, conversation: Sequence[Message], response: str, critic: str = "rules"
) -> list[Violation]:
    return [
        v for rule in principle.rules if (v := check_rule(rule, principle, conversation, response, critic)) is not None
    ]


def repair(principle: Principle, conversation: Sequence[Message], response: str) -> tuple[str, list[str]]:
    """Apply each violated rule's ``fix``. Returns the new text and the ids of rules that had no fix."""
    text = response
    unfixed: list[str] = []
    for rule in principle.rules:
        if check_rule(rule, principle, conversation, text, "rules") is None:
            continue
        if rule.fix is None:
            unfixed.append(rule.id)
        elif rule.kind == "forbid":
            pattern, _ = rule.compiled()
            replacement = rule.fix or ""
            text = pattern.sub(lambda _m, r=replacement: r, text)
        else:
            gap = "\n\n" if "\n" in text else " "
            if rule.fix_at == "start":
                text = rule.fix.strip() + gap + text.lstrip()
            else:
                text = text.rstrip() + gap + rule.fix.strip()
    return text, unfixed
