"""Built-in judges: multiple-choice soft labels from log-probs (both orders), chain-of-thought, pointwise scores.

Every pairwise judge scores BOTH presentation orders and averages them (small models have a strong position bias),
records the per-order probabilities and whether the two orders agree, and abstains rather than guessing when an
order cannot be scored. Several principles on one task form an ensemble: each is judged, and the labels average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import Field, model_validator

from cai_engine import (
    ChatPrompt,
    ComparisonTask,
    Judge,
    Judgement,
    Message,
    ModelComponent,
    ModelOptions,
    OrderResult,
    Score,
    hookimpl,
    normalise_pair,
)
from cai_engine.text.layouts import (
    ANSWER_PREFIX,
    OPTION_LETTERS,
    SCORE_INSTRUCTION,
    SCORE_PREFIX,
    TURN_MARKERS,
    chat_comparison,
    quoted_conversation,
    transcript_comparison,
)


def _question(principle) -> str:
    return principle.comparison or (principle.critique_request or principle.title or principle.id)


def _pointwise_text(principle) -> str:
    """How one reply is judged against a principle: its own yes/no question when it has one (Yes = it breaks the
    principle), else its critique request; never the two-reply comparison question."""
    title = principle.title or principle.id
    if principle.violation_question:
        return f"Principle: {title}. A reply breaks it if the answer to this is yes: {principle.violation_question}"
    return f"Principle: {title}. {principle.critique_request or principle.comparison or ''}".strip()


class LogprobJudge(ModelComponent, Judge):
    """Multiple choice: reads P(A) and P(B) from the next-token log-probs after "The answer is: (".

    The soft label for an order is ``exp(lA) / (exp(lA) + exp(lB))``; the judgement's ``p_a`` (probability that
    the task's first response is better) averages both orders and every principle.
    """

    name = "logprob"

    class Options(ModelOptions):
        """``max_new_tokens`` is unused: this judge only reads log-probs."""

    # subclasses add a rationale step
    def _rationales(self, prompts: list) -> list[str] | None:
        return None

    def _examples(self, task: ComparisonTask, principle):
        """Few-shot labelled pairs in the same layout, the correct letter alternating so they teach no position.

        Both orders get the same shots, so swapping the two responses mirrors the label exactly.
        """
        pool = [*principle.comparison_examples, *task.examples][: self.options.few_shot]
        shots = []
        for i, example in enumerate(pool):
            better_first = i % 2 == 0
            first, second = (example.better, example.worse) if better_first else (example.worse, example.better)
            shots.append((example.conversation, first, second, _question(principle), "A" if better_first else "B"))
        return shots

    def _prompt(self, task: ComparisonTask, principle, order: str, rationale: str | None = None):
        first, second = (task.response_a, task.response_b) if order == "ab" else (task.response_b, task.response_a)
        shots = self._examples(task, principle)
        if self.chat:
            messages = chat_comparison(shots, task.conversation, first, second, _question(principle))
            prefix = ANSWER_PREFIX if rationale is None else f"{self._reasoning_prefix()}{rationale}\n{ANSWER_PREFIX}"
            return ChatPrompt(messages, assistant_prefix=prefix)
        text = transcript_comparison(shots, task.conversation, first, second, _question(principle))
        if rationale is not None:
            text = text[: -len(ANSWER_PREFIX)] + f"{self._reasoning_prefix()}{rationale}\n{ANSWER_PREFIX}"
        return text

    def _reasoning_prefix(self) -> str:
        return ""

    def compare(self, tasks: Sequence[ComparisonTask]) -> list[Judgement]:
        tasks = list(tasks)
        if not tasks:
            return []
        slots = [(t, p, order) for t, task in enumerate(tasks) for p in task.principles for order in ("ab", "ba")]
        rationales = self._rationales([(tasks[t], p, o) for t, p, o in slots])
        prompts = [
            self._prompt(tasks[t], p, o, rationales[i] if rationales else None) for i, (t, p, o) in enumerate(slots)
        ]
        scored = self.backend.continuation_logprobs(prompts, [list(OPTION_LETTERS)] * len(prompts))
        per_task: list[list[OrderResult]] = [[] for _ in tasks]
        for i, ((t, _principle, order), (l_first, l_second)) in enumerate(zip(slots, scored)):
            p_first = normalise_pair(l_first, l_second)
            logprobs = {k: v for k, v in zip(OPTION_LETTERS, (l_first, l_second)) if v is not None}
            rationale = rationales[i] if rationales else None
            if p_first is None:
                missing = [k for k, v in zip(OPTION_LETTERS, (l_first, l_second)) if v is None or not math.isfinite(v)]
                per_task[t].append(
                    OrderResult(
                        order=order,
                        p_a=None,
                        logprobs=logprobs,
                        rationale=rationale,
                        abstained=True,
                        reason=f"option(s) {', '.join(missing)} could not be scored",
                    )
                )
                continue
            p_first = self._adjust(p_first)
            p_a = p_first if order == "ab" else 1 - p_first  # in "ba", response A was shown second
            per_task[t].append(OrderResult(order=order, p_a=p_a, logprobs=logprobs, rationale=rationale))
        return [self._combine(task, results) for task, results in zip(tasks, per_task)]

    def _adjust(self, p: float) -> float:
        return p

    def _combine(self, task: ComparisonTask, results: list[OrderResult]) -> Judgement:
        ids = [p.id for p in task.principles]
        failed = [r for r in results if r.p_a is None]
        if failed:
            reasons = "; ".join(f"order {r.order}: {r.reason}" for r in failed)
            return Judgement(
                principle_ids=ids,
                p_a=None,
                orders=results,
                abstained=True,
                reason=f"not every order could be scored ({reasons})",
                judge=self.name,
            )
        p_a = sum(r.p_a for r in results if r.p_a is not None) / len(results)
        prefs = {r.p_a > 0.5 if r.p_a != 0.5 else None for r in results if r.p_a is not None}
        return Judgement(
            principle_ids=ids, p_a=p_a, orders=results, position_consistent=prefs in ({True}, {False}), judge=self.name
        )


class CoTJudge(LogprobJudge):
    """Chain of thought: the model reasons first (greedy), then the letter probabilities are read and clamped.

    CAI clamps CoT probabilities to [0.4, 0.6] because the rationale makes the letter nearly certain, which would
    make over-confident soft labels (CAI-SPEC §3.3). Set ``clamp: null`` to keep them raw.
    """

    name = "cot"

    class Options(ModelOptions):
        max_new_tokens: int = Field(96, ge=1, le=1024, description="Upper bound on the rationale's tokens.")
        clamp: tuple[float, float] | None = Field((0.4, 0.6), description="Clamp range for each order's P(A).")

        @model_validator(mode="after")
        def _valid_clamp(self):
            if self.clamp is not None and not 0 <= self.clamp[0] <= 0.5 <= self.clamp[1] <= 1:
                raise ValueError("clamp must be (low, high) with 0 <= low <= 0.5 <= high <= 1")
            return self

    def _reasoning_prefix(self) -> str:
        return "Let's think step by step: "

    def _rationales(self, slots: list) -> list[str]:
        prompts = []
        for task, principle, order in slots:
            prompt = LogprobJudge._prompt(self, task, principle, order)
            if isinstance(prompt, ChatPrompt):
                prompts.append(ChatPrompt(prompt.messages, assistant_prefix=self._reasoning_prefix()))
            else:
                prompts.append(prompt[: -len(ANSWER_PREFIX)] + self._reasoning_prefix())
        stops = ("\nThe answer is", "The answer is:", *TURN_MARKERS)
        texts = self.backend.generate(prompts, self.settings(stop=stops, temperature=0.0))
        return [" ".join(t.split()) for t in texts]

    def _adjust(self, p: float) -> float:
        if self.options.clamp is None:  # type: ignore[attr-defined]
            return p
        low, high = self.options.clamp  # type: ignore[attr-defined]
        return min(max(p, low), high)


class PointwiseJudge(ModelComponent, Judge):
    """Scores one response per principle: the probability-weighted mean of the score digits (d-RLAIF).

    The model answers one digit, 0-9 (single tokens, so no option is a prefix of another); ``value`` reports it on
    the familiar 1-10 scale (digit + 1) and ``reward`` rescales it to [-1, 1] as ``(value - 5.5) / 4.5``. Several
    principles are averaged; if any of them cannot be scored the whole score abstains (a partial average would be a
    different measurement presented as the same one). ``compare`` scores both responses and turns the difference into
    a preference, so this judge can also vote pairwise.
    """

    name = "pointwise"

    class Options(ModelOptions):
        sharpness: float = Field(1.0, gt=0, description="Temperature of the score-difference preference in compare().")

    SCORES = tuple(str(i) for i in range(10))

    def _prompt(self, conversation, response, principle):
        instruction = SCORE_INSTRUCTION.format(principle=_pointwise_text(principle))
        body = (
            f"Consider the following conversation between a person (H) and an assistant (A):\n\n"
            f"{quoted_conversation([*conversation, Message(role='assistant', content=response)])}\n\n{instruction}"
        )
        if self.chat:
            return ChatPrompt([Message(role="user", content=body)], assistant_prefix=SCORE_PREFIX)
        return f"\n\nHuman: {body}\n\nAssistant: {SCORE_PREFIX}"

    def score(self, tasks):
        tasks = list(tasks)
        slots = [(t, p) for t, task in enumerate(tasks) for p in task.principles]
        scored = self.backend.continuation_logprobs(
            [self._prompt(tasks[t].conversation, tasks[t].response, p) for t, p in slots],
            [list(self.SCORES)] * len(slots),
        )
        values: list[list[float]] = [[] for _ in tasks]
        dists: list[list[dict[int, float]]] = [[] for _ in tasks]
        failed: list[list[str]] = [[] for _ in tasks]
        for (t, principle), logps in zip(slots, scored):
            if any(lp is None or math.isnan(lp) for lp in logps):  # an option the backend could not score
                failed[t].append(principle.id)
                continue
            usable = [(int(s) + 1, lp) for s, lp in zip(self.SCORES, logps) if math.isfinite(lp)]
            if not usable:
                failed[t].append(principle.id)
                continue
            top = max(lp for _, lp in usable)
            weights = [(s, math.exp(lp - top)) for s, lp in usable]
            total = sum(w for _, w in weights)
            values[t].append(sum(s * w for s, w in weights) / total)
            dists[t].append({s: w / total for s, w in weights})
        out = []
        for task, vals, dist, bad in zip(tasks, values, dists, failed):
            ids = [p.id for p in task.principles]
            if bad or not vals:
                out.append(
                    Score(
                        principle_ids=ids,
                        value=None,
                        reward=None,
                        abstained=True,
                        reason=f"could not score principle(s) {', '.join(bad) or ids}",
                        judge=self.name,
                    )
                )
                continue
            value = sum(vals) / len(vals)
            mean_dist = {str(s): round(sum(d.get(s, 0.0) for d in dist) / len(dist), 6) for s in range(1, 11)}
            out.append(
                Score(
                    principle_ids=ids, value=value, reward=(value - 5.5) / 4.5, distribution=mean_dist, judge=self.name
                )
            )
        return out

    def compare(self, tasks):
        from cai_engine import ScoringTask

        tasks = list(tasks)
        both = self.score(
            [
                ScoringTask(conversation=t.conversation, response=r, principles=t.principles)
                for t in tasks
                for r in (t.response_a, t.response_b)
            ]
        )
        out = []
        for k, task in enumerate(tasks):
            a, b = both[2 * k], both[2 * k + 1]
            ids = [p.id for p in task.principles]
            if a.value is None or b.value is None:
                out.append(
                    Judgement(
                        principle_ids=ids,
                        p_a=None,
                        abstained=True,
                        reason="a response could not be scored",
                        judge=self.name,
                    )
                )
                continue
            p_a = 1 / (1 + math.exp(-(a.value - b.value) / self.options.sharpness))
            # pointwise scores see one response at a time: there is no order, so position consistency does not apply
            out.append(Judgement(principle_ids=ids, p_a=p_a, position_consistent=None, judge=self.name))
        return out


@hookimpl
def cai_register_judges(register):
    register(LogprobJudge)
    register(CoTJudge)
    register(PointwiseJudge)
    from cai_engine.default_plugins.classifier import ClassifierJudge

    register(ClassifierJudge)
