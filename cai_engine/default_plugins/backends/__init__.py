"""Built-in backends: local transformers models, llama.cpp for GGUF files, and OpenAI-compatible servers."""

from __future__ import annotations

from cai_engine import hookimpl
from cai_engine.default_plugins.backends.hf_local import TransformersBackend
from cai_engine.default_plugins.backends.llama_cpp import LlamaCppBackend
from cai_engine.default_plugins.backends.openai_http import OpenAIBackend


# trylast: the runtime asks backends which model references they claim in registry order, so a plugin's backend is
# asked before these. Among these, endpoints and GGUF files are claimed before transformers takes every other string.
@hookimpl(trylast=True)
def cai_register_backends(register):
    register(OpenAIBackend)
    register(LlamaCppBackend)
    register(TransformersBackend)
