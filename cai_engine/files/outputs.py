"""Writing the files a user asked for: checked before any work, written whole or not at all.

Every output goes to a temporary file in the destination's folder and is renamed over the destination only when
it is complete, so a run that fails (a bad row, a full disk, Ctrl-C) leaves whatever was there before untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from cai_engine.errors import CaiError


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(
    path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str]] = (), what: str = "output"
) -> Path:
    """Refuse an output path that cannot be written or that is one of the inputs, before any work is done."""
    path = Path(path)
    for source in inputs:
        source = Path(source)
        if _same(path, source) or path.resolve() == source.resolve():
            raise CaiError(
                f"{path}: the {what} is the input file {source}; writing it would destroy the input. "
                "Choose another path"
            )
    if path.is_dir():
        raise CaiError(f"{path}: the {what} is a folder; give a file path")
    parent = path.parent
    if not parent.exists():
        raise CaiError(f"{path}: the folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise CaiError(f"{path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CaiError(f"{path}: cannot write in {parent} (permission denied)")
    if path.exists() and not os.access(path, os.W_OK):
        raise CaiError(f"{path}: the file exists and is not writable")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, what: str = "output") -> Iterator[IO[str]]:
    """A text handle whose content replaces ``path`` only if the block completes; otherwise nothing changes."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as exc:
        raise CaiError(f"{path}: cannot write the {what}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            with contextlib.suppress(OSError):
                os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CaiError(f"{path}: cannot write the {what}: {exc.strerror or exc}; nothing was changed") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike[str], text: str, *, what: str = "output") -> None:
    """Write ``text`` to ``path`` whole or not at all."""
    with atomic_output(path, what=what) as handle:
        handle.write(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
