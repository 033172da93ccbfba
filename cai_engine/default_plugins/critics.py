"""Built-in critics."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cai_engine.components import ChatPrompt, Critic
from cai_engine.hookspecs import hookimpl
from cai_engine.modeling import ModelComponent, ModelOptions, normalise_pair
from cai_engine.models import Message
from cai_engine.prompting import (
    CRITIQUE_STOPS,
    VERDICT_QUESTION,
    chat_critique,
    transcript_block,
    verdict_question,
)
from cai_engine.records import Critique
from cai_engine.rules import check_principle


def few_shot_examples(task, limit):
    """The principle's own examples first, then the shared pool the caller attached to the task."""
    pool = [*task.principle.examples, *task.examples]
    return pool[:limit]


class RuleCritic(Critic):
    """Checks a principle's deterministic ``rules`` (regular expressions); no model, milliseconds per response.

    A principle without rules is reported as compliant with ``needs_revision=None`` (this critic cannot tell).
    """

    name = "rules"

    def critique(self, tasks):
        out = []
        for task in tasks:
            if not task.principle.rules:
                out.append(Critique(principle_id=task.principle.id, text="", needs_revision=None, critic=self.name))
                continue
            violations = check_principle(task.principle, task.conversation, task.response, self.name)
            text = "; ".join(f"{v.message} (rule {v.rule_id}: {v.evidence!r})" for v in violations)
            out.append(Critique(principle_id=task.principle.id, text=text or "No rule is violated.",
                                needs_revision=bool(violations), violations=violations, critic=self.name))
        return out


class ModelCritic(ModelComponent, Critic):
    """Asks a model to critique a response against the principle's critique request, then reads its verdict.

    The verdict ("does the reply need changing?") is read from the next-token log-probs of Yes/No after the
    critique, so ``needs_revision`` is a calibrated decision rather than a parse of free text. A separate critique
    model is just this critic with ``model`` pointing elsewhere.
    """

    name = "model"

    class Options(ModelOptions):
        max_new_tokens: int = Field(96, ge=1, le=1024, description="Critiques are short.")
        threshold: float = Field(0.5, gt=0, lt=1, description="P(Yes) above which the response needs revising.")
        labels: Literal["CritiqueRequest", "Critique Request"] = Field(
            "CritiqueRequest", description="Transcript layout label spelling (the repo's or the paper's).")
        verdict_only: bool = Field(False, description="Skip the written critique and read only the Yes/No verdict "
                                                      "(one forward pass; for evaluation and cheap screening).")

    def _prompt(self, task, critique=None):
        request = task.principle.critique_request or task.principle.comparison or ""
        examples = few_shot_examples(task, self.options.few_shot)
        if self.chat:
            messages = chat_critique(examples, task.conversation, task.response, request)
            if critique is None:
                return messages
            return ChatPrompt([*messages, Message(role="assistant", content=critique),
                               Message(role="user", content=VERDICT_QUESTION)])
        labels = (self.options.labels, self.options.labels.replace("Critique", "Revision"))
        shots = "".join(transcript_block(e.conversation, e.response, request, e.critique, labels=labels)
                        for e in examples)
        text = shots + transcript_block(task.conversation, task.response, request, labels=labels)
        return text if critique is None else f"{text} {critique}\n\nDoes the reply need to be changed (Yes or No)?"

    def _verdict_prompt(self, task):
        request = task.principle.critique_request or task.principle.comparison or ""
        body = verdict_question(task.conversation, task.response, request)
        if self.chat:
            return ChatPrompt([Message(role="user", content=body)])
        return f"\n\nHuman: {body}\n\nAssistant:"

    def critique(self, tasks):
        tasks = list(tasks)
        if not tasks:
            return []
        if self.options.verdict_only:
            options = ["Yes", "No"] if self.chat else [" Yes", " No"]
            verdicts = self.backend.continuation_logprobs([self._verdict_prompt(t) for t in tasks],
                                                          [options] * len(tasks))
            out = []
            for task, (yes, no) in zip(tasks, verdicts):
                p_yes = normalise_pair(yes, no)
                out.append(Critique(principle_id=task.principle.id, text="", critic=self.name,
                                    needs_revision=None if p_yes is None else p_yes > self.options.threshold))
            return out
        texts = self.backend.generate([self._prompt(t) for t in tasks], self.settings(stop=CRITIQUE_STOPS))
        texts = [t.strip() for t in texts]
        options = ["Yes", "No"] if self.chat else [" Yes", " No"]
        verdicts = self.backend.continuation_logprobs([self._prompt(t, c) for t, c in zip(tasks, texts)],
                                                      [options] * len(tasks))
        out = []
        for task, text, (yes, no) in zip(tasks, texts, verdicts):
            p_yes = normalise_pair(yes, no)
            needs = None if p_yes is None or not text else p_yes > self.options.threshold
            out.append(Critique(principle_id=task.principle.id, text=text, needs_revision=needs, critic=self.name))
        return out


@hookimpl
def cai_register_critics(register):
    register(RuleCritic)
    register(ModelCritic)
