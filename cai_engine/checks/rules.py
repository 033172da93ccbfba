"""Deterministic rule checks and repairs: a constitution's ``rules`` applied without a model (milliseconds).

Patterns are searched in the folded text (``textnorm.fold``: Unicode respellings undone), and evidence and repairs are
taken from, and made in, the text as it was sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from cai_engine.constitution.model import Message, Principle, Rule
from cai_engine.records import Violation
from cai_engine.text import textnorm

# The name a constitution's own rules go by: the essential critic and reviser that apply them (registered by the
# built-in rules plugin, which the guard cannot run without) and the ``critic`` of every violation they find.
RULES = "rules"


def _conversation_text(conversation: Sequence[Message]) -> str:
    return "\n".join(m.content for m in conversation)


def rule_applies(rule: Rule, conversation: Sequence[Message], response: str) -> bool | str:
    """Whether the rule's ``when`` condition holds (True when it has none); returns the matched text as evidence."""
    _, when = rule.compiled()
    if when is None:
        return True
    places = {
        "response": [response],
        "conversation": [_conversation_text(conversation)],
        "either": [response, _conversation_text(conversation)],
    }[rule.when_in]
    for text in places:
        found = textnorm.search(when, rule.when or "", text)
        if found:
            match, view = found
            return view.original_of(match) or True
    return False


def check_rule(
    rule: Rule, principle: Principle, conversation: Sequence[Message], response: str, critic: str
) -> Violation | None:
    applies = rule_applies(rule, conversation, response)
    if not applies:
        return None
    pattern, _ = rule.compiled()
    found = textnorm.search(pattern, rule.pattern, response)
    if rule.kind == "forbid" and found:
        evidence = found[1].original_of(found[0])
    elif rule.kind == "require" and not found:
        evidence = "" if applies is True else applies
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
    principle: Principle, conversation: Sequence[Message], response: str, critic: str = RULES
) -> list[Violation]:
    return [
        v for rule in principle.rules if (v := check_rule(rule, principle, conversation, response, critic)) is not None
    ]


def repair(principle: Principle, conversation: Sequence[Message], response: str) -> tuple[str, list[str]]:
    """Apply each violated rule's ``fix``. Returns the new text and the ids of rules that had no fix."""
    text = response
    unfixed: list[str] = []
    for rule in principle.rules:
        if check_rule(rule, principle, conversation, text, RULES) is None:
            continue
        if rule.fix is None:
            unfixed.append(rule.id)
        elif rule.kind == "forbid":
            pattern, _ = rule.compiled()
            text = textnorm.substitute(pattern, rule.pattern, text, rule.fix or "")
        else:
            gap = "\n\n" if "\n" in text else " "
            if rule.fix_at == "start":
                text = rule.fix.strip() + gap + text.lstrip()
            else:
                text = text.rstrip() + gap + rule.fix.strip()
    return text, unfixed
