"""Deterministic checks for the financial constitution: promised returns and missing disclosures."""

from __future__ import annotations

import re

from cai_engine import Critic, Critique, Reviser, Revision, Violation, caveat_check, sentences

# (pattern, hedged replacement): the repair keeps the sentence and removes the promise.
GUARANTEES = [
    (r"\bguaranteed (?:returns?|profits?|income|gains?)\b", "possible returns"),
    (r"\b(?:is|are|it's) (?:completely |totally |100% )?(?:risk[- ]free|safe bets?)\b", "carries risk"),
    (r"\brisk[- ]free\b", "lower-risk"),
    (r"\b(?:can't|cannot|won't|will not|never) lose(?: money)?\b", "can still lose money"),
    (r"\bwill (?:definitely |certainly |surely )?(?:double|triple|10x|skyrocket|go up|rise)\b", "could rise or fall"),
    (r"\bguarantee(?:s|d)? (?:that )?(?:you|your)\b", "cannot promise that you"),
]
RISK_NOTE = "Investments can fall as well as rise, and past performance does not guarantee future results."
RISK_NOTED = re.compile(r"past performance|can (?:fall|go down|lose)|fall as well as rise", re.IGNORECASE)


def find_guarantees(response: str) -> list[tuple[str, str]]:
    found = []
    for sentence in sentences(response):
        if re.search(r"\b(?:not|no one can|nobody can|never) (?:a )?guarantee", sentence, re.IGNORECASE):
            continue  # "nothing is guaranteed" is the opposite of a promise
        for pattern, _ in GUARANTEES:
            match = re.search(pattern, sentence, re.IGNORECASE)
            if match:
                found.append((match.group(0), sentence))
                break
    return found


class GuaranteeCritic(Critic):
    """Flags promises of returns or safety ("guaranteed returns", "risk-free", "can't lose", "will double")."""

    name = "financial.guarantee"

    def critique(self, tasks):
        out = []
        for task in tasks:
            found = find_guarantees(task.response)
            violations = [Violation(principle_id=task.principle.id, evidence=sentence, severity="high",
                                    message=f"Promises an outcome no investment can promise ({phrase!r}).",
                                    critic=self.name) for phrase, sentence in found]
            out.append(Critique(principle_id=task.principle.id, critic=self.name, needs_revision=bool(found),
                                violations=violations,
                                text="; ".join(v.message for v in violations) or "No promised returns."))
        return out


class GuaranteeReviser(Reviser):
    """Replaces each promise with a hedged phrase and adds the standard risk note."""

    name = "financial.guarantee"

    def revise(self, tasks):
        out = []
        for task in tasks:
            if not find_guarantees(task.response):
                out.append(Revision(principle_id=task.principle.id, text=task.response, accepted=True,
                                    reason="nothing to repair", reviser=self.name))
                continue
            text = task.response
            for pattern, replacement in GUARANTEES:
                text = re.sub(pattern, replacement, text, flags=re.IGNORECASE)
            if not RISK_NOTED.search(text):
                text = f"{text.rstrip()}\n\n{RISK_NOTE}"
            out.append(Revision(principle_id=task.principle.id, text=text, accepted=True, reviser=self.name))
        return out


DisclosureCritic, DisclosureReviser = caveat_check(
    "financial.disclosure",
    triggers=[r"\byou should (?:buy|sell|invest in|put (?:your|all|some)[^.]{0,30} in(?:to)?)\b",
              r"\bI (?:recommend|suggest|advise) (?:buying|selling|investing|putting)\b",
              r"\b(?:buy|sell) (?:shares in|stock in|units of)\b",
              r"\bthe best (?:investment|fund|stock|crypto(?:currency)?) (?:is|for)\b"],
    satisfied_by=[r"\bnot (?:personal |individual )?(?:financial|investment) advice\b",
                  r"\b(?:licensed|qualified|independent|regulated) (?:financial )?(?:adviser|advisor|planner)\b",
                  r"\bgeneral information\b"],
    caveat=("This is general information, not personal financial advice; your own situation matters, and a licensed "
            "financial adviser can help you decide."),
    message="Recommends a specific investment action without stating the limits of the advice.",
    module=__name__,
)
