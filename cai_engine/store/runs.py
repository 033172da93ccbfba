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
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from pydantic import BaseModel, ValidationError

from cai_engine.errors import RunError, describe_validation
from cai_engine.files.jsonl import append_jsonl, write_json
from cai_engine.records import PreferenceRecord, SLRecord
from cai_engine.version import __version__

RECORDS = "records.jsonl"
MANIFEST = "run.json"
AUXILIARY = {"gate.json", "reviews.jsonl"}  # files a run may hold before its first record
RECORD_TYPES: dict[str, type[BaseModel]] = {"sl": SLRecord, "rl": PreferenceRecord}

R = TypeVar("R", bound=BaseModel)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new else [f"{path}: {json.dumps(old)} -> {json.dumps(new)}"]


class RunDirectory(Generic[R]):
    """One run's folder. ``fingerprint`` is what must match to resume (settings that change results).

    Its records are ``record_type`` models (by default the kind's: :class:`SLRecord` for ``sl``,
    :class:`PreferenceRecord` for ``rl``), validated as they are read and dumped as they are written.
    """

    def __init__(self, path: str | os.PathLike[str], kind: str, record_type: type[R] | None = None) -> None:
        self.path = Path(path)
        self.kind = kind
        if record_type is None and kind not in RECORD_TYPES:
            raise ValueError(f"no record type for runs of kind {kind!r}; pass record_type")
        self.record_type = cast("type[R]", record_type or RECORD_TYPES[kind])
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
        write_json(self.manifest_path, manifest, what="run manifest")
        return False

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError(f"{self.path}: not a run directory (no {MANIFEST})") from None

    # -- records ---------------------------------------------------------------------------------------------

    def records(self, *, repair: bool = False) -> Iterator[R]:
        """Every complete record. A final line cut off by a kill is skipped (and truncated with ``repair``); a
        record that is not an object or not a valid record of this kind is a :class:`RunError` naming the line."""
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
            record = self._validate(record, number)
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

    def _validate(self, record: Any, number: int) -> Any:
        if not isinstance(record, dict):
            what = "is not a JSON object"
        else:
            try:
                return self.record_type.model_validate(record)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(x) for x in first["loc"])
                what = f"lacks {where!r}" if first["type"] == "missing" else f"is invalid ({describe_validation(exc)})"
        raise RunError(
            f"{self.records_path}:{number}: the record {what}; this is not a {self.kind} run's "
            "record (was the file edited, or is this another kind of run?)"
        )

    def done_ids(self) -> set[str]:
        return {cast(Any, r).key for r in self.records(repair=True)}

    def append(self, records: Iterable[R | dict[str, Any]]) -> None:
        """Append records (models of this run's record type, or their JSON form, validated here) as JSONL lines and
        flush them to disk before returning."""
        append_jsonl(
            self.records_path, [self.record_type.model_validate(r) if isinstance(r, dict) else r for r in records]
        )
