"""The default audit sink: every guard decision (and guard run and server request) appended to a JSONL file.

The audit never holds what the guard removed from a reply. Each violation's ``evidence`` (the matched text, or the
critique that found it) is replaced by a redacted form, ``[redacted: N characters]``, wherever violations are
written (the decision's ``violations`` and every round's); so is the ``message`` of a violation that a plugin check
or a model found (a plugin may quote what it found there; a rule's message is the deployer's own text and is kept).
A reply the guard changed or refused is kept only as its hash (``original``), since it holds what was removed. Not
a hash of the evidence: a date of birth or a phone number has so few possible values that its hash is no secret.
``audit.include_text: false`` keeps hashes of the conversation and the replies instead of their text.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cai_engine.checks.rules import RULES
from cai_engine.constitution.model import Message
from cai_engine.errors import ConfigError
from cai_engine.files.jsonl import dumps_line, fsync_dir
from cai_engine.plugins.hookspecs import hookimpl
from cai_engine.records import GuardResult
from cai_engine.store.runs import now

FSYNC_INTERVAL_S = 1.0  # between fsyncs of the audit file while records keep coming (see JsonlAuditSink)


def sha256_text(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def redacted(text: str) -> str:
    """What the audit keeps of a text the guard found or removed: its length only ("" stays "")."""
    return f"[redacted: {len(text)} characters]" if text else ""


def audit_violation(violation: Any) -> dict[str, Any]:
    """A violation as the audit stores it: the evidence redacted, and the message too unless a rule wrote it."""
    data = violation.model_dump(mode="json") if hasattr(violation, "model_dump") else dict(violation)
    data["evidence"] = redacted(data.get("evidence") or "")
    if data.get("critic") != RULES:
        data["message"] = redacted(data.get("message") or "")
    return data


def audit_record(
    conversation: list[Message], result: GuardResult, policy_info: dict[str, str], include_text: bool
) -> dict[str, Any]:
    """The ``guard`` audit record of one decision; without ``include_text`` the texts are replaced by their hashes.
    Evidence is redacted either way, and a reply the guard changed is kept only as its hash."""
    messages = [m.model_dump() for m in conversation]
    rounds = []
    for round_ in result.rounds:
        data = round_.model_dump(mode="json")
        data["violations"] = [audit_violation(v) for v in round_.violations]
        rounds.append(data)
    unchanged = result.response == result.original
    return {
        "id": result.id,
        "time": now(),
        "policy": policy_info,
        "action": result.action,
        "compliant": result.compliant,
        "abstained": result.abstained,
        "principle_ids": sorted({v.principle_id for r in result.rounds for v in r.violations}),
        "violations": [audit_violation(v) for v in result.violations],
        "rounds": rounds,
        "conversation": messages if include_text else sha256_text(json.dumps(messages, sort_keys=True)),
        "original": result.original if include_text and unchanged else sha256_text(result.original),
        "response": result.response if include_text else sha256_text(result.response),
        "timings_ms": result.timings_ms,
    }


class JsonlAuditSink:
    """The default audit sink: appends every record of the given kinds to a JSONL file (thread-safe).

    Each record is written and flushed to the operating system before the guard's answer is returned, so a killed
    process loses no record; the file is fsynced (so that a power cut loses none either) at the end of every guard
    run, at most ``FSYNC_INTERVAL_S`` after a record while records keep coming, when the sink is closed, and when the
    process exits. An fsync per record would cost milliseconds, under the lock, on every request a server guards.
    """

    def __init__(self, path: str | Path, kinds: Sequence[str] = ("guard", "guard_run", "serve")) -> None:
        self.path = Path(path)
        self.check(self.path)
        self.kinds = set(kinds)
        self._lock = threading.Lock()
        self._state = _SyncState()
        # Sync what is left when the sink is dropped or the interpreter exits (finalize runs at exit too).
        weakref.finalize(self, _sync_quietly, self.path, self._state)

    @staticmethod
    def check(path: Path) -> None:
        """Refuse an audit path that could never be written, without creating anything (validation has no side
        effects; the folders are made on the first record)."""
        if path.is_dir():
            raise ConfigError(f"audit.path {path} is a folder; name a .jsonl file")
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ConfigError(f"audit.path {path}: {ancestor} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ConfigError(f"audit.path {path}: cannot be written (permission denied)")

    @hookimpl
    def cai_on_record(self, record, kind):
        if kind not in self.kinds:
            return
        line = dumps_line({"kind": kind, **record})
        with self._lock:
            try:
                created = not self.path.exists()
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(line)
                    handle.flush()
                    self._state.dirty = True
                    if kind == "guard_run" or time.monotonic() - self._state.synced >= FSYNC_INTERVAL_S:
                        self._state.fsync(handle.fileno())
                if created:  # the new file's name is durable only once its folder is synced
                    fsync_dir(self.path.parent)
            except OSError as exc:
                raise ConfigError(f"cannot append to the audit log {self.path}: {exc.strerror or exc}") from None

    def sync(self) -> None:
        """Flush every record written so far to disk (fsync)."""
        with self._lock:
            try:
                _sync_file(self.path, self._state)
            except OSError as exc:
                raise ConfigError(f"cannot sync the audit log {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        """Sync the file (the sink may still be used afterwards: each record opens the file anew)."""
        self.sync()


class _SyncState:
    def __init__(self) -> None:
        self.dirty = False
        self.synced = time.monotonic()

    def fsync(self, fd: int) -> None:
        os.fsync(fd)
        self.dirty, self.synced = False, time.monotonic()


def _sync_file(path: Path, state: _SyncState) -> None:
    if not state.dirty:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # never creates the file
    try:
        state.fsync(fd)
    finally:
        os.close(fd)


def _sync_quietly(path: Path, state: _SyncState) -> None:
    try:
        _sync_file(path, state)
    except OSError:  # at exit there is no one to tell; every record was already flushed to the system
        pass
