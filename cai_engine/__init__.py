"""cai-engine: a plugin-based Constitutional AI policy engine.

The public API lives here; plugins import only from this top level.
"""

from __future__ import annotations

from cai_engine.checks.text import asks_for_definition, caveat_check, drop_sentences, negated, sentence_spans, sentences
from cai_engine.constitution.load import lint, load_constitution
from cai_engine.constitution.model import (
    ComparisonExample,
    Constitution,
    CritiqueExample,
    Message,
    Phase,
    Principle,
    Rule,
    Stance,
)
from cai_engine.errors import (
    BackendUnavailableError,
    CaiError,
    ConfigError,
    ConstitutionError,
    DuplicateComponentError,
    ModelError,
    PluginError,
    RunError,
    UnknownComponentError,
)
from cai_engine.models.runtime import Runtime
from cai_engine.plugins.catalog import CatalogModel, Package
from cai_engine.plugins.components import (
    Backend,
    ChatPrompt,
    Component,
    Critic,
    GenerationSettings,
    Judge,
    Options,
    Reviser,
    Sampler,
    Trainer,
)
from cai_engine.plugins.hookspecs import hookimpl
from cai_engine.plugins.manager import make_plugin_manager
from cai_engine.plugins.registry import Registry
from cai_engine.prompts.sets import PromptItem, PromptSet, load_prompts
from cai_engine.records import (
    ComparisonTask,
    Critique,
    CritiqueTask,
    Judgement,
    Revision,
    RevisionTask,
    Score,
    ScoringTask,
    TrainingResult,
    Violation,
)
from cai_engine.version import __version__

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "CaiError",
    "CatalogModel",
    "ChatPrompt",
    "ComparisonExample",
    "ComparisonTask",
    "Component",
    "ConfigError",
    "Constitution",
    "ConstitutionError",
    "Critic",
    "Critique",
    "CritiqueExample",
    "CritiqueTask",
    "DuplicateComponentError",
    "GenerationSettings",
    "Judge",
    "Judgement",
    "Message",
    "ModelError",
    "Options",
    "Package",
    "Phase",
    "PluginError",
    "Principle",
    "PromptItem",
    "PromptSet",
    "Registry",
    "Reviser",
    "Revision",
    "RevisionTask",
    "Rule",
    "RunError",
    "Runtime",
    "Sampler",
    "Score",
    "ScoringTask",
    "Stance",
    "Trainer",
    "TrainingResult",
    "UnknownComponentError",
    "Violation",
    "__version__",
    "asks_for_definition",
    "caveat_check",
    "drop_sentences",
    "hookimpl",
    "lint",
    "load_constitution",
    "load_prompts",
    "make_plugin_manager",
    "negated",
    "sentence_spans",
    "sentences",
]
