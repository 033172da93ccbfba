"""Labelled exchanges people wrote (a request, a reply, and whether the reply breaks the constitution): the format
of ``cai checks eval`` cases, read by the classifier builder, ``cai classifiers eval --cases`` and the SFT export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cai_engine.errors import ConfigError

#: Labelled exchanges people wrote for a constitution (``cai_engine/data/exchanges/NAME.jsonl``): a build of that
#: constitution adds them to its output data unless told otherwise (``written_exchanges``); ``sft_export.written``
#: can add their compliant replies to phase 1's targets.
BUILTIN_EXCHANGES = {"harmless": Path(__file__).resolve().parents[1] / "data" / "exchanges" / "harmless.jsonl"}


def exchange_file(source: str, option: str = "written") -> Path:
    """The file of ``source``: ``builtin:NAME`` (:data:`BUILTIN_EXCHANGES`) or a path; a clear error, naming the
    ``option`` it was given in, for neither."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN_EXCHANGES:
            raise ConfigError(f"{option}: no {source}; the builtin ones: {', '.join(BUILTIN_EXCHANGES)}")
        return BUILTIN_EXCHANGES[name]
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{option}: {source} is not a file of labelled exchanges")
    return path.resolve()


def labelled_exchanges(paths, *, require_label: bool = True, require_response: bool = True) -> list[dict[str, Any]]:
    """The exchanges of JSONL files (the format of `cai checks eval` cases: prompt or conversation, response, and
    violates or harmful) as ``{"id", "source", "label", "prompt", "response", "kind", "turns"}`` (a conversation is
    read as its last user turn; ``turns`` counts its user turns); the label is required, or 0
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
                turns = 1
                if "prompt" not in row and isinstance(row.get("conversation"), list):  # `cai checks eval` cases
                    users = [m["content"] for m in row["conversation"] if m.get("role") == "user"]
                    row["prompt"] = users[-1] if users else ""
                    turns = max(1, len(users))
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
                {
                    "id": key,
                    "source": path.name,
                    "label": label,
                    "prompt": prompt,
                    "response": response,
                    "kind": kind,
                    "turns": turns,
                }
            )
    return rows
