from __future__ import annotations

import json
from pathlib import Path

from cai_engine import __version__
from cai_engine.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def test_version(cli_runner):
    result = cli_runner.invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert f"cai-engine {__version__}" in result.output


def test_help_explains(cli_runner):
    result = cli_runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "constitution" in result.output and "constitutions" in result.output and "plugins" in result.output


def test_plugins_is_json(cli_runner):
    result = cli_runner.invoke(cli, ["plugins"])
    assert result.exit_code == 0
    assert json.loads(result.output) == []  # autoload is off in tests and built-ins are hidden
    result = cli_runner.invoke(cli, ["plugins", "--all"])
    rows = json.loads(result.output)
    critics = next(r for r in rows if r["name"] == "cai_engine.default_plugins.critics")
    assert "model" in critics["provides"]["critics"]
    rules = next(r for r in rows if r["name"] == "cai_engine.default_plugins.rules")  # an essential built-in
    assert rules["provides"] == {"critics": ["rules"], "revisers": ["rules"]}
    result = cli_runner.invoke(cli, ["plugins", "--all", "--hook", "cai_register_constitutions"])
    assert [r["name"] for r in json.loads(result.output)] == ["cai_engine.default_plugins.constitutions"]


def test_constitutions_list(cli_runner):
    result = cli_runner.invoke(cli, ["constitutions", "list", "--json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["harmless"]["status"] == "ok" and rows["harmless"]["principles"] == 17
    table = cli_runner.invoke(cli, ["constitutions", "list"])
    assert "harmless" in table.output and "balanced" in table.output


def test_constitutions_show_resolves_extends(cli_runner):
    result = cli_runner.invoke(cli, ["constitutions", "show", "helpful-first", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    ids = [p["id"] for p in data["principles"]]
    assert "harm-001" in ids and "help-002" in ids and "harm-007" not in ids
    assert data["content_hash"].startswith("sha256:")
    yaml_out = cli_runner.invoke(cli, ["constitutions", "show", "harmless"])
    assert "harm-014" in yaml_out.output


def test_validate_ok_and_failures(cli_runner, tmp_path):
    import glob

    ok = cli_runner.invoke(
        cli, ["constitutions", "validate", *sorted(glob.glob(str(ROOT / "constitutions" / "*.yaml")))]
    )
    assert ok.exit_code == 0, ok.output
    assert ok.output.count("ok ") == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text('name: x\nversion: "1"\nprinciples:\n  - id: a\n    critque_request: c\n', encoding="utf-8")
    result = cli_runner.invoke(
        cli, ["constitutions", "validate", str(ROOT / "constitutions" / "harmless.yaml"), str(bad)]
    )
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert f"{bad}:5: principles[0].critque_request: unknown key; did you mean 'critique_request'" in result.output
    assert "1 of 2 file(s) failed" in result.output


def test_validate_strict_turns_warnings_into_failures(cli_runner, tmp_path):
    path = tmp_path / "warn.yaml"
    path.write_text(
        'name: w\nversion: "1"\nprinciples:\n  - {id: a, critique_request: c, revision_request: r, '
        "comparison: q, conflicts_with: [nothing]}\n",
        encoding="utf-8",
    )
    assert cli_runner.invoke(cli, ["constitutions", "validate", str(path)]).exit_code == 0
    result = cli_runner.invoke(cli, ["constitutions", "validate", "--strict", str(path)])
    assert result.exit_code == 1 and "matches no other principle" in result.output


def test_unknown_constitution_is_one_clear_line(cli_runner):
    result = cli_runner.invoke(cli, ["constitutions", "show", "nosuch"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error: unknown constitution 'nosuch'; known constitutions:")
    assert len(result.output.strip().splitlines()) == 1


def test_schema_command_matches_committed(cli_runner, tmp_path):
    out = tmp_path / "s.json"
    result = cli_runner.invoke(cli, ["constitutions", "schema", "-o", str(out)])
    assert result.exit_code == 0
    with open(ROOT / "schemas" / "constitution.schema.json", encoding="utf-8") as committed:
        assert json.load(committed) == json.loads(out.read_text(encoding="utf-8"))


def test_a_missing_extra_gets_an_install_hint(cli_runner, monkeypatch, tmp_path):
    """A fresh venv with only the core: a command that needs torch says which extra to install, no traceback."""
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch.") or name == "transformers":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name.split(".")[0])
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    result = cli_runner.invoke(cli, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 1 and "pip install 'cai-engine[models]'" in result.output
    assert "Traceback" not in result.output


def test_env_lists_versions_plugins_and_paths(cli_runner):
    data = json.loads(cli_runner.invoke(cli, ["env", "--json"]).output)
    assert data["cai_engine"] and data["python"] and "gguf_cache" in data and isinstance(data["plugins"], list)
    assert "pluggy" in data["packages"]
    assert cli_runner.invoke(cli, ["env"]).output.startswith("cai_engine")


def test_runs_print_how_each_model_runs_when_it_loads(tiny_model, capsys):
    """The run header: each model the CLI's runtime loads is announced once, with the path it takes."""
    from cai_engine.cli.base import current_runtime

    runtime = current_runtime()
    runtime.backend(str(tiny_model))
    runtime.backend(str(tiny_model))  # already loaded: not announced again
    err = capsys.readouterr().err
    assert err.count("model ") == 1
    assert (
        f"model {tiny_model}" in err
        and "transformers, float32 on cpu, oneDNN-packed weights, batches of up to 16 prompts" in err
    )
    runtime.close()
