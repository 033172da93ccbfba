"""cai-engine: a plugin-based Constitutional AI policy engine.

The public API is every name exported here, plus the prompt layouts in ``cai_engine.text.layouts`` for components
that prompt a model. Plugins import only these; the built-in plugins (``cai_engine.default_plugins``) do too, and a
test holds them to it, so a third-party plugin can do whatever a built-in does.
"""

from __future__ import annotations

from cai_engine.checks.rules import RULES, check_principle, repair
from cai_engine.checks.text import asks_for_definition, caveat_check, drop_sentences, negated, sentence_spans, sentences
from cai_engine.classifiers.checks import with_classifier, with_classifier_repair
from cai_engine.classifiers.load import load_classifier
from cai_engine.constitution.load import CONSTITUTION_SUFFIXES, Checked, check_constitution, lint, load_constitution
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
from cai_engine.constitution.problems import ConstitutionProblems, PolicyProblems, Problem
from cai_engine.errors import (
    BackendUnavailableError,
    CaiError,
    ConfigError,
    ConstitutionError,
    DuplicateComponentError,
    ModelError,
    PluginError,
    PromptTooLongError,
    RunError,
    UnknownComponentError,
    describe_validation,
)
from cai_engine.files.inputs import parse_scalar
from cai_engine.files.jsonl import write_json
from cai_engine.files.outputs import write_atomic
from cai_engine.files.resources import data_dir
from cai_engine.guard.engine import Engine
from cai_engine.models.catalog import registered_catalog
from cai_engine.models.files import default_model_file, local_model_problem, relayout_gguf, resolve_model_folder
from cai_engine.models.options import ModelComponent, ModelOptions, normalise_pair, with_model
from cai_engine.models.runtime import DEFAULT_MODEL, Runtime
from cai_engine.plugins.catalog import CatalogModel, Package
from cai_engine.plugins.components import (
    Backend,
    ChatPrompt,
    Component,
    Critic,
    GenerationSettings,
    Judge,
    Options,
    Prompt,
    Reviser,
    Sampler,
    Trainer,
    cut_at_stop,
)
from cai_engine.plugins.hookspecs import hookimpl
from cai_engine.plugins.manager import make_plugin_manager
from cai_engine.plugins.refs import ComponentRef
from cai_engine.plugins.registry import Registry
from cai_engine.prompts.sets import PromptItem, PromptSet, load_prompts, load_training_prompts
from cai_engine.records import (
    ComparisonTask,
    Critique,
    CritiqueTask,
    GateResult,
    GuardResult,
    Judgement,
    OrderResult,
    PreferenceExportManifest,
    Revision,
    RevisionTask,
    Score,
    ScoringTask,
    TrainingResult,
    Violation,
)
from cai_engine.store.cards import model_card
from cai_engine.text.refusals import REFUSAL_OPENERS
from cai_engine.version import __version__

__all__ = [
    "CONSTITUTION_SUFFIXES",
    "DEFAULT_MODEL",
    "REFUSAL_OPENERS",
    "RULES",
    "Backend",
    "BackendUnavailableError",
    "CaiError",
    "CatalogModel",
    "ChatPrompt",
    "Checked",
    "ComparisonExample",
    "ComparisonTask",
    "Component",
    "ComponentRef",
    "ConfigError",
    "Constitution",
    "ConstitutionError",
    "ConstitutionProblems",
    "Critic",
    "Critique",
    "CritiqueExample",
    "CritiqueTask",
    "DuplicateComponentError",
    "Engine",
    "GateResult",
    "GenerationSettings",
    "GuardResult",
    "Judge",
    "Judgement",
    "Message",
    "ModelComponent",
    "ModelError",
    "ModelOptions",
    "Options",
    "OrderResult",
    "Package",
    "Phase",
    "PluginError",
    "PolicyProblems",
    "PreferenceExportManifest",
    "Principle",
    "Problem",
    "Prompt",
    "PromptItem",
    "PromptSet",
    "PromptTooLongError",
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
    "check_constitution",
    "check_principle",
    "cut_at_stop",
    "data_dir",
    "default_model_file",
    "describe_validation",
    "drop_sentences",
    "hookimpl",
    "lint",
    "load_classifier",
    "load_constitution",
    "load_prompts",
    "load_training_prompts",
    "local_model_problem",
    "make_plugin_manager",
    "model_card",
    "negated",
    "normalise_pair",
    "parse_scalar",
    "registered_catalog",
    "relayout_gguf",
    "repair",
    "resolve_model_folder",
    "sentence_spans",
    "sentences",
    "with_classifier",
    "with_classifier_repair",
    "with_model",
    "write_atomic",
    "write_json",
]
