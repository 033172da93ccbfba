"""`cai constitutions`: list, show, validate and the schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cai_engine.cli.base import CaiGroup, cli, echo_json, state, write_schema
from cai_engine.errors import CaiError


@cli.group("constitutions", cls=CaiGroup)
def constitutions_group() -> None:
    """List, show, validate constitutions and print their JSON Schema."""


@constitutions_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def constitutions_list(as_json: bool) -> None:
    """Registered constitutions (from the core and from plugins), with broken ones and why."""
    registry = state().registry
    rows = []
    for name in registry.constitution_names():
        entry = registry.constitution_entry(name)
        row: dict[str, Any] = {"name": name, "plugin": entry.plugin, "path": str(entry.path)}
        try:
            constitution = registry.constitution(name)
            row.update(
                version=constitution.version,
                stance=constitution.stance.value,
                principles=len(constitution.principles),
                status="ok",
            )
        except CaiError as exc:
            row.update(status="broken", error=str(exc))
        rows.append(row)
    rows += [
        {"name": Path(b.path).stem, "plugin": b.plugin, "path": b.path, "status": "broken", "error": b.error}
        for b in registry.broken
    ]
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        if row["status"] == "ok":
            click.echo(
                f"{row['name']:<20} {row['version']:<8} {row['stance']:<19} {row['principles']:>3} principles"
                f"  [{row['plugin']}]"
            )
        else:
            click.echo(f"{row['name']:<20} BROKEN  [{row['plugin']}] {row['error']}")


@constitutions_group.command("show")
@click.argument("name_or_path")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
def constitutions_show(name_or_path: str, fmt: str) -> None:
    """Show a constitution fully resolved (after `extends` and `remove`), with its content hash."""
    import yaml

    constitution = state().registry.constitution(name_or_path)
    data = constitution.model_dump(mode="json", exclude={"schema_", "extends", "remove"}, exclude_defaults=False)
    data = {"content_hash": constitution.content_hash(), **data}
    if fmt == "json":
        echo_json(data)
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110), nl=False)


@constitutions_group.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--strict", is_flag=True, help="Treat lint warnings as errors.")
def constitutions_validate(paths: tuple[Path, ...], strict: bool) -> None:
    """Validate constitution files: syntax, schema, `extends`, check names, and lint (ids, requests, conflicts).

    Every problem of a file is reported in one run, one line each, as `FILE:LINE: FIELD.PATH: MESSAGE` (a warning
    says `warning:` before its message), with "did you mean" for misspelt keys, checks, ids and names.
    """
    registry = state().registry
    failed = 0
    for path in paths:
        checked = registry.check_constitution(path)
        for problem in checked.problems:
            click.echo(str(problem), err=True)
        if checked.constitution is None or checked.errors:
            failed += 1  # its problems are printed above, and counted in the tally at the end
        elif strict and checked.warnings:
            failed += 1
            click.echo(f"FAIL {path}: {len(checked.warnings)} warning(s) with --strict", err=True)
        else:
            constitution = checked.constitution
            click.echo(f"ok   {path}: {constitution.ref}, {len(constitution.principles)} principles")
    if failed:
        raise click.ClickException(f"{failed} of {len(paths)} file(s) failed validation")


@constitutions_group.command("schema")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write to this file instead of stdout.")
def constitutions_schema(output: Path | None) -> None:
    """Print the constitution JSON Schema (generated from the pydantic model)."""
    from cai_engine.constitution.model import constitution_json_schema

    write_schema(constitution_json_schema(), output)
