"""Loading, composing (``extends``) and linting constitutions.

Files are YAML or JSON, read as strict UTF-8 with safe loaders only. Every error names the file, the JSON path and,
where it can be found, the line, and says what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import ConstitutionError
from .inputs import limit_hint, limits, parse_document, read_text
from .schema import Constitution, Phase, Principle

SUFFIXES = (".yaml", ".yml", ".json")

# A lookup from a parent name to (raw data, source label, directory for relative parents).
ParentLookup = Callable[[str], "RawConstitution"]


@dataclass(frozen=True)
class RawConstitution:
    """A parsed but unresolved constitution and where it came from."""

    data: Mapping[str, Any]
    source: str
    base_dir: Path | None = None
    lines: Mapping[tuple[Any, ...], int] | None = None


@dataclass(frozen=True)
class LintIssue:
    level: str  # "error" | "warning"
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.message}"


# -- reading files -----------------------------------------------------------------------------------------------


def read_constitution_file(path: str | Path) -> RawConstitution:
    """Read and parse one constitution file without validating or resolving it."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ConstitutionError(
            f"unsupported file type {path.suffix or '(none)'!r}; use .yaml, .yml or .json", source=str(path)
        )
    text = read_text(path)
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
    return RawConstitution(data=data, source=str(path), base_dir=path.parent, lines=lines)


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
    return "/" in ref or "\\" in ref or ref.lower().endswith(SUFFIXES)


def resolve(
    raw: RawConstitution,
    lookup: ParentLookup | None = None,
    *,
    _stack: tuple[str, ...] = (),
    _done: dict[str, Constitution] | None = None,
) -> Constitution:
    """Validate ``raw`` and merge its parents into it.

    Parents merge in order; a principle with an id already present replaces it in place, new ones append;
    ``remove`` drops inherited ids. The result has no ``extends`` left and is what every component sees.
    """
    own = validate_constitution(raw)
    identity = f"{own.name} ({raw.source})"
    if own.name in [s.split(" (")[0] for s in _stack]:
        chain = " -> ".join([*_stack, identity])
        raise ConstitutionError(
            f"'extends' forms a cycle: {chain}; remove one of the links",
            source=raw.source,
            where=_where(("extends",), raw.lines),
        )
    stack = (*_stack, identity)
    done: dict[str, Constitution] = {} if _done is None else _done  # each parent is resolved once per load
    bounds = limits()

    principles: dict[str, Principle] = {}
    examples = []
    comparison_examples = []
    stance = None
    for index, parent_ref in enumerate(own.extends):
        where = _where(("extends", index), raw.lines)
        base = raw.base_dir or Path.cwd()
        key = str((base / parent_ref).resolve()) if _is_path(parent_ref) else f"name:{parent_ref}"
        if key in done:
            parent = done[key]
        else:
            if len(stack) >= bounds.extends_depth:
                raise ConstitutionError(
                    f"'extends' goes more than {bounds.extends_depth} levels deep; {limit_hint('extends_depth')}",
                    source=raw.source,
                    where=where,
                )
            if len(done) >= bounds.extends_files:
                raise ConstitutionError(
                    f"'extends' reaches more than {bounds.extends_files} files; {limit_hint('extends_files')}",
                    source=raw.source,
                    where=where,
                )
            if _is_path(parent_ref):
                try:
                    parent_raw = read_constitution_file(base / parent_ref)
                except ConstitutionError as exc:
                    raise ConstitutionError(
                        f"cannot load parent {parent_ref!r}: {exc}", source=raw.source, where=where
                    ) from None
            else:
                if lookup is None:
                    raise ConstitutionError(
                        f"parent {parent_ref!r} is a name, but no registry was given to look it up; pass a path "
                        "instead",
                        source=raw.source,
                        where=where,
                    )
                try:
                    parent_raw = lookup(parent_ref)
                except KeyError as exc:
                    raise ConstitutionError(
                        f"unknown parent constitution: {exc}", source=raw.source, where=where
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
    for index, p in enumerate(constitution.principles):
        where = f"principles[{index}] ({p.id})"
        needs_requests = p.applies_to(Phase.sl) or (p.applies_to(Phase.runtime) and not (p.rules or p.checks))
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
        elif p.comparison is None and p.applies_to(Phase.rl):
            issues.append(
                LintIssue(
                    "error",
                    f"{where}.comparison",
                    "is missing, but the principle claims the rl phase; add a comparison question or drop 'rl'",
                )
            )
        for ref in p.conflicts_with:
            others = [o for o in constitution.principles if o.id != p.id and (o.id == ref or ref in o.tags)]
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
        if p.examples and not any(not e.needs_revision for e in [*p.examples, *constitution.examples]):
            issues.append(
                LintIssue(
                    "warning",
                    f"{where}.examples",
                    "no example shows 'no change needed'; small models then always rewrite",
                )
            )
    return issues
