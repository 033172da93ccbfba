"""Building blocks for deterministic domain checks that plugins ship with their constitutions.

``caveat_check`` makes a matched critic/reviser pair: the critic flags each sentence of a response that matches a
*trigger* (a dose, a return promise, a statement of law) when the response carries no *satisfying* caveat anywhere;
the reviser repairs by adding the caveat, keeping the answer, instead of refusing. A principle names the pair in its
``checks`` list and the runtime guard runs it without a model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .components import Critic, Reviser
from .records import Critique, Revision, Violation

BOUNDARY = re.compile(r"[.!?]+(?=\s|$)|\n+")
ABBREVIATION = re.compile(r"(?:^|\s)(?:Mr|Mrs|Ms|Mx|Dr|Prof|St|Sr|Jr|vs|etc|approx|No|Inc|Ltd|e\.g|i\.e)\.$",
                          re.IGNORECASE)


def sentences(text: str) -> list[str]:
    """Split text into sentences, without breaking after abbreviations ("Mr.", "Dr.", "e.g.") or inside numbers."""
    out: list[str] = []
    start = 0
    for match in BOUNDARY.finditer(text):
        if match.group(0).startswith(".") and ABBREVIATION.search(text[start:match.end()]):
            continue
        chunk = text[start:match.end()].strip()
        if chunk:
            out.append(chunk)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def _compile(patterns: Sequence[str]) -> list[re.Pattern[str]]:
    return [re.compile(p, re.IGNORECASE) for p in patterns]


def caveat_check(name: str, *, triggers: Sequence[str], satisfied_by: Sequence[str], caveat: str, message: str,
                 severity: str = "medium", trigger_in: str = "response", module: str | None = None,
                 ) -> tuple[type[Critic], type[Reviser]]:
    """Make a critic and a reviser, both registered as ``name``.

    :param triggers: regular expressions; a sentence matching any of them needs the caveat.
    :param satisfied_by: regular expressions; the response is compliant if any matches anywhere in it.
    :param caveat: the sentence the reviser appends (it must match ``satisfied_by``).
    :param trigger_in: where triggers are looked for: ``response``, or ``either`` (the response or the person's
        messages, e.g. "I was arrested" makes any answer need the caveat).
    :param module: the calling module's ``__name__``, so registry errors name the plugin, not this module.
    """
    if trigger_in not in ("response", "either"):
        raise ValueError("trigger_in must be 'response' or 'either'")
    trigger_res, satisfied_res = _compile(triggers), _compile(satisfied_by)
    if not any(p.search(caveat) for p in satisfied_res):
        raise ValueError(f"{name}: the caveat must satisfy its own check")

    def find(conversation, response: str) -> list[str]:
        if any(p.search(response) for p in satisfied_res):
            return []
        texts = [response]
        if trigger_in == "either":
            texts += [m.content for m in conversation if m.role == "user"]
        return [s for text in texts for s in sentences(text) if any(p.search(s) for p in trigger_res)]

    class CaveatCritic(Critic):
        __doc__ = f"Flags sentences that need a caveat the response lacks: {message}"

        def critique(self, tasks):
            out = []
            for task in tasks:
                found = find(task.conversation, task.response)
                violations = [Violation(principle_id=task.principle.id, evidence=s, message=message,
                                        severity=severity, critic=name) for s in found]
                out.append(Critique(principle_id=task.principle.id, critic=name, needs_revision=bool(found),
                                    violations=violations,
                                    text=f"{message} ({len(found)} sentence(s))" if found else "Compliant."))
            return out

    class CaveatReviser(Reviser):
        __doc__ = f"Adds the caveat ({caveat!r}) where {name} finds it missing; keeps the rest of the answer."

        def revise(self, tasks):
            out = []
            for task in tasks:
                if find(task.conversation, task.response):
                    text = task.response.rstrip() + "\n\n" + caveat
                    out.append(Revision(principle_id=task.principle.id, text=text, accepted=True, reviser=name))
                else:
                    out.append(Revision(principle_id=task.principle.id, text=task.response, accepted=True,
                                        reason="nothing to repair", reviser=name))
            return out

    for cls, kind in ((CaveatCritic, "Critic"), (CaveatReviser, "Reviser")):
        cls.name = name
        cls.__qualname__ = cls.__name__ = f"{''.join(part.title() for part in re.split(r'[._-]', name))}{kind}"
        if module:
            cls.__module__ = module
    return CaveatCritic, CaveatReviser
