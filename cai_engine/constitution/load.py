"""Loading, composing (``extends``) and linting constitutions.

Files are YAML or JSON, read as strict UTF-8 with safe loaders only. Every error names the file, the JSON path and,
where it can be found, the line, and says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cai_engine.constitution.model import Constitution, Phase, Principle
from cai_engine.errors import ConstitutionError
from cai_engine.files.inputs import limit_hint, limits, parse_document, read_document, symlink_chain

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


@dataclass(frozen=True)
class LintIssue:
    level: str  # "error" | "warning"
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.message}"


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


def json_path(loc: tuple[Any, ...]) -> str:
    """Render a pydantic/JSON location as ``principles[3].critique_request``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _where(loc: tuple[Any, ...], lines: Mapping[tuple[Any, ...], int] | None) -> str:
    path = json_path(loc)
    if lines:
        probe = tuple(loc)
        while probe and probe not in lines:
            probe = probe[:-1]
        if probe in lines:
            return f"{path} (line {lines[probe]})"
    return path


def _explain(error: Mapping[str, Any]) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key; remove it or check its spelling against schemas/constitution.schema.json"
    if kind == "missing":
        return "required field is missing"
    message = str(error.get("msg", "invalid value"))
    return message.removeprefix("Value error, ")


def validate_constitution(raw: RawConstitution) -> Constitution:
    """Validate parsed data against the model, turning the first error into a one-line ConstitutionError."""
    principles = raw.data.get("principles")
    if isinstance(principles, list):  # name the second occurrence of a duplicate id, with its line
        first_seen: dict[str, int] = {}
        for index, item in enumerate(principles):
            pid = item.get("id") if isinstance(item, dict) else None
            if isinstance(pid, str) and pid in first_seen:
                raise ConstitutionError(
                    f"duplicate principle id {pid!r} (first used at principles[{first_seen[pid]}]); ids must be unique",
                    source=raw.source,
                    where=_where(("principles", index, "id"), raw.lines),
                )
            if isinstance(pid, str):
                first_seen[pid] = index
    try:
        return Constitution.model_validate(raw.data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise ConstitutionError(_explain(first) + more, source=raw.source, where=_where(loc, raw.lines)) from None


# -- extends -----------------------------------------------------------------------------------------------------


def _is_path(ref: str) -> bool:
    return "/" in ref or "\\" in ref or ref.lower().endswith(CONSTITUTION_SUFFIXES)


Frame = tuple[str, tuple[int, int] | None]  # (how a constitution is named in messages, its file's identity)


def _frame_label(name: str, source: str) -> str:
    path = Path(source)
    shown = symlink_chain(path) if path.suffix.lower() in CONSTITUTION_SUFFIXES and path.is_symlink() else source
    return f"{name} ({shown})"


def resolve(
    raw: RawConstitution,
    lookup: ParentLookup | None = None,
    *,
    _stack: tuple[Frame, ...] = (),
    _done: dict[str, Constitution] | None = None,
) -> Constitution:
    """Validate ``raw`` and merge its parents into it.

    Parents merge in order; a principle with an id already present replaces it in place, new ones append;
    ``remove`` drops inherited ids. The result has no ``extends`` left and is what every component sees.
    A cycle is found by name and by file (so a symlink back to a file already in the chain is one), and named with
    every link; the merged result is held to the principle and rule limits too.
    """
    own = validate_constitution(raw)
    label = _frame_label(own.name, raw.source)
    seen_files = [ident for _, ident in _stack if ident is not None]
    if own.name in [s.split(" (")[0] for s, _ in _stack] or (raw.identity is not None and raw.identity in seen_files):
        again = next((s for s, ident in _stack if raw.identity is not None and ident == raw.identity), None)
        if again is not None and again != label:
            label += f", the same file as {again}"
        chain = " -> ".join([*(s for s, _ in _stack), label])
        raise ConstitutionError(
            f"'extends' forms a cycle: {chain}; remove one of the links",
            source=raw.source,
            where=_where(("extends",), raw.lines),
        )
    stack = (*_stack, (label, raw.identity))
    done: dict[str, Constitution] = {} if _done is None else _done  # each parent is resolved once per load
    bounds = limits()

    principles: dict[str, Principle] = {}
    examples = []
    comparison_examples = []
    stance = None
    for index, parent_ref in enumerate(own.extends):

        def where(index: int = index) -> str:  # the line map is only built for an error message
            return _where(("extends", index), raw.lines)

        base = raw.base_dir or Path.cwd()
        key = _parent_key(base, parent_ref)
        if key in done:
            parent = done[key]
        else:
            if len(stack) >= bounds.extends_depth:
                raise ConstitutionError(
                    f"'extends' goes more than {bounds.extends_depth} levels deep; {limit_hint('extends_depth')}",
                    source=raw.source,
                    where=where(),
                )
            if len(done) >= bounds.extends_files:
                raise ConstitutionError(
                    f"'extends' reaches more than {bounds.extends_files} files; {limit_hint('extends_files')}",
                    source=raw.source,
                    where=where(),
                )
            if _is_path(parent_ref):
                try:
                    parent_raw = read_constitution_file(base / parent_ref)
                except ConstitutionError as exc:
                    raise ConstitutionError(
                        f"cannot load parent {parent_ref!r}: {exc}", source=raw.source, where=where()
                    ) from None
            else:
                if lookup is None:
                    raise ConstitutionError(
                        f"parent {parent_ref!r} is a name, but no registry was given to look it up; pass a path "
                        "instead",
                        source=raw.source,
                        where=where(),
                    )
                try:
                    parent_raw = lookup(parent_ref)
                except KeyError as exc:
                    raise ConstitutionError(
                        f"unknown parent constitution: {exc}", source=raw.source, where=where()
                    ) from None
            parent = resolve(parent_raw, lookup, _stack=stack, _done=done)
            done[key] = parent
        for principle in parent.principles:
            principles[principle.id] = principle
        examples.extend(parent.examples)
        comparison_examples.extend(parent.comparison_examples)
        stance = stance or parent.stance

    for principle in own.principles:
        principles[principle.id] = principle  # dict keeps the parent's position for overrides
    for index, removed in enumerate(own.remove):
        if removed not in principles:
            raise ConstitutionError(
                f"'remove' names {removed!r}, which no parent defines; known ids: {', '.join(principles) or '(none)'}",
                source=raw.source,
                where=_where(("remove", index), raw.lines),
            )
        del principles[removed]
    if own.extends:  # each file was counted as it was read; the merged whole is held to the same limits
        rules = sum(len(p.rules) for p in principles.values())
        for count, field in ((len(principles), "principles"), (rules, "rules")):
            if count > getattr(bounds, field):
                raise ConstitutionError(
                    f"with what it extends merged in, it has {count:,} {field}, over the limit of "
                    f"{getattr(bounds, field):,}; {limit_hint(field)}",
                    source=raw.source,
                    where="extends",
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
    return Constitution.model_validate(data)


def _parent_key(base: Path, parent_ref: str) -> str:
    """How a parent is cached within one load: a file by its identity (so two paths to one file, through symlinks or
    ``..``, are one parent), a registered constitution by its name."""
    if not _is_path(parent_ref):
        return f"name:{parent_ref}"
    path = base / parent_ref
    try:
        info = os.stat(path)
    except OSError:  # reading it will say what is wrong (missing, a symlink loop, ...)
        return f"path:{os.path.abspath(path)}"
    return f"file:{info.st_dev}:{info.st_ino}"


def load_constitution(
    source: str | Path | Mapping[str, Any] | RawConstitution, lookup: ParentLookup | None = None
) -> Constitution:
    """Load a constitution from a file, a mapping or parsed data; resolve ``extends``; fail on lint errors."""
    if isinstance(source, RawConstitution):
        raw = source
    elif isinstance(source, Mapping):
        raw = RawConstitution(data=source, source="<mapping>")
    else:
        raw = read_constitution_file(source)
    constitution = resolve(raw, lookup)
    errors = [issue for issue in lint(constitution) if issue.level == "error"]
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConstitutionError(first.message + more, source=raw.source, where=first.where)
    return constitution


# -- lint --------------------------------------------------------------------------------------------------------


def lint(constitution: Constitution) -> list[LintIssue]:
    """Semantic checks the schema cannot express. Errors make a constitution unusable; warnings are advice."""
    issues: list[LintIssue] = []
    if not constitution.principles:
        issues.append(LintIssue("error", "principles", "the constitution has no principles"))
    # Indexes built once, so that lint stays linear in the number of principles (a conflicts_with on each of
    # 10,000 principles would otherwise compare every pair).
    by_ref: dict[str, list[Principle]] = {}
    for o in constitution.principles:
        by_ref.setdefault(o.id, []).append(o)
        for tag in dict.fromkeys(o.tags):
            if tag != o.id:
                by_ref.setdefault(tag, []).append(o)
    shared_no_change = any(not e.needs_revision for e in constitution.examples)
    sl, rl, runtime = Phase.sl, Phase.rl, Phase.runtime
    for index, p in enumerate(constitution.principles):
        where = f"principles[{index}] ({p.id})"
        claimed = set(p.phases)
        needs_requests = sl in claimed or (runtime in claimed and not (p.rules or p.checks))
        for field in ("critique_request", "revision_request"):
            value = getattr(p, field)
            if value is not None and not value.strip():
                issues.append(LintIssue("error", f"{where}.{field}", "is empty; write the request or remove the key"))
            elif value is None and needs_requests:
                phases = ", ".join(ph.value for ph in p.phases)
                issues.append(
                    LintIssue(
                        "error",
                        f"{where}.{field}",
                        f"is missing, but the principle claims phases [{phases}]; add it or drop those phases",
                    )
                )
        if p.comparison is not None and not p.comparison.strip():
            issues.append(LintIssue("error", f"{where}.comparison", "is empty; write the question or remove the key"))
        elif p.comparison is None and rl in claimed:
            issues.append(
                LintIssue(
                    "error",
                    f"{where}.comparison",
                    "is missing, but the principle claims the rl phase; add a comparison question or drop 'rl'",
                )
            )
        for ref in p.conflicts_with:
            others = [o for o in by_ref.get(ref, ()) if o.id != p.id]
            if not others:
                issues.append(
                    LintIssue("warning", f"{where}.conflicts_with", f"{ref!r} matches no other principle's id or tag")
                )
            for other in others:
                if other.authority == p.authority:
                    issues.append(
                        LintIssue(
                            "warning",
                            where,
                            f"conflicts with {other.id!r} and both have authority {p.authority}; give one precedence",
                        )
                    )
        for r_index, rule in enumerate(p.rules):
            if rule.fix is None:
                continue
            pattern, _ = rule.compiled()
            if rule.kind == "require" and not pattern.search(rule.fix):
                issues.append(
                    LintIssue(
                        "error",
                        f"{where}.rules[{r_index}].fix",
                        "does not match the rule's own pattern, so the repair would never satisfy it",
                    )
                )
            if rule.kind == "forbid" and pattern.search(rule.fix):
                issues.append(
                    LintIssue(
                        "error",
                        f"{where}.rules[{r_index}].fix",
                        "matches the forbidden pattern itself, so the repair would never satisfy it",
                    )
                )
        if p.examples and not shared_no_change and not any(not e.needs_revision for e in p.examples):
            issues.append(
                LintIssue(
                    "warning",
                    f"{where}.examples",
                    "no example shows 'no change needed'; small models then always rewrite",
                )
            )
    return issues
