"""The three domain plugins, loaded the way users get them: installed distributions found by entry point."""

from __future__ import annotations

import json

import pytest

from cai_engine import Registry, make_plugin_manager
from cai_engine.cli import cli
from cai_engine.plugins.manager import list_plugins

DOMAINS = ("medical", "financial", "legal")


@pytest.fixture
def installed(monkeypatch):
    import importlib.metadata

    names = {ep.name for ep in importlib.metadata.entry_points(group="cai_engine")}
    missing = set(DOMAINS) - names
    if missing:
        pytest.skip(f"domain plugins not installed: {', '.join(sorted(missing))} (make setup installs them)")
    monkeypatch.delenv("CAI_DISABLE_PLUGIN_AUTOLOAD", raising=False)


@pytest.mark.parametrize("domain", DOMAINS)
def test_plugin_accepts_this_core_version(domain):
    """Each plugin's pin on cai-engine must admit the core in this checkout, or a fresh install cannot resolve."""
    from pathlib import Path

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    import cai_engine

    root = Path(__file__).resolve().parents[1]
    meta = tomllib.loads((root / "plugins" / f"cai-{domain}" / "pyproject.toml").read_text())
    pins = [Requirement(d) for d in meta["project"]["dependencies"] if Requirement(d).name == "cai-engine"]
    assert pins, f"cai-{domain} does not declare its dependency on cai-engine"
    assert all(cai_engine.__version__ in pin.specifier for pin in pins), (
        f"cai-{domain} requires {pins[0]}, but the core is {cai_engine.__version__}"
    )


def test_installed_plugins_are_listed(installed, cli_runner):
    rows = {r["name"]: r for r in json.loads(cli_runner.invoke(cli, ["plugins"]).output)}
    for domain in DOMAINS:
        assert rows[domain]["distribution"] == f"cai-{domain}"
        provides = rows[domain]["provides"]
        assert provides["constitutions"] == [domain] and provides["prompt_sets"] == [domain]
        assert all(name.startswith(f"{domain}.") for name in provides["critics"])
    listed = json.loads(cli_runner.invoke(cli, ["constitutions", "list", "--json"]).output)
    assert {r["name"] for r in listed if r["status"] == "ok"} >= set(DOMAINS)
    shown = cli_runner.invoke(cli, ["constitutions", "show", "medical", "--format", "json"])
    assert {"harm-001", "med-003"} <= {p["id"] for p in json.loads(shown.output)["principles"]}


def test_blocking_a_plugin_removes_everything_it_provides(installed, monkeypatch):
    monkeypatch.setenv("CAI_BLOCKED_PLUGINS", "medical")
    registry = Registry(make_plugin_manager())
    assert "medical" not in registry.constitution_names() and "medical" not in registry.prompt_set_names()
    assert not any(n.startswith("medical.") for n in registry.names("critic"))
    assert "financial" in registry.constitution_names()
    assert "medical" not in [r["name"] for r in list_plugins(registry.pm, registry)]


@pytest.mark.slow
@pytest.mark.parametrize("domain", DOMAINS)
def test_sl_runs_with_each_domain(installed, domain, tiny_model, tmp_path):
    from cai_engine.models.runtime import Runtime
    from cai_engine.phase1.revise import run_sl

    summary = run_sl(
        {
            "constitution": domain,
            "prompts": f"{domain}:{domain}",
            "limit": 2,
            "rounds": 1,
            "model": str(tiny_model),
            "helpful_prompts": None,
            "sampler": {"name": "model", "options": {"max_new_tokens": 6}},
            "critic": {"name": "model", "options": {"max_new_tokens": 6}},
            "reviser": {"name": "model", "options": {"max_new_tokens": 6}},
        },
        tmp_path / domain,
        runtime=Runtime(Registry(make_plugin_manager())),
        progress=False,
    )
    assert summary["red_team_items"] == 2 and summary["error_items"] == 0
    records = [json.loads(line) for line in (tmp_path / domain / "records.jsonl").read_text().splitlines()]
    assert all(r["provenance"]["constitution"]["name"] == domain for r in records)
