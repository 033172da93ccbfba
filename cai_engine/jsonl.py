"""Reading JSONL input files with errors that name the file and line; rows are streamed, never read whole."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CaiError, ConfigError, ConstitutionError
from .inputs import iter_lines


def iter_jsonl(path: str | Path, error: type[CaiError] = ConfigError) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file:line", object)`` for each non-blank line; bad UTF-8, bad JSON, non-objects or a line over the
    row limit (``CAI_LIMIT_ROW_BYTES``) raise ``error``."""
    path = Path(path)
    lines = iter_lines(path)
    while True:
        try:
            number, line = next(lines)
        except StopIteration:
            return
        except ConstitutionError as exc:
            raise error(str(exc)) from None
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except RecursionError:
            raise error(f"{where}: nested too deeply") from None
        except ValueError as exc:
            raise error(
                f"{where}: invalid JSON ({getattr(exc, 'msg', exc)}); each line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise error(f"{where}: each line must be a JSON object, not {type(row).__name__}")
        yield where, row
