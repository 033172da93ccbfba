"""A plugin's deterministic check backed by a small trained classifier: the check's precision, the classifier's
recall on wording the check was not written for.

A domain plugin ships, beside a check, a probe folder trained on labelled answers (``cai classifiers train CASES
--out FOLDER``) and registers ``with_classifier(TheCritic, FOLDER)`` instead of ``TheCritic``. The check runs first;
an answer it passes is scored by the classifier and flagged when P(violation) is above the classifier's calibrated
threshold. The classifier reads the default model's first layers, so it needs that model installed
(``cai models install smollm2``); without it, or with ``CAI_CHECK_CLASSIFIERS=off``, the check runs alone (a warning
says so once). The classifier reads whole answers: the guard's rails (a request, a stream's window, tool-call
arguments) run the check's rules alone (``rules_critic``; see ``GuardComponents.rail_check``).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

from cai_engine.plugins.components import Critic
from cai_engine.records import Critique

#: Set to ``off`` (or ``0``/``false``/``no``) to run every classifier-backed check on its rules alone.
ENV = "CAI_CHECK_CLASSIFIERS"


def classifiers_enabled() -> bool:
    return os.environ.get(ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def with_classifier(critic: type[Critic], folder: str | Path) -> type[Critic]:
    """``critic`` (a check's critic class) that also flags what the output classifier in ``folder`` flags among the
    answers the check passes. The returned class keeps the check's name, options and docstring."""
    folder = Path(str(folder))
    lock = threading.Lock()
    state: dict[str, Any] = {"probe": None, "tried": False}

    def probe() -> Any:
        if not classifiers_enabled():
            return None
        with lock:
            if not state["tried"]:
                state["tried"] = True
                try:
                    from cai_engine.classifiers.load import load_classifier

                    loaded = load_classifier(folder)
                    getattr(loaded, "encoder", None)  # a probe's base model loads now: a missing one is known here
                    state["probe"] = loaded
                except Exception as exc:
                    # any reason: a missing base model or torch (a core or serve install), an unreadable or
                    # corrupt folder; the check must still work on its rules
                    warnings.warn(
                        f"{critic.name}: its classifier is not used, the check runs on its rules alone "
                        f"({type(exc).__name__}: {exc})",
                        stacklevel=3,
                    )
        return state["probe"]

    class Classified(critic):  # type: ignore[valid-type,misc]
        classifier_folder = folder
        rules_critic = critic  # the check without its classifier (scored apart by `cai checks eval`)

        @staticmethod
        def classifier_active() -> bool:
            """Whether the classifier is consulted here (loaded, and not switched off)."""
            return probe() is not None

        def critique(self, tasks):
            out = list(super().critique(tasks))
            model = probe()
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


def _last_user(conversation: Any) -> str:
    users = [m.content for m in conversation if m.role == "user"]
    return users[-1] if users else ""
