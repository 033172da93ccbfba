"""Lint: what a valid constitution can still get wrong, which the schema cannot express (a missing request for a
phase a principle claims, a repair that cannot satisfy its own rule, conflicts that authority does not settle, check
names no plugin registered). Errors make a constitution unusable; warnings are advice (``--strict`` fails on them).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from cai_engine.constitution.model import Constitution, Phase, Principle
from cai_engine.constitution.problems import did_you_mean


@dataclass(frozen=True)
class LintIssue:
    level: str  # "error" | "warning"
    where: str
    message: str
    principle: str | None = None  # the id of the principle it is about
    field: tuple[Any, ...] = ()  # the path inside that principle (or in the constitution, without one)

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.message}"


def lint(constitution: Constitution, *, checks: Collection[str] | None = None) -> list[LintIssue]:
    """Semantic checks the schema cannot express. Errors make a constitution unusable; warnings are advice.

    :param checks: the check names that exist (the registry's critics); a principle naming any other is an error
        that lists the known checks most like it. None: check names are not looked at.
    """
    issues: list[LintIssue] = []
    if not constitution.principles:
        issues.append(LintIssue("error", "principles", "the constitution has no principles", field=("principles",)))
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

        def issue(level: str, field: str, message: str, *loc: Any, where: str = where, pid: str = p.id) -> LintIssue:
            return LintIssue(
                level, f"{where}.{field}" if field else where, message, pid, (field, *loc) if field else ()
            )

        claimed = set(p.phases)
        needs_requests = sl in claimed or (runtime in claimed and not (p.rules or p.checks))
        for field in ("critique_request", "revision_request"):
            value = getattr(p, field)
            if value is not None and not value.strip():
                issues.append(issue("error", field, "is empty; write the request or remove the key"))
            elif value is None and needs_requests:
                phases = ", ".join(ph.value for ph in p.phases)
                issues.append(
                    issue(
                        "error",
                        field,
                        f"is missing, but the principle claims phases [{phases}]; add it or drop those phases",
                    )
                )
        if p.comparison is not None and not p.comparison.strip():
            issues.append(issue("error", "comparison", "is empty; write the question or remove the key"))
        elif p.comparison is None and rl in claimed:
            issues.append(
                issue(
                    "error",
                    "comparison",
                    "is missing, but the principle claims the rl phase; add a comparison question or drop 'rl'",
                )
            )
        for c_index, ref in enumerate(p.conflicts_with):
            others = [o for o in by_ref.get(ref, ()) if o.id != p.id]
            if not others:
                hint = did_you_mean(ref, [r for r in by_ref if r != p.id])
                issues.append(
                    issue("warning", "conflicts_with", f"{ref!r} matches no other principle's id or tag{hint}", c_index)
                )
            for other in others:
                if other.authority == p.authority:
                    issues.append(
                        issue(
                            "warning",
                            "authority",
                            f"conflicts with {other.id!r} and both have authority {p.authority}; give one precedence "
                            "(the higher authority wins)",
                        )
                    )
        if checks is not None:
            for k_index, name in enumerate(p.checks):
                if name not in checks:
                    hint = did_you_mean(name, checks, listing="known checks", n=3)
                    issues.append(issue("error", "checks", f"unknown check {name!r}{hint}", k_index))
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
                        p.id,
                        ("rules", r_index, "fix"),
                    )
                )
            if rule.kind == "forbid" and pattern.search(rule.fix):
                issues.append(
                    LintIssue(
                        "error",
                        f"{where}.rules[{r_index}].fix",
                        "matches the forbidden pattern itself, so the repair would never satisfy it",
                        p.id,
                        ("rules", r_index, "fix"),
                    )
                )
        if p.examples and not shared_no_change and not any(not e.needs_revision for e in p.examples):
            issues.append(
                issue("warning", "examples", "no example shows 'no change needed'; small models then always rewrite")
            )
    return issues
