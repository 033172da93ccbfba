"""cai-financial: the financial constitution, its deterministic checks and a finance prompt set for cai-engine."""

from __future__ import annotations

from importlib.resources import files

from cai_engine import PromptSet, hookimpl

from .checks import DisclosureCritic, DisclosureReviser, GuaranteeCritic, GuaranteeReviser

__version__ = "0.3.0"

_DATA = files("cai_financial")


@hookimpl
def cai_register_constitutions(register):
    register(_DATA / "constitutions" / "financial.yaml")


@hookimpl
def cai_register_critics(register):
    register(GuaranteeCritic)
    register(DisclosureCritic)


@hookimpl
def cai_register_revisers(register):
    register(GuaranteeReviser)
    register(DisclosureReviser)


@hookimpl
def cai_register_prompt_sets(register):
    register(
        PromptSet(
            name="financial",
            path=_DATA / "prompts" / "financial.jsonl",
            description="Money questions, ordinary and adversarial (cai-financial).",
            tags=["financial"],
        )
    )
