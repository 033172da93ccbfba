"""Loading, composing (``extends``) and linting constitutions.

Files are YAML or JSON, read as strict UTF-8 with safe loaders only. Every error names the file, the JSON path and,
where it can be found, the line, and says what to do.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import ConstitutionError
from .models import Constitution, Phase, Principle

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


class _StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one, losing data)."""


def _construct_mapping(loader: _StrictSafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (a later value would silently replace the first)", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_map(text: str) -> dict[tuple[Any, ...], int]:
    """Map each JSON path (as a tuple) to its 1-based line, using YAML's composer (JSON is close enough to YAML)."""
    lines: dict[tuple[Any, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: tuple[Any, ...]) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                lines[path + (key_node.value,)] = key_node.start_mark.line + 1
                walk(value_node, path + (key_node.value,))
                lines[path + (key_node.value,)] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, path + (index,))

    if root is not None:
        walk(root, ())
    return lines


def read_text(path: Path) -> str:
    """Read a file as UTF-8, naming the file and byte offset when it is not."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConstitutionError("file not found; check the path", source=str(path)) from None
    except IsADirectoryError:
        raise ConstitutionError("is a directory; pass a .yaml, .yml or .json file", source=str(path)) from None
    except OSError as exc:
        raise ConstitutionError(f"cannot read: {exc.strerror}", source=str(path)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConstitutionError(
            f"not UTF-8 text (byte {exc.start}); save the file as UTF-8", source=str(path), where=f"line {line}"
        ) from None


def parse_document(text: str, source: str, *, json_only: bool = False) -> Any:
    """Parse YAML (or JSON) text into Python data with safe loaders only."""
    if json_only:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConstitutionError(
                f"invalid JSON: {exc.msg}", source=source, where=f"line {exc.lineno}, column {exc.colno}"
            ) from None
    try:
        return yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = exc.problem or exc.context or "syntax error"
        raise ConstitutionError(f"invalid YAML: {problem}", source=source, where=where) from None
    except yaml.YAMLError as exc:
        raise ConstitutionError(f"invalid YAML: {exc}", source=source) from None


def read_constitution_file(path: str | Path) -> RawConstitution:
    """Read and parse one constitution file without validating or resolving it."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ConstitutionError(
            f"unsupported file type {path.suffix or '(none)'!r}; use .yaml, .yml or .json", source=str(path)
        )
    text = read_text(path)
    if not text.strip():
        raise ConstitutionError("the file is empty; a constitution needs at least name, version and principles",
                                source=str(path))
    data = parse_document(text, str(path), json_only=path.suffix.lower() == ".json")
    if not isinstance(data, dict):
        raise ConstitutionError(
            f"the top level must be a mapping (name, version, principles, ...), not {type(data).__name__}",
            source=str(path),
        )
    return RawConstitution(data=data, source=str(path), base_dir=path.parent, lines=_line_map(text))


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
                    source=raw.source, where=_where(("principles", index, "id"), raw.lines))
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
) -> Constitution:
    """Validate ``raw`` and merge its parents into it.

    Parents merge in order; a principle with an id already present replaces it in place, new ones append;
    ``remove`` drops inherited ids. The result has no ``extends`` left and is what every component sees.
    """
    own = validate_constitution(raw)
    identity = f"{own.name} ({raw.source})"
    if own.name in [s.split(" (")[0] for s in _stack]:
        chain = " -> ".join([*_stack, identity])
        raise ConstitutionError(f"'extends' forms a cycle: {chain}; remove one of the links", source=raw.source,
                                where=_where(("extends",), raw.lines))
    stack = (*_stack, identity)

    principles: dict[str, Principle] = {}
    examples = []
    comparison_examples = []
    stance = None
    for index, parent_ref in enumerate(own.extends):
        where = _where(("extends", index), raw.lines)
        if _is_path(parent_ref):
            base = raw.base_dir or Path.cwd()
            try:
                parent_raw = read_constitution_file(base / parent_ref)
            except ConstitutionError as exc:
                raise ConstitutionError(f"cannot load parent {parent_ref!r}: {exc}", source=raw.source,
                                        where=where) from None
        else:
            if lookup is None:
                raise ConstitutionError(
                    f"parent {parent_ref!r} is a name, but no registry was given to look it up; pass a path instead",
                    source=raw.source, where=where)
            try:
                parent_raw = lookup(parent_ref)
            except KeyError as exc:
                raise ConstitutionError(f"unknown parent constitution: {exc}", source=raw.source,
                                        where=where) from None
        parent = resolve(parent_raw, lookup, _stack=stack)
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
                source=raw.source, where=_where(("remove", index), raw.lines))
        del principles[removed]

    if "stance" in own.model_fields_set or stance is None:
        stance = own.stance
    data = own.model_dump(by_alias=True, exclude={"schema_"})
    data.update(
        extends=[], remove=[], stance=stance, principles=list(principles.values()),
        examples=[*examples, *own.examples], comparison_examples=[*comparison_examples, *own.comparison_examples],
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
                issues.append(LintIssue(
                    "error", f"{where}.{field}",
                    f"is missing, but the principle claims phases [{phases}]; add it or drop those phases"))
        if p.comparison is not None and not p.comparison.strip():
            issues.append(LintIssue("error", f"{where}.comparison", "is empty; write the question or remove the key"))
        elif p.comparison is None and p.applies_to(Phase.rl):
            issues.append(LintIssue(
                "error", f"{where}.comparison",
                "is missing, but the principle claims the rl phase; add a comparison question or drop 'rl'"))
        for ref in p.conflicts_with:
            others = [o for o in constitution.principles if o.id != p.id and (o.id == ref or ref in o.tags)]
            if not others:
                issues.append(LintIssue("warning", f"{where}.conflicts_with",
                                        f"{ref!r} matches no other principle's id or tag"))
            for other in others:
                if other.authority == p.authority:
                    issues.append(LintIssue(
                        "warning", where,
                        f"conflicts with {other.id!r} and both have authority {p.authority}; give one precedence"))
        for r_index, rule in enumerate(p.rules):
            if rule.fix is None:
                continue
            pattern, _ = rule.compiled()
            if rule.kind == "require" and not pattern.search(rule.fix):
                issues.append(LintIssue("error", f"{where}.rules[{r_index}].fix",
                                        "does not match the rule's own pattern, so the repair would never satisfy it"))
            if rule.kind == "forbid" and pattern.search(rule.fix):
                issues.append(LintIssue("error", f"{where}.rules[{r_index}].fix",
                                        "matches the forbidden pattern itself, so the repair would never satisfy it"))
        if p.examples and not any(not e.needs_revision for e in [*p.examples, *constitution.examples]):
            issues.append(LintIssue("warning", f"{where}.examples",
                                    "no example shows 'no change needed'; small models then always rewrite"))
    return issues
