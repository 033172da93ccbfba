"""What a plugin implements: one abstract base class per kind of component.

Every component has a ``name`` (the key users write in config), a nested pydantic ``Options`` model that rejects
unknown keys and is validated when a pipeline is *built* (before any model loads), and batch-first methods: a list
in, a list of the same length out, so backends can batch.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cai_engine.constitution.model import Message
from cai_engine.context import default_runtime
from cai_engine.errors import ConfigError, describe_validation

if TYPE_CHECKING:
    from cai_engine.models.runtime import Runtime
    from cai_engine.plugins.registry import Registry
    from cai_engine.records import (
        ComparisonTask,
        Conversation,
        Critique,
        CritiqueTask,
        Judgement,
        Revision,
        RevisionTask,
        Score,
        ScoringTask,
        TrainingResult,
    )


class Options(BaseModel):
    """Base for component options: unknown keys are errors, every field is described."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def options_error(kind: str, name: str, exc: ValidationError) -> str:
    detail = describe_validation(exc, empty="(options)", unknown="unknown option; check its spelling")
    return f"invalid options for {kind} {name!r}: {detail}"


_BaseOptions = Options  # the module-level class, for annotations inside Component (whose Options attribute shadows it)


class Component(ABC):
    """Shared plumbing: options validation and access to the runtime (registry + loaded models)."""

    name: ClassVar[str]
    kind: ClassVar[str] = "component"
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: _BaseOptions | dict[str, Any] | None = None, runtime: Runtime | None = None) -> None:
        self.options = self.validate_options(options)
        self._runtime = runtime

    @classmethod
    def validate_options(cls, options: _BaseOptions | dict[str, Any] | None) -> Any:
        """Validate raw options; raises ConfigError naming the component and each bad field."""
        if isinstance(options, cls.Options):
            return options
        try:
            return cls.Options.model_validate(options or {})
        except ValidationError as exc:
            raise ConfigError(options_error(cls.kind, cls.name, exc)) from None

    @property
    def runtime(self) -> Runtime:
        """The runtime this component was built with (``runtime.component(...)`` passes it); a component made by hand
        without one uses the process's shared ``Runtime.default()``, never a new model pool of its own."""
        if self._runtime is None:
            self._runtime = default_runtime()
        return self._runtime

    #: Whether this component consults a trained classifier besides its rules (``with_classifier`` and
    #: ``with_classifier_repair`` set it); :meth:`rules_only` gives an instance that does not.
    consult_classifier: bool = False

    def rules_only(self) -> Component:
        """This component without its classifier: ``self`` when it has none, else a new instance of the same class
        (a subclass keeps its overrides) that does not consult it (the guard's rails run checks so)."""
        if not self.consult_classifier:
            return self
        alone = copy.copy(self)  # no second __init__: whatever the instance holds (and its signature) stays as is
        alone.consult_classifier = False
        return alone

    def describe(self) -> dict[str, Any]:
        """Provenance: the registry name and the options as used."""
        return {"name": self.name, "options": self.options.model_dump(mode="json")}


class Sampler(Component):
    """Produces assistant responses to conversations."""

    kind = "sampler"

    @abstractmethod
    def sample(self, conversations: Sequence[Conversation], n: int = 1) -> list[list[str]]:
        """Return ``n`` responses for each conversation, in order."""


class Critic(Component):
    """Critiques a response against a principle and says whether it must change."""

    kind = "critic"
    #: A check that can judge only a whole answer (what an answer lacks, such as a caveat that may come at its
    #: end): the guard's rails (a request, a stream's window, a tool call's arguments) skip it; the answer meets it.
    answers_only: ClassVar[bool] = False

    @abstractmethod
    def critique(self, tasks: Sequence[CritiqueTask]) -> list[Critique]:
        """Return one Critique per task, in order."""


class Reviser(Component):
    """Rewrites a response so it follows a principle (using the critique when there is one)."""

    kind = "reviser"

    @abstractmethod
    def revise(self, tasks: Sequence[RevisionTask]) -> list[Revision]:
        """Return one Revision per task, in order; a rejected revision keeps the input text."""

    def unchanged(self, task: RevisionTask, reason: str = "nothing to repair") -> Revision:
        """The revision that keeps the response as it is (a deterministic reviser found nothing to repair)."""
        from cai_engine.records import Revision

        return Revision(
            principle_id=task.principle.id, text=task.response, accepted=True, reason=reason, reviser=self.name
        )


class Judge(Component):
    """Compares two responses against principles; may also score one response pointwise."""

    kind = "judge"

    @abstractmethod
    def compare(self, tasks: Sequence[ComparisonTask]) -> list[Judgement]:
        """Return one Judgement per task, in order; abstain (``p_a=None``) rather than guess."""

    def score(self, tasks: Sequence[ScoringTask]) -> list[Score]:
        """Pointwise 1-10 scores. Judges that cannot score raise NotImplementedError."""
        raise NotImplementedError(f"judge {self.name!r} does not score single responses; use the 'pointwise' judge")


class Trainer(Component):
    """Trains a model on an exported dataset and writes a checkpoint folder that loads back as a model.

    What a run fills in (``cai run``): each option the trainer's ``Options`` declares among ``model`` (the model to
    train), ``constitution`` (the run's constitution), ``judge`` (a judge as ``{name, options}``, given the feedback
    model) and ``reward`` (the folder of the preference model, when the run trained one) is filled in unless the
    user set it; options it does not declare are never passed. After ``train`` returns, the run marks the output
    folder as done, so a rerun skips the stage.
    """

    kind = "trainer"
    trains_on: ClassVar[Literal["conversations", "preferences", "prompts"]] = "preferences"
    """What ``train``'s ``dataset`` is: an SFT export (``cai export sft``: conversations), a preference export
    (``cai export preferences``), or a prompt source such as ``builtin:red-team`` (online RL). Each stage of the
    pipeline hands its trainer the data it declares here."""
    task: ClassVar[str] = "text-generation"
    """The Hugging Face task of the checkpoints it writes (the model card's ``pipeline_tag``)."""
    auto_class: ClassVar[str] = "AutoModelForCausalLM"
    """The transformers class that loads its checkpoints (the model card's example)."""

    @abstractmethod
    def train(self, dataset: str | Path, output_dir: str | Path) -> TrainingResult:
        """Train on ``dataset`` (what ``trains_on`` says), write the checkpoint to ``output_dir`` and return what
        happened.

        The :class:`~cai_engine.records.TrainingResult` names the trainer, the base model, the steps taken, the
        seconds they took, the final metrics, the log history and the checkpoint folder; add what only this trainer
        reports as further keyword arguments (they are kept, and read back by key). The built-in trainers also write
        it beside the checkpoint, as ``cai_training.json``. (A summary dict, what trainers returned before, is read
        as one.)
        """


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation to render with the model's chat layout, plus text the assistant's turn starts with.

    ``assistant_prefix`` lets a component put words in the model's mouth ("The answer is: (") so the next token
    is the one it wants to read.
    """

    messages: Sequence[Message]
    assistant_prefix: str = ""


# What backends accept: raw text (sent as is), a conversation, or a ChatPrompt.
Prompt = Union[str, Sequence["Message"], ChatPrompt]  # noqa: UP007 - a runtime alias with a forward reference


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the first occurrence of any stop string (the stop string itself is dropped)."""
    cut = len(text)
    for marker in stop:
        if marker:
            found = text.find(marker)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


class GenerationSettings(BaseModel):
    """Sampling settings every backend understands."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(128, ge=1, description="Upper bound on generated tokens.")
    temperature: float = Field(0.0, ge=0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    repetition_penalty: float = Field(1.0, ge=1.0, description=">1 discourages repeating tokens (small models loop).")
    stop: tuple[str, ...] = Field((), description="Generation stops at the first of these strings (not included).")
    seed: int | None = Field(None, description="Seed for sampling; the same seed and inputs give the same output.")


class Backend(ABC):
    """A language-model runtime. One instance serves every role that names the same model."""

    name: ClassVar[str]
    kind: ClassVar[str] = "backend"

    class Options(Options):
        model: str = Field(description="What to load: a name, a folder, a file or a URL (the backend says which).")

    def __init__(self, options: Options | dict[str, Any]) -> None:
        self.options = self.validate_options(options)

    @classmethod
    def claims(cls, ref: str, registry: Registry) -> bool:
        """Whether this backend serves the model reference ``ref`` (a string such as ``mymodels:foo``) when the user
        names no backend.

        The runtime asks the registered backends in registry order and the first that claims ``ref`` serves it.
        Plugins' backends are asked before the built-ins, which register ``trylast``; the built-in ``transformers``
        backend claims every string, so it serves whatever no other backend claimed. The default claims nothing:
        such a backend is used only when named (``{backend: NAME, model: ...}``).
        """
        return False

    @classmethod
    def read_ref(cls, ref: str) -> dict[str, Any]:
        """The options a reference string this backend claims stands for (``{"model": ref}`` unless the backend
        reads more out of it, as an endpoint URL gives ``base_url`` and the model name)."""
        return {"model": ref}

    @classmethod
    def model_problem(cls, options: dict[str, Any], registry: Registry) -> str | None:
        """Why the model these (raw) options name could not load, found without loading it (no network, no
        conversion): a message saying how to fix it, or None when it looks fine (the default)."""
        return None

    @classmethod
    def validate_options(cls, options: Options | dict[str, Any]) -> Any:
        """Validate raw options without loading anything; raises ConfigError naming each bad field."""
        if isinstance(options, cls.Options):
            return options
        try:
            return cls.Options.model_validate(options)
        except ValidationError as exc:
            raise ConfigError(options_error("backend", cls.name, exc)) from None

    @property
    def model_id(self) -> str:
        """A stable identifier of the loaded model, written into records."""
        return self.options.model

    @property
    def has_chat_template(self) -> bool:
        return False

    @property
    def path_summary(self) -> str:
        """How this backend runs its model, in a few words (printed when a run loads it)."""
        return self.name

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[str]:
        """Continue each prompt; return only the new text, cut at the first stop string."""

    @abstractmethod
    def continuation_logprobs(
        self, prompts: Sequence[Prompt], continuations: Sequence[Sequence[str]]
    ) -> list[list[float | None]]:
        """For each prompt, the summed log-probability of each candidate continuation.

        None marks a continuation the backend could not score (e.g. not among a server's top log-probs); callers
        abstain rather than guess.
        """

    def chat_messages(self, conversation: Conversation) -> list[dict[str, str]]:
        """The conversation as chat-template messages, with the backend's ``system_prompt`` option (when it has one
        and is set) added to a conversation that has no system turn."""
        messages = [m.model_dump() for m in conversation]
        system = getattr(self.options, "system_prompt", None)
        if system is not None and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def format_chat(self, conversation: Conversation, *, add_generation_prompt: bool = True) -> str:
        """Render a conversation as the prompt text this model expects (chat template or transcript)."""
        from cai_engine.text.layouts import transcript

        return transcript(conversation, add_generation_prompt=add_generation_prompt)

    def count_tokens(self, text: str) -> int:
        """Approximate when the backend has no tokenizer at hand."""
        return max(1, len(text) // 4)

    @property
    def context_length(self) -> int | None:
        return None

    def close(self) -> None:  # noqa: B027 - optional for subclasses, a no-op by default
        """Release resources (servers, threads); called when the runtime shuts down."""
