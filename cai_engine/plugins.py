"""The plugin manager and the component registry: the only module that touches ``pm.hook``."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pluggy

from . import hookspecs
from .components import Backend, Critic, Judge, Reviser, Sampler, Trainer
from .errors import ConstitutionError, DuplicateComponentError, PluginError, UnknownComponentError

ENTRY_POINT_GROUP = "cai_engine"

# Built-ins go through the same hooks as third-party plugins. Each can be blocked by its module name in
# CAI_BLOCKED_PLUGINS; blocking one leaves the engine without that kind of built-in, which is the user's call.
DEFAULT_PLUGINS = (
    "cai_engine.default_plugins.backends",
    "cai_engine.default_plugins.samplers",
    "cai_engine.default_plugins.critics",
    "cai_engine.default_plugins.revisers",
    "cai_engine.default_plugins.judges",
    "cai_engine.default_plugins.trainers",
    "cai_engine.default_plugins.constitutions",
    "cai_engine.default_plugins.prompt_sets",
    "cai_engine.default_plugins.selection",
    "cai_engine.default_plugins.models",
)

COMPONENT_KINDS: dict[str, type] = {
    "backend": Backend,
    "sampler": Sampler,
    "critic": Critic,
    "reviser": Reviser,
    "judge": Judge,
    "trainer": Trainer,
}
_HOOK_FOR_KIND = {kind: f"cai_register_{kind}s" for kind in COMPONENT_KINDS}

T = TypeVar("T")


def _env_list(name: str) -> list[str]:
    return [part.strip() for part in os.environ.get(name, "").split(",") if part.strip()]


def make_plugin_manager(
    *, autoload: bool = True, plugins: Iterable[object] = (), skip_broken: bool = False
) -> pluggy.PluginManager:
    """Build the plugin manager: hook specs, entry-point plugins, built-ins, then ``plugins``.

    :param autoload: load third-party plugins from the ``cai_engine`` entry-point group (off also when
        ``CAI_DISABLE_PLUGIN_AUTOLOAD`` is set).
    :param plugins: extra plugin objects (modules or instances), registered last; used by tests and embedders.
    :param skip_broken: an installed plugin that fails to import or declares a hook that does not exist is left
        out and recorded in ``pm.cai_broken`` (name -> error) instead of raising; the CLI uses this so that one
        broken plugin cannot take ``cai --help`` or ``cai plugins`` down with it.
    """
    pm = pluggy.PluginManager("cai_engine")
    pm.add_hookspecs(hookspecs)
    pm.cai_distinfo = {}  # type: ignore[attr-defined]  # plugin name -> (distribution name, version)
    pm.cai_broken = {}  # type: ignore[attr-defined]  # plugin name -> why it was left out (skip_broken)
    pm.cai_warnings = []  # type: ignore[attr-defined]  # advice for the user (e.g. a blocked name that matches nothing)
    blocked = _env_list("CAI_BLOCKED_PLUGINS")
    for name in blocked:
        pm.set_blocked(name)
    known = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)} | set(DEFAULT_PLUGINS)
    for name in blocked:
        if name not in known:
            pm.cai_warnings.append(  # type: ignore[attr-defined]
                f"CAI_BLOCKED_PLUGINS names {name!r}, which is no installed plugin; installed: "
                f"{', '.join(sorted(known - set(DEFAULT_PLUGINS))) or '(none)'}"
            )
    if os.environ.get("CAI_TRACE_PLUGINS"):
        pm.trace.root.setwriter(print)
        pm.enable_tracing()
    if autoload and not os.environ.get("CAI_DISABLE_PLUGIN_AUTOLOAD"):
        _load_entry_points(pm, skip_broken=skip_broken)
    for modname in DEFAULT_PLUGINS:
        if not pm.is_blocked(modname):
            pm.register(importlib.import_module(modname), modname)
    for plugin in plugins:
        pm.register(plugin)
    pm.check_pending()  # a misspelled hookimpl (cai_register_critic) fails here, at start-up
    return pm


def _load_entry_points(pm: pluggy.PluginManager, *, skip_broken: bool = False) -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
            continue
        dist = getattr(ep, "dist", None)
        who = f"plugin {ep.name!r} (entry point {ep.value!r}{f', distribution {dist.name}' if dist else ''})"
        try:
            plugin = ep.load()
        except Exception as exc:
            if skip_broken:
                pm.cai_broken[ep.name] = f"failed to import: {type(exc).__name__}: {exc}"  # type: ignore[attr-defined]
                continue
            # Surface the plugin's own error with its traceback; only add who it was and how to skip it.
            note = (
                f"cai-engine: {who} failed to import; fix or uninstall it, or set "
                f"CAI_BLOCKED_PLUGINS={ep.name} to skip it"
            )
            if sys.version_info >= (3, 11):
                exc.add_note(note)
                raise
            raise PluginError(f"{note} ({type(exc).__name__}: {exc})") from exc
        try:
            pm.register(plugin, name=ep.name)
            unknown = sorted(
                c.name for c in (pm.get_hookcallers(plugin) or []) if c.spec is None and not c.name.startswith("pytest")
            )
            if unknown:
                pm.unregister(plugin)
                raise pluggy.PluginValidationError(
                    plugin,
                    f"{who} implements {', '.join(unknown)}, which is no cai-engine hook (a typo?); the hooks "
                    f"are: {', '.join(sorted(n for n in dir(pm.hook) if n.startswith('cai_')))}",
                )
        except pluggy.PluginValidationError as exc:
            if skip_broken:
                pm.cai_broken[ep.name] = str(exc)  # type: ignore[attr-defined]
                continue
            raise
        pm.cai_distinfo[ep.name] = (dist.name, dist.version) if dist else (None, None)  # type: ignore[attr-defined]


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
                _HOOK_FOR_KIND[kind], lambda plugin, kind=kind: self._component_register(kind, plugin)
            )
        self._call_register_hook("cai_register_constitutions", self._constitution_register)
        self._call_register_hook("cai_register_prompt_sets", self._prompt_set_register)
        from .catalog import Catalog

        self.catalog = Catalog(())
        self._call_register_hook("cai_register_models", self._model_register)

    # -- building --------------------------------------------------------------------------------------------

    def _call_register_hook(self, hook_name: str, make_register: Any) -> None:
        caller = getattr(self.pm.hook, hook_name)
        # Call implementations one at a time so each registration knows which plugin made it.
        for impl in reversed(caller.get_hookimpls()):
            register = make_register(impl.plugin_name)
            kwargs = {"register": register}
            try:
                impl.function(*[kwargs[arg] for arg in impl.argnames])
            except (PluginError, TypeError, ConstitutionError):
                raise
            except Exception as exc:
                raise PluginError(f"{hook_name} raised {type(exc).__name__}: {exc}", plugin=impl.plugin_name) from exc

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
        from .constitutions import read_constitution_file

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
        from .prompts import PromptSet

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
            raise UnknownComponentError(kind, name, self._components[kind]) from None

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
            raise UnknownComponentError("constitution", name, self._constitutions) from None

    def raw_constitution(self, name: str):
        return self.constitution_entry(name).raw

    def constitution(self, name_or_path: str | os.PathLike[str]):
        """A resolved constitution by registered name, or from a file path (whose parents may be names)."""
        from .constitutions import SUFFIXES, load_constitution

        text = str(name_or_path)
        if isinstance(name_or_path, os.PathLike) or text.lower().endswith(SUFFIXES) or os.sep in text:
            return load_constitution(Path(text), lookup=self.raw_constitution)
        entry = self.constitution_entry(text)
        try:
            return load_constitution(entry.raw, lookup=self.raw_constitution)
        except ConstitutionError as exc:
            if entry.plugin.startswith("cai_engine."):
                raise
            raise ConstitutionError(f"{exc} (constitution registered by plugin {entry.plugin!r})") from None

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


def list_plugins(pm: pluggy.PluginManager, registry: Registry | None = None, *, all: bool = False) -> list[dict]:
    """Name, version, hooks and contributions of each registered plugin; built-ins only with ``all``."""
    contributions = registry.contributions() if registry else {}
    broken = registry.broken if registry else []
    distinfo = getattr(pm, "cai_distinfo", {})
    rows = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        if name is None:
            continue
        is_default = name in DEFAULT_PLUGINS
        if is_default and not all:
            continue
        hooks = sorted(h.name for h in (pm.get_hookcallers(plugin) or []))
        row: dict[str, Any] = {"name": name, "hooks": hooks}
        dist, version = distinfo.get(name, (None, None))
        if dist:
            row["distribution"] = dist
            row["version"] = version
        if contributions.get(name):
            row["provides"] = contributions[name]
        errors = [f"{b.path}: {b.error}" for b in broken if b.plugin == name]
        if errors:
            row["errors"] = errors
        rows.append(row)
    for name, error in getattr(pm, "cai_broken", {}).items():
        rows.append({"name": name, "hooks": [], "broken": True, "errors": [error]})
    return sorted(rows, key=lambda r: r["name"])
