"""Reading JSONL input files with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .constitutions import read_text
from .errors import CaiError, ConfigError, ConstitutionError


def iter_jsonl(path: str | Path, error: type[CaiError] = ConfigError) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file:line", object)`` for each non-blank line; bad UTF-8, bad JSON or non-objects raise ``error``."""
    path = Path(path)
    try:
        text = read_text(path)
    except ConstitutionError as exc:
        raise error(str(exc)) from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise error(f"{where}: invalid JSON ({getattr(exc, 'msg', exc)}); each line must be one JSON object") \
                from None
        if not isinstance(row, dict):
            raise error(f"{where}: each line must be a JSON object, not {type(row).__name__}")
        yield where, row
