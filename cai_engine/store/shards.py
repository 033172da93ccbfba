"""Sharded runs: split phase 1, labelling or evaluation by prompt id, run the shards anywhere, merge them into one.

``--shard i/n`` makes a run handle only the prompts whose id hashes to shard ``i`` of ``n`` (deterministic: the same
prompt always lands in the same shard, whatever else is in the set). Each shard is an ordinary resumable run
directory whose manifest records its shard; :func:`merge_runs` checks that the shards were made by the same config
(everything but the shard), that they cover ``0 .. n-1`` exactly once, and writes one run whose records are the
union, ready for ``cai export``. :func:`run_sharded` runs every shard of a stage and merges them, in this process or as Ray tasks
on a cluster (each task builds its own runtime, so each worker holds its own model replica or endpoint client).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from cai_engine.errors import ConfigError, RunError
from cai_engine.records import MergeSummary
from cai_engine.store.runs import RunDirectory

SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


class Shard(BaseModel):
    """Shard ``index`` of ``count`` (0-based)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0)
    count: int = Field(ge=1)

    @classmethod
    def parse(cls, text: str | Shard | dict[str, Any]) -> Shard:
        """``"i/n"`` (0 <= i < n) or a mapping; anything else is a :class:`ConfigError`."""
        if isinstance(text, Shard):
            return text
        if isinstance(text, dict):
            return cls.model_validate(text)
        match = SHARD.match(str(text))
        if not match or int(match.group(1)) >= int(match.group(2)):
            raise ConfigError(f"shard {text!r}: write it as i/n with 0 <= i < n, e.g. 0/4")
        return cls(index=int(match.group(1)), count=int(match.group(2)))

    def owns(self, item_id: str) -> bool:
        digest = hashlib.sha256(item_id.encode("utf-8")).hexdigest()
        return int(digest[:12], 16) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _normalise(value: str | None) -> str | None:
    return None if value is None else str(Shard.parse(value))


ShardField = Annotated[str | None, AfterValidator(_normalise)]
"""A config field holding ``"i/n"`` (checked and normalised) or None: run configs use it for their ``shard``."""


def shard_field(what: str) -> Any:
    return Field(
        None, description=f"i/n: {what} only the prompts whose id hashes to shard i of n (`cai merge` joins them)."
    )


def shard_dirs(out: str | Path, count: int) -> list[Path]:
    """Where :func:`run_sharded` puts each shard's run: ``OUT.shards/0-of-N`` ... beside the merged ``OUT``."""
    base = Path(str(out).rstrip("/") + ".shards")
    return [base / f"{i}-of-{count}" for i in range(count)]


def merge_runs(out: str | Path, shards: Sequence[str | Path]) -> MergeSummary:
    """Merge the shard run directories of one ``sl`` or ``rl`` run into one run at ``out`` (which must not hold
    another run). ``cai_engine.stages.merge`` picks the merge for any stage's shards."""
    if not shards:
        raise ConfigError("name the shard run directories to merge")
    manifests = []
    for folder in shards:
        manifest = RunDirectory[Any](folder, "sl").manifest()  # any kind reads a manifest; checked below
        manifests.append((Path(folder), manifest))
    kinds = {m.get("kind") for _, m in manifests}
    if len(kinds) != 1 or not kinds <= {"sl", "rl"}:
        raise RunError(f"shards must all be sl runs or all rl runs; found kinds {sorted(map(str, kinds))}")
    kind = str(kinds.pop())
    seen: dict[int, Path] = {}
    counts = set()
    base = None
    for folder, manifest in manifests:
        fingerprint = dict(manifest.get("fingerprint") or {})
        raw = fingerprint.pop("shard", None)
        if raw is None:
            raise RunError(f"{folder}: is not a shard (made without --shard)")
        shard = Shard.parse(raw)
        counts.add(shard.count)
        if shard.index in seen:
            raise RunError(f"{folder} and {seen[shard.index]} are both shard {shard}")
        seen[shard.index] = folder
        if base is None:
            base = (folder, fingerprint)
        elif fingerprint != base[1]:
            differing = sorted(k for k in set(fingerprint) | set(base[1]) if fingerprint.get(k) != base[1].get(k))
            raise RunError(
                f"{folder} was made with a different config from {base[0]} (differs in: {', '.join(differing)}); "
                "only shards of one run can be merged"
            )
    if len(counts) != 1:
        raise RunError(f"the shards disagree on how many shards there are: {sorted(counts)}")
    count = counts.pop()
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        raise RunError(f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} are missing; run them, then merge")
    assert base is not None
    merged: RunDirectory[Any] = RunDirectory(out, kind)
    first_manifest = manifests[0][1]
    extra = {k: v for k, v in first_manifest.items() if k not in {"kind", "cai_engine", "created", "fingerprint"}}
    extra["merged_from"] = [str(seen[i]) for i in range(count)]
    if isinstance(extra.get("config"), dict):
        extra["config"] = {**extra["config"], "shard": None}
    if merged.records_path.exists():
        raise RunError(f"{out}: already holds records; merge into a new folder")
    merged.open(base[1], extra)
    records: list[Any] = []
    keys: set[str] = set()
    for index in range(count):
        shard_dir: RunDirectory[Any] = RunDirectory(seen[index], kind)
        for record in shard_dir.records():
            if record.key in keys:
                raise RunError(f"record {record.key!r} is in more than one shard")
            keys.add(record.key)
            records.append(record)
    records.sort(key=lambda r: r.key)
    merged.append(records)
    gate = seen[0] / "gate.json"  # the same judge labelled every shard (same config): its gate holds for the merge
    if gate.exists() and not (Path(out) / "gate.json").exists():
        shutil.copyfile(gate, Path(out) / "gate.json")
    return MergeSummary(run_dir=str(out), kind=kind, shards=count, records=len(records))


def run_sharded(
    run: Callable[[dict[str, Any], str], dict[str, Any]],
    merge: Callable[[str | Path, Sequence[str | Path]], MergeSummary],
    config: dict[str, Any],
    out: str | Path,
    shards: int,
    *,
    executor: Literal["local", "ray"] = "local",
    ray_address: str | None = None,
) -> MergeSummary:
    """Run a stage as ``shards`` shards (``run(config, out)`` for each: a module-level function, so Ray can send
    it to a worker, which builds its own runtime and models), then ``merge`` them into ``out``.

    ``executor="ray"`` submits each shard as a Ray task (``ray_address``: a cluster to join, ``"auto"`` for the one
    this machine belongs to; None starts a local Ray); ``"local"`` runs them one after another here. Shard runs
    resume like any run, so rerunning after a failure finishes only what is missing.
    """
    if shards < 1:
        raise ConfigError("shards must be at least 1")
    folders = shard_dirs(out, shards)
    configs = [{**config, "shard": f"{i}/{shards}"} for i in range(shards)]
    if executor == "ray":
        try:
            import ray
        except ImportError:
            raise ConfigError(
                "running shards on Ray needs ray; install it with pip install 'cai-engine[ray]'"
            ) from None
        if not ray.is_initialized():
            ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False)
        task = ray.remote(run)
        summaries = ray.get([task.remote(c, str(f)) for c, f in zip(configs, folders)])
    else:
        summaries = [run(c, str(f)) for c, f in zip(configs, folders)]
    merged = merge(out, folders)
    merged.shard_summaries = summaries
    return merged
