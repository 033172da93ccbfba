"""The ``cai`` command line: a thin click layer; every command calls one library function.

Errors caused by input (``CaiError``) print one line and exit non-zero; anything else keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from . import __version__
from .errors import CaiError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def render_validation_error(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(input)'}: {e['msg']}" for e in exc.errors()
    )


class CaiGroup(click.Group):
    """A group that turns input errors into one clear line and loads plugin commands on first use."""

    _plugin_commands_loaded = False

    def _load_plugin_commands(self) -> None:
        if self._plugin_commands_loaded or self is not cli:
            return
        CaiGroup._plugin_commands_loaded = True
        state().pm.hook.cai_register_commands(cli=self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self._load_plugin_commands()
            command = super().get_command(ctx, cmd_name)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CaiError as exc:
            raise click.ClickException(str(exc)) from None
        except ValidationError as exc:
            raise click.ClickException(render_validation_error(exc)) from None


class _State:
    """The plugin manager and registry, built once per process and only when a command needs them."""

    @functools.cached_property
    def pm(self):
        from .plugins import make_plugin_manager

        return make_plugin_manager()

    @functools.cached_property
    def registry(self):
        from .plugins import Registry

        return Registry(self.pm)


_STATE: _State | None = None


def state() -> _State:
    global _STATE
    if _STATE is None:
        _STATE = _State()
    return _STATE


def reset_state() -> None:
    """Forget the cached plugin manager (tests that change environment variables call this)."""
    global _STATE
    _STATE = None
    CaiGroup._plugin_commands_loaded = False


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _version_message() -> str:
    from importlib.metadata import entry_points

    lines = [f"cai-engine {__version__}"]
    for ep in entry_points(group="cai_engine"):
        dist = getattr(ep, "dist", None)
        if dist is not None:
            lines.append(f"  plugin {ep.name}: {dist.name} {dist.version}")
    return "\n".join(lines)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(_version_message())
        ctx.exit()


@click.group(cls=CaiGroup, context_settings=CONTEXT_SETTINGS)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and the installed plugin distributions, then exit.")
def cli() -> None:
    """cai-engine: Constitutional AI as a policy engine.

    A constitution (a validated YAML/JSON file of principles) drives three jobs: supervised critique and
    revision (phase 1, SL-CAI), AI-judged preferences for preference models and RL (phase 2, RLAIF), and a
    runtime guard that critiques and revises responses until they comply.

    Start with `cai constitutions list` and `cai constitutions show harmless`. Every command has --help.
    """


# -- plugins -------------------------------------------------------------------------------------------------------


@cli.command("plugins")
@click.option("--all", "show_all", is_flag=True, help="Include the built-in default plugins.")
@click.option("--hook", "hooks", multiple=True, help="Only plugins implementing this hook (repeatable).")
def plugins_command(show_all: bool, hooks: tuple[str, ...]) -> None:
    """List installed plugins as JSON: name, version, hooks and what each provides."""
    from .plugins import list_plugins

    rows = list_plugins(state().pm, state().registry, all=show_all)
    if hooks:
        rows = [row for row in rows if set(hooks) & set(row["hooks"])]
    echo_json(rows)


# -- constitutions ---------------------------------------------------------------------------------------------------


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
            row.update(version=constitution.version, stance=constitution.stance.value,
                       principles=len(constitution.principles), status="ok")
        except CaiError as exc:
            row.update(status="broken", error=str(exc))
        rows.append(row)
    rows += [{"name": Path(b.path).stem, "plugin": b.plugin, "path": b.path, "status": "broken", "error": b.error}
             for b in registry.broken]
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        if row["status"] == "ok":
            click.echo(f"{row['name']:<20} {row['version']:<8} {row['stance']:<19} {row['principles']:>3} principles"
                       f"  [{row['plugin']}]")
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
    """Validate constitution files: syntax, schema, `extends`, and lint (ids, requests, conflicts)."""
    from .constitutions import lint

    registry = state().registry
    failed = 0
    for path in paths:
        try:
            constitution = registry.constitution(path)
        except CaiError as exc:
            failed += 1
            click.echo(f"FAIL {exc}", err=True)
            continue
        warnings = [issue for issue in lint(constitution) if issue.level == "warning"]
        for issue in warnings:
            click.echo(f"{path}: {issue}", err=True)
        if strict and warnings:
            failed += 1
            click.echo(f"FAIL {path}: {len(warnings)} warning(s) with --strict", err=True)
        else:
            click.echo(f"ok   {path}: {constitution.ref}, {len(constitution.principles)} principles")
    if failed:
        raise click.ClickException(f"{failed} of {len(paths)} file(s) failed validation")


@constitutions_group.command("schema")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write to this file instead of stdout.")
def constitutions_schema(output: Path | None) -> None:
    """Print the constitution JSON Schema (generated from the pydantic model)."""
    from .models import constitution_json_schema

    text = json.dumps(constitution_json_schema(), indent=2, ensure_ascii=False) + "\n"
    if output:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


@cli.command("demo")
@click.option("--constitution", default="harmless", show_default=True, help="Constitution name or file.")
def demo_command(constitution: str) -> None:
    """The main job: validate the shipped constitutions and summarise the default one."""
    from .constitutions import lint

    registry = state().registry
    for name in registry.constitution_names():
        resolved = registry.constitution(name)
        warnings = [i for i in lint(resolved) if i.level == "warning"]
        click.echo(f"ok   {resolved.ref:<26} {len(resolved.principles):>2} principles, {len(warnings)} warning(s)")
    chosen = registry.constitution(constitution)
    click.echo(f"\n{chosen.ref} ({chosen.stance.value}) {chosen.content_hash()}")
    for principle in chosen.principles:
        phases = ",".join(p.value for p in principle.phases)
        click.echo(f"  {principle.id:<12} a={principle.authority:<3} [{phases}] {principle.title or ''}")


def main() -> None:  # pragma: no cover - console entry point
    cli(prog_name="cai")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
