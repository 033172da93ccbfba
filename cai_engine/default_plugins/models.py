"""Built-in catalogue models: the embedded default and the stronger GGUF models published on PyPI."""

from __future__ import annotations

from cai_engine.models.catalog import BUILTIN_MODELS
from cai_engine.plugins.hookspecs import hookimpl


@hookimpl
def cai_register_models(register):
    for model in BUILTIN_MODELS:
        register(model)
