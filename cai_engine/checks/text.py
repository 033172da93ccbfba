"""Building blocks for deterministic domain checks that plugins ship with their constitutions.

``caveat_check`` makes a matched critic/reviser pair: the critic flags each sentence of a response that matches a
*trigger* (a dose, a return promise, a statement of law) when the response carries no *satisfying* caveat anywhere,
and each sentence that *waves the caveat away* ("you don't need a doctor"). A satisfying phrase counts only where no
negation scopes over it. The reviser drops the dismissive sentences and adds the caveat, keeping the rest of the
answer, instead of refusing. A principle names the pair in its ``checks`` list and the runtime guard runs it without a
model.

The helpers (``sentence_spans``, ``negated``, ``drop_sentences``) are for plugins that write their own checks.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

from cai_engine.plugins.components import Critic, Reviser
from cai_engine.records import Critique, Revision, Violation

BOUNDARY = re.compile(r"[.!?]+(?=\s|$)|\n+")
ABBREVIATION = re.compile(
    r"(?:^|[\s\-(])(?:(?i:Mr|Mrs|Ms|Mx|Dr|Prof|St|Sr|Jr|vs|etc|approx|No|Inc|Ltd|e\.g|i\.e)|"
    r"[A-Z])\.$"
)  # an initial: "Elena M. Rossi", "K. Nakamura"

# Negation cues, and the places where a cue does not negate what follows it.
NEGATION = re.compile(
    r"\b(?:not|no|never|nothing|nobody|none|neither|nor|without|cannot|hardly|skip|skipping|"
    r"bypass|instead of|rather than|forget about)\b|n't\b|\bno one\b",
    re.IGNORECASE,
)
# A negation that follows the words it denies: "a doctor isn't necessary", "a lawyer is overkill".
POST_NEGATION = re.compile(
    r"^[^,;:.!?]{0,25}?\b(?:(?:is|are|was|would be)(?:n't| not) (?:really |strictly )?"
    r"(?:necessary|needed|required|essential|worth it|worth paying for)|(?:is|are|would be) "
    r"(?:unnecessary|overkill|a waste|pointless|not needed))\b",
    re.IGNORECASE,
)
NOT_NEGATING = re.compile(
    r"\b(?:do not|don't|never|not) (?:hesitate|delay|wait|forget|ignore|skip|put off|be afraid)\b"
    r"|\bnot only\b|\bno later than\b|\bno matter\b|\bnot sure\b|\b(?:can't|cannot|can not|couldn't) afford\b"
    r"|\bif you (?:can't|cannot|don't|do not|aren't|are not|haven't|have not|didn't) \w+"
    r"|\b(?:is|are|isn't|aren't|was|be|as) (?:not )?(?:a )?(?:substitute|replacement) for\b"
    r"|\bnothing (?:here |in this (?:answer|reply) )?(?:replaces|substitutes for|beats)\b"
    r"|\bif (?:it|they|this|that|things?|symptoms?|the \w+|your \w+) (?:do(?:es)?n't|do(?:es)? not|won't|will not|"
    r"(?:is|are)n't|(?:is|are) not|has(?:n't| not)|have(?:n't| not)) \w+",
    re.IGNORECASE,
)
CLAUSE = re.compile(
    r"[,;:()\u2014\u2013]|\s-\s|\b(?:but|however|although|though|unless|because|so that|"
    r"whereas|while|and then|otherwise)\b|\band (?=(?:it|they|you|he|she|we|this|that)\b)",
    re.IGNORECASE,
)
SELF_DISCLAIMER = re.compile(r"\bI(?:'m| am) not (?:a |an |your )?$", re.IGNORECASE)


@functools.lru_cache(maxsize=256)
def sentence_spans(text: str) -> tuple[tuple[int, int], ...]:
    """(start, end) of each sentence, without breaking after abbreviations ("Mr.", "Dr.", "e.g.") or inside numbers.
    The guard runs several checks on one response; the split is cached."""
    return tuple(_spans(text))


def _spans(text: str) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    start = 0
    for match in BOUNDARY.finditer(text):
        if match.group(0).startswith(".") and ABBREVIATION.search(text[start : match.end()]):
            continue
        _add_span(text, start, match.end(), out)
        start = match.end()
    _add_span(text, start, len(text), out)
    return out


def _add_span(text: str, start: int, end: int, out: list[tuple[int, int]]) -> None:
    chunk = text[start:end]
    if chunk.strip():
        lead = len(chunk) - len(chunk.lstrip())
        out.append((start + lead, start + len(chunk.rstrip())))


def sentences(text: str) -> list[str]:
    """Split text into sentences, without breaking after abbreviations ("Mr.", "Dr.", "e.g.") or inside numbers."""
    return [text[a:b] for a, b in sentence_spans(text)]


def clause_head(sentence: str, start: int) -> str:
    """The words of ``sentence`` before ``start`` that are in the same clause."""
    head = sentence[:start]
    cut = 0
    for match in CLAUSE.finditer(head):
        cut = match.end()
    return head[cut:]


def negated(sentence: str, start: int, end: int | None = None) -> bool:
    """Whether a negation scopes over the words at ``start``: an odd number of negation cues earlier in the same
    clause ("you don't need a lawyer" yes; "never stop it without asking your doctor" no, two cues cancel; "if it
    doesn't improve, see a doctor" no, another clause; "don't hesitate to call your GP" no, an idiom), or, given
    ``end``, a denial just after the words ("a doctor isn't necessary")."""
    head = NOT_NEGATING.sub(" ", clause_head(sentence, start))
    if len(NEGATION.findall(head)) % 2 == 1:
        return True
    return end is not None and bool(POST_NEGATION.match(sentence[end:]))


GENERAL_QUESTION = re.compile(
    r"^\s*(?:what (?:does|do|is|are|was|were)\b(?=[^?]*\b(?:mean|means|meaning|an?|the)\b)|what does it mean to\b|"
    r"what (?:is|are) (?![^?]*\b(?:best|should|good|worth|safe|safest|better|right|buy)\b)[^?]{1,60}\?\s*$|"
    r"define\b|what happens (?:at|in|during) an?\b|how (?:does|do) an? \w+ work|who (?:was|were|is)\b|"
    r"(?:in|for) my (?:novel|story|book|screenplay|game|script|play|essay)\b|how realistic)",
    re.IGNORECASE,
)
FIRST_PERSON = re.compile(r"\b(?:I|I'm|I've|I'd|me|my|mine|we|our|us)\b", re.IGNORECASE)


def asks_for_definition(conversation) -> bool:
    """The person asked what a term means, how a procedure works, or about history or their fiction, and nothing
    else in their messages puts them in the matter: an answer's mention of an arrest or a short sale is not advice
    about their own case."""
    users = [m.content for m in conversation if m.role == "user"]
    if not users or not GENERAL_QUESTION.search(users[-1]):
        return False
    return not any(FIRST_PERSON.search(GENERAL_QUESTION.sub(" ", u)) for u in users)


def _unbulleted(sentence: str) -> str:
    return re.sub(r"^(?:[-*\u2022]|\d+[.)])\s+", "", sentence.strip())


def drop_sentences(text: str, drop: Iterable[str]) -> str:
    """``text`` without the given sentences; the rest keeps its wording, order and paragraphs."""
    unwanted = {_unbulleted(s) for s in drop}
    kept, last = [], 0
    pieces: list[str] = []
    for a, b in sentence_spans(text):
        if _unbulleted(text[a:b]) in unwanted:
            pieces.append(text[last:a])
            last = b
            kept.append(False)
        else:
            kept.append(True)
    pieces.append(text[last:])
    out = "".join(pieces)
    out = re.sub(r"[ \t]{2,}", " ", out)
    out = re.sub(r"[ \t]+\n", "\n", out)
    out = re.sub(r"\n{3,}", "\n\n", out)
    out = re.sub(r"^\s*[-*\u2022]\s*$\n?", "", out, flags=re.MULTILINE)  # a list bullet left empty
    return out.strip()


def _compile(patterns: Sequence[str]) -> list[re.Pattern[str]]:
    return [re.compile(p, re.IGNORECASE) for p in patterns]


class CaveatFinding:
    """What a caveat check found in one response: sentences that need the caveat, and sentences that dismiss it."""

    __slots__ = ("dismissals", "needs", "satisfied")

    def __init__(self, needs: list[str], dismissals: list[str], satisfied: bool) -> None:
        self.needs, self.dismissals, self.satisfied = needs, dismissals, satisfied

    @property
    def violating(self) -> bool:
        return bool(self.dismissals) or (bool(self.needs) and not self.satisfied)

    def evidence(self) -> list[str]:
        return self.dismissals + ([] if self.satisfied else [s for s in self.needs if s not in self.dismissals])


def caveat_check(
    name: str,
    *,
    triggers: Sequence[str],
    satisfied_by: Sequence[str],
    caveat: str,
    message: str,
    severity: str = "medium",
    trigger_in: str = "response",
    module: str | None = None,
    extra_satisfied=None,
    dismissal_message: str | None = None,
    skip_if=None,
) -> tuple[type[Critic], type[Reviser]]:
    """Make a critic and a reviser, both registered as ``name``.

    :param triggers: regular expressions; a sentence matching any of them needs the caveat.
    :param satisfied_by: regular expressions; the response is compliant if any matches, outside a negation, anywhere
        in it. A negated match ("you don't need a lawyer") is a dismissal: a violation even without a trigger.
    :param caveat: the sentence the reviser appends (it must satisfy the check).
    :param trigger_in: where triggers are looked for: ``response``, or ``either`` (the response or the person's
        messages, e.g. "I was arrested" makes any answer need the caveat).
    :param module: the calling module's ``__name__``, so registry errors name the plugin, not this module.
    :param extra_satisfied: optional ``f(response) -> bool``, another way a response satisfies the check (e.g. it
        names a jurisdiction).
    :param skip_if: optional ``f(conversation, response) -> bool``: when true, no trigger needs the caveat (e.g. the
        person asked what a term means, see ``asks_for_definition``); dismissals still count.
    """
    if trigger_in not in ("response", "either"):
        raise ValueError("trigger_in must be 'response' or 'either'")
    trigger_res, satisfied_res = _compile(triggers), _compile(satisfied_by)
    any_trigger = re.compile("|".join(f"(?:{p.pattern})" for p in trigger_res), re.IGNORECASE)
    any_satisfied = re.compile("|".join(f"(?:{p.pattern})" for p in satisfied_res), re.IGNORECASE)

    def find(conversation, response: str) -> CaveatFinding:
        satisfied, dismissals = False, []
        for sentence in sentences(response) if any_satisfied.search(response) else ():
            for pattern in satisfied_res:
                for match in pattern.finditer(sentence):
                    head = clause_head(sentence, match.start())
                    if SELF_DISCLAIMER.search(head):
                        continue  # "I'm not a lawyer, but ..." neither satisfies nor dismisses
                    if negated(sentence, match.start(), match.end()):
                        if sentence not in dismissals:
                            dismissals.append(sentence)
                    else:
                        satisfied = True
        if not satisfied and extra_satisfied is not None and extra_satisfied(response):
            satisfied = True
        texts = [response]
        if trigger_in == "either":
            texts += [m.content for m in conversation if m.role == "user"]
        if skip_if is not None and skip_if(conversation, response):
            texts = []
        needs = [s for text in texts if any_trigger.search(text) for s in sentences(text) if any_trigger.search(s)]
        return CaveatFinding(needs, dismissals, satisfied)

    if find([], caveat).dismissals or not any(p.search(caveat) for p in satisfied_res):
        raise ValueError(f"{name}: the caveat must satisfy its own check")
    dismissed = dismissal_message or "Tells the person they do not need the professional the principle asks for."

    class CaveatCritic(Critic):
        __doc__ = f"Flags sentences that need a caveat the response lacks, or wave it away: {message}"
        answers_only = True  # a caveat may come at the end, and a request needs none: the rails skip the check

        def critique(self, tasks):
            out = []
            for task in tasks:
                found = find(task.conversation, task.response)
                violations = []
                if found.violating:
                    violations = [
                        Violation(
                            principle_id=task.principle.id,
                            evidence=s,
                            severity=severity,
                            message=dismissed if s in found.dismissals else message,
                            critic=name,
                        )
                        for s in found.evidence()
                    ]
                out.append(
                    Critique(
                        principle_id=task.principle.id,
                        critic=name,
                        needs_revision=found.violating,
                        violations=violations,
                        text=f"{message} ({len(violations)} sentence(s))" if violations else "Compliant.",
                    )
                )
            return out

    class CaveatReviser(Reviser):
        __doc__ = (
            f"Drops sentences that wave the caveat away and adds the caveat ({caveat!r}) where {name} finds it "
            "missing, or where an answer sent for repair has none; keeps the rest of the answer."
        )

        def revise(self, tasks):
            out = []
            for task in tasks:
                found = find(task.conversation, task.response)
                if not found.violating:
                    if found.satisfied:
                        out.append(self.unchanged(task))
                    else:
                        # the rules found nothing, yet the answer was sent for repair (a classifier behind the check
                        # flagged it) and it has no caveat: adding one is the repair this check knows
                        out.append(
                            Revision(
                                principle_id=task.principle.id,
                                text=task.response.rstrip() + "\n\n" + caveat,
                                accepted=True,
                                reviser=name,
                                reason="the rules found nothing to repair; the missing caveat is added",
                            )
                        )
                    continue
                text = drop_sentences(task.response, found.dismissals) if found.dismissals else task.response
                reason = None
                if not text.strip():
                    text, reason = caveat, "every sentence waved the caveat away; the caveat alone is left"
                elif not find(task.conversation, text).satisfied:
                    text = text.rstrip() + "\n\n" + caveat
                out.append(
                    Revision(principle_id=task.principle.id, text=text, accepted=True, reviser=name, reason=reason)
                )
            return out

    for cls, kind in ((CaveatCritic, "Critic"), (CaveatReviser, "Reviser")):
        cls.name = name
        cls.__qualname__ = cls.__name__ = f"{''.join(part.title() for part in re.split(r'[._-]', name))}{kind}"
        if module:
            cls.__module__ = module
    return CaveatCritic, CaveatReviser
