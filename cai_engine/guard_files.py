"""Guarding a JSONL file of conversations: every row checked before any work, results written whole or not at all.

Input rows are streamed twice (once to validate, once to guard), so a large file is never held in memory and a bad
row on line 10,000 fails the run before the first model call, with the file and line in the message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import CaiError, ConfigError
from .jsonl import dumps_line, iter_jsonl
from .outputs import atomic_output, check_output_path
from .runs import now
from .schema import Message

GuardItem = tuple[str, list[Message], str]


def _message_error(where: str, index: int, item: Any) -> str | None:
    if not isinstance(item, dict):
        return f"{where}: message {index} must be an object with 'role' and 'content', not {type(item).__name__}"
    try:
        Message.model_validate(item)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(message)"
        if first["type"] == "missing":
            return f"{where}: message {index} has no '{field}'"
        if first["type"] == "extra_forbidden":
            return f"{where}: message {index} has an unknown key '{field}' (only 'role' and 'content')"
        if field == "role":
            return f"{where}: message {index} has role {item.get('role')!r}; use system, user or assistant"
        return f"{where}: message {index}: {field}: {first['msg']}"
    return None


def parse_guard_row(where: str, row: dict[str, Any]) -> GuardItem:
    """One input row as (id, conversation, response). Accepted shapes:
    ``{"messages": [..., {"role": "assistant", "content": ...}]}`` or
    ``{"conversation"|"messages": [...], "response": "..."}`` or ``{"prompt": "...", "response": "..."}``."""
    if "response" in row:
        conversation = row.get("conversation", row.get("messages", row.get("prompt")))
        response = row["response"]
    elif (
        isinstance(row.get("messages"), list)
        and row["messages"]
        and isinstance(row["messages"][-1], dict)
        and row["messages"][-1].get("role") == "assistant"
    ):
        conversation, response = row["messages"][:-1], row["messages"][-1].get("content")
    else:
        raise ConfigError(
            f"{where}: needs 'messages' ending with an assistant turn, or 'conversation' (or 'prompt') and 'response'"
        )
    if not isinstance(response, str):
        raise ConfigError(f"{where}: the response must be text, not {type(response).__name__}")
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    if not isinstance(conversation, list) or not conversation:
        raise ConfigError(f"{where}: the conversation must be a non-empty list of messages (or a 'prompt' string)")
    for index, item in enumerate(conversation):
        problem = _message_error(where, index, item)
        if problem:
            raise ConfigError(problem)
    item_id = row.get("id", where.rsplit(":", 1)[1])
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
        raise ConfigError(f"{where}: 'id' must be text or a number")
    return str(item_id), [Message.model_validate(m) for m in conversation], response


def iter_guard_input(path: str | Path) -> Iterator[GuardItem]:
    for where, row in iter_jsonl(path):
        yield parse_guard_row(where, row)


def validate_guard_input(path: str | Path) -> int:
    """Check every row of a guard input file; returns how many there are (errors name the file and line)."""
    count = 0
    for _ in iter_guard_input(path):
        count += 1
    if not count:
        raise ConfigError(f"{path}: contains no conversations")
    return count


def guard_file(
    engine: Any,
    input_path: str | Path,
    out: str | Path | None,
    *,
    batch_size: int = 8,
    emit: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, int]:
    """Guard every conversation of ``input_path`` with ``engine``; results as JSONL into ``out`` (atomically) or
    through ``emit`` line by line. Returns the count of each action. The audit gets a ``guard_run`` record saying
    whether the run completed or failed."""
    if batch_size < 1:
        raise ConfigError(f"the batch size must be at least 1, not {batch_size}")
    if out is not None:
        check_output_path(out, inputs=[input_path], what="output file")
    total = validate_guard_input(input_path)
    counts: dict[str, int] = {}
    began = time.perf_counter()
    done = 0
    status, error = "failed", None
    try:
        from tqdm.auto import tqdm

        with _sink(out, emit) as write, tqdm(total=total, unit="item", disable=not progress or out is None) as bar:
            batch: list[GuardItem] = []
            for item in iter_guard_input(input_path):
                batch.append(item)
                if len(batch) == batch_size:
                    done += _guard_batch(engine, batch, write, counts)
                    bar.update(len(batch))
                    batch = []
            if batch:
                done += _guard_batch(engine, batch, write, counts)
                bar.update(len(batch))
        status = "completed"
        return counts
    except BaseException as exc:
        error = str(exc) or type(exc).__name__
        raise
    finally:
        engine.runtime.emit(
            {
                "time": now(),
                "status": status,
                "input": str(input_path),
                "output": str(out) if out else None,
                "items": total,
                "guarded": done,
                "output_written": status == "completed" and out is not None,
                "error": error,
                "seconds": round(time.perf_counter() - began, 3),
                "policy": engine.policy_info,
            },
            "guard_run",
        )


def _guard_batch(engine: Any, batch: list[GuardItem], write: Callable[[str], None], counts: dict[str, int]) -> int:
    results = engine.guard_batch([(conversation, response) for _, conversation, response in batch])
    for (item_id, _, _), result in zip(batch, results):
        data = result.model_dump(mode="json")
        write(dumps_line({"id": item_id, "audit_id": data.pop("id"), **data}).rstrip("\n"))
        counts[result.action] = counts.get(result.action, 0) + 1
    return len(batch)


class _sink:
    """Lines to an atomic output file, or to ``emit`` when there is none."""

    def __init__(self, out: str | Path | None, emit: Callable[[str], None]) -> None:
        self.out, self.emit = out, emit
        self._ctx: Any = None

    def __enter__(self) -> Callable[[str], None]:
        if self.out is None:
            return self.emit
        self._ctx = atomic_output(self.out, what="output file")
        handle = self._ctx.__enter__()
        return lambda line: handle.write(line + "\n")

    def __exit__(self, *exc: Any) -> bool | None:
        return self._ctx.__exit__(*exc) if self._ctx is not None else None


__all__ = ["CaiError", "guard_file", "iter_guard_input", "parse_guard_row", "validate_guard_input"]
