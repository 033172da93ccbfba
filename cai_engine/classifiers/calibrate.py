"""Re-calibrating a compiled classifier's threshold on harmless traffic it will really see.

``cai classifiers build`` sets the threshold on the held-out half of its own synthetic split. That split comes from
the same generator as the training data, so a threshold that gives 5% false alarms there can give far more, or far
fewer, on requests people write: a probe on deeper layers of the same data ranked real prompts as well as a shallower
one but flagged almost none of them at its synthetic threshold (docs/results, classifiers). Calibrating on the
deployment's own harmless requests (or exchanges) fixes the false-alarm rate where it matters; what the classifier
then catches is measured separately, with ``cai classifiers eval``, on data used for neither.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

from cai_engine.classifiers.probe import CONFIG
from cai_engine.classifiers.train import rate_entry, write_card
from cai_engine.errors import ConfigError
from cai_engine.files.outputs import write_atomic


def threshold_for(scores: list[float], false_alarm_rate: float) -> float:
    """The smallest threshold with at most ``false_alarm_rate`` of ``scores`` strictly above it: a score equal to the
    threshold passes, as the guard reads it (a violation is ``p > threshold``)."""
    if not scores:
        raise ConfigError("nothing to calibrate on: the harmless set is empty")
    if not 0.0 <= false_alarm_rate < 1.0:
        raise ConfigError(f"the false-alarm rate must be in [0, 1), not {false_alarm_rate}")
    ranked = sorted(scores, reverse=True)
    allowed = math.floor(false_alarm_rate * len(ranked) + 1e-9)
    return ranked[allowed]


def calibrate_folder(
    folder: str | Path,
    classifier: Any,
    items: list[tuple[str, str, str | None]],
    false_alarm_rate: float,
    *,
    write: bool = True,
) -> dict[str, Any]:
    """Score ``items`` ((source, prompt, reply or None), all harmless) with ``classifier``, set its overall threshold
    to give ``false_alarm_rate`` of them as false alarms, record where the threshold came from in the folder's
    config and card (when ``write``), and return that record."""
    folder = Path(folder)
    kind = classifier.config.kind
    if kind == "output" and any(reply is None for *_, reply in items):
        raise ConfigError("an output classifier is calibrated on exchanges: every item needs a reply")
    prompts = [prompt for _, prompt, _ in items]
    replies = None if kind == "input" else [reply or "" for *_, reply in items]
    scores = [s["violation"] for s in classifier.predict(prompts, replies)]
    threshold = threshold_for(scores, false_alarm_rate)
    previous = classifier.config.thresholds.get("violation")
    by_source: dict[str, dict[str, Any]] = {}
    for source in dict.fromkeys(s for s, *_ in items):
        chosen = [v for (s, *_), v in zip(items, scores) if s == source]
        by_source[source] = rate_entry(sum(1 for v in chosen if v > threshold), len(chosen))
    record = {
        "threshold": threshold,
        "previous_threshold": previous,
        "false_alarm_target": false_alarm_rate,
        "false_alarms": rate_entry(sum(1 for v in scores if v > threshold), len(scores)),
        "by_source": by_source,
        "calibrated_on": datetime.date.today().isoformat(),
        "previous_was_on_synthetic_data": "calibration" not in classifier.config.metrics,
    }
    if write:
        config = classifier.config.model_copy(deep=True)
        config.thresholds["violation"] = threshold
        config.metrics["calibration"] = record
        write_atomic(folder / CONFIG, config.to_json(), what="classifier")
        write_card(folder, config)
        classifier.config = config
    return record
