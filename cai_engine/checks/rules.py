"""Deterministic rule checks and repairs: a constitution's ``rules`` applied without a model (milliseconds).

Patterns are searched in the folded text (``textnorm.fold``: Unicode respellings undone), and evidence and repairs are
taken from, and made in, the text as it was sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
    principle: Principle,
    conversation: Sequence[Message],
    response: str,
    critic: str = RULES,
    present: set[int] | None = None,
) -> list[Violation]:
    """The violations of ``principle``'s rules in ``response``. ``present`` (from :meth:`RuleIndex.present`, the
    indices of this principle's rules whose pattern occurs somewhere in the response) lets the rules whose outcome it
    already settles go unsearched: a ``forbid`` pattern that is absent, a ``require`` pattern that is there."""
    out = []
    for index, rule in enumerate(principle.rules):
        if present is not None and (index in present) == (rule.kind == "require"):
            continue
        violation = check_rule(rule, principle, conversation, response, critic)
        if violation is not None:
            out.append(violation)
    return out


class RuleIndex:
    """Every rule pattern of some principles in one RE2 set, so that one pass over each view of a reply says which
    patterns occur anywhere in it; only those rules (and the ``require`` rules whose pattern is absent) are then
    searched one by one for their evidence. With thousands of rules this replaces thousands of searches per reply.
    The views are the ones each rule is searched in (``textnorm.views``): the text as sent, folded, and for
    number-like patterns folded with the separators between digits dropped."""

    MIN_RULES = 16  # below this, searching each rule is as fast

    def __init__(self, principles: Sequence[Principle]) -> None:
        import re2

        options = re2.Options()
        options.log_errors = False
        options.max_mem = 64 << 20
        self._set: Any = re2.Set.SearchSet(options)
        self._first: dict[str, int] = {}
        self._number_like: list[bool] = []
        self._usable = True
        try:
            for principle in principles:
                self._first[principle.id] = len(self._number_like)
                for rule in principle.rules:
                    self._set.Add(("(?i)" if rule.ignore_case else "") + rule.pattern)
                    self._number_like.append(textnorm.number_like(rule.pattern))
            self._set.Compile()  # raises re2.error when the set is too big for max_mem
        except Exception:  # a set RE2 cannot build: every rule is searched on its own, as before
            self._usable = False
        self._any_number_like = any(self._number_like)

    def present(self, text: str) -> set[int] | None:
        """The global indices of the patterns found in some view of ``text`` (None: the set is unusable)."""
        if not self._usable:
            return None
        found: set[int] = set()
        for view in {text, textnorm.fold(text).text}:
            found.update(self._set.Match(view) or ())
        if self._any_number_like:
            digits = textnorm.fold(text, digits=True).text
            found.update(i for i in self._set.Match(digits) or () if self._number_like[i])
        return found

    def violations(
        self, principle: Principle, conversation: Sequence[Message], response: str, present: set[int] | None
    ) -> list[Violation]:
        """``check_principle`` for one of the indexed principles, with what ``present`` settled left unsearched."""
        first = self._first.get(principle.id)
        if present is None or first is None:
            return check_principle(principle, conversation, response)
        mine = {i - first for i in present if first <= i < first + len(principle.rules)}
        return check_principle(principle, conversation, response, present=mine)


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
