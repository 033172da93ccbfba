"""Run directories: append-only JSONL records, the resolved config, and resume.

A run directory holds ``run.json`` (what was asked, fully resolved, with the constitution's hash) and
``records.jsonl`` (one line per finished item). Rerunning the same command continues: finished ids are skipped and
nothing is duplicated. Records are written a batch at a time and flushed to disk, so a killed run loses at most the
batch in flight; a line cut off by the kill is dropped on resume. Asking a directory for a different config is an
error that names what differs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .errors import RunError

RECORDS = "records.jsonl"
MANIFEST = "run.json"
AUXILIARY = {"gate.json", "reviews.jsonl"}  # files a run may hold before its first record


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new else [f"{path}: {json.dumps(old)} -> {json.dumps(new)}"]


class RunDirectory:
    """One run's folder. ``fingerprint`` is what must match to resume (settings that change results)."""

    def __init__(self, path: str | os.PathLike[str], kind: str) -> None:
        self.path = Path(path)
        self.kind = kind
        self.records_path = self.path / RECORDS
        self.manifest_path = self.path / MANIFEST

    # -- manifest --------------------------------------------------------------------------------------------

    def open(self, fingerprint: dict[str, Any], extra: dict[str, Any] | None = None) -> bool:
        """Create the directory or check that it was made by the same config. Returns True when resuming."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path}: exists and is not a directory; choose another --out")
        if self.manifest_path.exists():
            try:
                manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise RunError(f"{self.manifest_path}: unreadable ({exc}); move the directory aside") from None
            if manifest.get("kind") != self.kind:
                raise RunError(
                    f"{self.path}: is a {manifest.get('kind')!r} run, not {self.kind!r}; choose another --out"
                )
            new = json.loads(json.dumps(fingerprint, default=str))
            old = manifest.get("fingerprint")
            if isinstance(old, dict) and isinstance(new, dict):  # settings this version no longer counts are ignored
                old = {k: v for k, v in old.items() if k in new}
            changes = _diff(old, new)
            if changes:
                shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
                raise RunError(
                    f"{self.path}: was made with a different config ({shown}); rerun with the same "
                    "settings to resume, or choose another --out"
                )
            return True
        if self.path.exists() and any(p.name not in AUXILIARY for p in self.path.iterdir()):
            raise RunError(f"{self.path}: exists, is not empty and is not a {self.kind} run; choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "kind": self.kind,
            "cai_engine": __version__,
            "created": now(),
            "fingerprint": fingerprint,
            **(extra or {}),
        }
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        tmp.replace(self.manifest_path)
        return False

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError(f"{self.path}: not a run directory (no {MANIFEST})") from None

    # -- records ---------------------------------------------------------------------------------------------

    def records(self, *, repair: bool = False, required: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
        """Every complete record. A final line cut off by a kill is skipped (and truncated with ``repair``); a
        record that is not an object or lacks one of the ``required`` keys is a :class:`RunError` naming the line."""
        if not self.records_path.exists():
            return
        data = self.records_path.read_bytes()
        good_end = 0
        lines = data.split(b"\n")
        for number, line in enumerate(lines, start=1):
            is_last = number == len(lines)
            if not line.strip():
                if not is_last:
                    good_end += len(line) + 1
                continue
            try:
                record = json.loads(line)
            except ValueError:
                if is_last:  # the write in flight when the run was killed
                    break
                raise RunError(
                    f"{self.records_path}:{number}: corrupt record; the file was edited or damaged"
                ) from None
            missing = [k for k in required if k not in record] if isinstance(record, dict) else list(required)
            if not isinstance(record, dict) or missing:
                what = f"lacks {missing[0]!r}" if isinstance(record, dict) else "is not a JSON object"
                raise RunError(
                    f"{self.records_path}:{number}: the record {what}; this is not a {self.kind} run's "
                    "record (was the file edited, or is this another kind of run?)"
                )
            if is_last:  # a complete JSON object without its newline: keep it, finish the line
                if repair:
                    with open(self.records_path, "ab") as handle:
                        handle.write(b"\n")
                good_end += len(line) + 1
            else:
                good_end += len(line) + 1
            yield record
        if repair and good_end < len(data):
            with open(self.records_path, "r+b") as handle:
                handle.truncate(good_end)

    def done_ids(self) -> set[str]:
        return {r["key"] for r in self.records(repair=True)}

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records as JSONL lines and flush them to disk before returning."""
        blob = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
        if not blob:
            return
        with open(self.records_path, "a", encoding="utf-8") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
