"""Loading a classifier folder made by ``cai classifiers build``, whichever method made it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cai_engine.classifiers.finetune import FinetunedClassifier
from cai_engine.classifiers.probe import CONFIG, Probe, ProbeConfig
from cai_engine.errors import ModelError


def load_classifier(
    folder: str | Path, *, check_base: bool = True, precision: str = "auto", compile: bool = False
) -> Any:
    """A classifier folder made by ``cai classifiers build``, whichever method made it (a ``Probe`` or a
    ``FinetunedClassifier``: both have ``config``, ``predict`` and ``threshold``). ``precision`` (a probe's base
    layers: ``auto``, ``float32`` or ``bfloat16``, and ``int8`` for a probe built with ``--int8``, which only
    ``auto`` or ``int8`` load; see :data:`cai_engine.classifiers.probe.Precision`); ``compile``: a probe's float base
    layers run through ``torch.compile`` (:class:`cai_engine.classifiers.probe.Encoder`; a fine-tuned classifier runs
    as it is)."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise ModelError(f"{folder}: not a classifier folder (no {CONFIG})")
    try:
        config = ProbeConfig.model_validate_json((folder / CONFIG).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelError(f"{folder / CONFIG}: invalid ({exc})") from None
    if config.method == "finetuned":
        return FinetunedClassifier.load(folder, config)
    return Probe.load(folder, check_base=check_base, precision=precision, compile=compile)
