"""JSON and JSONL in and out: input files read with errors that name the file and line (streamed, never read whole);
outputs written whole or not at all (:func:`write_jsonl`, :func:`write_json`) or appended durably (:func:`append_jsonl`).
Rows may be pydantic models (dumped in their JSON form) or plain objects."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cai_engine.errors import CaiError, ConfigError, ConstitutionError
from cai_engine.files.inputs import STDIN, iter_lines
from cai_engine.files.outputs import write_atomic


def _plain(row: BaseModel | dict[str, Any]) -> Any:
    return row.model_dump(mode="json") if isinstance(row, BaseModel) else row


def dumps_line(row: BaseModel | dict[str, Any]) -> str:
    """One JSONL line (with its newline); non-ASCII text is kept as is."""
    return json.dumps(_plain(row), ensure_ascii=False, default=str) + "\n"


def write_jsonl(path: str | Path, rows: Iterable[BaseModel | dict[str, Any]], *, what: str = "output") -> None:
    """Write ``rows`` as a JSONL file, whole or not at all."""
    write_atomic(path, "".join(dumps_line(r) for r in rows), what=what)


def write_json(path: str | Path, data: BaseModel | dict[str, Any], *, what: str = "output") -> None:
    """Write one JSON document (indented), whole or not at all."""
    write_atomic(path, json.dumps(_plain(data), indent=2, ensure_ascii=False, default=str) + "\n", what=what)


def append_jsonl(path: str | Path, rows: Iterable[BaseModel | dict[str, Any]]) -> None:
    """Append rows as JSONL lines and flush them to disk before returning (a killed writer loses at most the line
    in flight)."""
    blob = "".join(dumps_line(r) for r in rows)
    if not blob:
        return
    created = not os.path.exists(path)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(blob)
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        fsync_dir(Path(path).parent)


def fsync_dir(folder: str | Path) -> None:
    """Make a file created or renamed in ``folder`` durable: a file's own fsync does not cover its name (POSIX; a
    no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def iter_jsonl(path: str | Path, error: type[CaiError] = ConfigError) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file:line", object)`` for each non-blank line, reading the file (or pipe, or ``-`` for standard
    input) once; bad UTF-8, bad JSON, non-objects, a device or a line over the row limit (``CAI_LIMIT_ROW_BYTES``)
    raise ``error``."""
    label = "<stdin>" if str(path) == STDIN else str(path)
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
        where = f"{label}:{number}"
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
