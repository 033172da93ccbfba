"""The cache root (CAI_CACHE_DIR, else platformdirs' user cache folder), and `cai env` agreeing with `cai models list`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_engine import CatalogModel, Package, hookimpl
from cai_engine.cli import cli
from cai_engine.cli.base import reset_state
from cai_engine.files.caches import cache_dir, cache_dirs, cache_root, default_cache_root
from cai_engine.models.runtime import DEFAULT_MODEL
from cai_engine.plugins.catalog import models_dir


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh HOME with neither CAI_CACHE_DIR nor XDG_CACHE_HOME set."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CAI_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return tmp_path / "home"


def test_the_default_is_the_user_cache_folder(home):
    assert cache_root() == default_cache_root() == home / ".cache" / "cai-engine"  # what existing installs use
    assert models_dir() == home / ".cache" / "cai-engine" / "gguf"


def test_xdg_cache_home_is_honoured(home, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "cai-engine"
    assert cache_dir("models") == tmp_path / "xdg" / "cai-engine" / "models"


def test_cai_cache_dir_wins(home, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine" and models_dir() == tmp_path / "mine" / "gguf"
    # read-only look-ups also try the user cache folder and the pre-XDG one, in that order
    assert cache_dirs("gguf") == [
        tmp_path / "mine" / "gguf",
        tmp_path / "xdg" / "cai-engine" / "gguf",
        home / ".cache" / "cai-engine" / "gguf",
    ]


def test_no_hand_written_cache_paths_are_left():
    root = Path(__file__).resolve().parents[1]
    offenders = [
        str(path.relative_to(root))
        for folder in ("cai_engine", "bench", "plugins", "tools")
        for path in (root / folder).rglob("*.py")
        if path.name != "caches.py" and '".cache"' in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)  # the catalogue checks the size (the hash is checked on install)


def test_env_and_models_list_agree_on_every_catalogue_model(cli_runner, home, tmp_path, monkeypatch):
    from cai_engine.default_plugins.models import BUILTIN_MODELS

    fake = CatalogModel(
        name="fake-model",
        title="A fake model",
        filename="fake.gguf",
        size=1234,
        sha256="0" * 64,
        licence="MIT",
        provenance="made by the test",
        packages=(Package(name="fake-model-part1", version="1.0.0"),),
    )

    class Plugin:
        @hookimpl
        def cai_register_models(self, register):
            register(fake)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cache"))
    by_name = {m.name: m for m in BUILTIN_MODELS}
    _sparse(tmp_path / "cache" / "gguf" / "fake.gguf", 1234)
    # the default model installed in the user cache folder while CAI_CACHE_DIR points elsewhere: found by both
    _sparse(tmp_path / "xdg" / "cai-engine" / "gguf" / by_name[DEFAULT_MODEL].filename, by_name[DEFAULT_MODEL].size)
    _sparse(tmp_path / "cache" / "gguf" / by_name["qwen2.5-coder-0.5b"].filename, 10)  # truncated: not installed
    reset_state(plugins=[Plugin()])

    listed = cli_runner.invoke(cli, ["models", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    env = cli_runner.invoke(cli, ["env", "--json"])
    assert env.exit_code == 0, env.output
    rows = {row["name"]: row for row in json.loads(listed.output)}
    data = json.loads(env.output)
    assert set(rows) == set(data["models"]) == {*by_name, "fake-model"}
    for name, row in rows.items():
        assert data["models"][name] == {"installed": row["installed"], "path": row["path"]}, name
    installed = {name for name, row in rows.items() if row["installed"]}
    assert installed == {DEFAULT_MODEL, "fake-model"}
    assert data["caches"]["root"] == str(tmp_path / "cache") and data["caches"]["root_from"] == "CAI_CACHE_DIR"
    assert data["caches"]["user_default"] == str(tmp_path / "xdg" / "cai-engine")
    path = cli_runner.invoke(cli, ["models", "path", DEFAULT_MODEL])
    assert path.output.strip() == rows[DEFAULT_MODEL]["path"]
    text = cli_runner.invoke(cli, ["env"]).output
    assert f"{DEFAULT_MODEL} installed" in text and "qwen2.5-coder-0.5b not installed" in text


def test_env_reports_what_trl_env_does(cli_runner, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = json.loads(cli_runner.invoke(cli, ["env", "--json"]).output)
    for package in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "huggingface_hub", "pydantic"):
        assert data["packages"][package] != "not installed", package
    assert data["packages"]["llama-cpp-python"]  # a version, or "not installed"
    assert "not-a-package" not in data["packages"]
    assert data["platform"] and data["python"] and data["devices"]
    from huggingface_hub import constants

    assert data["huggingface"]["hub_cache"] == constants.HF_HUB_CACHE
    accelerate = data["accelerate_config"]
    assert (
        accelerate["file"].endswith("default_config.yaml")
        and accelerate["exists"] is Path(accelerate["file"]).is_file()
    )
