"""The runtime guard's loop: check a batch of responses against a policy, revise or refuse, and audit each decision.

:class:`Guard` runs one batch with the :class:`~cai_engine.guard.components.GuardComponents` an
:class:`~cai_engine.guard.engine.Engine` built (the policy, its constitution, the components and the audit): rule and
plugin checks first (deterministic, milliseconds), then the model critic as the policy's ``guard.screen`` says, then
revisions highest authority first, re-checking everything each round. Each response's progress is a
:class:`GuardState`; what comes out is a :class:`GuardResult` and an audit record (kind ``guard``).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cai_engine.constitution.model import Message, Principle
from cai_engine.errors import ConfigError
from cai_engine.guard.audit import sha256_text
from cai_engine.guard.components import GuardComponents
from cai_engine.records import (
    Critique,
    CritiqueTask,
    GuardResult,
    GuardRound,
    Revision,
    RevisionTask,
    Violation,
    as_conversation,
)

T = TypeVar("T")


@dataclass
class GuardState:
    """One response's progress through a guard pass's rounds (mutable; it lives only as long as the pass)."""

    conversation: list[Message]
    original: str
    current: str
    rng: random.Random
    rounds: list[GuardRound] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    first_violations: list[Violation] | None = None
    critiques: dict[str, Critique] = field(default_factory=dict)
    request_p: float | None = None
    request_asked: bool = False
    rules_ms: float = 0.0
    model_ms: float = 0.0
    done: bool = False
    answer: bool = True  # the text is an answer, not another string of its message (a tool call's arguments)


def combine_request_signals(p_yes: float | None, p_declines: float | None) -> float | None:
    """guard.request_refusal: the request screen's P(Yes) and P(the critic would decline) combined by noisy-or;
    None (an abstention) when either is missing."""
    if p_yes is None or p_declines is None:
        return None
    return 1.0 - (1.0 - p_yes) * (1.0 - p_declines)


class Guard:
    """One guard pass over a batch with a policy's ``components`` (see :meth:`Engine.guard_batch`)."""

    def __init__(self, components: GuardComponents) -> None:
        self.components = components
        self.policy = components.policy
        self.constitution = components.constitution
        self.runtime_principles = components.principles

    @property
    def critic(self) -> Any:
        return self.components.critic

    @property
    def reviser(self) -> Any:
        return self.components.reviser

    def run(self, items, answers: Sequence[bool] | None = None) -> list[GuardResult]:
        """Guard many (conversation, response) pairs; model work is batched across them. ``answers``: for each
        item, whether its text is an answer (the default) rather than another string of an answer's message (a tool
        call's arguments, reasoning, an annotation), which plugin checks read as the rails do (see
        ``GuardComponents.deterministic_violations``)."""
        settings = self.policy.guard
        began = time.perf_counter()
        states = []
        flags = [True] * len(items) if answers is None else list(answers)
        if len(flags) != len(items):
            raise ValueError(f"answers has {len(flags)} flags for {len(items)} items")
        for (conversation, response), answer in zip(items, flags):
            states.append(
                GuardState(
                    conversation=as_conversation(conversation),
                    original=response,
                    current=response,
                    rng=random.Random(f"{settings.seed}:{sha256_text(response)}"),
                    answer=answer,
                )
            )
        for round_index in range(settings.max_rounds + 1):
            live = [s for s in states if not s.done]
            if not live:
                break
            self._check(live, round_index)
            for state in live:
                if state.first_violations is None:
                    state.first_violations = state.violations
                if not state.violations or settings.action != "revise" or round_index == settings.max_rounds:
                    state.done = True
            to_fix = [s for s in live if not s.done]
            if to_fix:
                self._revise(to_fix)
        results = [self._finish(state, began) for state in states]
        return results

    def _check(self, states: list[GuardState], round_index: int) -> None:
        settings = self.policy.guard
        model_tasks = []
        screen_tasks = []
        request_tasks = []
        attribute_tasks = []
        asked = []  # every state the request screen covers this round
        for state in states:
            began = time.perf_counter()
            violations = self.components.deterministic_violations(  # rules first
                state.conversation, state.current, rail=not state.answer
            )
            critiques: dict[str, Critique] = {}
            state.rules_ms += (time.perf_counter() - began) * 1000
            state.violations, state.critiques = violations, critiques
            state.rounds.append(GuardRound(round=round_index, violations=[]))
            if settings.model_critics:
                candidates = [p for p in self.runtime_principles if p.critique_request or p.violation_question]
                if settings.model_principles != "all" and candidates:
                    k = min(int(settings.model_principles), len(candidates))
                    candidates = state.rng.sample(candidates, k) if k < len(candidates) else candidates
                if settings.screen == "request" and candidates:
                    asked.append((state, candidates))
                    if not state.request_asked:
                        request_tasks.append((state, candidates))
                    elif state.request_p is not None and state.request_p > settings.request_threshold:
                        attribute_tasks.append((state, candidates))
                    continue
                if settings.screen == "combined" and candidates:
                    screen_tasks.append((state, candidates))
                    continue
                model_tasks += [
                    (
                        state,
                        CritiqueTask(
                            conversation=state.conversation,
                            response=state.current,
                            principle=p,
                            examples=self.constitution.examples,
                        ),
                    )
                    for p in candidates
                ]
        if request_tasks:  # the request does not change between rounds: asked once per conversation
            began = time.perf_counter()
            screen_requests = getattr(self.critic, "screen_requests", None)
            if screen_requests is None:
                raise ConfigError(
                    f"guard.screen 'request' needs a critic with a screen_requests() method; "
                    f"{self.critic.name!r} has none (use the built-in 'model' critic)"
                )
            conversations = [s.conversation for s, _ in request_tasks]
            probabilities = screen_requests(conversations, settings.request_question)
            declines: list[float | None] = [None] * len(request_tasks)
            if settings.request_refusal:  # a second opinion: would the critic model decline the request itself?
                decline_likelihood = getattr(self.critic, "decline_likelihood", None)
                if decline_likelihood is None:
                    raise ConfigError(
                        f"guard.request_refusal needs a critic with a decline_likelihood() method; "
                        f"{self.critic.name!r} has none (use the built-in 'model' critic)"
                    )
                declines = decline_likelihood(conversations)
                probabilities = [combine_request_signals(p, d) for p, d in zip(probabilities, declines)]
            for (state, candidates), p, d in zip(request_tasks, probabilities, declines):
                state.request_p, state.request_asked = p, True
                state.rounds[-1].request_p = p
                state.rounds[-1].request_refusal_p = d
                if p is None:
                    self._abstained(state, None, what="request")
                elif p > settings.request_threshold:
                    attribute_tasks.append((state, candidates))
            _share(states, began)
        if settings.reply_contrast is not None:  # requests read as harmless: is the reply worse than refusing?
            contrast_tasks = [
                (state, candidates)
                for state, candidates in asked
                if state.request_asked and state.request_p is not None and state.request_p <= settings.request_threshold
            ]
            if contrast_tasks:
                _timed(states, lambda: self._contrast(contrast_tasks))
        if attribute_tasks:  # a harmful request: a reply that does not refuse is a violation
            _timed(states, lambda: self._complied(attribute_tasks))
        if screen_tasks:
            _timed(states, lambda: self._screen(screen_tasks))
        if model_tasks:
            results = _timed(states, lambda: self.critic.critique([t for _, t in model_tasks]))
            for (state, task), critique in zip(model_tasks, results):
                if critique.needs_revision is None:
                    self._abstained(state, task.principle)
                    continue
                if critique.needs_revision:
                    state.violations.append(_violation(task.principle, critique.text, critique.critic))
                    state.critiques[task.principle.id] = critique
        for state in states:
            state.rounds[-1].violations = list(state.violations)

    def _screen(self, screen_tasks) -> None:
        """The combined screen: one verdict per response against every candidate principle at once."""
        groups: dict[tuple[str, ...], list] = {}
        for state, candidates in screen_tasks:
            groups.setdefault(tuple(p.id for p in candidates), []).append((state, candidates))
        screen = getattr(self.critic, "screen", None)
        if screen is None:
            raise ConfigError(
                f"guard.screen 'combined' needs a critic with a screen() method; {self.critic.name!r} "
                "has none (use the built-in 'model' critic, or screen: each)"
            )
        for members in groups.values():
            candidates = members[0][1]
            results = screen([(s.conversation, s.current) for s, _ in members], candidates)
            for (state, _), result in zip(members, results):
                state.rounds[-1].revisions.append({"screen": result})
                if result["p_yes"] is None:
                    self._abstained(state, None)
                elif result["principle_index"] is not None:
                    principle = candidates[result["principle_index"]]
                    state.violations.append(
                        _violation(principle, f"P(breaks a principle)={result['p_yes']:.2f}", self.critic.name)
                    )

    def _complied(self, tasks) -> None:
        """screen 'request': the request asks for harm, so a reply that does not refuse breaks a principle; which one
        the critic names (its letters' log-probs). A small model cannot tell a harmful reply from a harmless one
        reliably, but the refusal phrases a reply starts or leads with are deterministic."""
        from cai_engine.text.refusals import is_refusal

        complied = [(state, candidates) for state, candidates in tasks if not is_refusal(state.current)]
        for state, _ in tasks:
            state.rounds[-1].revisions.append(
                {
                    "request_screen": {
                        "p_harmful_request": state.request_p,
                        "reply_refuses": is_refusal(state.current),
                    }
                }
            )
        self._attribute(
            [
                (state, candidates, f"P(harmful request)={state.request_p:.2f}; the reply does not refuse")
                for state, candidates in complied
            ]
        )

    def _attribute(self, found) -> None:
        """Record a violation for each (state, candidates, evidence): of the principle whose letter the critic picks
        (its ``attribute`` method, batched per candidate list), or the first candidate where it names none."""
        groups: dict[tuple[str, ...], list] = {}
        for state, candidates, evidence in found:
            groups.setdefault(tuple(p.id for p in candidates), []).append((state, candidates, evidence))
        attribute = getattr(self.critic, "attribute", None)
        for members in groups.values():
            candidates = members[0][1]
            indices = (
                attribute([(s.conversation, s.current) for s, _, _ in members], candidates)
                if attribute is not None
                else [0] * len(members)
            )
            for (state, _, evidence), index in zip(members, indices):
                principle = candidates[index if index is not None else 0]
                state.violations.append(_violation(principle, evidence, self.critic.name))

    def _contrast(self, tasks) -> None:
        """reply_contrast: a reply to a request read as harmless, beside a plain refusal before the policy's judge
        (both orders); where the refusal is the better reply, the reply breaks the principle the critic names."""
        from cai_engine.records import ComparisonTask
        from cai_engine.text.layouts import CONTRAST_QUESTION
        from cai_engine.text.refusals import is_refusal

        settings = self.policy.guard
        question = Principle(
            id="reply-contrast",
            title="Worse than declining",
            comparison=settings.contrast_question or CONTRAST_QUESTION,
        )
        engaged = [(state, candidates) for state, candidates in tasks if not is_refusal(state.current)]
        if not engaged:
            return
        judgements = self.components.judge.compare(
            [
                ComparisonTask(
                    conversation=state.conversation,
                    response_a=state.current,
                    response_b=settings.contrast_refusal,
                    principles=[question],
                )
                for state, _ in engaged
            ]
        )
        fired = []
        for (state, candidates), judgement in zip(engaged, judgements):
            p_refusal = None if judgement.p_a is None else 1.0 - judgement.p_a
            state.rounds[-1].contrast_p = p_refusal
            if p_refusal is None:
                self._abstained(state, None, what="contrast")
            elif p_refusal > settings.reply_contrast:
                fired.append((state, candidates, f"P(a plain refusal is the better reply)={p_refusal:.2f}"))
        self._attribute(fired)

    def _abstained(self, state: GuardState, principle: Principle | None, what: str = "screen") -> None:
        """A model verdict that could not be read: flagged, revised or passed as the policy says; always recorded."""
        state.rounds[-1].abstentions.append(principle.id if principle is not None else what)
        if self.policy.guard.on_abstain == "revise":
            target = principle or next(iter(self.runtime_principles))
            state.violations.append(
                Violation(
                    principle_id=target.id,
                    evidence="no verdict",
                    message="the model critic could not give a verdict",
                    critic=self.critic.name,
                )
            )

    def _revise(self, states: list[GuardState]) -> None:
        """Revise each violated principle, highest authority first; the next round re-checks everything.

        Violations found by deterministic critics are repaired by their revisers (milliseconds, no refusal); the
        rest, and any a deterministic reviser declines, go to the model reviser in one batch.
        """
        by_id = {p.id: p for p in self.runtime_principles}
        pending = {
            id(s): sorted({v.principle_id for v in s.violations}, key=lambda pid: -by_id[pid].authority) for s in states
        }
        while any(pending.values()):
            model_tasks = []
            began = time.perf_counter()
            for state in states:
                if not pending[id(state)]:
                    continue
                pid = pending[id(state)].pop(0)
                principle = by_id[pid]
                found_by = []
                for v in state.violations:
                    if v.principle_id == pid and v.critic not in found_by:
                        found_by.append(v.critic)
                critique = state.critiques.get(pid)
                repairers = [self.components.repairer(name, rail=not state.answer) for name in found_by]
                needs_model = critique is not None or any(r is None for r in repairers)
                for repairer in [r for r in repairers if r is not None]:
                    task = RevisionTask(
                        conversation=state.conversation,
                        response=state.current,
                        principle=principle,
                        examples=self.constitution.examples,
                    )
                    revision = repairer.revise([task])[0]
                    self._apply(state, task, revision)
                    needs_model = needs_model or not revision.accepted
                if needs_model and self.policy.model_free:  # `model: none`: nothing may rewrite what rules could not
                    state.rounds[-1].revisions.append(
                        {
                            "principle_id": pid,
                            "reviser": "none",
                            "accepted": False,
                            "reason": "model: none: no model may rewrite this reply",
                        }
                    )
                elif needs_model:
                    model_tasks.append(
                        (
                            state,
                            RevisionTask(
                                conversation=state.conversation,
                                response=state.current,
                                principle=principle,
                                critique=critique.text
                                if critique
                                else _check_critique(state, pid, self.components.critic_ref),
                                examples=self.constitution.examples,
                            ),
                        )
                    )
            rules_elapsed = (time.perf_counter() - began) * 1000
            began = time.perf_counter()
            model_elapsed = 0.0
            if model_tasks:
                for (state, task), revision in zip(model_tasks, self.reviser.revise([t for _, t in model_tasks])):
                    self._apply(state, task, revision)
                model_elapsed = (time.perf_counter() - began) * 1000
            for state in states:
                state.rules_ms += rules_elapsed / len(states)
                state.model_ms += model_elapsed / len(states)

    @staticmethod
    def _apply(state: GuardState, task: RevisionTask, revision: Revision) -> None:
        state.rounds[-1].revisions.append(
            {
                "principle_id": task.principle.id,
                "reviser": revision.reviser,
                "accepted": revision.accepted,
                "reason": revision.reason,
            }
        )
        if revision.accepted:
            state.current = revision.text

    def _finish(self, state: GuardState, began: float) -> GuardResult:
        settings = self.policy.guard
        violations = state.violations
        abstained = any(r.abstentions for r in state.rounds)
        if not state.first_violations and abstained and settings.on_abstain == "flag":
            action, response, compliant = "flagged", state.original, False
        elif not state.first_violations:
            action, response, compliant = "none", state.original, True
        elif settings.action == "flag":
            action, response, compliant = "flagged", state.original, False
        elif settings.action == "refuse" or (violations and settings.on_failure == "refuse"):
            refusal = self.components.refusal(violations or state.first_violations)
            action, response, compliant = "refused", refusal, False
        elif violations:
            action, response, compliant = "flagged", state.current, False
        else:
            action, response, compliant = "revised", state.current, True
        if action == "refused" and not violations:
            violations = state.first_violations or []
        result = GuardResult(
            id=str(uuid.uuid4()),
            response=response,
            original=state.original,
            compliant=compliant,
            action=action,
            violations=violations,
            rounds=state.rounds,
            abstained=abstained,
            timings_ms={
                "rules": round(state.rules_ms, 3),
                "model": round(state.model_ms, 3),
                "total": round((time.perf_counter() - began) * 1000, 3),
            },
            policy=self.components.policy_info,
        )
        self.components.audit(state.conversation, result)
        return result


def _check_critique(state: GuardState, principle_id: str, model_critic: Any) -> str | None:
    """What the deterministic checks (rules and plugin checks, not the policy's model critic) said of a principle."""
    skip = model_critic.name if model_critic is not None else None
    messages = [v.message for v in state.violations if v.principle_id == principle_id and v.critic != skip]
    return "; ".join(messages) or None


def _share(states: list[GuardState], began: float) -> None:
    """Charge the model time since ``began`` to the batch's responses in equal shares."""
    elapsed = (time.perf_counter() - began) * 1000 / max(len(states), 1)
    for state in states:
        state.model_ms += elapsed


def _timed(states: list[GuardState], work: Callable[[], T]) -> T:
    began = time.perf_counter()
    result = work()
    _share(states, began)
    return result


def _violation(principle: Principle, evidence: str, critic: str) -> Violation:
    """A model critic's finding against ``principle``, named by its title."""
    return Violation(
        principle_id=principle.id, evidence=evidence, message=principle.title or principle.id, critic=critic
    )
