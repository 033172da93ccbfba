"""cai-medical: the medical constitution, its deterministic checks and a medical prompt set for cai-engine."""

from __future__ import annotations

from importlib.resources import files

from cai_engine import PromptSet, hookimpl

from .checks import PHI_NOTE, CaveatCritic, CaveatReviser, PHICritic, PHIReviser

__version__ = "0.3.0"

_DATA = files("cai_medical")


def _backed(critic):
    """The check with the classifier shipped beside it (classifiers/CHECK/, trained on its labelled cases; see the
    README): the rules decide first, the classifier adds what they miss. An older cai-engine without classifier
    support runs the rules alone."""
    try:
        from cai_engine import with_classifier
    except ImportError:
        return critic
    return with_classifier(critic, _DATA / "classifiers" / critic.name)


def _repairing(reviser, finish=None):
    """The check's reviser that also repairs what only the shipped classifier flagged, by dropping the sentences it
    blames and finishing as the rules' repair does (an older cai-engine: the rules' repair alone)."""
    try:
        from cai_engine import with_classifier_repair
    except ImportError:
        return reviser
    return with_classifier_repair(reviser, _DATA / "classifiers" / reviser.name, finish=finish)


_CRITICS = [_backed(critic) for critic in (PHICritic, CaveatCritic)]


def _phi_noted(text):
    return text if PHI_NOTE in text else f"{text.rstrip()}\n\n{PHI_NOTE}"


_REVISERS = [_repairing(PHIReviser, _phi_noted), _repairing(CaveatReviser)]


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
