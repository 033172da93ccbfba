"""An opt-in pytest plugin for people who write cai-engine plugins (``pytest_plugins = ["cai_engine.testing"]``).

Fixtures:

- ``cai_pm``: a plugin manager with entry-point autoloading off (only built-ins), so tests see no installed plugins;
- ``cai_registry``: the registry built from it;
- ``cai_runtime``: a runtime over that registry;
- ``cli_runner``: click's ``CliRunner`` with the CLI's cached plugin state reset around each test; call
  :func:`use_cli_plugins` in the test to run the CLI with plugin objects that are not installed;
- ``tiny_model`` / ``tiny_plain_model``: a folder with a tiny random Llama and a byte-level tokenizer, built
  in-process (no network), with and without a chat template; any backend loads it like a real model folder.

Fakes that need no model: :class:`ScriptedSampler`, :class:`ScriptedCritic`, :class:`ScriptedReviser` and
:class:`ScriptedJudge` return what a test enqueued, in order, so pipeline tests stay torch-free.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from cai_engine.plugins.components import Critic, Judge, Reviser, Sampler
from cai_engine.plugins.hookspecs import hookimpl
from cai_engine.records import Critique, Judgement, Revision


class _Scripted:
    def __init__(self, options=None, runtime=None):
        super().__init__(options, runtime)  # type: ignore[call-arg]
        self.queue: deque[Any] = deque()
        self.calls: list[Any] = []

    def enqueue(self, *items: Any) -> None:
        self.queue.extend(items)

    def _next(self, task: Any) -> Any:
        self.calls.append(task)
        if not self.queue:
            raise AssertionError(f"{type(self).__name__}: nothing enqueued for {task!r}")
        return self.queue.popleft()


class ScriptedSampler(_Scripted, Sampler):
    """Returns enqueued response strings, one per requested sample."""

    name = "scripted"

    def sample(self, conversations, n=1):
        return [[self._next(c) for _ in range(n)] for c in conversations]


class ScriptedCritic(_Scripted, Critic):
    """Returns enqueued ``(text, needs_revision)`` pairs."""

    name = "scripted"

    def critique(self, tasks):
        out = []
        for task in tasks:
            text, needs = self._next(task)
            out.append(Critique(principle_id=task.principle.id, text=text, needs_revision=needs, critic=self.name))
        return out


class ScriptedReviser(_Scripted, Reviser):
    """Returns enqueued revision strings (all accepted)."""

    name = "scripted"

    def revise(self, tasks):
        return [
            Revision(principle_id=t.principle.id, text=self._next(t), accepted=True, reviser=self.name) for t in tasks
        ]


class ScriptedJudge(_Scripted, Judge):
    """Returns enqueued ``p_a`` values (None abstains)."""

    name = "scripted"

    def compare(self, tasks):
        out = []
        for task in tasks:
            p = self._next(task)
            ids = [p_.id for p_ in task.principles]
            if p is None:
                out.append(Judgement(principle_ids=ids, p_a=None, abstained=True, reason="scripted", judge=self.name))
            else:
                out.append(Judgement(principle_ids=ids, p_a=p, judge=self.name))
        return out


class ScriptedPlugin:
    """Registers the scripted components (names ``scripted``) as a plugin object."""

    @hookimpl
    def cai_register_samplers(self, register):
        register(ScriptedSampler)

    @hookimpl
    def cai_register_critics(self, register):
        register(ScriptedCritic)

    @hookimpl
    def cai_register_revisers(self, register):
        register(ScriptedReviser)

    @hookimpl
    def cai_register_judges(self, register):
        register(ScriptedJudge)


def make_test_pm(plugins: Iterable[object] = ()):
    from cai_engine.plugins.manager import make_plugin_manager

    return make_plugin_manager(autoload=False, plugins=plugins)


@pytest.fixture
def cai_pm():
    return make_test_pm()


@pytest.fixture
def cai_registry(cai_pm):
    from cai_engine.plugins.registry import Registry

    return Registry(cai_pm)


@pytest.fixture
def cai_runtime(cai_registry):
    from cai_engine.models.runtime import Runtime

    runtime = Runtime(cai_registry)
    yield runtime
    runtime.close()


def use_cli_plugins(*plugins: object) -> None:
    """Make the ``cai`` CLI register these plugin objects too (after the installed ones), as if they were installed,
    until the ``cli_runner`` fixture resets its state at the end of the test."""
    from cai_engine.cli.base import reset_state

    reset_state(plugins)


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    from cai_engine.cli.base import reset_state

    reset_state()
    yield CliRunner()
    reset_state()


# -- a tiny model built in-process --------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def build_tiny_model(folder: Path, *, chat_template: bool = True, context: int = 4096, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[3:],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with a chat template (4,096-token context)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_plain_model(tmp_path_factory):
    """The same tiny model without a chat template (transcript layout)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-plain") / "model", chat_template=False)


def assert_check_benchmark(
    registry,
    check: str,
    path,
    *,
    precision: float = 0.9,
    recall: float = 0.85,
    repair: float = 0.9,
    min_cases: int = 60,
):
    """Assert a deterministic check's scores on a labelled case file (see ``cai checks eval``): at least
    ``min_cases`` answers, half violating; precision, recall and repair success at or above the bars. Returns the
    result, so a plugin's test can look further."""
    from cai_engine.evaluation.checks import evaluate_check, load_cases

    cases = load_cases(path)
    assert len(cases) >= min_cases and 2 * sum(c.violates for c in cases) == len(cases), (
        f"{path}: needs at least {min_cases} cases, half of them violating"
    )
    result = evaluate_check(registry, check, cases)
    found = result["deterministic"]
    assert found["precision"]["rate"] >= precision and found["recall"]["rate"] >= recall, found["errors"]
    assert result["repair"]["success"]["rate"] >= repair, result["repair"]["failures"]
    return result


def require_default_model() -> None:
    """Skip the calling test (or module, at import) when the embedded default model is not installed
    (``cai models install smollm2``)."""
    from cai_engine.errors import ModelError
    from cai_engine.models.files import default_model_file

    try:
        default_model_file()
    except ModelError as exc:  # pragma: no cover - only without the default model
        pytest.skip(str(exc), allow_module_level=True)
