"""Built-in backends: local transformers models, llama.cpp for GGUF files, and OpenAI-compatible servers."""

from __future__ import annotations

from cai_engine.models.backends.hf_local import TransformersBackend
from cai_engine.models.backends.llama_cpp import LlamaCppBackend
from cai_engine.models.backends.openai_http import OpenAIBackend
from cai_engine.plugins.hookspecs import hookimpl


@hookimpl
def cai_register_backends(register):
    register(TransformersBackend)
    register(LlamaCppBackend)
    register(OpenAIBackend)
