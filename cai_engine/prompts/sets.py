"""Prompt sets: registered collections of conversations, and loaders for users' own files.

A prompt source is ``builtin:<name>`` / ``<plugin>:<name>`` (a registered set) or a path: JSONL, CSV, plain text
(one prompt per line), or a Hugging Face ``datasets`` folder (``save_to_disk``) or data file (parquet, arrow).
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cai_engine.constitution.model import Message
from cai_engine.context import default_runtime
from cai_engine.errors import CaiError, ConstitutionError, describe_validation
from cai_engine.files.inputs import limits, read_text

DEFAULT_FIELDS = ("messages", "conversation", "prompt", "question", "instruction", "text")


class PromptError(CaiError):
    """A prompt source cannot be read as asked."""


class PromptItem(BaseModel):
    """One prompt: a conversation ending with a user turn."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="Stable id; records of a run are keyed by it.")
    conversation: list[Message] = Field(min_length=1)
    category: str | None = None
    tags: list[str] = Field(default_factory=list)

    @property
    def text(self) -> str:
        return self.conversation[-1].content

    def hook_item(self) -> dict[str, Any]:
        """This prompt as the ``item`` the ``cai_select_principles`` hook receives, in every phase: its ``id``,
        ``conversation``, ``category`` and ``tags``."""
        return {"id": self.id, "conversation": self.conversation, "category": self.category, "tags": self.tags}


@dataclass
class PromptSet:
    """A named prompt collection a plugin registers through ``cai_register_prompt_sets``.

    Give either ``path`` (any format :func:`load_prompt_file` reads) or ``loader`` (a callable returning items).
    ``heldout=True`` marks evaluation-only sets; training commands never use them by default.
    """

    name: str
    description: str = ""
    path: Path | None = None
    loader: Callable[[], Iterable[PromptItem]] | None = None
    field: str | None = None
    heldout: bool = False
    tags: list[str] = dataclass_field(default_factory=list)

    def items(self) -> list[PromptItem]:
        if self.loader is not None:
            return list(self.loader())
        if self.path is None:
            raise PromptError(f"prompt set {self.name!r} has neither a path nor a loader")
        return load_prompt_file(self.path, field=self.field)


def id_matches(prompt_id: str, patterns: list[str]) -> bool:
    """Whether a prompt id (or a record key ``kind:id``) matches one of ``patterns`` (shell-style, e.g. ``'rt-*'``)."""
    ids = {prompt_id, prompt_id.split(":", 1)[-1]}
    return any(fnmatch.fnmatchcase(i, pattern) for i in ids for pattern in patterns)


def stable_id(conversation: list[Message]) -> str:
    blob = json.dumps([m.model_dump() for m in conversation], sort_keys=True, ensure_ascii=False)
    return "p-" + hashlib.sha1(blob.encode("utf-8")).hexdigest()[:12]


def _to_item(value: Any, record: dict[str, Any], where: str, field_name: str) -> PromptItem:
    if isinstance(value, str):
        if not value.strip():
            raise PromptError(f"{where}: field {field_name!r} is empty")
        conversation = [Message(role="user", content=value.strip())]
    elif isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        try:
            conversation = [Message.model_validate({"role": m.get("role"), "content": m.get("content")}) for m in value]
        except ValidationError as exc:
            raise PromptError(
                f"{where}: field {field_name!r} is not a list of {{role, content}} messages: {describe_validation(exc, first_only=True)}"
            ) from None
        if conversation[-1].role == "assistant":
            conversation = conversation[:-1]  # a finished exchange: prompt with everything before the reply
        if not conversation or conversation[-1].role != "user":
            raise PromptError(f"{where}: the conversation must end with a user turn")
    else:
        raise PromptError(
            f"{where}: field {field_name!r} must be a string or a list of messages, not {type(value).__name__}"
        )
    raw_id = record.get("id")
    tags = record.get("tags") or []
    return PromptItem(
        id=str(raw_id) if raw_id not in (None, "") else stable_id(conversation),
        conversation=conversation,
        category=record.get("category") if isinstance(record.get("category"), str) else None,
        tags=[str(t) for t in tags] if isinstance(tags, list) else [str(tags)],
    )


def _pick_field(record: dict[str, Any], field_name: str | None, where: str) -> str:
    if field_name is not None:
        if field_name not in record:
            raise PromptError(
                f"{where}: no field {field_name!r}; fields here: {', '.join(map(str, record)) or '(none)'}"
                "; pass --field with one of them"
            )
        return field_name
    for candidate in DEFAULT_FIELDS:
        if candidate in record:
            return candidate
    raise PromptError(
        f"{where}: none of the usual prompt fields ({', '.join(DEFAULT_FIELDS)}); fields here: "
        f"{', '.join(map(str, record)) or '(none)'}; pass --field to choose one"
    )


def _from_records(records: Iterable[tuple[str, dict[str, Any]]], field_name: str | None) -> list[PromptItem]:
    items: list[PromptItem] = []
    seen: set[str] = set()
    for where, record in records:
        name = _pick_field(record, field_name, where)
        item = _to_item(record[name], record, where, name)
        if item.id in seen:
            continue  # the same prompt twice (or a repeated id) would make duplicate records
        seen.add(item.id)
        items.append(item)
    return items


def load_prompt_file(path: str | Path, *, field: str | None = None) -> list[PromptItem]:
    """Read prompts from a file or a ``datasets`` folder; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise PromptError(f"{path}: no such file or folder")
    if path.is_dir() or path.suffix.lower() in (".parquet", ".arrow"):
        items = _load_hf(path, field)
    else:
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):  # streamed row by row
            from cai_engine.files.jsonl import iter_jsonl

            items = _from_records(iter_jsonl(path, PromptError), field)
            if not items:
                raise PromptError(f"{path}: contains no prompts")
            return items
        try:
            text = read_text(path, max_bytes=limits().data_bytes)
        except ConstitutionError as exc:
            raise PromptError(str(exc)) from None
        if suffix == ".json":
            items = _from_records(_json(text, path), field)
        elif suffix == ".csv":
            items = _from_records(_csv(text, path), field)
        else:
            items = [
                _to_item(line, {}, f"{path}:{n}", "line")
                for n, line in enumerate(text.splitlines(), start=1)
                if line.strip()
            ]
            items = list({item.id: item for item in items}.values())
    if not items:
        raise PromptError(f"{path}: contains no prompts")
    return items


def _json(text: str, path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise PromptError(f"{path}: nested too deeply") from None
    if not isinstance(data, list):
        raise PromptError(f"{path}: a .json prompt file must hold a list of objects (or use .jsonl)")
    for index, record in enumerate(data):
        if isinstance(record, str):
            record = {"prompt": record}
        if not isinstance(record, dict):
            raise PromptError(f"{path}: item [{index}] must be an object or a string")
        yield f"{path}[{index}]", record


def _csv(text: str, path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    """Rows of a CSV file with a header, read strictly: an unclosed quote or a row with the wrong number of fields
    is an error naming the line, never two rows silently merged into one prompt."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise PromptError(f"{path}:1: invalid CSV header ({exc})") from None
    if not header or not any(h.strip() for h in header):
        raise PromptError(f"{path}: the CSV file has no header row")
    if len(set(header)) != len(header):
        raise PromptError(f"{path}:1: the CSV header repeats a column name")
    start = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            hint = (
                "; a quoted field that never closes swallows the rows after it"
                if "end of data" in str(exc) or "expected" in str(exc)
                else ""
            )
            raise PromptError(f"{path}:{start}: invalid CSV ({exc}){hint}") from None
        if values and len(values) != len(header):
            raise PromptError(
                f"{path}:{start}: {len(values)} fields where the header has {len(header)}; quote fields "
                "that hold commas (an unbalanced quote merges rows)"
            )
        if values:
            yield f"{path}:{start}", dict(zip(header, values))
        start = reader.line_num + 1


def iter_dataset_rows(path: Path, error: type[CaiError] = PromptError) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("path[i]", row)`` for each row of a Hugging Face ``datasets`` folder (``save_to_disk``; its train split,
    else its first) or a parquet/arrow file; an unreadable one raises ``error``."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise error("reading Hugging Face datasets needs the 'datasets' package") from None
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable folders
        raise error(f"{path}: not a readable datasets folder or file ({type(exc).__name__}: {exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    return ((f"{path}[{i}]", dict(row)) for i, row in enumerate(ds))


def _load_hf(path: Path, field_name: str | None) -> list[PromptItem]:
    return _from_records(iter_dataset_rows(path), field_name)


def is_heldout(source: str | Path, registry: Any) -> bool:
    """Whether ``source`` names a registered evaluation-only prompt set."""
    text = str(source)
    if ":" not in text or Path(text).exists():
        return False
    try:
        return bool(registry.prompt_set(text).heldout)
    except KeyError:
        return False


def normalise_prompt(text: str) -> str:
    """Case, spacing and punctuation folded away, so a lightly edited copy of a prompt still matches."""
    import re

    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def heldout_fingerprints(registry: Any) -> dict[str, str]:
    """Normalised text -> 'set:id' for every prompt of every registered held-out (evaluation-only) set."""
    out: dict[str, str] = {}
    for name in registry.prompt_set_names():
        prompt_set = registry.prompt_set(name)
        if not prompt_set.heldout:
            continue
        for item in load_prompts(f"builtin:{name}", registry):
            for message in item.conversation:
                if message.role == "user":
                    out.setdefault(normalise_prompt(message.content), f"{name}:{item.id}")
    return out


def refuse_heldout_content(items: list[PromptItem], registry: Any, source: str) -> None:
    """Refuse training prompts whose text is a held-out prompt, whatever file they came from (a copy of a held-out
    file passed as a path is caught here, not only the named set)."""
    from cai_engine.errors import ConfigError

    known = heldout_fingerprints(registry)
    for item in items:
        for message in item.conversation:
            match = known.get(normalise_prompt(message.content)) if message.role == "user" else None
            if match:
                raise ConfigError(
                    f"{source}: prompt {item.id!r} is the held-out evaluation prompt {match}; training "
                    "on it would contaminate evaluation. Remove it, or set allow_heldout: true"
                )


def load_training_prompts(
    source: str | Path,
    registry: Any,
    *,
    field: str | None = None,
    limit: int | None = None,
    allow_heldout: bool = False,
) -> list[PromptItem]:
    """:func:`load_prompts` for training data: an evaluation-only (held-out) set, or a file holding any held-out
    prompt's text, is refused unless ``allow_heldout``; training on it would contaminate evaluation."""
    from cai_engine.errors import ConfigError

    if not allow_heldout and is_heldout(source, registry):
        raise ConfigError(
            f"{source} is an evaluation-only (held-out) prompt set; training on it would contaminate evaluation. "
            "Choose another set, or set allow_heldout: true"
        )
    items = load_prompts(source, registry, field=field, limit=limit)
    if not allow_heldout:
        refuse_heldout_content(items, registry, str(source))
    return items


def source_list(sources: str | list[str]) -> list[str]:
    """A config's ``prompts``, one source or a list, as a list."""
    return [sources] if isinstance(sources, str) else list(sources)


def source_limit(limit: int | dict[str, int] | None, source: str) -> int | None:
    """A config's ``limit`` for one source: one number for all, or a mapping (sources it does not name: None)."""
    return limit.get(source) if isinstance(limit, dict) else limit


def load_training_sources(
    sources: list[str],
    registry: Any,
    *,
    field: str | None = None,
    limit_for: Callable[[str], int | None] = lambda source: None,
    allow_heldout: bool = False,
    kept_as: str = "records",
) -> list[PromptItem]:
    """:func:`load_training_prompts` over several sources, in order, each with its own limit; an id that two sources
    share is a :class:`ConfigError` (runs keep their ``kept_as`` by id)."""
    from cai_engine.errors import ConfigError

    items: list[PromptItem] = []
    origin: dict[str, str] = {}
    for source in sources:
        for item in load_training_prompts(
            source, registry, field=field, limit=limit_for(source), allow_heldout=allow_heldout
        ):
            if item.id in origin:
                raise ConfigError(
                    f"prompts: id {item.id!r} is in {origin[item.id]} and {source}; ids must be unique "
                    f"({kept_as} are kept by id)"
                )
            origin[item.id] = source
            items.append(item)
    return items


def load_prompts(
    source: str | Path, registry: Any = None, *, field: str | None = None, limit: int | None = None
) -> list[PromptItem]:
    """Resolve ``builtin:name`` / ``plugin:name`` through ``registry`` (without one, the process's default runtime's
    registry, never a second one), anything else as a path."""
    text = str(source)
    path = Path(text)
    if ":" in text and not path.exists() and not (len(text) > 1 and text[1] == ":"):
        if registry is None:
            registry = default_runtime().registry
        prompt_set = registry.prompt_set(text)
        if field:
            prompt_set = PromptSet(**{**prompt_set.__dict__, "field": field})
        items = prompt_set.items()
    else:
        items = load_prompt_file(path, field=field)
    return items[:limit] if limit else items
