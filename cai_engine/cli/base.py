"""The `cai` group and what every command shares: state, errors, config files, JSON output."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError

from cai_engine.errors import CaiError, describe_validation
from cai_engine.version import __version__

if TYPE_CHECKING:
    from cai_engine.records import GateResult, SLSummary

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class CaiGroup(click.Group):
    """A group that turns input errors into one clear line and loads plugin commands on first use."""

    _plugin_commands_loaded = False
    _plugin_commands: set[str] = set()  # the commands plugins added, taken away again when the plugins change

    def _load_plugin_commands(self) -> None:
        from cai_engine.plugins.manager import Hooks

        if self is not cli:
            return
        manager = state().pm  # first: a change of plugin settings forgets the commands the old plugins added
        if self._plugin_commands_loaded:
            return
        CaiGroup._plugin_commands_loaded = True
        before = set(self.commands)
        Hooks(manager).register_commands(self)
        CaiGroup._plugin_commands = set(self.commands) - before

    @classmethod
    def forget_plugin_commands(cls) -> None:
        for name in cls._plugin_commands:
            cli.commands.pop(name, None)
        cls._plugin_commands = set()
        cls._plugin_commands_loaded = False

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
            raise click.ClickException(describe_validation(exc)) from None
        except ModuleNotFoundError as exc:
            hint = install_hint(exc.name or "")
            if hint is None:
                raise
            raise click.ClickException(
                f"{ctx.command_path} {ctx.invoked_subcommand or ''}".rstrip()
                + f" needs {exc.name}, which is not installed: {hint}"
            ) from None


# Which extra brings each optional module (pyproject.toml's [project.optional-dependencies]).
EXTRAS = {
    "torch": "models",
    "transformers": "models",
    "gguf": "models",
    "safetensors": "models",
    "trl": "train",
    "peft": "train",
    "datasets": "train",
    "accelerate": "train",
    "matplotlib": "eval",
    "llama_cpp": "llamacpp",
    "starlette": "serve",
    "uvicorn": "serve",
}


def install_hint(module: str) -> str | None:
    """``pip install 'cai-engine[extra]'`` for a missing optional module; None for anything else."""
    extra = EXTRAS.get(module.split(".")[0])
    return f"pip install 'cai-engine[{extra}]'" if extra else None


class _State:
    """The plugin manager and registry, built once per process and only when a command needs them (again when the
    plugin settings in the environment change, as ``Runtime.default`` does)."""

    def __init__(self, plugins: tuple[object, ...] = ()) -> None:
        from cai_engine.plugins.manager import plugin_settings

        self.plugins = plugins
        self.settings = plugin_settings()

    @functools.cached_property
    def pm(self):
        from cai_engine.plugins.manager import make_plugin_manager

        pm = make_plugin_manager(skip_broken=True, plugins=self.plugins)
        for name, error in pm.cai_broken.items():
            click.echo(
                f"warning: plugin {name!r} is left out: {error}; fix or uninstall it, or set "
                f"CAI_BLOCKED_PLUGINS={name}",
                err=True,
            )
        for warning in pm.cai_warnings:
            click.echo(f"warning: {warning}", err=True)
        return pm

    @functools.cached_property
    def registry(self):
        from cai_engine.plugins.registry import Registry

        return Registry(self.pm)


_STATE: _State | None = None


def state() -> _State:
    from cai_engine.plugins.manager import plugin_settings

    global _STATE
    if _STATE is None or _STATE.settings != plugin_settings():
        if _STATE is not None:
            CaiGroup.forget_plugin_commands()
        _STATE = _State(_STATE.plugins if _STATE is not None else ())
    return _STATE


def reset_state(plugins: Iterable[object] = ()) -> None:
    """Forget the cached plugin manager (tests that change environment variables call this).

    :param plugins: plugin objects the next plugin manager registers after the installed ones, as
        ``make_plugin_manager(plugins=...)`` does: a plugin's tests run the CLI with it without installing it.
    """
    global _STATE
    _STATE = _State(tuple(plugins)) if plugins else None
    CaiGroup.forget_plugin_commands()


def training_line(result: Any, extra: str = "") -> str:
    """``checkpoint (N steps, S s)`` for a ``TrainingResult``; ``?`` for what the trainer did not report."""
    steps, seconds = ("?" if v is None else v for v in (result.steps, result.seconds))
    return f"{result.checkpoint} ({steps} steps, {seconds} s{extra})"


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
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and the installed plugin distributions, then exit.",
)
def cli() -> None:
    """cai-engine: Constitutional AI as a policy engine.

    A constitution (a validated YAML/JSON file of principles) drives three jobs: supervised critique and
    revision (phase 1, SL-CAI), AI-judged preferences for preference models and RL (phase 2, RLAIF), and a
    runtime guard that critiques and revises responses until they comply.

    Start with `cai constitutions list` and `cai constitutions show harmless`. Every command has --help.
    """


def write_schema(schema: dict[str, Any], output: Path | None) -> None:
    text = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
    if output:
        from cai_engine.files.outputs import write_atomic

        write_atomic(output, text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


def load_config_file(path: Path | None) -> dict[str, Any]:
    """A YAML/JSON config file as a mapping (safe loader; errors name the file and line)."""
    if path is None:
        return {}
    from cai_engine.errors import ConfigError, ConstitutionError
    from cai_engine.files.inputs import parse_document, read_text

    try:
        data, _ = parse_document(read_text(path), str(path), json_only=path.suffix.lower() == ".json")
    except ConstitutionError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of settings")
    return data


def merge_flags(base: dict[str, Any], **flags: Any) -> dict[str, Any]:
    """Flags given on the command line override the config file; unset flags (None) leave it alone."""
    return {**base, **{k: v for k, v in flags.items() if v is not None}}


def validate_config(model: Any, data: dict[str, Any], source: str) -> Any:
    from cai_engine.errors import ConfigError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation(exc)}") from None


def current_runtime():
    from cai_engine.models.runtime import Runtime

    runtime = Runtime(state().registry)
    runtime.announce = lambda line: click.echo(line, err=True)
    return runtime


def _clip(text: str, width: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def parse_setting(text: str) -> Any:
    """A --set value, read as YAML 1.2 reads it (see ``inputs.parse_scalar``)."""
    from cai_engine.files.inputs import parse_scalar

    return parse_scalar(text)


def parse_settings(items: tuple[str, ...], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` flags as a mapping (values parsed as by ``parse_setting``)."""
    from cai_engine.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_setting(value)
    return out


def print_sl_summary(summary: SLSummary) -> None:
    click.echo(f"run directory: {summary.run_dir}{' (resumed)' if summary.resumed else ''}")
    click.echo(f"written this time: {summary.written} (already done: {summary.skipped_done}, {summary.seconds} s)")
    click.echo(
        f"red-team items: {summary.red_team_items}, revised: {summary.items_revised}, accepted "
        f"revisions: {summary.accepted_revisions}, helpfulness samples: {summary.helpful_items}, "
        f"errors: {summary.error_items}"
    )
    used = ", ".join(f"{k}x{v}" for k, v in summary.principles_used.items())
    click.echo(f"principles drawn: {used or '(none)'}")
    example = summary.example
    if example:
        click.echo("\nexample\n  prompt: " + _clip(example.prompt))
        click.echo("  before: " + _clip(example.before or ""))
        click.echo("  after:  " + _clip(example.after or ""))


def gate_line(result: GateResult) -> str:
    return (
        f"judge gate: accuracy {result.accuracy} on {result.scored}/{result.pairs} labelled pairs, "
        f"position consistency {result.position_consistency} (same position {result.same_position_rate}), "
        f"calibration error {result.expected_calibration_error}, abstained {result.abstained}"
    )


def parse_written(value: str) -> dict[str, str | None]:
    """A ``--written SOURCE=harmful|benign[:GLOB]`` value as a :class:`~cai_engine.classifiers.data.WrittenSource`
    mapping (source, label, ids)."""
    source, sep, rest = value.rpartition("=")
    label, _, ids = rest.partition(":")
    if not sep or not source or label not in ("harmful", "benign"):
        raise click.BadParameter(f"{value!r}: expected SOURCE=harmful or SOURCE=benign[:GLOB]", param_hint="--written")
    return {"source": source, "label": label, "ids": ids or None}


def config_option(help: str = "YAML/JSON file with any of the settings below; flags override it."):
    """The ``--config FILE`` option the run commands share (its settings, then the flags over them)."""
    return click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), help=help)


constitution_option = click.option("--constitution", help="Constitution name or file. [default: harmless]")


def intent_options(declined: str, answered: str):
    """``--must-decline PATTERN`` and ``--must-answer PATTERN`` (repeatable): prompt ids, as shell patterns, of requests
    known to be harmful and of requests harmless however they sound; ``declined`` and ``answered`` say what each
    does in this command."""

    def decorate(function):
        function = click.option(
            "--must-answer",
            multiple=True,
            metavar="PATTERN",
            help=f"Prompt ids (shell patterns, e.g. 'pr-*-b') of harmless requests: {answered}. Repeatable.",
        )(function)
        return click.option(
            "--must-decline",
            multiple=True,
            metavar="PATTERN",
            help=f"Prompt ids (shell patterns, e.g. 'rt-*') of harmful requests: {declined}. Repeatable.",
        )(function)

    return decorate


def push_options(kind: str):
    """``--push-to-hub REPO`` and ``--private``: upload what the command wrote to the Hugging Face Hub."""

    def decorate(function):
        function = click.option("--private", is_flag=True, help="Create the Hub repository as private.")(function)
        return click.option(
            "--push-to-hub",
            "push_to_hub",
            metavar="OWNER/NAME",
            help=f"Upload the {kind} folder to this Hugging Face Hub repository (token: HF_TOKEN or "
            "`huggingface-cli login`).",
        )(function)

    return decorate


def push(folder: Path | str, repo_id: str | None, repo_type: str, private: bool) -> None:
    if not repo_id or int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch, the main process pushes
        return
    from cai_engine.store.hub import push_folder

    url = push_folder(folder, repo_id, repo_type=repo_type, private=private)  # type: ignore[arg-type]
    click.echo(f"pushed {folder} to {url}")


def shard_options(function):
    """``--shard i/n`` (this process runs one shard) and ``--shards N`` (run every shard on Ray, then merge)."""
    function = click.option(
        "--ray-address",
        help="With --shards: the Ray cluster to join ('auto': the one this machine belongs to). [default: a local Ray]",
    )(function)
    function = click.option(
        "--executor",
        type=click.Choice(["ray", "local"]),
        default="ray",
        show_default=True,
        help="With --shards: run the shards as Ray tasks, or one after another here.",
    )(function)
    function = click.option(
        "--shards",
        type=click.IntRange(min=1),
        help="Split the run into N shards, run them (see --executor) and merge them into --out.",
    )(function)
    return click.option(
        "--shard",
        metavar="I/N",
        help="Run only shard I of N (by prompt id); merge the shard directories with `cai merge`.",
    )(function)
