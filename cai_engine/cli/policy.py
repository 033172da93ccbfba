"""`cai policy`: validate and show deployment policies, and print their JSON Schema."""

from __future__ import annotations

from pathlib import Path

import click

from cai_engine.cli.base import CaiGroup, cli, current_runtime, echo_json, write_schema
from cai_engine.errors import CaiError


@cli.group("policy", cls=CaiGroup)
def policy_group() -> None:
    """Validate and show deployment policies (constitutions + overrides + guard settings)."""


@policy_group.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def policy_validate(paths: tuple[Path, ...]) -> None:
    """Validate policy files: schema, constitutions, overrides, check names, component options (no model is loaded).

    Every problem of a file's schema, constitutions, ids, tags and checks is reported in one run, one line each, as
    `FILE:LINE: FIELD.PATH: MESSAGE`, with "did you mean" for misspelt keys and names.

    A policy with `model: none` must keep every model out of the guard's request path: it fails when a reply
    could need a model to rewrite it (a rule without a fix, a plugin check whose repair can decline) and the policy
    does not write out guard.on_failure to say what happens instead. A policy that has a model but no model critic
    gets a note naming where the guard would still call it.
    """
    from cai_engine.constitution.problems import problems_of
    from cai_engine.guard.engine import Engine
    from cai_engine.guard.policy import load_policy, model_fallbacks, model_free_problem, unchecked_without_model

    failed = 0
    for path in paths:
        try:
            load_policy(path, registry=current_runtime().registry)  # its schema problems with its unknown names
            engine = Engine.from_policy(path, runtime=current_runtime())
            engine.close()
            problems = engine.model_problems()
        except CaiError as exc:
            failed += 1
            if getattr(exc, "problems", None):  # every problem of the file, one line each: FILE:LINE: PATH: MESSAGE
                for item in problems_of(exc):
                    click.echo(str(item), err=True)
            else:
                click.echo(f"FAIL {exc}", err=True)
            continue
        policy, registry = engine.policy, engine.runtime.registry
        guard_roles = [(role, p) for role, p in problems if role != "judge"]
        for role, problem in problems:
            if role == "judge":
                click.echo(f"warning: {path}: judge: {problem} (only compare() uses it)", err=True)
        if guard_roles:
            failed += 1
            click.echo(f"FAIL {path}: {guard_roles[0][0]}: {guard_roles[0][1]}", err=True)
            continue
        model_free = model_free_problem(policy, engine.constitution, registry)
        if model_free:
            failed += 1
            click.echo(f"FAIL {path}: {model_free}", err=True)
            continue
        fallbacks = model_fallbacks(policy, engine.constitution, registry)
        if policy.model_free:
            mode = "rules only (model: none)"
            if fallbacks:
                mode += f"; what rules and checks may not repair ({len(fallbacks)}) ends as on_failure: {policy.guard.on_failure}"
        else:
            mode = "model critic on" if policy.guard.model_critics else "no model critic"
        click.echo(
            f"ok   {path}: {policy.name}@{policy.version}, "
            f"{len(engine.constitution.principles)} principles ({len(engine.runtime_principles)} at runtime); {mode}"
        )
        if not policy.model_free and not policy.guard.model_critics and fallbacks:
            shown = "; ".join(fallbacks[:3]) + (f"; and {len(fallbacks) - 3} more" if len(fallbacks) > 3 else "")
            click.echo(
                f"note: {path}: the guard has no model critic but can still load a model to rewrite a reply: {shown} "
                "(write model: none to keep models out of the request path)",
                err=True,
            )
        unchecked = unchecked_without_model(policy, engine.constitution)
        if unchecked:
            shown = ", ".join(unchecked[:8]) + (f" and {len(unchecked) - 8} more" if len(unchecked) > 8 else "")
            click.echo(
                f"note: {path}: {len(unchecked)} runtime principle(s) have no rules or checks, so without a model "
                f"critic nothing checks them at runtime: {shown}",
                err=True,
            )
    if failed:
        raise click.ClickException(f"{failed} of {len(paths)} policy file(s) failed validation")


@policy_group.command("show")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
def policy_show(path: Path, fmt: str) -> None:
    """The fully resolved policy: settings plus the effective constitution after extends and overrides."""
    import yaml

    from cai_engine.guard.engine import Engine

    engine = Engine.from_policy(path, runtime=current_runtime())
    engine.close()
    data = engine.policy.model_dump(
        mode="json", by_alias=True, exclude={"schema_", "add", "override", "disable", "disable_tags"}
    )
    data["effective_constitution"] = {
        "content_hash": engine.constitution.content_hash(),
        "stance": engine.constitution.stance.value,
        "principles": [p.model_dump(mode="json", exclude_defaults=True) for p in engine.constitution.principles],
    }
    if fmt == "json":
        echo_json(data)
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110), nl=False)


@policy_group.command("schema")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write to this file instead of stdout.")
def policy_schema(output: Path | None) -> None:
    """Print the policy JSON Schema (generated from the pydantic model)."""
    from cai_engine.guard.policy import policy_json_schema

    write_schema(policy_json_schema(), output)
