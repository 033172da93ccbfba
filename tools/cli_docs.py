"""The ``cai`` commands by name, for the mkdocs-click directives of ``docs/reference/cli/``.

A page says ``:module: cli_docs`` and ``:command: rl`` and gets ``cai rl`` whatever the function behind it is
called; ``:command: root`` is the ``cai`` group itself without its subcommands (the index page lists those).
``tools/mkdocs_hooks.py`` puts this folder on ``sys.path`` for the build.
"""

from __future__ import annotations

import click


def cai_group() -> click.Group:
    """The ``cai`` group of cai-engine itself: commands that installed plugins add are left out."""
    from cai_engine.cli import cli

    return cli


def top_level() -> dict[str, click.Command]:
    """Every top-level command of cai-engine by name, sorted."""
    return dict(sorted(cai_group().commands.items()))


def __getattr__(name: str) -> click.Command:
    if name.startswith("__"):
        raise AttributeError(name)
    if name == "root":
        group = cai_group()
        return click.Group(name="cai", help=group.help, params=group.params, context_settings=group.context_settings)
    try:
        return top_level()[name.replace("_", "-")]
    except KeyError:
        raise AttributeError(f"cai has no command {name!r}") from None
