"""What a result depends on besides its config: the CPU's instruction set, the numeric libraries and the models' files.

llama.cpp is compiled for the CPU it is built on, and its rounding differs between instruction sets (a run on a CPU
with AVX-512 and one without can write different text from the same seed), so a run records the machine it ran on
next to its numbers: a result is one sample of (config, seed, machine).
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# CPU features that change how llama.cpp and torch compute (their kernels are chosen by them).
CPU_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "neon")
PACKAGES = ("cai-engine", "torch", "transformers", "trl", "peft", "accelerate", "llama-cpp-python", "numpy")


def cpu() -> dict[str, Any]:
    """The CPU's model name, core count and the features in ``CPU_FEATURES`` it has (Linux: /proc/cpuinfo)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            name = value.strip()
        elif key in ("flags", "Features"):
            flags |= set(value.split())
    return {
        "model": name,
        "cores": os.cpu_count(),
        "features": [feature for feature in CPU_FEATURES if feature in flags],
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_record(models: Iterable[Any] = (), catalog: Any = None) -> dict[str, Any]:
    """The machine a run ran on: CPU (model, cores, instruction-set features), OS, Python, the versions of the
    libraries that compute, and for each of ``models`` that the ``catalog`` knows, the SHA-256 of its file (the
    catalogue checks it on install)."""
    hashes: dict[str, str | None] = {}
    for ref in dict.fromkeys(m for m in models if isinstance(m, str)):
        entry = None
        if catalog is not None and ref in catalog:
            entry = catalog.get(ref)
        hashes[ref] = entry.sha256 if entry is not None else None
    return {
        "cpu": cpu(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "packages": {name: _version(name) for name in PACKAGES},
        "models": hashes,
    }
