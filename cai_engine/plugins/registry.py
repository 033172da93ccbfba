"""The component registry: every registered component, constitution, prompt set and catalogue model, with typed
look-ups. Built once from a plugin manager; each registration hook runs exactly once, here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

from cai_engine.constitution.problems import UnknownNameError
from cai_engine.errors import ConstitutionError, DuplicateComponentError, UnknownComponentError
from cai_engine.plugins.components import Backend, Critic, Judge, Reviser, Sampler, Trainer
from cai_engine.plugins.manager import COMPONENT_KINDS, DEFAULT_PLUGINS, HOOK_FOR_KIND, Hooks, make_plugin_manager


@dataclass
class ConstitutionEntry:
    """A registered constitution file: who registered it, and either its parsed data or why it is broken."""

    name: str
    path: Path
    plugin: str
    raw: Any = None
    error: str | None = None


@dataclass
class BrokenEntry:
    plugin: str
    path: str
    error: str


@dataclass
class _Owned:
    obj: Any
    plugin: str
    module: str


class Registry:
    """Every registered component, constitution and prompt set, with typed look-ups.

    Built once from a plugin manager; registration hooks each run exactly once, here.
    """

    def __init__(self, pm: pluggy.PluginManager | None = None) -> None:
        self.pm = pm if pm is not None else make_plugin_manager()
        self._components: dict[str, dict[str, _Owned]] = {kind: {} for kind in COMPONENT_KINDS}
        self._constitutions: dict[str, ConstitutionEntry] = {}
        self.broken: list[BrokenEntry] = []
        self._prompt_sets: dict[str, _Owned] = {}
        for kind in COMPONENT_KINDS:
            self._call_register_hook(
                HOOK_FOR_KIND[kind], lambda plugin, kind=kind: self._component_register(kind, plugin)
            )
        self._call_register_hook("cai_register_constitutions", self._constitution_register)
        self._call_register_hook("cai_register_prompt_sets", self._prompt_set_register)
        from cai_engine.plugins.catalog import Catalog

        self.catalog = Catalog(())
        self._call_register_hook("cai_register_models", self._model_register)

    # -- building --------------------------------------------------------------------------------------------

    def _call_register_hook(self, hook_name: str, make_register: Any) -> None:
        Hooks(self.pm).each_registration(hook_name, make_register)

    def _component_register(self, kind: str, plugin: str):
        base = COMPONENT_KINDS[kind]

        def register(cls: type) -> None:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise TypeError(
                    f"plugin {plugin!r} registered {cls!r} as a {kind}, but it is not a subclass of "
                    f"cai_engine.{base.__name__}"
                )
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise TypeError(f"plugin {plugin!r}: {kind} class {cls.__qualname__} has no `name` class attribute")
            existing = self._components[kind].get(name)
            if existing is not None:
                raise DuplicateComponentError(
                    f"{kind} name {name!r} is registered twice: by {existing.module}.{existing.obj.__qualname__} "
                    f"and by {cls.__module__}.{cls.__qualname__}; rename one or block a plugin with CAI_BLOCKED_PLUGINS",
                    plugin=plugin,
                )
            self._components[kind][name] = _Owned(cls, plugin, cls.__module__)

        return register

    def _constitution_register(self, plugin: str):
        from cai_engine.constitution.load import read_constitution_file

        def register(path: str | os.PathLike[str]) -> None:
            path = Path(path)
            try:
                raw = read_constitution_file(path)
                name = raw.data.get("name")
                if not isinstance(name, str) or not name:
                    raise ConstitutionError("has no 'name'; every constitution needs one", source=str(path))
            except ConstitutionError as exc:
                self.broken.append(BrokenEntry(plugin, str(path), str(exc)))
                return
            if name in self._constitutions:
                other = self._constitutions[name]
                self.broken.append(
                    BrokenEntry(
                        plugin,
                        str(path),
                        f"constitution name {name!r} is already registered by plugin {other.plugin!r} ({other.path}); "
                        "this one was skipped",
                    )
                )
                return
            self._constitutions[name] = ConstitutionEntry(name, path, plugin, raw=raw)

        return register

    def _model_register(self, plugin: str):
        def register(model: Any) -> None:
            try:
                self.catalog.add(model)
            except ValueError as exc:
                raise DuplicateComponentError(f"plugin {plugin!r}: {exc}") from None

        return register

    def _prompt_set_register(self, plugin: str):
        from cai_engine.prompts.sets import PromptSet

        def register(prompt_set: PromptSet) -> None:
            if not isinstance(prompt_set, PromptSet):
                raise TypeError(f"plugin {plugin!r} registered {prompt_set!r}; expected a cai_engine.PromptSet")
            key = prompt_set.name
            if key in self._prompt_sets:
                raise DuplicateComponentError(
                    f"prompt set {key!r} is registered twice: by plugin {self._prompt_sets[key].plugin!r} and by "
                    f"plugin {plugin!r}",
                    plugin=plugin,
                )
            self._prompt_sets[key] = _Owned(prompt_set, plugin, plugin)

        return register

    # -- look-ups --------------------------------------------------------------------------------------------

    def component(self, kind: str, name: str) -> type:
        if kind not in self._components:
            raise UnknownComponentError("component kind", kind, self._components)
        try:
            return self._components[kind][name].obj
        except KeyError:
            raise UnknownNameError(kind, name, self._components[kind]) from None

    def backend(self, name: str) -> type[Backend]:
        return self.component("backend", name)

    def sampler(self, name: str) -> type[Sampler]:
        return self.component("sampler", name)

    def critic(self, name: str) -> type[Critic]:
        return self.component("critic", name)

    def reviser(self, name: str) -> type[Reviser]:
        return self.component("reviser", name)

    def judge(self, name: str) -> type[Judge]:
        return self.component("judge", name)

    def trainer(self, name: str) -> type[Trainer]:
        return self.component("trainer", name)

    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def in_order(self, kind: str) -> list[type]:
        """The registered classes of a kind in the order their plugins' hooks ran: as pluggy calls hooks, plugins
        registered later first, ``tryfirst`` implementations before and ``trylast`` ones after the rest."""
        return [owned.obj for owned in self._components[kind].values()]

    def owner(self, kind: str, name: str) -> str:
        return self._components[kind][name].plugin

    # constitutions

    def constitution_names(self) -> list[str]:
        return sorted(self._constitutions)

    def constitution_entry(self, name: str) -> ConstitutionEntry:
        try:
            return self._constitutions[name]
        except KeyError:
            broken = [b for b in self.broken if Path(b.path).stem == name]
            if broken:
                raise ConstitutionError(
                    f"constitution {name!r} is broken (plugin {broken[0].plugin!r}): {broken[0].error}"
                ) from None
            raise UnknownNameError("constitution", name, self._constitutions) from None

    def raw_constitution(self, name: str):
        return self.constitution_entry(name).raw

    def constitution(self, name_or_path: str | os.PathLike[str]):
        """A resolved constitution by registered name, or from a file path (whose parents may be names)."""
        from cai_engine.constitution.load import CONSTITUTION_SUFFIXES, load_constitution

        text = str(name_or_path)
        if isinstance(name_or_path, os.PathLike) or text.lower().endswith(CONSTITUTION_SUFFIXES) or os.sep in text:
            return load_constitution(Path(text), lookup=self.raw_constitution)
        entry = self.constitution_entry(text)
        try:
            return load_constitution(entry.raw, lookup=self.raw_constitution)
        except ConstitutionError as exc:
            if entry.plugin in DEFAULT_PLUGINS:  # a built-in's error needs no pointer to who registered it
                raise
            raise ConstitutionError(f"{exc} (constitution registered by plugin {entry.plugin!r})") from None

    def check_constitution(self, name_or_path: str | os.PathLike[str]):
        """Every problem of a constitution (a registered name or a file) at once, each with its file and line:
        syntax, schema, ``extends``, lint, and check names that no plugin registered. Returns a
        ``constitution.load.Checked``; problems with the input are in it, not raised."""
        from cai_engine.constitution.load import CONSTITUTION_SUFFIXES, check_constitution
        from cai_engine.constitution.problems import problems_of

        text = str(name_or_path)
        checks = self.names("critic")
        if isinstance(name_or_path, os.PathLike) or text.lower().endswith(CONSTITUTION_SUFFIXES) or os.sep in text:
            return check_constitution(Path(text), self.raw_constitution, checks=checks)
        try:
            raw = self.constitution_entry(text).raw
        except (ConstitutionError, UnknownComponentError) as exc:
            from cai_engine.constitution.load import Checked

            return Checked(None, problems_of(exc))
        return check_constitution(raw, self.raw_constitution, checks=checks)

    # prompt sets

    def prompt_set(self, name: str):
        """A prompt set by name: ``red-team``, ``builtin:red-team`` (``builtin:`` names any registered set, as it always
        has) or ``medical:medical`` (the one the plugin ``medical`` registered). A plugin prefix is checked:
        ``medical:red-team`` is an error, not the built-in set."""
        if name in self._prompt_sets:
            return self._prompt_sets[name].obj
        prefix, _, key = name.partition(":")
        owned = self._prompt_sets.get(key) if key else None
        if owned is None:
            raise UnknownComponentError("prompt set", name, self._prompt_sets)
        builtin = owned.plugin in DEFAULT_PLUGINS
        if prefix != "builtin" and prefix not in self._aliases(owned.plugin):  # builtin: names any registered set
            owner = "built-in" if builtin else f"plugin {owned.plugin!r}'s"
            raise UnknownComponentError(
                "prompt set",
                name,
                [f"{'builtin' if o.plugin in DEFAULT_PLUGINS else o.plugin}:{k}" for k, o in self._prompt_sets.items()],
            ) from ValueError(f"{key!r} is {owner}, not {prefix!r}'s")
        return owned.obj

    def _aliases(self, plugin: str) -> set[str]:
        """Names a user may write for a plugin: its registered name, its module's last part, either without a
        ``cai_``/``cai-`` prefix, and its distribution's name."""
        names = {plugin, plugin.rsplit(".", 1)[-1]}
        dist = getattr(self.pm, "cai_distinfo", {}).get(plugin, (None, None))[0]
        if dist:
            names.add(dist)
        return names | {n.removeprefix("cai_").removeprefix("cai-") for n in names}

    def prompt_set_names(self) -> list[str]:
        return sorted(self._prompt_sets)

    # introspection

    def contributions(self) -> dict[str, dict[str, list[str]]]:
        """What each plugin contributed, by kind: {plugin: {"critics": [...], "constitutions": [...]}}."""
        out: dict[str, dict[str, list[str]]] = {}
        for kind, entries in self._components.items():
            for name, owned in entries.items():
                out.setdefault(owned.plugin, {}).setdefault(f"{kind}s", []).append(name)
        for name, entry in self._constitutions.items():
            out.setdefault(entry.plugin, {}).setdefault("constitutions", []).append(name)
        for name, owned in self._prompt_sets.items():
            out.setdefault(owned.plugin, {}).setdefault("prompt_sets", []).append(name)
        for values in out.values():
            for names in values.values():
                names.sort()
        return out
