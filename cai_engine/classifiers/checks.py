"""A plugin's deterministic check backed by a small trained classifier: the check's precision, the classifier's
recall on wording the check was not written for.

A domain plugin ships, beside a check, a probe folder trained on labelled answers (``cai classifiers train CASES
--out FOLDER``) and registers ``with_classifier(TheCritic, FOLDER)`` instead of ``TheCritic``. The check runs first;
an answer it passes is scored by the classifier and flagged when P(violation) is above the classifier's calibrated
threshold. The classifier reads the default model's first layers, so it needs that model installed
(``cai models install smollm2``); without it, or with ``CAI_CHECK_CLASSIFIERS=off``, the check runs alone (a warning
says so once). ``CAI_CHECK_CLASSIFIER_DIR`` names a folder of classifier folders by check name whose heads replace
the shipped ones (e.g. heads on the feedback model's activations). The classifier reads whole answers: the guard's
rails (a request, a stream's window, tool-call arguments) run the check's rules alone (``rules_critic``; see
``GuardComponents.rail_check``).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cai_engine.plugins.components import Critic, Reviser
from cai_engine.records import Critique, Revision

#: Set to ``off`` (or ``0``/``false``/``no``) to run every classifier-backed check on its rules alone.
ENV = "CAI_CHECK_CLASSIFIERS"


#: A folder of classifier folders named by check (``DIR/medical.phi/classifier.json``): a check named there loads that
#: classifier instead of the one its plugin ships (e.g. a head trained on the feedback model's activations).
DIR_ENV = "CAI_CHECK_CLASSIFIER_DIR"


def classifiers_enabled() -> bool:
    return os.environ.get(ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def classifier_folder(shipped: str | Path) -> Path:
    """The folder a check's classifier loads from: ``$CAI_CHECK_CLASSIFIER_DIR/<check name>`` where that folder holds
    a ``classifier.json``, else ``shipped`` (the one the plugin ships; a check missing from the folder keeps its own).
    A variable naming no folder warns and leaves every check on its shipped classifier."""
    shipped = Path(str(shipped))
    root = os.environ.get(DIR_ENV, "").strip()
    if not root:
        return shipped
    base = Path(root).expanduser()
    if not base.is_dir():
        warnings.warn(
            f"{DIR_ENV}={root} is not a folder: the checks use the classifiers their plugins ship", stacklevel=2
        )
        return shipped
    mine = base / shipped.name
    if (mine / "classifier.json").is_file():
        return mine
    if mine.exists():
        warnings.warn(
            f"{DIR_ENV}: {mine} has no classifier.json: {shipped.name} uses the classifier its plugin ships",
            stacklevel=2,
        )
    return shipped


_PROBES: dict[str, dict[str, Any]] = {}
_PROBES_LOCK = threading.Lock()


class _Remembering:
    """A loaded classifier that remembers its last scores: the guard's critic scores an answer and the reviser then
    asks again for the same answer (and a folded re-check, or a retried request, repeats it too). Thread-safe; scores
    missing from memory are computed in one batch."""

    SIZE = 512

    def __init__(self, probe: Any) -> None:
        self._probe = probe
        self._scores: OrderedDict[tuple[str, str], dict[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._probe, name)

    def predict(self, prompts: list[str], texts: list[str]) -> list[dict[str, float]]:
        keys = list(zip(prompts, texts))
        with self._lock:
            known = {k: self._scores[k] for k in keys if k in self._scores}
            for k in known:
                self._scores.move_to_end(k)
        missing = list(dict.fromkeys(k for k in keys if k not in known))
        if missing:
            scores = self._probe.predict([p for p, _ in missing], [t for _, t in missing])
            fresh = dict(zip(missing, scores))
            known.update(fresh)
            with self._lock:
                self._scores.update(fresh)
                while len(self._scores) > self.SIZE:
                    self._scores.popitem(last=False)
        return [known[k] for k in keys]


def _probe(folder: Path, who: str, stacklevel: int = 4) -> Any:
    """The classifier in ``folder``, loaded once per process for every check and reviser that uses it; None when
    switched off or when it cannot load (a warning names ``who`` once)."""
    if not classifiers_enabled():
        return None
    with _PROBES_LOCK:
        state = _PROBES.setdefault(str(folder), {"probe": None, "tried": False, "folder": folder})
        if not state["tried"]:
            state["tried"] = True
            source = state["folder"] = classifier_folder(folder)
            try:
                from cai_engine.classifiers.load import load_classifier

                loaded = load_classifier(source)
                config = getattr(loaded, "config", None)
                if config is not None and (config.kind != "output" or "violation" not in config.labels):
                    raise ValueError(f"a check needs an output classifier with a 'violation' label, not {config.kind}")
                getattr(loaded, "encoder", None)  # a probe's base model loads now: a missing one is known here
                state["probe"] = _Remembering(loaded)
            except Exception as exc:
                # any reason: a missing base model or torch (a core or serve install), an unreadable or corrupt
                # folder; the check must still work on its rules
                mine = f" (from {DIR_ENV})" if source != folder else ""
                warnings.warn(
                    f"{who}: its classifier {source}{mine} is not used, the check runs on its rules alone "
                    f"({type(exc).__name__}: {exc})",
                    stacklevel=stacklevel,
                )
    return state["probe"]


def _loaded_from(folder: str | Path) -> Path:
    """The folder the classifier of the check shipped with ``folder`` was loaded from in this process (as resolved
    when it first loaded), or where it would load from now."""
    with _PROBES_LOCK:
        state = _PROBES.get(str(folder))
    return state["folder"] if state and state["tried"] else classifier_folder(folder)


def with_classifier(critic: type[Critic], folder: str | Path) -> type[Critic]:
    """``critic`` (a check's critic class) that also flags what the output classifier in ``folder`` flags among the
    answers the check passes. The returned class keeps the check's name, options and docstring."""
    folder = Path(str(folder))

    def probe() -> Any:
        return _probe(folder, critic.name)

    class Classified(critic):  # type: ignore[valid-type,misc]
        classifier_folder = folder
        rules_critic = critic  # the check without its classifier (scored apart by `cai checks eval`)
        #: False on an instance that runs the rules alone (``rules_only()``)
        consult_classifier = True

        @staticmethod
        def classifier_active() -> bool:
            """Whether the classifier is consulted here (loaded, and not switched off)."""
            return probe() is not None

        @staticmethod
        def loaded_folder() -> Path:
            """The folder its classifier loads from: the shipped one, or its replacement under
            ``CAI_CHECK_CLASSIFIER_DIR`` (once loaded, the one it was loaded from)."""
            return _loaded_from(folder)

        def critique(self, tasks):
            out = list(super().critique(tasks))
            model = probe() if self.consult_classifier else None
            # only answers the rules pass (an abstention, needs_revision None, stays one)
            passed = [i for i, c in enumerate(out) if c.needs_revision is False and not c.violations]
            if model is None or not passed:
                return out
            prompts = [_last_user(tasks[i].conversation) for i in passed]
            scores = model.predict(prompts, [tasks[i].response for i in passed])
            cut = model.threshold()
            for i, score in zip(passed, scores):
                p = score["violation"]
                if p > cut:
                    out[i] = Critique(
                        principle_id=out[i].principle_id,
                        text=f"{critic.name} classifier: P(violation) {p:.2f} is above its threshold {cut:.2f} "
                        f"(the rules found nothing)",
                        needs_revision=True,
                        critic=out[i].critic,
                    )
            return out

    Classified.__name__ = critic.__name__
    Classified.__qualname__ = critic.__qualname__
    Classified.__module__ = critic.__module__
    Classified.__doc__ = (
        critic.__doc__ or ""
    ) + f"\n\nBacked by the classifier in {folder.name}/ (see with_classifier)."
    return Classified


def with_classifier_repair(
    reviser: type[Reviser],
    folder: str | Path,
    *,
    finish: Callable[[str], str] | None = None,
    max_share: float = 0.5,
) -> type[Reviser]:
    """``reviser`` (a check's deterministic reviser) that can also repair what only the classifier in ``folder``
    flagged. When the classifier still flags what the reviser returns (its repair, or the answer it found nothing
    in), the sentences that carry the violation are found with the classifier (each step drops the sentence whose
    removal lowers P(violation) most) until the answer is under the classifier's threshold; ``finish`` then completes
    the text (e.g. adds the check's note; it must leave a finished text as it is). At most ``max_share`` of the
    answer's words go. When that is not enough, an answer the rules had repaired keeps their repair (the next round
    decides, and their redaction is never lost), and one they found nothing in is declined (the model reviser, or
    the policy's ``on_failure``, decides) rather than returned still flagged."""
    folder = Path(str(folder))

    class Repairing(reviser):  # type: ignore[valid-type,misc]
        classifier_folder = folder
        rules_reviser = reviser
        #: False on an instance that repairs by the rules alone (``rules_only()``)
        consult_classifier = True

        def revise(self, tasks):
            out = list(super().revise(tasks))
            model = _probe(folder, reviser.name) if self.consult_classifier else None
            if model is None:
                return out
            for i, (task, revision) in enumerate(zip(tasks, out)):
                if revision.accepted:  # what the rules repaired, or found nothing in, may still be flagged
                    out[i] = _drop_blamed(model, task, revision, finish, max_share)
            return out

    Repairing.__name__ = reviser.__name__
    Repairing.__qualname__ = reviser.__qualname__
    Repairing.__module__ = reviser.__module__
    Repairing.__doc__ = (reviser.__doc__ or "") + (
        f"\n\nWhat only the classifier in {folder.name}/ flags is repaired by dropping the sentences it blames "
        "(see with_classifier_repair)."
    )
    return Repairing


def _drop_blamed(model: Any, task: Any, revision: Revision, finish: Any, max_share: float) -> Revision:
    """``revision`` (accepted) if the classifier passes its text, else that text without the sentences the
    classifier blames, finished. When dropping ``max_share`` of the answer's words is not enough: the rules'
    repair as it was if they changed anything (never lose a redaction), else a declined revision."""
    from cai_engine.checks.text import drop_sentences, sentences

    prompt = _last_user(task.conversation)
    cut = model.threshold()
    text = revision.text
    if model.predict([prompt], [text])[0]["violation"] <= cut:
        return revision
    by_rules = text != task.response
    parts = [s for s in sentences(text) if s.strip()]
    dropped: list[str] = []
    budget = max_share * len(task.response.split())  # words that may go, counted on the answer as written
    while True:
        left = [s for s in parts if s not in dropped]
        candidates = [(s, drop_sentences(text, [*dropped, s])) for s in left]
        candidates = [(s, c) for s, c in candidates if len(text.split()) - len(c.split()) <= budget and c.strip()]
        if not candidates:
            break
        scores = [r["violation"] for r in model.predict([prompt] * len(candidates), [c for _, c in candidates])]
        best = min(range(len(candidates)), key=scores.__getitem__)
        dropped.append(candidates[best][0])
        if scores[best] <= cut:
            repaired = drop_sentences(text, dropped)
            if finish is not None:  # idempotent: a note the rules' repair added (and maybe dropped) is there once
                repaired = finish(repaired)
            what = "the rules' repair was still flagged" if by_rules else "the rules found nothing"
            return Revision(
                principle_id=task.principle.id,
                text=repaired,
                accepted=True,
                reviser=revision.reviser,
                reason=f"{what}; dropped {len(dropped)} sentence(s) the classifier blamed "
                f"(P(violation) {scores[best]:.2f} after, threshold {cut:.2f})",
            )
    if by_rules:
        return revision
    return Revision(
        principle_id=task.principle.id,
        text=task.response,
        accepted=False,
        reviser=revision.reviser,
        reason=f"the classifier still flags the answer after dropping {len(dropped)} of {len(parts)} sentences; "
        "the model reviser must rewrite it",
    )


def _last_user(conversation: Any) -> str:
    users = [m.content for m in conversation if m.role == "user"]
    return users[-1] if users else ""
