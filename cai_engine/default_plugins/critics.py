"""Built-in critics."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from cai_engine import ChatPrompt, Critic, Critique, Message, ModelComponent, ModelOptions, hookimpl, normalise_pair
from cai_engine.text.layouts import (
    CRITIQUE_STOPS,
    VERDICT_QUESTION,
    chat_critique,
    transcript,
    transcript_block,
    verdict_question,
)


def few_shot_examples(task, limit):
    """The principle's own examples first, then the shared pool the caller attached to the task."""
    pool = [*task.principle.examples, *task.examples]
    return pool[:limit]


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
            "CritiqueRequest", description="Transcript layout label spelling (the repo's or the paper's)."
        )
        verdict_only: bool = Field(
            False,
            description="Skip the written critique and read only the Yes/No verdict "
            "(one forward pass; for evaluation and cheap screening).",
        )

    def _prompt(self, task, critique=None):
        request = task.principle.critique_request or task.principle.comparison or ""
        examples = few_shot_examples(task, self.options.few_shot)
        if self.chat:
            messages = chat_critique(examples, task.conversation, task.response, request)
            if critique is None:
                return messages
            return ChatPrompt(
                [*messages, Message(role="assistant", content=critique), Message(role="user", content=VERDICT_QUESTION)]
            )
        labels = (self.options.labels, self.options.labels.replace("Critique", "Revision"))
        shots = "".join(
            transcript_block(e.conversation, e.response, request, e.critique, labels=labels) for e in examples
        )
        text = shots + transcript_block(task.conversation, task.response, request, labels=labels)
        return text if critique is None else f"{text} {critique}\n\nDoes the reply need to be changed (Yes or No)?"

    def _verdict_prompt(self, task):
        """The Yes/No question about one reply; with ``few_shot``, the principle's examples come first as earlier
        turns answered Yes (needs revision) or No, so a small model sees what each answer means (and the shared
        prefix is computed once per batch)."""
        principle = task.principle
        question = principle.violation_question or principle.critique_request or principle.comparison or ""
        shots = few_shot_examples(task, self.options.few_shot)
        turns = [
            (verdict_question(e.conversation, e.response, question), "Yes" if e.needs_revision else "No") for e in shots
        ]
        body = verdict_question(task.conversation, task.response, question)
        if self.chat:
            messages = []
            for asked, answer in turns:
                messages += [Message(role="user", content=asked), Message(role="assistant", content=answer)]
            return ChatPrompt([*messages, Message(role="user", content=body)])
        return (
            "".join(f"\n\nHuman: {asked}\n\nAssistant: {answer}" for asked, answer in turns)
            + f"\n\nHuman: {body}\n\nAssistant:"
        )

    def _ask(self, body: str, prefix: str = ""):
        if self.chat:
            return ChatPrompt([Message(role="user", content=body)], assistant_prefix=prefix)
        return f"\n\nHuman: {body}\n\nAssistant:{' ' + prefix if prefix else ''}"

    def screen_requests(self, conversations, question: str | None = None) -> list[float | None]:
        """P(Yes) that each conversation's request (the person's turns only, not the reply) asks for harm; None
        where it could not be read. The question comes first, so a batch shares it as a prefix."""
        from cai_engine.text.layouts import REQUEST_QUESTION, request_turns

        conversations = list(conversations)
        if not conversations:
            return []
        yes_no = ["Yes", "No"] if self.chat else [" Yes", " No"]
        prompts = []
        for conversation in conversations:
            turns = request_turns(conversation, question or REQUEST_QUESTION)
            prompts.append(
                ChatPrompt(turns)
                if self.chat
                else "".join(f"\n\n{'Human' if m.role == 'user' else 'Assistant'}: {m.content}" for m in turns)
                + "\n\nAssistant:"
            )
        verdicts = self.backend.continuation_logprobs(prompts, [yes_no] * len(conversations))
        return [normalise_pair(yes, no) for yes, no in verdicts]

    def decline_likelihood(self, conversations) -> list[float | None]:
        """P(this critic's own model, answering each conversation itself, opens its reply by declining): the summed
        probability of the openers in ``cai_engine.text.refusals.REFUSAL_OPENERS``, read from log-probs (each
        conversation's openers share its prompt). An opener the backend cannot score counts as 0; None where none
        could be scored."""
        from cai_engine import REFUSAL_OPENERS

        conversations = list(conversations)
        if not conversations:
            return []
        if self.chat:
            prompts: list = [ChatPrompt(list(c)) for c in conversations]
            openers = list(REFUSAL_OPENERS)
        else:
            prompts = [transcript(c) for c in conversations]
            openers = [" " + o for o in REFUSAL_OPENERS]
        out: list[float | None] = []
        for logps in self.backend.continuation_logprobs(prompts, [openers] * len(prompts)):
            usable = [lp for lp in logps if lp is not None and math.isfinite(lp)]
            out.append(min(1.0, sum(math.exp(lp) for lp in usable)) if usable else None)
        return out

    def attribute(self, items, principles) -> list[int | None]:
        """For responses already found to break a principle: which one (the index), read from the letters'
        log-probs; None where no letter could be read."""
        return [index for index, _ in self._letters(list(items), list(principles))]

    def _letters(self, items, principles) -> list[tuple[int | None, dict[str, float] | None]]:
        """(index of the principle the reply breaks most clearly, probability of each letter) per item."""
        from cai_engine.text.layouts import SCREEN_LETTERS, SCREEN_WHICH, screen_body

        if not items:
            return []
        if len(principles) == 1:
            return [(0, None)] * len(items)
        letters = list(SCREEN_LETTERS[: len(principles)])
        scored = self.backend.continuation_logprobs(
            [self._ask(screen_body(principles, c, r, SCREEN_WHICH), "(") for c, r in items], [letters] * len(items)
        )
        out: list[tuple[int | None, dict[str, float] | None]] = []
        for logps in scored:
            usable = [(k, lp) for k, lp in enumerate(logps) if lp is not None and math.isfinite(lp)]
            if not usable:
                out.append((None, None))
                continue
            top = max(lp for _, lp in usable)
            total = sum(math.exp(lp - top) for _, lp in usable)
            out.append(
                (
                    max(usable, key=lambda kv: kv[1])[0],
                    {letters[k]: round(math.exp(lp - top) / total, 4) for k, lp in usable},
                )
            )
        return out

    def screen(self, items, principles, question: str | None = None) -> list[dict]:
        """One check of each (conversation, response) against several principles at once, for the runtime guard.

        A Yes/No verdict on "does the reply break any of these?" (the lettered principles come first, so every
        response shares that prefix), then, only where it fires, the letter of the principle it breaks most
        clearly, read from log-probs. Returns per item ``{"p_yes", "principle_index", "letter_probs"}``; p_yes None
        means the verdict could not be read (the caller decides what an abstention means).
        """
        from cai_engine.text.layouts import SCREEN_LETTERS, SCREEN_QUESTION, screen_body

        items, principles = list(items), list(principles)
        if len(principles) > len(SCREEN_LETTERS):
            return self._screen_in_parts(items, principles, question)
        yes_no = ["Yes", "No"] if self.chat else [" Yes", " No"]
        verdicts = self.backend.continuation_logprobs(
            [self._ask(screen_body(principles, c, r, question or SCREEN_QUESTION)) for c, r in items],
            [yes_no] * len(items),
        )
        out: list[dict[str, Any]] = [
            {"p_yes": normalise_pair(yes, no), "principle_index": None, "letter_probs": None} for yes, no in verdicts
        ]
        threshold = self.options.threshold  # type: ignore[attr-defined]
        fired = [i for i, o in enumerate(out) if o["p_yes"] is not None and o["p_yes"] > threshold]
        for i, (index, probs) in zip(fired, self._letters([items[i] for i in fired], principles)):
            out[i]["principle_index"], out[i]["letter_probs"] = index, probs
        return out

    def _screen_in_parts(self, items, principles, question: str | None) -> list[dict]:
        """More principles than letters: even parts of at most 26, one screen each. A reply breaks the whole list if
        it breaks any part (the part with the highest P(Yes) names the principle, ``letter_probs`` are that part's);
        it abstains when a part abstains and none fired."""
        from cai_engine.text.layouts import SCREEN_LETTERS

        parts = -(-len(principles) // len(SCREEN_LETTERS))
        size = -(-len(principles) // parts)
        results = [
            (start, self.screen(items, principles[start : start + size], question))
            for start in range(0, len(principles), size)
        ]
        threshold = self.options.threshold  # type: ignore[attr-defined]
        out: list[dict[str, Any]] = []
        for i in range(len(items)):
            read = [(start, part[i]) for start, part in results if part[i]["p_yes"] is not None]
            start, best = max(read, key=lambda sr: sr[1]["p_yes"], default=(0, None))
            if best is None or (best["p_yes"] <= threshold and len(read) < len(results)):
                out.append({"p_yes": None, "principle_index": None, "letter_probs": None})
                continue
            index = best["principle_index"]
            out.append({**best, "principle_index": None if index is None else start + index})
        return out

    def critique(self, tasks):
        tasks = list(tasks)
        if not tasks:
            return []
        if self.options.verdict_only:
            options = ["Yes", "No"] if self.chat else [" Yes", " No"]
            verdicts = self.backend.continuation_logprobs(
                [self._verdict_prompt(t) for t in tasks], [options] * len(tasks)
            )
            out = []
            for task, (yes, no) in zip(tasks, verdicts):
                p_yes = normalise_pair(yes, no)
                out.append(
                    Critique(
                        principle_id=task.principle.id,
                        text="",
                        critic=self.name,
                        needs_revision=None if p_yes is None else p_yes > self.options.threshold,
                    )
                )
            return out
        texts = self.backend.generate([self._prompt(t) for t in tasks], self.settings(stop=CRITIQUE_STOPS))
        texts = [t.strip() for t in texts]
        options = ["Yes", "No"] if self.chat else [" Yes", " No"]
        verdicts = self.backend.continuation_logprobs(
            [self._prompt(t, c) for t, c in zip(tasks, texts)], [options] * len(tasks)
        )
        out = []
        for task, text, (yes, no) in zip(tasks, texts, verdicts):
            p_yes = normalise_pair(yes, no)
            needs = None if p_yes is None or not text else p_yes > self.options.threshold
            out.append(Critique(principle_id=task.principle.id, text=text, needs_revision=needs, critic=self.name))
        return out


@hookimpl
def cai_register_critics(register):
    register(ModelCritic)
    from cai_engine.default_plugins.classifier import ClassifierCritic

    register(ClassifierCritic)
