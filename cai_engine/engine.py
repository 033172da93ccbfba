"""The embedding API: ``Engine.from_policy(...)`` and the runtime guard.

    engine = Engine.from_policy("policy.yaml")
    result = engine.guard(conversation, response)        # or await engine.aguard(...), engine.guard_batch(...)
    result.response, result.compliant, result.violations

Components and models load lazily, once. Every guard decision is emitted as an audit record through the
``cai_on_record`` hook (kind ``guard``), and appended to the policy's JSONL audit file when it names one.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .audit import JsonlAuditSink
from .guard import Guard
from .policy import Policy, load_policy, resolve_policy
from .records import (
    ComparisonTask,
    Critique,
    CritiqueTask,
    GuardResult,
    Judgement,
    Revision,
    RevisionTask,
    Violation,
    as_conversation,
)
from .rules import check_principle
from .runtime import Runtime
from .schema import Constitution, Message, Phase, Principle


class Engine:
    """A policy bound to a runtime: critique, revise, compare and guard, single or batched, sync or async."""

    def __init__(self, policy: Policy, *, runtime: Runtime | None = None, base_dir: Path | None = None) -> None:
        self.policy = policy
        self.runtime = runtime or Runtime.default()
        self.constitution: Constitution = resolve_policy(policy, self.runtime.registry, base_dir)
        self.runtime_principles = self.constitution.for_phase(Phase.runtime)
        # Validate every component's options now, before any model loads (models load on first use).
        if policy.guard.model_critics or policy.guard.action == "revise":
            self._critic_ref = policy.role(policy.critic, "critic", self.runtime, threshold=policy.guard.threshold)
            self._critic_ref.build("critic", self.runtime)
            policy.role(policy.reviser, "reviser", self.runtime).build("reviser", self.runtime)
        policy.role(policy.judge, "judge", self.runtime).build("judge", self.runtime)
        self._checks: dict[str, Any] = {}
        self._repairers: dict[str, Any] = {}
        for principle in self.runtime_principles:  # unknown plugin critics fail now, not mid-request
            for name in principle.checks:
                self.check_critic(name)
        self.audit_sink = None
        if policy.audit.path:
            path = Path(policy.audit.path)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            self.audit_sink = JsonlAuditSink(path)
            self.runtime.pm.register(self.audit_sink)
        self.policy_info = {
            "name": policy.name,
            "version": policy.version,
            "constitution_hash": self.constitution.content_hash(),
        }

    def model_problems(self) -> list[tuple[str, str]]:
        """``(role, problem)`` for each model the guard would load that cannot be found (checked without loading:
        a missing folder or file, a catalogue model not installed). Endpoints are not contacted."""
        roles = []
        if self.policy.guard.model_critics:
            roles.append(("critic", self._critic_ref))
        if self.policy.guard.action == "revise" or self.policy.guard.on_abstain == "revise":
            roles.append(("reviser", self.policy.role(self.policy.reviser, "reviser", self.runtime)))
        roles.append(("judge", self.policy.role(self.policy.judge, "judge", self.runtime)))
        problems = []
        for role, ref in roles:
            model = ref.options.get("model")
            if model is None:
                continue
            problem = self.runtime.model_problem(model)
            if problem:
                problems.append((role, problem))
        return problems

    @classmethod
    def from_policy(cls, source: str | Path | dict[str, Any], *, runtime: Runtime | None = None) -> Engine:
        """Load a policy file (YAML/JSON) or mapping and build an engine for it."""
        policy, base_dir = load_policy(source)
        return cls(policy, runtime=runtime, base_dir=base_dir)

    # -- components, built once ------------------------------------------------------------------------------

    @functools.cached_property
    def rule_critic(self):
        return self.runtime.component("critic", "rules")

    @functools.cached_property
    def rule_reviser(self):
        return self.runtime.component("reviser", "rules")

    @functools.cached_property
    def critic(self):
        return self._critic_ref.build("critic", self.runtime)

    @functools.cached_property
    def reviser(self):
        return self.policy.role(self.policy.reviser, "reviser", self.runtime).build("reviser", self.runtime)

    @functools.cached_property
    def judge(self):
        return self.policy.role(self.policy.judge, "judge", self.runtime).build("judge", self.runtime)

    def close(self) -> None:
        if self.audit_sink is not None:
            self.runtime.pm.unregister(self.audit_sink)
            self.audit_sink = None

    # -- building blocks -------------------------------------------------------------------------------------

    def _principles(self, ids: Sequence[str] | None) -> list[Principle]:
        if ids is None:
            return self.runtime_principles
        return [self.constitution.principle(pid) for pid in ids]

    def critique(self, conversation, response: str, principles: Sequence[str] | None = None) -> list[Critique]:
        """Rule and model critiques of one response against the policy's principles (all runtime ones by default)."""
        return self.critique_batch([(conversation, response)], principles)[0]

    def critique_batch(self, items, principles: Sequence[str] | None = None) -> list[list[Critique]]:
        chosen = self._principles(principles)
        out: list[list[Critique]] = []
        tasks = []
        for conversation, response in items:
            conv = as_conversation(conversation)
            out.append(
                list(
                    self.rule_critic.critique(
                        [CritiqueTask(conversation=conv, response=response, principle=p) for p in chosen if p.rules]
                    )
                )
            )
            tasks += [
                (
                    len(out) - 1,
                    CritiqueTask(
                        conversation=conv, response=response, principle=p, examples=self.constitution.examples
                    ),
                )
                for p in chosen
                if p.critique_request
            ]
        if tasks and self.policy.guard.model_critics:
            for (index, _), critique in zip(tasks, self.critic.critique([t for _, t in tasks])):
                out[index].append(critique)
        return out

    def revise(self, conversation, response: str, principle: str, critique: str | None = None) -> Revision:
        """One revision of ``response`` for ``principle`` (rule repair when the rules can fix it, else the model)."""
        conv = as_conversation(conversation)
        p = self.constitution.principle(principle)
        task = RevisionTask(
            conversation=conv, response=response, principle=p, critique=critique, examples=self.constitution.examples
        )
        return self.revise_batch([task])[0]

    def revise_batch(self, tasks: Sequence[RevisionTask]) -> list[Revision]:
        return self.reviser.revise(list(tasks))

    def compare(
        self, conversation, response_a: str, response_b: str, principles: Sequence[str] | None = None
    ) -> Judgement:
        """Which response follows the principles better (both orders, averaged); defaults to every rl principle."""
        chosen = (
            [self.constitution.principle(p) for p in principles]
            if principles
            else self.constitution.for_phase(Phase.rl)
        )
        task = ComparisonTask(
            conversation=as_conversation(conversation),
            response_a=response_a,
            response_b=response_b,
            principles=chosen,
            examples=self.constitution.comparison_examples,
        )
        return self.judge.compare([task])[0]

    # -- the guard -------------------------------------------------------------------------------------------

    def check_input(self, conversation) -> tuple[list[Violation], str | None]:
        """The input rail: the runtime principles' rules and plugin checks applied to the last user message (the
        earlier turns are its context). Returns the violations and, where every one of them can be repaired
        deterministically, the redacted message (None when something cannot be)."""
        conversation = as_conversation(conversation)
        last = max((i for i, m in enumerate(conversation) if m.role == "user"), default=None)
        if last is None:
            return [], None
        context, text = conversation[:last], conversation[last].content
        violations = self.deterministic_violations(context, text)
        if not violations:
            return [], text
        redacted = text
        by_id = {p.id: p for p in self.runtime_principles}
        for pid in sorted({v.principle_id for v in violations}, key=lambda p: -by_id[p].authority):
            for critic in sorted({v.critic for v in violations if v.principle_id == pid}):
                repairer = self.repairer(critic)
                if repairer is None:
                    return violations, None
                revision = repairer.revise(
                    [
                        RevisionTask(
                            conversation=context or [Message(role="user", content="")],
                            response=redacted,
                            principle=by_id[pid],
                        )
                    ]
                )[0]
                if not revision.accepted:
                    return violations, None
                redacted = revision.text
        return violations, redacted

    def guard(self, conversation, response: str) -> GuardResult:
        """Check ``response`` against the policy and act on violations (revise, refuse or flag)."""
        return self.guard_batch([(conversation, response)])[0]

    async def aguard(self, conversation, response: str) -> GuardResult:
        """The guard for async web services: runs in a worker thread so the event loop stays free."""
        return await asyncio.to_thread(self.guard, conversation, response)

    async def aguard_batch(self, items) -> list[GuardResult]:
        return await asyncio.to_thread(self.guard_batch, items)

    def guard_batch(self, items) -> list[GuardResult]:
        """Guard many (conversation, response) pairs; model work is batched across them."""
        return Guard(self).run(items)

    def deterministic_violations(self, conversation: list[Message], text: str) -> list[Violation]:
        """What the runtime principles' rules and plugin checks find in ``text`` (no model; milliseconds)."""
        context = conversation or [Message(role="user", content="")]
        violations: list[Violation] = []
        for principle in self.runtime_principles:
            if principle.rules:
                violations += check_principle(principle, conversation, text)
            for name in principle.checks:  # deterministic critics a plugin ships for its principles
                task = CritiqueTask(conversation=context, response=text, principle=principle)
                critique = self.check_critic(name).critique([task])[0]
                if critique.violations:
                    violations += critique.violations
                elif critique.needs_revision:
                    violations.append(
                        Violation(
                            principle_id=principle.id,
                            evidence=critique.text,
                            message=principle.title or principle.id,
                            critic=name,
                        )
                    )
        return violations

    def check_critic(self, name: str):
        """The deterministic critic a principle names in ``checks:``, built once."""
        if name not in self._checks:
            self._checks[name] = self.runtime.component("critic", name)
        return self._checks[name]

    def repairer(self, critic_name: str):
        """The deterministic reviser for violations found by ``critic_name`` (None: only the model can fix them)."""
        if critic_name == "rules":
            return self.rule_reviser
        if critic_name in self.runtime.registry.names("reviser") and critic_name != self.policy.critic.name:
            if critic_name not in self._repairers:
                self._repairers[critic_name] = self.runtime.component("reviser", critic_name)
            return self._repairers[critic_name]
        return None

    def refusal_text(self, violations: list[Violation]) -> str:
        """The policy's refusal message naming the violated principles."""
        return Guard(self).refusal(violations)
