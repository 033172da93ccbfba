"""Shared plumbing for components that call a model: the ``model`` option, layouts, and sampling settings."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from cai_engine.errors import ConfigError
from cai_engine.models.runtime import DEFAULT_MODEL, ModelRef
from cai_engine.plugins.components import Backend, GenerationSettings, Options
from cai_engine.plugins.refs import ComponentRef


class ModelOptions(Options):
    """Options every model-driven component shares. ``model`` is the one setting that points a role elsewhere."""

    model: ModelRef = Field(
        DEFAULT_MODEL,
        description=f"Which model serves this role: {DEFAULT_MODEL!r}, a model folder, a .gguf file, "
        "'http://host:port/v1#name', a reference a plugin's backend claims, or a mapping {backend, model, ...}.",
    )
    layout: Literal["auto", "chat", "transcript"] = Field(
        "auto",
        description="'chat' uses the model's chat template, 'transcript' the paper's Human:/Assistant: "
        "layout; 'auto' picks chat when the model has a template.",
    )
    max_new_tokens: int = Field(128, ge=1, le=4096, description="Upper bound on generated tokens.")
    temperature: float = Field(0.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass (with temperature > 0).")
    repetition_penalty: float = Field(1.15, ge=1, le=2, description="Small models loop without it.")
    seed: int | None = Field(0, description="Sampling seed (None: not reproducible).")
    few_shot: int = Field(
        1, ge=0, le=8, description="Worked examples shown before each task (each costs prompt tokens)."
    )

    @field_validator("model")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        return value


def with_model(ref: ComponentRef, kind: str, runtime: Any, model: ModelRef, **defaults: Any) -> ComponentRef:
    """``ref`` with the run's ``model`` and other ``defaults`` (``seed=...``) filled in: the one rule for who gets
    which model, for every kind of component, built-in or third-party.

    The rule is the component's options class: each of ``model`` and ``defaults`` is filled in where the class
    declares a field of that name (a :class:`ModelOptions` declares ``model``, ``seed`` and the sampling settings;
    a trainer its ``model``), and left out where it does not. Options the user wrote always win.
    """
    cls = runtime.registry.component(kind, ref.name)
    options = dict(ref.options)
    options_class = getattr(cls, "Options", None)
    declared = (
        options_class.model_fields if isinstance(options_class, type) and issubclass(options_class, BaseModel) else {}
    )
    for key, value in {"model": model, **defaults}.items():
        if key in declared:
            options.setdefault(key, value)
    return ComponentRef(name=ref.name, options=options)


class ModelComponent:
    """Mixin for components whose options are a ``ModelOptions``: lazy backend, layout, generation settings."""

    options: ModelOptions

    def __init__(self, options=None, runtime=None) -> None:
        super().__init__(options, runtime)  # type: ignore[call-arg]
        self._check_model()

    def _check_model(self) -> None:
        # Validate the model reference (backend name and options) now, before anything loads.
        try:
            self.runtime.backend_options(self.options.model)  # type: ignore[attr-defined]
        except ConfigError as exc:
            raise ConfigError(f"{self.kind} {self.name!r}: {exc}") from None  # type: ignore[attr-defined]

    @property
    def backend(self) -> Backend:
        return self.runtime.backend(self.options.model)  # type: ignore[attr-defined]

    @property
    def chat(self) -> bool:
        if self.options.layout == "auto":
            return self.backend.has_chat_template
        return self.options.layout == "chat"

    def settings(
        self, *, max_new_tokens: int | None = None, stop: tuple[str, ...] = (), temperature: float | None = None
    ) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=max_new_tokens or self.options.max_new_tokens,
            temperature=self.options.temperature if temperature is None else temperature,
            top_p=self.options.top_p,
            repetition_penalty=self.options.repetition_penalty,
            stop=stop,
            seed=self.options.seed,
        )

    def describe(self) -> dict[str, Any]:
        data = super().describe()  # type: ignore[misc]
        data["model_id"] = self.backend.model_id
        return data


def normalise_pair(logp_a: float | None, logp_b: float | None) -> float | None:
    """``exp(a) / (exp(a) + exp(b))`` computed stably; None when either is missing or not finite."""
    if logp_a is None or logp_b is None or not (math.isfinite(logp_a) and math.isfinite(logp_b)):
        return None
    top = max(logp_a, logp_b)
    ea, eb = math.exp(logp_a - top), math.exp(logp_b - top)
    return ea / (ea + eb)
