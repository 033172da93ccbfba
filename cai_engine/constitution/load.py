"""Loading, composing (``extends``) and linting constitutions.

Files are YAML or JSON, read as strict UTF-8 with safe loaders only. Every error names the file, the JSON path and,
where it can be found, the line, and says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from cai_engine.constitution.lint import LintIssue, lint
from cai_engine.constitution.model import Constitution, Principle
from cai_engine.constitution.problems import (
    ConstitutionProblems,
    Problem,
    did_you_mean,
    json_path,
    line_of,
    problems_of,
    sort_problems,
)
from cai_engine.errors import ConstitutionError, UnknownComponentError
from cai_engine.files.inputs import limit_hint, limits, parse_document, read_document, symlink_chain

__all__ = [  # lint lives in constitution.lint; these names stay importable from here
    "CONSTITUTION_SUFFIXES",
    "Checked",
    "LintIssue",
    "RawConstitution",
    "check_constitution",
    "lint",
    "load_constitution",
    "read_constitution_file",
    "resolve",
]

CONSTITUTION_SUFFIXES = (".yaml", ".yml", ".json")

# A lookup from a parent name to (raw data, source label, directory for relative parents).
ParentLookup = Callable[[str], "RawConstitution"]


@dataclass(frozen=True)
class RawConstitution:
    """A parsed but unresolved constitution and where it came from."""

    data: Mapping[str, Any]
    source: str
    base_dir: Path | None = None
    lines: Mapping[tuple[Any, ...], int] | None = None
    identity: tuple[int, int] | None = None  # (device, inode) of the file it was read from


# -- reading files -----------------------------------------------------------------------------------------------


def read_constitution_file(path: str | Path) -> RawConstitution:
    """Read and parse one constitution file without validating or resolving it (a regular file only; its size, and
    its count of principles and rules, within the limits)."""
    path = Path(path)
    if path.suffix.lower() not in CONSTITUTION_SUFFIXES:
        raise ConstitutionError(
            f"unsupported file type {path.suffix or '(none)'!r}; use .yaml, .yml or .json", source=str(path)
        )
    text, identity = read_document(path)
    if not text.strip():
        raise ConstitutionError(
            "the file is empty; a constitution needs at least name, version and principles", source=str(path)
        )
    data, lines = parse_document(text, str(path), json_only=path.suffix.lower() == ".json")
    if not isinstance(data, dict):
        raise ConstitutionError(
            f"the top level must be a mapping (name, version, principles, ...), not {type(data).__name__}",
            source=str(path),
        )
    check_counts(data.get("principles"), str(path), "principles")
    return RawConstitution(data=data, source=str(path), base_dir=path.parent, lines=lines, identity=identity)


def check_counts(principles: Any, source: str, key: str) -> None:
    """Refuse a list of principles (raw data, before validation) longer than ``CAI_LIMIT_PRINCIPLES`` or holding
    more than ``CAI_LIMIT_RULES`` rules: counting is cheap, validating 100,000 principles is not (nor is finding
    line numbers in a large JSON file, so the message names the key alone)."""
    if not isinstance(principles, list):
        return
    bounds = limits()
    if len(principles) > bounds.principles:
        raise ConstitutionError(
            f"{len(principles):,} principles, over the limit of {bounds.principles:,}; {limit_hint('principles')}",
            source=source,
            where=key,
        )
    rules = sum(len(p["rules"]) for p in principles if isinstance(p, dict) and isinstance(p.get("rules"), list))
    if rules > bounds.rules:
        raise ConstitutionError(
            f"{rules:,} rules, over the limit of {bounds.rules:,}; {limit_hint('rules')}", source=source, where=key
        )


# -- validation --------------------------------------------------------------------------------------------------


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The keys a mapping at ``loc`` may hold (aliases as written in files), walking the model's field types; None
    where ``loc`` is not a model (a free-form value)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        current = _model_in(current.model_fields[part].annotation)
        if current is None:
            return None
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return None
    return [field.alias or name for name, field in current.model_fields.items()]


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside ``list[X]``, ``dict[str, X]``, ``X | None`` or ``Annotated[X, ...]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def schema_problems(
    data: Mapping[str, Any],
    model: type[BaseModel],
    *,
    source: str | None,
    lines: Mapping[tuple[Any, ...], int] | None,
    schema: str,
) -> list[Problem]:
    """Every error pydantic finds in ``data``, one :class:`Problem` each, with its line and, for an unknown key, the
    known keys most like it. ``schema`` names the committed JSON Schema file users can read."""
    try:
        model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            problems.append(
                Problem(
                    _explain(error, model, loc, schema),
                    source=source,
                    path=json_path(loc) if loc else "",
                    line=line_of(loc, lines),
                )
            )
        return sort_problems(problems)
    return []


def _explain(error: Mapping[str, Any], model: type[BaseModel], loc: tuple[Any, ...], schema: str) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        known = _fields_at(model, loc[:-1]) or []
        hint = did_you_mean(str(loc[-1]), known) if loc else ""
        return f"unknown key{hint or f'; remove it or check its spelling against {schema}'}"
    if kind == "missing":
        return "required field is missing"
    message = str(error.get("msg", "invalid value"))
    return message.removeprefix("Value error, ")


def constitution_problems(raw: RawConstitution) -> list[Problem]:
    """Every schema problem of one file (its parents are not read): duplicate ids, wrong types, unknown keys."""
    problems: list[Problem] = []
    principles = raw.data.get("principles")
    if isinstance(principles, list):  # name the second occurrence of a duplicate id, with its line
        first_seen: dict[str, int] = {}
        for index, item in enumerate(principles):
            pid = item.get("id") if isinstance(item, dict) else None
            if isinstance(pid, str) and pid in first_seen:
                loc = ("principles", index, "id")
                problems.append(
                    Problem(
                        f"duplicate principle id {pid!r} (first used at principles[{first_seen[pid]}]); ids must be "
                        "unique",
                        source=raw.source,
                        path=json_path(loc),
                        line=line_of(loc, raw.lines),
                    )
                )
            if isinstance(pid, str):
                first_seen.setdefault(pid, index)
    for problem in schema_problems(
        raw.data, Constitution, source=raw.source, lines=raw.lines, schema="schemas/constitution.schema.json"
    ):
        if problems and not problem.path and problem.message.startswith("duplicate principle id"):
            continue  # the model's own check, already reported above with its line
        problems.append(problem)
    return sort_problems(problems)


def _name_problems(raw: RawConstitution, lookup: ParentLookup | None, checks: Collection[str] | None) -> list[Problem]:
    """Parent names and check names looked up in the raw data, for a file whose schema problems stop it from being
    resolved: they are reported in the same run as those problems."""
    problems: list[Problem] = []

    def add(message: str, *loc: Any) -> None:
        problems.append(Problem(message, source=raw.source, path=json_path(loc), line=line_of(loc, raw.lines)))

    extends = raw.data.get("extends")
    for index, ref in enumerate([extends] if isinstance(extends, str) else extends or []):
        if lookup is None or not isinstance(ref, str) or is_constitution_path(ref):
            continue
        try:
            lookup(ref)
        except UnknownComponentError as exc:
            add(
                f"unknown parent constitution {ref!r}{did_you_mean(ref, exc.known, listing='known constitutions')}",
                "extends",
                index,
            )
        except (KeyError, ConstitutionError):
            pass  # resolving reports it, once the file itself is valid
    if checks is not None:
        unknown_checks(raw.data.get("principles"), checks, "principles", add)
    return problems


def unknown_checks(principles: Any, checks: Collection[str], field: str, add: Callable[..., None]) -> None:
    """Report (through ``add(message, *location)``) each name in the ``checks`` of the raw ``principles`` list (a
    constitution's ``principles``, a policy's ``add``, named ``field``) that no installed plugin registers."""
    for index, principle in enumerate(principles if isinstance(principles, list) else []):
        names = principle.get("checks") if isinstance(principle, dict) else None
        for k_index, name in enumerate(names if isinstance(names, list) else []):
            if isinstance(name, str) and name not in checks:
                add(
                    f"unknown check {name!r}{did_you_mean(name, checks, listing='known checks', n=3)}",
                    field,
                    index,
                    "checks",
                    k_index,
                )


def validate_constitution(raw: RawConstitution) -> Constitution:
    """Validate parsed data against the model; every problem found is in the raised
    :class:`ConstitutionProblems`."""
    problems = constitution_problems(raw)
    if problems:
        raise ConstitutionProblems(problems)
    return Constitution.model_validate(raw.data)


# -- extends -----------------------------------------------------------------------------------------------------


def is_constitution_path(ref: str) -> bool:
    """Whether ``extends`` (or a policy's ``constitutions``) names a file rather than a registered constitution."""
    return "/" in ref or "\\" in ref or ref.lower().endswith(CONSTITUTION_SUFFIXES)


Frame = tuple[str, tuple[int, int] | None]  # (how a constitution is named in messages, its file's identity)


def _frame_label(name: str, source: str) -> str:
    path = Path(source)
    shown = symlink_chain(path) if path.suffix.lower() in CONSTITUTION_SUFFIXES and path.is_symlink() else source
    return f"{name} ({shown})"


class _AlreadyReported(ConstitutionError):
    """A parent failed only because one of its own parents did, whose problems another branch of the same load
    has already reported (the first branch to reach a file reports its problems; they reach the top from there)."""


Origins = dict[str, tuple[RawConstitution, int]]  # principle id -> (the file that defines it, its index there)


def resolve(
    raw: RawConstitution,
    lookup: ParentLookup | None = None,
    *,
    _stack: tuple[Frame, ...] = (),
    _done: dict[str, Any] | None = None,
) -> Constitution:
    """Validate ``raw`` and merge its parents into it.

    Parents merge in order; a principle with an id already present replaces it in place, new ones append;
    ``remove`` drops inherited ids. The result has no ``extends`` left and is what every component sees.
    A cycle is found by name and by file (so a symlink back to a file already in the chain is one), and named with
    every link; the merged result is held to the principle and rule limits too. Every problem found (in this file
    and in the parents it could read) is in the raised :class:`ConstitutionProblems`.
    """
    return _resolve(raw, lookup, _stack=_stack, _done=_done)[0]


def resolve_with_origins(raw: RawConstitution, lookup: ParentLookup | None = None) -> tuple[Constitution, Origins]:
    """:func:`resolve`, also returning where each principle of the result was defined (for :func:`locate`)."""
    return _resolve(raw, lookup)


def _resolve(
    raw: RawConstitution,
    lookup: ParentLookup | None = None,
    *,
    _stack: tuple[Frame, ...] = (),
    _done: dict[str, tuple[Constitution, Origins] | None] | None = None,
) -> tuple[Constitution, Origins]:
    own = validate_constitution(raw)
    label = _frame_label(own.name, raw.source)

    def problem(message: str, *loc: Any) -> Problem:
        return Problem(message, source=raw.source, path=json_path(loc), line=line_of(loc, raw.lines))

    seen_files = [ident for _, ident in _stack if ident is not None]
    if own.name in [s.split(" (")[0] for s, _ in _stack] or (raw.identity is not None and raw.identity in seen_files):
        again = next((s for s, ident in _stack if raw.identity is not None and ident == raw.identity), None)
        if again is not None and again != label:
            label += f", the same file as {again}"
        chain = " -> ".join([*(s for s, _ in _stack), label])
        raise ConstitutionProblems([problem(f"'extends' forms a cycle: {chain}; remove one of the links", "extends")])
    stack = (*_stack, (label, raw.identity))
    # Each parent is resolved once per load; one that failed is None here, its problems reported the first time.
    done: dict[str, tuple[Constitution, Origins] | None] = {} if _done is None else _done
    bounds = limits()

    problems: list[Problem] = []
    failed = False  # a parent that failed earlier in this load: its problems are already reported
    principles: dict[str, Principle] = {}
    origins: Origins = {}
    examples = []
    comparison_examples = []
    stance = None
    for index, parent_ref in enumerate(own.extends):
        base = raw.base_dir or Path.cwd()
        key = _parent_key(base, parent_ref)
        if key in done:
            resolved = done[key]
            if resolved is None:
                failed = True
                continue
            parent, parent_origins = resolved
        else:
            if len(stack) >= bounds.extends_depth:
                raise ConstitutionProblems(
                    [
                        problem(
                            f"'extends' goes more than {bounds.extends_depth} levels deep; "
                            f"{limit_hint('extends_depth')}",
                            "extends",
                            index,
                        )
                    ]
                )
            if len(done) >= bounds.extends_files:
                raise ConstitutionProblems(
                    [
                        problem(
                            f"'extends' reaches more than {bounds.extends_files} files; {limit_hint('extends_files')}",
                            "extends",
                            index,
                        )
                    ]
                )
            if is_constitution_path(parent_ref):
                try:
                    parent_raw = read_constitution_file(base / parent_ref)
                except ConstitutionError as exc:
                    problems.append(problem(f"cannot load parent {parent_ref!r}: {exc}", "extends", index))
                    continue
            elif lookup is None:
                problems.append(
                    problem(
                        f"parent {parent_ref!r} is a name, but no registry was given to look it up; pass a path "
                        "instead",
                        "extends",
                        index,
                    )
                )
                continue
            else:
                try:
                    parent_raw = lookup(parent_ref)
                except UnknownComponentError as exc:
                    hint = did_you_mean(parent_ref, exc.known, listing="known constitutions")
                    problems.append(problem(f"unknown parent constitution {parent_ref!r}{hint}", "extends", index))
                    continue
                except KeyError as exc:
                    problems.append(problem(f"unknown parent constitution: {exc}", "extends", index))
                    continue
                except ConstitutionError as exc:
                    problems.append(problem(f"cannot load parent {parent_ref!r}: {exc}", "extends", index))
                    continue
            try:
                parent, parent_origins = _resolve(parent_raw, lookup, _stack=stack, _done=done)
            except ConstitutionProblems as exc:  # the parent's own problems, each in its own file
                done[key] = None
                problems.extend(exc.problems)
                continue
            except _AlreadyReported:
                done[key] = None
                failed = True
                continue
            done[key] = (parent, parent_origins)
        for principle in parent.principles:
            principles[principle.id] = principle
            if principle.id in parent_origins:
                origins[principle.id] = parent_origins[principle.id]
        examples.extend(parent.examples)
        comparison_examples.extend(parent.comparison_examples)
        stance = stance or parent.stance

    for index, principle in enumerate(own.principles):
        principles[principle.id] = principle  # dict keeps the parent's position for overrides
        origins[principle.id] = (raw, index)
    if not problems and not failed:  # with a parent missing, an id it would have defined is not a typo
        for index, removed in enumerate(own.remove):
            if removed not in principles:
                hint = did_you_mean(removed, principles, listing="known ids")
                problems.append(problem(f"'remove' names {removed!r}, which no parent defines{hint}", "remove", index))
                continue
            del principles[removed]
    if problems:
        raise ConstitutionProblems(sort_problems(problems))
    if failed:
        raise _AlreadyReported(raw.source)
    if own.extends:  # each file was counted as it was read; the merged whole is held to the same limits
        rules = sum(len(p.rules) for p in principles.values())
        for count, field in ((len(principles), "principles"), (rules, "rules")):
            if count > getattr(bounds, field):
                raise ConstitutionProblems(
                    [
                        problem(
                            f"with what it extends merged in, it has {count:,} {field}, over the limit of "
                            f"{getattr(bounds, field):,}; {limit_hint(field)}",
                            "extends",
                        )
                    ]
                )

    if "stance" in own.model_fields_set or stance is None:
        stance = own.stance
    data = own.model_dump(by_alias=True, exclude={"schema_"})
    data.update(
        extends=[],
        remove=[],
        stance=stance,
        principles=list(principles.values()),
        examples=[*examples, *own.examples],
        comparison_examples=[*comparison_examples, *own.comparison_examples],
    )
    return Constitution.model_validate(data), {pid: origins[pid] for pid in principles if pid in origins}


def _parent_key(base: Path, parent_ref: str) -> str:
    """How a parent is cached within one load: a file by its identity (so two paths to one file, through symlinks or
    ``..``, are one parent), a registered constitution by its name."""
    if not is_constitution_path(parent_ref):
        return f"name:{parent_ref}"
    path = base / parent_ref
    try:
        info = os.stat(path)
    except OSError:  # reading it will say what is wrong (missing, a symlink loop, ...)
        return f"path:{os.path.abspath(path)}"
    return f"file:{info.st_dev}:{info.st_ino}"


@dataclass
class Checked:
    """What checking a constitution found: the resolved constitution (None when it could not be built) and every
    problem, errors and warnings, each with its file, line and JSON path."""

    constitution: Constitution | None
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "warning"]


def _as_raw(source: str | Path | Mapping[str, Any] | RawConstitution) -> RawConstitution:
    if isinstance(source, RawConstitution):
        return source
    if isinstance(source, Mapping):
        return RawConstitution(data=source, source="<mapping>")
    return read_constitution_file(source)


def check_constitution(
    source: str | Path | Mapping[str, Any] | RawConstitution,
    lookup: ParentLookup | None = None,
    *,
    checks: Collection[str] | None = None,
) -> Checked:
    """Every problem of a constitution at once: syntax, schema, ``extends`` and ``remove``, then lint (with
    ``checks``, the registered check names, a principle naming any other check is an error). Problems with the
    input are returned, not raised."""
    try:
        raw = _as_raw(source)
        schema = constitution_problems(raw)
        if schema:
            return Checked(None, sort_problems([*schema, *_name_problems(raw, lookup, checks)]))
        constitution, origins = _resolve(raw, lookup)
    except ConstitutionError as exc:
        return Checked(None, problems_of(exc))
    located = [locate(issue, raw, origins) for issue in lint(constitution, checks=checks)]
    return Checked(constitution, sort_problems(located))


def locate(issue: LintIssue, raw: RawConstitution, origins: Origins) -> Problem:
    """A lint issue of the resolved constitution, placed in the file (a parent's, for an inherited principle) that
    defines what it is about."""
    source, loc, lines = raw.source, issue.field, raw.lines
    if issue.principle is not None and issue.principle in origins:
        origin, index = origins[issue.principle]
        source, loc, lines = origin.source, ("principles", index, *issue.field), origin.lines
    elif issue.principle is not None:
        loc = ()
    path = json_path(loc) if loc else issue.where
    return Problem(issue.message, source=source, path=path, line=line_of(loc, lines), level=issue.level)


def load_constitution(
    source: str | Path | Mapping[str, Any] | RawConstitution,
    lookup: ParentLookup | None = None,
    *,
    checks: Collection[str] | None = None,
) -> Constitution:
    """Load a constitution from a file, a mapping or parsed data; resolve ``extends``; fail on lint errors (and,
    given ``checks``, on a check name not among them). The raised :class:`ConstitutionProblems` lists every
    problem found."""
    checked = check_constitution(source, lookup, checks=checks)
    if checked.errors or checked.constitution is None:
        raise ConstitutionProblems(checked.errors)
    return checked.constitution
