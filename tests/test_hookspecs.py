"""Meta-tests: every hook is documented, named by convention, on the docs site's hooks page, and tested."""

from __future__ import annotations

import inspect
import random
import re
from pathlib import Path

import pytest
import yaml

from cai_engine import hookimpl, make_plugin_manager
from cai_engine.constitution.model import Phase
from cai_engine.plugins import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(name for name, fn in vars(hookspecs).items() if name.startswith("cai_") and callable(fn))


def test_the_hooks_the_design_names_exist():
    expected = {
        f"cai_register_{k}"
        for k in (
            "backends",
            "samplers",
            "critics",
            "revisers",
            "judges",
            "trainers",
            "constitutions",
            "prompt_sets",
            "commands",
            "models",
        )
    }
    expected |= {"cai_select_principles", "cai_on_record"}
    assert expected == set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_documented(name):
    doc = inspect.getdoc(getattr(hookspecs, name))
    assert doc and len(doc) > 60 and "versionadded" in doc


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_on_the_hooks_page(name):
    """docs/reference/hooks.md renders hookspecs.py with mkdocstrings, so the page is generated from the docstrings
    above, never copied; its member filters must let every hook through."""
    text = (ROOT / "docs" / "reference" / "hooks.md").read_text(encoding="utf-8")
    directive = re.search(r"^::: cai_engine\.plugins\.hookspecs\n((?:    .*\n)*)", text, re.MULTILINE)
    assert directive, "docs/reference/hooks.md must render `::: cai_engine.plugins.hookspecs`"
    options = yaml.safe_load("\n".join(line[4:] for line in directive.group(1).splitlines())) or {}
    for pattern in (options.get("options") or {}).get("filters", []):
        negative = pattern.startswith("!")
        assert bool(re.search(pattern.lstrip("!"), name)) != negative, f"the filter {pattern!r} hides {name}"


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_has_a_test(name):
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    assert f"def test_hook_{name}" in sources


def test_hook_cai_register_commands(cli_runner, monkeypatch):
    import click

    from cai_engine.cli import base as cli_module

    class Plugin:
        @hookimpl
        def cai_register_commands(self, cli):
            @cli.command("hello")
            def hello():
                """Say hello."""
                click.echo("hello from a plugin")

    pm = make_plugin_manager(autoload=False, plugins=[Plugin()])
    cli_module.state().__dict__["pm"] = pm
    try:
        result = cli_runner.invoke(cli_module.cli, ["hello"])
        assert result.exit_code == 0, result.output
        assert "hello from a plugin" in result.output
    finally:
        cli_module.cli.commands.pop("hello", None)


def test_hook_cai_select_principles(cai_registry):
    harmless = cai_registry.constitution("harmless")
    candidates = harmless.for_phase(Phase.sl)

    class AlwaysLast:
        @hookimpl
        def cai_select_principles(self, constitution, candidates, item, phase, round, rng):
            return [candidates[-1]]

    hook = make_plugin_manager(autoload=False, plugins=[AlwaysLast()]).hook.cai_select_principles
    chosen = hook(constitution=harmless, candidates=candidates, item={}, phase=Phase.sl, round=0, rng=random.Random(0))
    assert chosen == [candidates[-1]]


def test_builtin_selection_is_weighted_uniform_with_replacement(cai_pm, cai_registry):
    """CAI-SPEC G0: the draw is uniform with replacement (chi-squared over many draws)."""
    harmless = cai_registry.constitution("harmless")
    candidates = harmless.for_phase(Phase.sl)
    rng = random.Random(1234)
    counts = {p.id: 0 for p in candidates}
    draws = 8000
    repeats = 0
    for _i in range(draws // 4):
        chosen = [
            cai_pm.hook.cai_select_principles(
                constitution=harmless, candidates=candidates, item={}, phase=Phase.sl, round=r, rng=rng
            )[0].id
            for r in range(4)
        ]
        repeats += len(set(chosen)) < 4
        for pid in chosen:
            counts[pid] += 1
    expected = draws / len(candidates)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 37.7  # p = 0.001 critical value for 15 degrees of freedom
    assert repeats > 0  # with replacement: some items reuse a principle within their rounds


def test_hook_cai_on_record(cai_runtime):
    seen = []

    class Audit:
        @hookimpl
        def cai_on_record(self, record, kind):
            seen.append((kind, record["id"]))

    cai_runtime.pm.register(Audit())
    cai_runtime.emit({"id": "x1"}, "guard")
    assert seen == [("guard", "x1")]


def _one_registration(hook, kind):
    """A plugin registers one new component of ``kind`` through ``hook``: the registry finds it by name, credits the
    plugin, and a second registration of the same name is refused."""
    from cai_engine import Backend, Critic, DuplicateComponentError, Judge, Registry, Reviser, Sampler, Trainer

    base = {
        "backend": Backend,
        "sampler": Sampler,
        "critic": Critic,
        "reviser": Reviser,
        "judge": Judge,
        "trainer": Trainer,
    }[kind]
    component = type(f"Hooked{kind.title()}", (base,), {"name": f"hooked-{kind}", "__module__": __name__})
    calls = []

    class Plugin:
        pass

    def impl(register):
        calls.append(register)
        register(component)

    setattr(Plugin, hook, staticmethod(hookimpl(impl)))
    registry = Registry(make_plugin_manager(autoload=False, plugins=[Plugin()]))
    assert len(calls) == 1  # registration hooks run exactly once
    assert registry.component(kind, f"hooked-{kind}") is component
    assert f"hooked-{kind}" in registry.names(kind)
    owners = [
        plugin for plugin, kinds in registry.contributions().items() if f"hooked-{kind}" in kinds.get(f"{kind}s", [])
    ]
    assert len(owners) == 1 and owners[0] == registry.owner(kind, f"hooked-{kind}")
    with pytest.raises(DuplicateComponentError, match=f"hooked-{kind}"):
        Registry(make_plugin_manager(autoload=False, plugins=[Plugin(), Plugin()]))


def test_hook_cai_register_backends():
    _one_registration("cai_register_backends", "backend")


def test_hook_cai_register_samplers():
    _one_registration("cai_register_samplers", "sampler")


def test_hook_cai_register_critics():
    _one_registration("cai_register_critics", "critic")


def test_hook_cai_register_revisers():
    _one_registration("cai_register_revisers", "reviser")


def test_hook_cai_register_judges():
    _one_registration("cai_register_judges", "judge")


def test_hook_cai_register_trainers():
    _one_registration("cai_register_trainers", "trainer")


def test_hook_cai_register_constitutions(tmp_path):
    from cai_engine import Registry

    path = tmp_path / "mine.yaml"
    path.write_text('name: mine\nversion: "3"\nextends: harmless\n', encoding="utf-8")

    class Plugin:
        @hookimpl
        def cai_register_constitutions(self, register):
            register(path)

    registry = Registry(make_plugin_manager(autoload=False, plugins=[Plugin()]))
    assert registry.constitution("mine").version == "3"


def test_hook_cai_register_prompt_sets(tmp_path):
    from cai_engine import PromptSet, Registry, load_prompts

    path = tmp_path / "p.txt"
    path.write_text("first prompt\nsecond prompt\n", encoding="utf-8")

    class Plugin:
        @hookimpl
        def cai_register_prompt_sets(self, register):
            register(PromptSet(name="mine", path=path))

    registry = Registry(make_plugin_manager(autoload=False, plugins=[Plugin()]))
    assert [i.text for i in load_prompts("builtin:mine", registry)] == ["first prompt", "second prompt"]
