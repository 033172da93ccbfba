"""The plugin manager and the typed facade over its hooks (:class:`Hooks`): the only module that touches ``pm.hook``.

The component registry built from the registration hooks is ``plugins.registry``."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

import pluggy

from cai_engine.constitution.problems import did_you_mean
from cai_engine.errors import ConstitutionError, PluginError
from cai_engine.plugins import hookspecs
from cai_engine.plugins.components import Backend, Critic, Judge, Reviser, Sampler, Trainer

ENTRY_POINT_GROUP = "cai_engine"

# Built-ins go through the same hooks as third-party plugins. Each can be blocked by its module name in
# CAI_BLOCKED_PLUGINS; blocking one leaves the engine without that kind of built-in, which is the user's call.
DEFAULT_PLUGINS = (
    "cai_engine.default_plugins.rules",
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

# Built-ins the engine cannot work without (as pytest's essential plugins): the guard checks every response with the
# `rules` critic and repairs with the `rules` reviser. CAI_BLOCKED_PLUGINS cannot block them.
ESSENTIAL_PLUGINS = ("cai_engine.default_plugins.rules",)

COMPONENT_KINDS: dict[str, type] = {
    "backend": Backend,
    "sampler": Sampler,
    "critic": Critic,
    "reviser": Reviser,
    "judge": Judge,
    "trainer": Trainer,
}
HOOK_FOR_KIND = {kind: f"cai_register_{kind}s" for kind in COMPONENT_KINDS}

T = TypeVar("T")


def _env_list(name: str) -> list[str]:
    return [part.strip() for part in os.environ.get(name, "").split(",") if part.strip()]


def plugin_settings() -> tuple[str, ...]:
    """The environment variables that decide which plugins a new plugin manager loads; a cached manager built under
    other values is stale (``Runtime.default`` and the CLI rebuild theirs when this changes)."""
    return tuple(os.environ.get(name, "") for name in ("CAI_DISABLE_PLUGIN_AUTOLOAD", "CAI_BLOCKED_PLUGINS"))


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
        if name in ESSENTIAL_PLUGINS:
            pm.cai_warnings.append(  # type: ignore[attr-defined]
                f"CAI_BLOCKED_PLUGINS names {name!r}, an essential built-in the guard needs; it stays loaded"
            )
            continue
        pm.set_blocked(name)
    known = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)} | set(DEFAULT_PLUGINS)
    for name in blocked:
        if name not in known:
            pm.cai_warnings.append(  # type: ignore[attr-defined]
                f"CAI_BLOCKED_PLUGINS names {name!r}, which is no installed plugin; installed: "
                f"{', '.join(sorted(known - set(DEFAULT_PLUGINS))) or '(none)'}{did_you_mean(name, known)}"
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
        if pm.is_registered(plugin):  # already loaded by its entry point (a test or embedder passed it too)
            continue
        pm.register(plugin)
        problem = unknown_hooks(pm, plugin, f"plugin {getattr(plugin, '__name__', type(plugin).__name__)!r}")
        if problem:  # a misspelled hookimpl (cai_register_critic) fails here, at start-up
            pm.unregister(plugin)
            raise pluggy.PluginValidationError(plugin, problem)
    pm.check_pending()
    return pm


def hook_names(pm: pluggy.PluginManager) -> list[str]:
    """The hooks cai-engine defines (those with a spec): a misspelt hookimpl adds a caller of its own to
    ``pm.hook``, which is not one of them."""
    return sorted(
        name
        for name in dir(pm.hook)
        if name.startswith("cai_") and getattr(getattr(pm.hook, name), "spec", None) is not None
    )


def unknown_hooks(pm: pluggy.PluginManager, plugin: object, who: str) -> str | None:
    """Why ``plugin`` cannot be loaded because it implements hooks cai-engine does not define (a typo, most
    likely), naming each with the closest real hook; None when every hook it implements exists."""
    unknown = sorted(
        c.name for c in (pm.get_hookcallers(plugin) or []) if c.spec is None and not c.name.startswith("pytest")
    )
    if not unknown:
        return None
    known = hook_names(pm)
    named = "; ".join(f"{name!r}, which is no cai-engine hook{did_you_mean(name, known, n=1)}" for name in unknown)
    return f"{who} implements {named} (the hooks are: {', '.join(known)})"


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
            problem = unknown_hooks(pm, plugin, who)
            if problem:
                pm.unregister(plugin)
                raise pluggy.PluginValidationError(plugin, problem)
        except pluggy.PluginValidationError as exc:
            if skip_broken:
                pm.cai_broken[ep.name] = str(exc)  # type: ignore[attr-defined]
                continue
            raise
        pm.cai_distinfo[ep.name] = (dist.name, dist.version) if dist else (None, None)  # type: ignore[attr-defined]


class Hooks:
    """Every hook call, typed: registration hooks one implementation at a time (so each registration knows which
    plugin made it), principle selection, record observers and plugin commands (modelled on tox's facade)."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm

    def each_registration(self, hook_name: str, make_register: Any) -> None:
        """Call every implementation of a ``cai_register_*`` hook with ``register=make_register(plugin_name)``."""
        caller = getattr(self.pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):
            register = make_register(impl.plugin_name)
            kwargs = {"register": register}
            try:
                impl.function(*[kwargs[arg] for arg in impl.argnames])
            except (PluginError, TypeError, ConstitutionError):
                raise
            except Exception as exc:
                raise PluginError(f"{hook_name} raised {type(exc).__name__}: {exc}", plugin=impl.plugin_name) from exc

    def select_principles(
        self, *, constitution: Any, candidates: list[Any], item: dict[str, Any], phase: Any, round: int, rng: Any
    ) -> list[Any] | None:
        """``cai_select_principles`` (first result wins): which of ``candidates`` to use for ``item``."""
        return self.pm.hook.cai_select_principles(
            constitution=constitution, candidates=candidates, item=item, phase=phase, round=round, rng=rng
        )

    def on_record(self, record: dict[str, Any], kind: str) -> None:
        """``cai_on_record``: hand a written record (its JSON form) to every observer."""
        self.pm.hook.cai_on_record(record=record, kind=kind)

    def register_commands(self, cli: Any) -> None:
        """``cai_register_commands``: let plugins add subcommands to the ``cai`` group."""
        self.pm.hook.cai_register_commands(cli=cli)


def list_plugins(pm: pluggy.PluginManager, registry: Any = None, *, all: bool = False) -> list[dict]:
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
