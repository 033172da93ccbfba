"""The built-in prompt sets (``cai_engine/data/prompts``), selected as ``builtin:<name>``."""

from __future__ import annotations

import json

from cai_engine import PromptSet, data_dir, hookimpl


@hookimpl
def cai_register_prompt_sets(register):
    folder = data_dir("prompts")
    index = json.loads((folder / "index.json").read_text(encoding="utf-8")) if (folder / "index.json").exists() else {}
    for name, meta in sorted(index.items()):
        register(
            PromptSet(
                name=name,
                path=folder / meta["file"],
                description=meta.get("description", ""),
                heldout=bool(meta.get("heldout", False)),
                tags=list(meta.get("tags", [])),
            )
        )
