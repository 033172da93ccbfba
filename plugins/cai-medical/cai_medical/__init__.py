"""cai-medical: the medical constitution, its deterministic checks and a medical prompt set for cai-engine."""

from __future__ import annotations

from importlib.resources import files

from cai_engine import PromptSet, hookimpl

from .checks import PHI_NOTE, CaveatCritic, CaveatReviser, PHICritic, PHIReviser

__version__ = "0.3.0"

_DATA = files("cai_medical")


def _shipped(component, **options):
    """A check's critic or reviser with the classifier shipped beside it (classifiers/CHECK/, trained on its labelled
    cases; see the README): the critic flags what the rules miss, the reviser repairs what only the classifier
    flagged. An older cai-engine without classifier support: the rules alone."""
    try:
        from cai_engine import Critic, with_classifier, with_classifier_repair
    except ImportError:
        return component
    wrap = with_classifier if issubclass(component, Critic) else with_classifier_repair
    return wrap(component, _DATA / "classifiers" / component.name, **options)


_CRITICS = [_shipped(critic) for critic in (PHICritic, CaveatCritic)]


def _phi_noted(text):
    return text if PHI_NOTE in text else f"{text.rstrip()}\n\n{PHI_NOTE}"


_REVISERS = [_shipped(PHIReviser, finish=_phi_noted), _shipped(CaveatReviser)]


@hookimpl
def cai_register_constitutions(register):
    register(_DATA / "constitutions" / "medical.yaml")


@hookimpl
def cai_register_critics(register):
    for critic in _CRITICS:
        register(critic)


@hookimpl
def cai_register_revisers(register):
    for reviser in _REVISERS:
        register(reviser)


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
