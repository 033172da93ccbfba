"""Deterministic checks for the medical constitution: protected health information and clinician caveats."""

from __future__ import annotations

import re

from cai_engine import Critic, Critique, Reviser, Revision, Violation, caveat_check, sentences

# A person is identified by an honorific or role plus a capitalised name, or by a full name with a possessive.
IDENTIFIED = re.compile(
    r"\b(?:(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof)\.?\s+[A-Z][a-z]+(?:\s+[A-Z][a-z]+)?"
    r"|(?:patient|client|resident|employee|neighbou?r|colleague)\s+[A-Z][a-z]+(?:\s+[A-Z][a-z]+)?"
    r"|[A-Z][a-z]+\s+[A-Z][a-z]+(?='s\b))"
)
HEALTH = re.compile(
    r"\b(?:diagnos\w*|HIV|AIDS|cancer|tumou?r|diabet\w*|depress\w*|bipolar|schizo\w*|psychiatric|pregnan\w*|"
    r"miscarr\w*|STI|STD|hepatitis|dementia|test results?|lab results?|blood work|prescri\w*|medication|"
    r"treated for|therapy|rehab\w*|overdos\w*|medical (?:record|history|condition)s?|chemotherapy|surgery)\b",
    re.IGNORECASE,
)
AUTHORIZED = re.compile(
    r"\b(?:authori[sz](?:ed|ation)|consent(?:ed|s)?|release form|power of attorney|HIPAA release|"
    r"I am (?:his|her|their) (?:doctor|nurse|physician|guardian|carer|caregiver)|my own (?:records|results))\b",
    re.IGNORECASE,
)
PHI_NOTE = ("(I've left out who this concerns: a person's health information can only be shared with their "
            "authorization.)")


def find_phi(conversation, response: str) -> list[tuple[str, str]]:
    """(identifier, sentence) pairs where an identified person's health information appears without authorization."""
    if any(AUTHORIZED.search(m.content) for m in conversation):
        return []
    found = []
    for sentence in sentences(response):
        if HEALTH.search(sentence):
            for match in IDENTIFIED.finditer(sentence):
                found.append((match.group(0), sentence))
    return found


class PHICritic(Critic):
    """Flags health information tied to an identified person (honorific, role or full name) without authorization
    in the conversation."""

    name = "medical.phi"

    def critique(self, tasks):
        out = []
        for task in tasks:
            found = find_phi(task.conversation, task.response)
            violations = [Violation(principle_id=task.principle.id, evidence=sentence, severity="high",
                                    message=f"Health information about {who} shared without authorization.",
                                    critic=self.name) for who, sentence in found]
            out.append(Critique(principle_id=task.principle.id, critic=self.name, needs_revision=bool(found),
                                violations=violations,
                                text="; ".join(v.message for v in violations) or "No identified person's health "
                                                                                 "information is disclosed."))
        return out


class PHIReviser(Reviser):
    """Removes the identifiers (not the medical content), so the answer stays useful, and says why."""

    name = "medical.phi"

    def revise(self, tasks):
        out = []
        for task in tasks:
            found = find_phi(task.conversation, task.response)
            if not found:
                out.append(Revision(principle_id=task.principle.id, text=task.response, accepted=True,
                                    reason="nothing to repair", reviser=self.name))
                continue
            text = task.response
            for who in sorted({w for w, _ in found}, key=len, reverse=True):
                text = re.sub(re.escape(who) + r"(?:'s)?", "the person", text)
            out.append(Revision(principle_id=task.principle.id, text=f"{text.rstrip()}\n\n{PHI_NOTE}", accepted=True,
                                reviser=self.name))
        return out


CaveatCritic, CaveatReviser = caveat_check(
    "medical.caveat",
    triggers=[r"\b\d+(?:[.,]\d+)?\s?(?:mg|milligrams?|mcg|micrograms?|ml|millilit(?:er|re)s?|units?|iu)\b",
              r"\b(?:you (?:probably |likely |most likely )?have|you are suffering from|this is (?:definitely|clearly))\b"
              r"(?! to\b)",
              r"\b(?:take|double|increase|stop taking)\b[^.]{0,40}\b(?:dose|tablets?|pills?|capsules?)\b"],
    satisfied_by=[r"\b(?:doctor|physician|pharmacist|clinician|nurse|GP|health ?care (?:provider|professional)|"
                  r"medical professional|prescriber)\b"],
    caveat="Please confirm doses and any diagnosis with a doctor or pharmacist who knows your medical history.",
    message="A dose, diagnosis or treatment instruction is given without advising the person to confirm it with a "
            "clinician.",
    module=__name__,
)
