"""Built-in backends: local transformers models and OpenAI-compatible servers."""

from __future__ import annotations

from cai_engine.backends.hf_local import TransformersBackend
from cai_engine.backends.openai_http import OpenAIBackend
from cai_engine.hookspecs import hookimpl


@hookimpl
def cai_register_backends(register):
    register(TransformersBackend)
    register(OpenAIBackend)
