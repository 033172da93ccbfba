from __future__ import annotations

import textwrap
import uuid

import pluggy
import pytest

from cai_engine import (
    Critic,
    Critique,
    DuplicateComponentError,
    PluginError,
    Registry,
    UnknownComponentError,
    hookimpl,
    make_plugin_manager,
)
from cai_engine.plugins.manager import DEFAULT_PLUGINS, list_plugins


def install_fake_distribution(tmp_path, monkeypatch, module_source: str, *, ep_name="fake"):
    """A real installed distribution: a module plus a .dist-info with a cai_engine entry point, on sys.path.

    Each call uses a fresh module name, so no test sees a module another test imported.
    """
    name = f"fakeplug_{uuid.uuid4().hex[:8]}"
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / f"{name}.py").write_text(textwrap.dedent(module_source), encoding="utf-8")
    info = site / f"{name}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[cai_engine]\n{ep_name} = {name}\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("CAI_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    return name


PLUGIN_SOURCE = """
    from cai_engine import Critic, Critique, hookimpl

    class ShoutCritic(Critic):
        name = "fake.shout"
        def critique(self, tasks):
            return [Critique(principle_id=t.principle.id, text="", needs_revision=t.response.isupper(),
                             critic=self.name) for t in tasks]

    @hookimpl
    def cai_register_critics(register):
        register(ShoutCritic)
"""


def test_entry_point_plugin_is_loaded_and_listed(tmp_path, monkeypatch):
    dist = install_fake_distribution(tmp_path, monkeypatch, PLUGIN_SOURCE)
    pm = make_plugin_manager()
    registry = Registry(pm)
    assert registry.critic("fake.shout").__name__ == "ShoutCritic"
    rows = list_plugins(pm, registry)
    fake = next(r for r in rows if r["name"] == "fake")
    assert fake["distribution"] == dist and fake["version"] == "1.2.3"
    assert fake["hooks"] == ["cai_register_critics"]
    assert fake["provides"] == {"critics": ["fake.shout"]}
    assert all(r["name"] not in DEFAULT_PLUGINS for r in rows)
    assert {r["name"] for r in list_plugins(pm, registry, all=True)} >= set(DEFAULT_PLUGINS)


def test_autoload_can_be_turned_off(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path, monkeypatch, PLUGIN_SOURCE)
    assert "fake.shout" not in Registry(make_plugin_manager(autoload=False)).names("critic")
    monkeypatch.setenv("CAI_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "fake.shout" not in Registry(make_plugin_manager()).names("critic")


def test_plugins_can_be_blocked_by_environment(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path, monkeypatch, PLUGIN_SOURCE)
    monkeypatch.setenv("CAI_BLOCKED_PLUGINS", "fake, cai_engine.default_plugins.revisers")
    registry = Registry(make_plugin_manager())
    assert "fake.shout" not in registry.names("critic")
    assert not {"model", "ensemble"} & set(registry.names("reviser"))
    assert "rules" in registry.names("reviser")  # an essential built-in, in its own module


def test_the_cli_loads_plugins_again_when_the_plugin_settings_change(tmp_path, monkeypatch):
    """A command run after the settings change sees the plugins they allow, not a manager cached under the old ones
    (a test that turned autoload off must not hide an installed plugin from a later command in the same process), and
    the commands a plugin adds come and go with it."""
    import importlib

    from click.testing import CliRunner

    from cai_engine.cli import cli
    from cai_engine.cli.base import reset_state, state

    source = textwrap.dedent(PLUGIN_SOURCE) + textwrap.dedent(
        """
        import click

        @hookimpl
        def cai_register_commands(cli):
            @cli.command("fake-hello")
            def hello():
                click.echo("hello from fake")
        """
    )
    name = install_fake_distribution(tmp_path, monkeypatch, source)
    try:
        monkeypatch.setenv("CAI_DISABLE_PLUGIN_AUTOLOAD", "1")
        # a test passes the plugin's module itself while autoload is off (as a plugin's own tests do)
        reset_state(plugins=[importlib.import_module(name)])
        assert "fake.shout" in state().registry.names("critic")
        reset_state()
        assert "fake.shout" not in state().registry.names("critic")
        assert CliRunner().invoke(cli, ["fake-hello"]).exit_code == 2  # no such command
        monkeypatch.delenv("CAI_DISABLE_PLUGIN_AUTOLOAD")
        assert "fake.shout" in state().registry.names("critic")
        shown = CliRunner().invoke(cli, ["plugins"])
        assert shown.exit_code == 0 and "fake" in shown.output, shown.output
        said = CliRunner().invoke(cli, ["fake-hello"])
        assert said.exit_code == 0 and "hello from fake" in said.output, said.output
        monkeypatch.setenv("CAI_BLOCKED_PLUGINS", "fake")
        assert "fake.shout" not in state().registry.names("critic")
        assert CliRunner().invoke(cli, ["fake-hello"]).exit_code == 2  # the blocked plugin's command went with it
        # the module given to reset_state and also found by its entry point is registered once
        monkeypatch.delenv("CAI_BLOCKED_PLUGINS")
        monkeypatch.setenv("CAI_DISABLE_PLUGIN_AUTOLOAD", "1")
        reset_state(plugins=[importlib.import_module(name)])
        monkeypatch.delenv("CAI_DISABLE_PLUGIN_AUTOLOAD")
        assert "fake.shout" in state().registry.names("critic")
    finally:
        reset_state()


def test_essential_plugins_cannot_be_blocked(monkeypatch):
    monkeypatch.setenv("CAI_BLOCKED_PLUGINS", "cai_engine.default_plugins.rules")
    pm = make_plugin_manager(autoload=False)
    assert "rules" in Registry(pm).names("critic") and "rules" in Registry(pm).names("reviser")
    assert any("essential built-in" in warning for warning in pm.cai_warnings)


def test_import_error_in_plugin_surfaces_with_its_name(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path, monkeypatch, "import module_that_does_not_exist_anywhere\n")
    with pytest.raises(ModuleNotFoundError, match="module_that_does_not_exist_anywhere") as info:
        make_plugin_manager()
    assert any("plugin 'fake'" in note and "CAI_BLOCKED_PLUGINS=fake" in note for note in info.value.__notes__)


def test_misspelled_hookimpl_fails_at_startup():
    class Typo:
        @hookimpl
        def cai_register_critic(self, register):  # missing the s
            pass

    with pytest.raises(pluggy.PluginValidationError, match="cai_register_critic"):
        make_plugin_manager(autoload=False, plugins=[Typo()])


class Dup(Critic):
    name = "rules"

    def critique(self, tasks):
        return [Critique(principle_id=t.principle.id, text="", needs_revision=False, critic=self.name) for t in tasks]


def test_duplicate_component_names_raise_naming_both_modules():
    class Plugin:
        @hookimpl
        def cai_register_critics(self, register):
            register(Dup)

    with pytest.raises(DuplicateComponentError) as info:
        Registry(make_plugin_manager(autoload=False, plugins=[Plugin()]))
    message = str(info.value)
    assert "cai_engine.default_plugins.rules.RuleCritic" in message
    assert f"{__name__}.Dup" in message


def test_registering_a_non_component_is_a_type_error():
    class Plugin:
        @hookimpl
        def cai_register_critics(self, register):
            register(dict)

    with pytest.raises(TypeError, match="not a subclass of cai_engine.Critic"):
        Registry(make_plugin_manager(autoload=False, plugins=[Plugin()]))


def test_plugin_that_raises_is_reported_by_name():
    class Plugin:
        @hookimpl
        def cai_register_judges(self, register):
            raise RuntimeError("boom")

    with pytest.raises(PluginError, match="plugin .*: cai_register_judges raised RuntimeError: boom"):
        Registry(make_plugin_manager(autoload=False, plugins=[Plugin()]))


def test_unknown_names_list_the_known_ones(cai_registry):
    with pytest.raises(UnknownComponentError, match="unknown critic 'nope'; known critics: .*rules"):
        cai_registry.critic("nope")
    with pytest.raises(KeyError):
        cai_registry.reviser("nope")
    with pytest.raises(UnknownComponentError, match="unknown constitution 'nope'"):
        cai_registry.constitution("nope")
    with pytest.raises(UnknownComponentError, match="unknown prompt set"):
        cai_registry.prompt_set("builtin:nope")


def test_broken_constitution_in_a_plugin_does_not_stop_others(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nversion: [\n", encoding="utf-8")
    good = tmp_path / "good.yaml"
    good.write_text('name: good\nversion: "1"\nextends: harmless\n', encoding="utf-8")

    class Broken:
        @hookimpl
        def cai_register_constitutions(self, register):
            register(bad)

    class Good:
        @hookimpl
        def cai_register_constitutions(self, register):
            register(good)

    pm = make_plugin_manager(autoload=False)
    pm.register(Broken(), name="broken-plugin")
    pm.register(Good(), name="good-plugin")
    registry = Registry(pm)
    assert registry.constitution("good").name == "good"
    assert len(registry.broken) == 1
    assert registry.broken[0].plugin == "broken-plugin" and str(bad) in registry.broken[0].path
    assert "invalid YAML" in registry.broken[0].error
    row = next(r for r in list_plugins(pm, registry) if r["name"] == "broken-plugin")
    assert "invalid YAML" in row["errors"][0]


def test_registries_are_independent_and_hooks_run_once():
    calls = []

    class Counting:
        @hookimpl
        def cai_register_critics(self, register):
            calls.append(1)

    pm = make_plugin_manager(autoload=False, plugins=[Counting()])
    registry = Registry(pm)
    assert calls == [1]
    registry.names("critic"), registry.component("critic", "rules")  # look-ups do not run the hooks again
    assert calls == [1]

    class Extra(Critic):
        name = "only-in-the-second"

        def critique(self, tasks):
            return []

    class Adds:
        @hookimpl
        def cai_register_critics(self, register):
            register(Extra)

    other = Registry(make_plugin_manager(autoload=False, plugins=[Counting(), Adds()]))
    assert calls == [1, 1]  # the second registry ran its own hooks once
    assert "only-in-the-second" in other.names("critic")
    assert "only-in-the-second" not in registry.names("critic")  # and the first registry did not change


def _hooks_listed(message: str) -> list[str]:
    return message.rsplit("(the hooks are: ", 1)[1].rstrip(")").split(", ")


def test_misspelled_hookimpl_names_the_typo_and_the_closest_hook():
    class Typo:
        @hookimpl
        def cai_register_critic(self, register):  # missing the s
            pass

    with pytest.raises(pluggy.PluginValidationError) as info:
        make_plugin_manager(autoload=False, plugins=[Typo()])
    message = str(info.value)
    assert "plugin 'Typo' implements 'cai_register_critic', which is no cai-engine hook" in message
    assert "did you mean 'cai_register_critics'?" in message
    listed = _hooks_listed(message)
    assert "cai_register_critic" not in listed and "cai_register_critics" in listed


def test_misspelled_hook_in_an_installed_plugin_is_left_out_with_a_suggestion(tmp_path, monkeypatch):
    install_fake_distribution(
        tmp_path,
        monkeypatch,
        """
        from cai_engine import hookimpl

        @hookimpl
        def cai_register_judgess(register):
            pass
        """,
        ep_name="typo",
    )
    pm = make_plugin_manager(skip_broken=True)
    error = pm.cai_broken["typo"]
    assert (
        "implements 'cai_register_judgess', which is no cai-engine hook; did you mean 'cai_register_judges'?" in error
    )
    assert "cai_register_judgess" not in _hooks_listed(error)
    with pytest.raises(pluggy.PluginValidationError, match="did you mean 'cai_register_judges'"):
        make_plugin_manager()


def test_plugins_command_rejects_an_unknown_hook(cli_runner):
    import json

    from cai_engine.cli import cli

    wrong = cli_runner.invoke(cli, ["plugins", "--hook", "cai_register_critic"])
    assert wrong.exit_code == 2
    assert "'cai_register_critic' is no cai-engine hook; did you mean 'cai_register_critics'?" in wrong.output
    assert cli_runner.invoke(cli, ["plugins", "--hook", "cai_register_nope"]).exit_code == 2
    right = cli_runner.invoke(cli, ["plugins", "--all", "--hook", "cai_register_critics"])
    assert right.exit_code == 0, right.output
    assert any(row["name"] == "cai_engine.default_plugins.critics" for row in json.loads(right.output))


def test_unknown_component_names_suggest_the_closest(cai_registry):
    with pytest.raises(UnknownComponentError, match=r"known critics: .*; did you mean 'rules'\?$"):
        cai_registry.critic("ruless")
    with pytest.raises(UnknownComponentError, match=r"unknown constitution 'harmles'; .*did you mean 'harmless'"):
        cai_registry.constitution("harmles")
