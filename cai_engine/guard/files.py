"""Guarding a JSONL file of conversations: every row checked before any work, results written whole or not at all.

The input is read exactly once, so it may be a pipe (``--input <(cmd)``, ``--input /dev/stdin``, or ``-`` for
standard input) as well as a file: each row is checked as it is read and copied, checked, into a private temporary
spool (unlinked, so nothing is left behind even by a killed run), and the guard reads the spool. A bad row on line
10,000 fails the run before the first model call, with the file and line in the message; what is guarded is exactly
what was checked, even if the file changes meanwhile.

The output goes to a temporary ``.partial`` file beside ``--out``, locked while the run writes it, fsynced and
renamed over ``--out`` only when every row is guarded (the folder is fsynced after the rename). A run that fails or
is stopped (an exception, Ctrl-C, or SIGTERM/SIGHUP under :func:`stop_on_signals`) removes its ``.partial`` and
leaves ``--out`` as it was; a run killed outright (SIGKILL, a power cut) leaves its ``.partial`` unlocked, and the
next run for the same ``--out`` removes it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from cai_engine.constitution.model import Message
from cai_engine.errors import ConfigError
from cai_engine.files.inputs import STDIN
from cai_engine.files.jsonl import dumps_line, fsync_dir, iter_jsonl
from cai_engine.files.outputs import atomic_output, check_output_path
from cai_engine.store.runs import now

try:  # POSIX; elsewhere a run cannot tell a live .partial from a stale one, so none is removed
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

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
    """Each row of a guard input (a file, a pipe, or ``-`` for standard input), read once, as it is checked."""
    for where, row in iter_jsonl(path):
        yield parse_guard_row(where, row)


def validate_guard_input(path: str | Path) -> int:
    """Check every row of a guard input file; returns how many there are (errors name the file and line)."""
    count = 0
    for _ in iter_guard_input(path):
        count += 1
    if not count:
        raise ConfigError(f"{_label(path)}: contains no conversations")
    return count


def _label(path: str | Path) -> str:
    return "<stdin>" if str(path) == STDIN else str(path)


@contextlib.contextmanager
def spooled_guard_input(
    path: str | Path, *, on_row: Callable[[int], None] | None = None
) -> Iterator[tuple[int, Callable[[], Iterator[GuardItem]]]]:
    """Read the guard input once, checking every row, into an unlinked temporary file; yields the number of rows and
    a function that iterates over them (as checked). A bad row raises before anything is yielded. ``on_row`` is
    called with the number of rows read so far after each one."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        count = 0
        for item_id, conversation, response in iter_guard_input(path):
            spool.write(json.dumps([item_id, [m.model_dump() for m in conversation], response]) + "\n")
            count += 1
            if on_row is not None:
                on_row(count)
        if not count:
            raise ConfigError(f"{_label(path)}: contains no conversations")
        spool.flush()

        def items() -> Iterator[GuardItem]:
            spool.seek(0)
            for line in spool:
                item_id, conversation, response = json.loads(line)
                yield item_id, [Message(**m) for m in conversation], response

        yield count, items


def guard_file(
    engine: Any,
    input_path: str | Path,
    out: str | Path | None,
    *,
    batch_size: int = 8,
    emit: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, int]:
    """Guard every conversation of ``input_path`` (a file, a pipe, or ``-`` for standard input, read once) with
    ``engine``; results as JSONL into ``out`` (atomically) or through ``emit`` line by line. Returns the count of each
    action. The audit gets one ``guard_run`` record however the run ends: completed, or failed with the error, the
    stage it failed in (``setup``, ``reading`` or ``guarding``) and the rows read and guarded so far (#32)."""
    counts: dict[str, int] = {}
    began = time.perf_counter()
    run: dict[str, Any] = {"stage": "setup", "read": 0, "items": None, "guarded": 0}
    status, error = "failed", None

    def row_read(count: int) -> None:
        run["read"] = count

    try:
        if batch_size < 1:
            raise ConfigError(f"the batch size must be at least 1, not {batch_size}")
        if out is not None:
            check_output_path(out, inputs=[] if str(input_path) == STDIN else [input_path], what="output file")
            remove_stale_partials(out)
        run["stage"] = "reading"
        with spooled_guard_input(input_path, on_row=row_read) as (total, items):
            run["stage"], run["items"] = "guarding", total
            from tqdm.auto import tqdm

            with _sink(out, emit) as write, tqdm(total=total, unit="item", disable=not progress or out is None) as bar:
                batch: list[GuardItem] = []
                for item in items():
                    batch.append(item)
                    if len(batch) == batch_size:
                        run["guarded"] += _guard_batch(engine, batch, write, counts)
                        bar.update(len(batch))
                        batch = []
                if batch:
                    run["guarded"] += _guard_batch(engine, batch, write, counts)
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
                "input": _label(input_path),
                "output": str(out) if out else None,
                "items": run["items"],
                "read": run["read"],
                "guarded": run["guarded"],
                "stage": run["stage"] if status == "failed" else None,
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


@contextlib.contextmanager
def _sink(out: str | Path | None, emit: Callable[[str], None]) -> Iterator[Callable[[str], None]]:
    """Lines to an atomic output file (locked while written, fsynced, renamed, its folder fsynced), or to ``emit``
    when there is none."""
    if out is None:
        yield emit
        return
    with atomic_output(out, what="output file") as handle:
        _lock(handle)

        def write(line: str) -> None:
            handle.write(line + "\n")

        yield write
    fsync_dir(Path(out).parent)


def _lock(handle: IO[str]) -> None:
    """Hold an exclusive lock on a .partial file while this run writes it: the lock dies with the process, so a
    .partial nobody holds is a stale one."""
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a file system without locks: the run goes on; its .partial just looks live to others
            pass


def remove_stale_partials(out: str | Path) -> list[Path]:
    """Remove the ``.partial`` files that killed runs left beside ``out`` (those no live run holds locked); returns
    what was removed."""
    if fcntl is None:
        return []
    out = Path(out)
    removed = []
    for partial in out.parent.glob(f".{glob.escape(out.name)}.*.partial"):
        try:
            handle = open(partial, "rb")  # noqa: SIM115 - closed below, after the lock is tried
        except OSError:
            continue
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live run is writing it
            try:
                partial.unlink()
                removed.append(partial)
            except OSError:
                pass
    return removed


class Terminated(BaseException):  # a BaseException, like KeyboardInterrupt: no `except Exception` swallows it
    """Raised in the main thread when the process gets SIGTERM or SIGHUP under :func:`stop_on_signals`, so that a
    guard run cleans up (removes its .partial, audits the failed run) as it does on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM))):
    """Turn SIGTERM (and SIGHUP) into :class:`Terminated` within the block, so ``finally`` clauses run; a second
    signal during the cleanup is ignored. Does nothing outside the main thread (only it may handle signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = tuple(dict.fromkeys(signums))

    def handler(signum: int, frame: Any) -> None:
        for number in signums:
            signal.signal(number, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {number: signal.signal(number, handler) for number in signums}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


__all__ = [
    "Terminated",
    "guard_file",
    "iter_guard_input",
    "parse_guard_row",
    "remove_stale_partials",
    "spooled_guard_input",
    "stop_on_signals",
    "validate_guard_input",
]
