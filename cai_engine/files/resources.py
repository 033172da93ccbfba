"""Where the files shipped with the core live (constitutions, schemas, prompt sets).

In a wheel they are package data under ``cai_engine/_data`` (hatchling force-includes the top-level folders
there); in a source checkout or editable install they are the top-level folders themselves.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def data_dir(kind: str) -> Path:
    """The folder of shipped ``kind`` files: ``constitutions``, ``schemas`` or ``prompts``."""
    packaged = Path(str(importlib.resources.files("cai_engine"))) / "_data" / kind
    if packaged.is_dir():
        return packaged
    if kind == "prompts":
        return Path(str(importlib.resources.files("cai_engine"))) / "data" / "prompts"
    return Path(__file__).resolve().parents[2] / kind
