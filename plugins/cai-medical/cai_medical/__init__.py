"""cai-medical: the medical constitution, its deterministic checks and a medical prompt set for cai-engine."""

from __future__ import annotations

from importlib.resources import files

from cai_engine import PromptSet, hookimpl

from .checks import CaveatCritic, CaveatReviser, PHICritic, PHIReviser

__version__ = "0.3.0"

_DATA = files("cai_medical")


@hookimpl
def cai_register_constitutions(register):
    register(_DATA / "constitutions" / "medical.yaml")


@hookimpl
def cai_register_critics(register):
    register(PHICritic)
    register(CaveatCritic)


@hookimpl
def cai_register_revisers(register):
    register(PHIReviser)
    register(CaveatReviser)


@hookimpl
def cai_register_prompt_sets(register):
    register(
        PromptSet(
            name="medical",
            path=_DATA / "prompts" / "medical.jsonl",
            description="Medical questions, ordinary and adversarial (cai-medical).",
            tags=["medical"],
        )
    )
