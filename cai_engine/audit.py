"""The default audit sink: every guard decision (and guard run and server request) appended to a JSONL file."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .hookspecs import hookimpl
from .jsonl import dumps_line
from .records import GuardResult
from .runs import now
from .schema import Message


def sha256_text(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def audit_record(
    conversation: list[Message], result: GuardResult, policy_info: dict[str, str], include_text: bool
) -> dict[str, Any]:
    """The ``guard`` audit record of one decision; without ``include_text`` the texts are replaced by their hashes."""
    messages = [m.model_dump() for m in conversation]
    return {
        "id": result.id,
        "time": now(),
        "policy": policy_info,
        "action": result.action,
        "compliant": result.compliant,
        "abstained": result.abstained,
        "principle_ids": sorted({v.principle_id for r in result.rounds for v in r.violations}),
        "violations": [v.model_dump() for v in result.violations],
        "rounds": [r.model_dump() for r in result.rounds],
        "conversation": messages if include_text else sha256_text(json.dumps(messages, sort_keys=True)),
        "original": result.original if include_text else sha256_text(result.original),
        "response": result.response if include_text else sha256_text(result.response),
        "timings_ms": result.timings_ms,
    }


class JsonlAuditSink:
    """The default audit sink: appends every record of the given kinds to a JSONL file (thread-safe)."""

    def __init__(self, path: str | Path, kinds: Sequence[str] = ("guard", "guard_run", "serve")) -> None:
        self.path = Path(path)
        self.check(self.path)
        self.kinds = set(kinds)
        self._lock = threading.Lock()

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
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(line)
                    handle.flush()
            except OSError as exc:
                raise ConfigError(f"cannot append to the audit log {self.path}: {exc.strerror or exc}") from None
