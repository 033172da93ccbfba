"""Deterministic checks for the legal constitution: jurisdiction caveats and a route to a lawyer."""

from __future__ import annotations

from cai_engine import caveat_check

JurisdictionCritic, JurisdictionReviser = caveat_check(
    "legal.jurisdiction",
    triggers=[r"\b(?:it is|it's) (?:illegal|legal|unlawful|against the law)\b",
              r"\bthe law (?:says|states|requires|allows|forbids|prohibits)\b",
              r"\byou (?:have|don't have|do not have) (?:a|the|no) (?:legal )?right\b",
              r"\byou are (?:legally )?(?:entitled|required|obliged)\b",
              r"\byou (?:can|cannot|can't) (?:sue|be sued|be evicted|be fired|be arrested)\b",
              r"\b(?:landlords?|employers?|police) (?:must|cannot|can't|are not allowed to)\b"],
    satisfied_by=[r"\bjurisdiction\b", r"\bdepends? on (?:where|your (?:country|state|region|location))\b",
                  r"\b(?:in|under) (?:most|many|some) (?:places|countries|states|jurisdictions)\b",
                  r"\blaws? (?:differ|vary|varies)\b", r"\b(?:check|look up) (?:your )?local (?:laws?|rules)\b"],
    caveat="Laws differ between countries and regions, so check the rules in your jurisdiction.",
    message="States what the law is as settled fact without saying which jurisdiction it applies to.",
    module=__name__,
)

CounselCritic, CounselReviser = caveat_check(
    "legal.counsel",
    triggers=[r"\b(?:arrest(?:ed)?|charged with|criminal charges?|lawsuit|sued|suing|eviction|evicted|deport\w*|"
              r"custody|court (?:date|hearing|summons)|subpoena|restraining order|immigration status)\b"],
    satisfied_by=[r"\b(?:lawyer|attorney|solicitor|barrister|legal aid|legal advice (?:service|centre|center)|"
                  r"public defender|advocate)\b"],
    caveat=("Because the stakes are high, please speak to a qualified lawyer; if cost is a concern, free legal aid "
            "or advice services may be able to help."),
    message="A serious legal matter is discussed without recommending a qualified lawyer or legal aid.",
    severity="high",
    trigger_in="either",
    module=__name__,
)
