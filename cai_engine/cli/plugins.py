"""`cai plugins` and `cai env`: what is installed, for users and bug reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


# What `cai env` reports the version of: ours, TRL's (`trl env`) and the optional back ends; "not installed" where
# absent (distribution names, as pip knows them).
ENV_PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "huggingface_hub",
    "safetensors",
    "tokenizers",
    "llama-cpp-python",
    "gguf",
    "bitsandbytes",
    "deepspeed",
    "liger-kernel",
    "vllm",
    "pydantic",
    "pluggy",
    "click",
    "PyYAML",
    "platformdirs",
    "google-re2",
    "starlette",
    "uvicorn",
    "prometheus_client",
    "tenacity",
)


def _devices(torch_installed: bool) -> str:
    if not torch_installed:
        return "torch not installed"
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda x{len(names)} ({', '.join(names)})"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return f"cpu ({torch.get_num_threads()} threads)"


def _accelerate_config(installed: bool) -> dict[str, Any]:
    """accelerate's default config file (what `accelerate launch` reads without --config_file), whether it exists,
    and its settings."""
    if not installed:
        return {"file": None, "exists": False}
    from accelerate.commands.config.config_args import default_config_file

    path = Path(default_config_file)
    found: dict[str, Any] = {"file": str(path), "exists": path.is_file()}
    if path.is_file():
        import yaml

        try:
            found["settings"] = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            found["settings"] = f"unreadable: {exc}"
    return found


def environment() -> dict[str, Any]:
    """Everything `cai env` reports, as one mapping."""
    import importlib.metadata as metadata
    import os
    import platform

    from cai_engine.cli.models import catalog_rows
    from cai_engine.files.caches import cache_root, default_cache_root
    from cai_engine.models.files import conversions_dir
    from cai_engine.plugins.catalog import models_dir
    from cai_engine.plugins.manager import list_plugins
    from cai_engine.version import __version__

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    packages = {name: version(name) for name in ENV_PACKAGES}
    installed = {name for name, v in packages.items() if v != "not installed"}
    hub: dict[str, Any] = {}
    if "huggingface_hub" in installed:
        from huggingface_hub import constants

        hub = {
            "home": constants.HF_HOME,
            "hub_cache": constants.HF_HUB_CACHE,
            "offline": bool(constants.HF_HUB_OFFLINE),
            "token_file": constants.HF_TOKEN_PATH,
        }
    plugins = [{"name": row["name"], "version": row.get("version")} for row in list_plugins(state().pm)]
    return {
        "cai_engine": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "devices": _devices("torch" in installed),
        "packages": packages,
        "huggingface": hub,
        "accelerate_config": _accelerate_config("accelerate" in installed),
        "caches": {
            "root": str(cache_root()),
            "root_from": "CAI_CACHE_DIR" if os.environ.get("CAI_CACHE_DIR", "").strip() else "platformdirs",
            "user_default": str(default_cache_root()),
            "models": str(models_dir()),
            "conversions": str(conversions_dir()),
        },
        "gguf_cache": str(models_dir()),
        "models": {
            row["name"]: {"installed": row["installed"], "path": row["path"]}
            for row in catalog_rows(state().registry.catalog)
        },
        "plugins": plugins,
        "broken_plugins": [str(b) for b in getattr(state().pm, "cai_broken", [])],
        "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("CAI_") and "KEY" not in k},
    }


@cli.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def env_command(as_json: bool) -> None:
    """What to paste into a bug report: platform, versions, devices, Hugging Face and accelerate settings, our
    caches, the catalogue models (installed or not, as `cai models list` says), plugins and CAI_* settings."""
    data = environment()
    if as_json:
        echo_json(data)
        return
    width = max(len(k) for k in data)
    for key, value in data.items():
        if key == "models":
            value = {name: "installed" if row["installed"] else "not installed" for name, row in value.items()}
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(v if isinstance(v, str) else f"{v['name']} {v['version']}" for v in value) or "-"
        click.echo(f"{key:<{width}}  {value}")
