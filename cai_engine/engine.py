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
import hashlib
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError
from .hookspecs import hookimpl
from .models import Constitution, Message, Phase, Principle
from .policy import Policy, load_policy, resolve_policy
from .records import (
    ComparisonTask,
    Critique,
    CritiqueTask,
    Judgement,
    Revision,
    RevisionTask,
    Violation,
    as_conversation,
)
from .rules import check_principle
from .runs import now
from .runtime import Runtime


class GuardRound(BaseModel):
    model_config = ConfigDict(extra="forbid")

    round: int
    violations: list[Violation]
    revisions: list[dict[str, Any]] = Field(default_factory=list)
    abstentions: list[str] = Field(
        default_factory=list,
        description="Principle ids (or 'screen', 'request') the model critic could not give a verdict on.",
    )
    request_p: float | None = Field(None, description="screen 'request': P(the request asks for harm), if asked.")


class GuardResult(BaseModel):
    """What the guard decided about one response."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="The audit id of this decision.")
    response: str = Field(description="The response to send: original, revised, or a refusal.")
    original: str
    compliant: bool = Field(description="True when the returned response violates nothing that was checked.")
    action: Literal["none", "revised", "refused", "flagged"]
    violations: list[Violation] = Field(
        description="Violations of the returned response (the original's when flagged or refused)."
    )
    abstained: bool = Field(
        False,
        description="The model critic could not decide on something (see rounds); with "
        "on_abstain 'flag' the response is flagged for review.",
    )
    rounds: list[GuardRound]
    timings_ms: dict[str, float]
    policy: dict[str, str]


class JsonlAuditSink:
    """The default audit sink: appends every record of the given kinds to a JSONL file (thread-safe)."""

    def __init__(self, path: str | Path, kinds: Sequence[str] = ("guard", "guard_run", "serve")) -> None:
        self.path = Path(path)
        self.check(self.path)
        self.kinds = set(kinds)
        self._lock = threading.Lock()

    @staticmethod
    def check(path: Path) -> None:
        """Refuse an audit path that could never be written, without creating anything (validation has no side
        effects; the folders are made on the first record)."""
        if path.is_dir():
            raise ConfigError(f"audit.path {path} is a folder; name a .jsonl file")
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ConfigError(f"audit.path {path}: {ancestor} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ConfigError(f"audit.path {path}: cannot be written (permission denied)")

    @hookimpl
    def cai_on_record(self, record, kind):
        if kind not in self.kinds:
            return
        line = json.dumps({"kind": kind, **record}, ensure_ascii=False, default=str) + "\n"
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(line)
                    handle.flush()
            except OSError as exc:
                raise ConfigError(f"cannot append to the audit log {self.path}: {exc.strerror or exc}") from None


def _sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


class Engine:
    """A policy bound to a runtime: critique, revise, compare and guard, single or batched, sync or async."""

    def __init__(self, policy: Policy, *, runtime: Runtime | None = None, base_dir: Path | None = None) -> None:
        self.policy = policy
        self.runtime = runtime or Runtime.default()
        self.constitution: Constitution = resolve_policy(policy, self.runtime.registry, base_dir)
        self.runtime_principles = self.constitution.for_phase(Phase.runtime)
        # Validate every component's options now, before any model loads (models load on first use).
        if policy.guard.model_critics or policy.guard.action == "revise":
            self._critic_ref = (
                policy.role(policy.critic, threshold=policy.guard.threshold)
                if policy.critic.name == "model"
                else policy.critic
            )
            self._critic_ref.build("critic", self.runtime)
            policy.role(policy.reviser).build("reviser", self.runtime)
        policy.role(policy.judge).build("judge", self.runtime)
        self._checks: dict[str, Any] = {}
        self._repairers: dict[str, Any] = {}
        for principle in self.runtime_principles:  # unknown plugin critics fail now, not mid-request
            for name in principle.checks:
                self._check_critic(name)
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
            roles.append(("reviser", self.policy.role(self.policy.reviser)))
        roles.append(("judge", self.policy.role(self.policy.judge)))
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
        return self.policy.role(self.policy.reviser).build("reviser", self.runtime)

    @functools.cached_property
    def judge(self):
        return self.policy.role(self.policy.judge).build("judge", self.runtime)

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
        violations: list[Violation] = []
        for principle in self.runtime_principles:
            if principle.rules:
                violations += check_principle(principle, context, text)
            for name in principle.checks:
                critique = self._check_critic(name).critique(
                    [
                        CritiqueTask(
                            conversation=context or [Message(role="user", content="")],
                            response=text,
                            principle=principle,
                        )
                    ]
                )[0]
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
        if not violations:
            return [], text
        redacted = text
        by_id = {p.id: p for p in self.runtime_principles}
        for pid in sorted({v.principle_id for v in violations}, key=lambda p: -by_id[p].authority):
            for critic in sorted({v.critic for v in violations if v.principle_id == pid}):
                repairer = self._repairer(critic)
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
        settings = self.policy.guard
        began = time.perf_counter()
        states = []
        for conversation, response in items:
            states.append(
                {
                    "conversation": as_conversation(conversation),
                    "original": response,
                    "current": response,
                    "rounds": [],
                    "rules_ms": 0.0,
                    "model_ms": 0.0,
                    "rng": random.Random(f"{settings.seed}:{_sha(response)}"),
                    "done": False,
                    "violations": [],
                    "first_violations": None,
                }
            )
        for round_index in range(settings.max_rounds + 1):
            live = [s for s in states if not s["done"]]
            if not live:
                break
            self._check(live, round_index)
            for state in live:
                if state["first_violations"] is None:
                    state["first_violations"] = state["violations"]
                if not state["violations"] or settings.action != "revise" or round_index == settings.max_rounds:
                    state["done"] = True
            to_fix = [s for s in live if not s["done"]]
            if to_fix:
                self._revise(to_fix)
        results = [self._finish(state, began) for state in states]
        return results

    def _check(self, states, round_index: int) -> None:
        settings = self.policy.guard
        model_tasks = []
        screen_tasks = []
        request_tasks = []
        attribute_tasks = []
        for state in states:
            began = time.perf_counter()
            violations: list[Violation] = []
            critiques: dict[str, Critique] = {}
            for principle in self.runtime_principles:  # rule critics first: cheap, deterministic
                if principle.rules:
                    violations += check_principle(principle, state["conversation"], state["current"])
                for name in principle.checks:  # deterministic critics a plugin ships for its principles
                    task = CritiqueTask(
                        conversation=state["conversation"], response=state["current"], principle=principle
                    )
                    critique = self._check_critic(name).critique([task])[0]
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
            state["rules_ms"] += (time.perf_counter() - began) * 1000
            state["violations"], state["critiques"] = violations, critiques
            state["rounds"].append(GuardRound(round=round_index, violations=[]))
            if settings.model_critics:
                candidates = [p for p in self.runtime_principles if p.critique_request or p.violation_question]
                if settings.model_principles != "all" and candidates:
                    k = min(int(settings.model_principles), len(candidates))
                    candidates = state["rng"].sample(candidates, k) if k < len(candidates) else candidates
                if settings.screen == "request" and candidates:
                    if "request_p" not in state:
                        request_tasks.append((state, candidates))
                    elif state["request_p"] is not None and state["request_p"] > settings.request_threshold:
                        attribute_tasks.append((state, candidates))
                    continue
                if settings.screen == "combined" and candidates:
                    screen_tasks.append((state, candidates))
                    continue
                model_tasks += [
                    (
                        state,
                        CritiqueTask(
                            conversation=state["conversation"],
                            response=state["current"],
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
            probabilities = screen_requests([s["conversation"] for s, _ in request_tasks], settings.request_question)
            for (state, candidates), p in zip(request_tasks, probabilities):
                state["request_p"] = p
                state["rounds"][-1].request_p = p
                if p is None:
                    self._abstained(state, None, what="request")
                elif p > settings.request_threshold:
                    attribute_tasks.append((state, candidates))
            elapsed = (time.perf_counter() - began) * 1000 / max(len(states), 1)
            for state in states:
                state["model_ms"] += elapsed
        if attribute_tasks:  # a harmful request: a reply that does not refuse is a violation
            began = time.perf_counter()
            self._complied(attribute_tasks)
            elapsed = (time.perf_counter() - began) * 1000 / max(len(states), 1)
            for state in states:
                state["model_ms"] += elapsed
        if screen_tasks:
            began = time.perf_counter()
            self._screen(screen_tasks)
            elapsed = (time.perf_counter() - began) * 1000 / max(len(states), 1)
            for state in states:
                state["model_ms"] += elapsed
        if model_tasks:
            began = time.perf_counter()
            results = self.critic.critique([t for _, t in model_tasks])
            elapsed = (time.perf_counter() - began) * 1000 / max(len(states), 1)
            for state in states:
                state["model_ms"] += elapsed
            for (state, task), critique in zip(model_tasks, results):
                if critique.needs_revision is None:
                    self._abstained(state, task.principle)
                    continue
                if critique.needs_revision:
                    state["violations"].append(
                        Violation(
                            principle_id=task.principle.id,
                            evidence=critique.text,
                            message=task.principle.title or task.principle.id,
                            critic=critique.critic,
                        )
                    )
                    state["critiques"][task.principle.id] = critique
        for state in states:
            state["rounds"][-1].violations = list(state["violations"])

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
            results = screen([(s["conversation"], s["current"]) for s, _ in members], candidates)
            for (state, _), result in zip(members, results):
                state["rounds"][-1].revisions.append({"screen": result})
                if result["p_yes"] is None:
                    self._abstained(state, None)
                elif result["principle_index"] is not None:
                    principle = candidates[result["principle_index"]]
                    state["violations"].append(
                        Violation(
                            principle_id=principle.id,
                            evidence=f"P(breaks a principle)={result['p_yes']:.2f}",
                            message=principle.title or principle.id,
                            critic=self.critic.name,
                        )
                    )

    def _complied(self, tasks) -> None:
        """screen 'request': the request asks for harm, so a reply that does not refuse breaks a principle; which one
        the critic names (its letters' log-probs). A small model cannot tell a harmful reply from a harmless one
        reliably, but the refusal phrases a reply starts or leads with are deterministic."""
        from .refusals import is_refusal

        complied = [(state, candidates) for state, candidates in tasks if not is_refusal(state["current"])]
        for state, _ in tasks:
            state["rounds"][-1].revisions.append(
                {
                    "request_screen": {
                        "p_harmful_request": state["request_p"],
                        "reply_refuses": is_refusal(state["current"]),
                    }
                }
            )
        groups: dict[tuple[str, ...], list] = {}
        for state, candidates in complied:
            groups.setdefault(tuple(p.id for p in candidates), []).append((state, candidates))
        attribute = getattr(self.critic, "attribute", None)
        for members in groups.values():
            candidates = members[0][1]
            indices = (
                attribute([(s["conversation"], s["current"]) for s, _ in members], candidates)
                if attribute is not None
                else [0] * len(members)
            )
            for (state, _), index in zip(members, indices):
                principle = candidates[index if index is not None else 0]
                state["violations"].append(
                    Violation(
                        principle_id=principle.id,
                        evidence=f"P(harmful request)={state['request_p']:.2f}; the reply does not refuse",
                        message=principle.title or principle.id,
                        critic=self.critic.name,
                    )
                )

    def _abstained(self, state, principle, what: str = "screen") -> None:
        """A model verdict that could not be read: flagged, revised or passed as the policy says; always recorded."""
        state["rounds"][-1].abstentions.append(principle.id if principle is not None else what)
        if self.policy.guard.on_abstain == "revise":
            target = principle or next(iter(self.runtime_principles))
            state["violations"].append(
                Violation(
                    principle_id=target.id,
                    evidence="no verdict",
                    message="the model critic could not give a verdict",
                    critic=self.critic.name,
                )
            )

    def _check_critic(self, name: str):
        if name not in self._checks:
            self._checks[name] = self.runtime.component("critic", name)
        return self._checks[name]

    def _repairer(self, critic_name: str):
        """The deterministic reviser for violations found by ``critic_name`` (None: only the model can fix them)."""
        if critic_name == "rules":
            return self.rule_reviser
        if critic_name in self.runtime.registry.names("reviser") and critic_name != self.policy.critic.name:
            if critic_name not in self._repairers:
                self._repairers[critic_name] = self.runtime.component("reviser", critic_name)
            return self._repairers[critic_name]
        return None

    def _revise(self, states) -> None:
        """Revise each violated principle, highest authority first; the next round re-checks everything.

        Violations found by deterministic critics are repaired by their revisers (milliseconds, no refusal); the
        rest, and any a deterministic reviser declines, go to the model reviser in one batch.
        """
        by_id = {p.id: p for p in self.runtime_principles}
        pending = {
            id(s): sorted({v.principle_id for v in s["violations"]}, key=lambda pid: -by_id[pid].authority)
            for s in states
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
                for v in state["violations"]:
                    if v.principle_id == pid and v.critic not in found_by:
                        found_by.append(v.critic)
                critique = state["critiques"].get(pid)
                repairers = [self._repairer(name) for name in found_by]
                needs_model = critique is not None or any(r is None for r in repairers)
                for repairer in [r for r in repairers if r is not None]:
                    task = RevisionTask(
                        conversation=state["conversation"],
                        response=state["current"],
                        principle=principle,
                        examples=self.constitution.examples,
                    )
                    revision = repairer.revise([task])[0]
                    self._apply(state, task, revision)
                    needs_model = needs_model or not revision.accepted
                if needs_model:
                    model_tasks.append(
                        (
                            state,
                            RevisionTask(
                                conversation=state["conversation"],
                                response=state["current"],
                                principle=principle,
                                critique=critique.text if critique else _rule_critique(state, pid),
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
                state["rules_ms"] += rules_elapsed / len(states)
                state["model_ms"] += model_elapsed / len(states)

    @staticmethod
    def _apply(state, task: RevisionTask, revision: Revision) -> None:
        state["rounds"][-1].revisions.append(
            {
                "principle_id": task.principle.id,
                "reviser": revision.reviser,
                "accepted": revision.accepted,
                "reason": revision.reason,
            }
        )
        if revision.accepted:
            state["current"] = revision.text

    def _finish(self, state, began: float) -> GuardResult:
        settings = self.policy.guard
        violations = state["violations"]
        abstained = any(r.abstentions for r in state["rounds"])
        if not state["first_violations"] and abstained and settings.on_abstain == "flag":
            action, response, compliant = "flagged", state["original"], False
        elif not state["first_violations"]:
            action, response, compliant = "none", state["original"], True
        elif settings.action == "flag":
            action, response, compliant = "flagged", state["original"], False
        elif settings.action == "refuse" or (violations and settings.on_failure == "refuse"):
            action, response, compliant = "refused", self._refusal(violations or state["first_violations"]), False
        elif violations:
            action, response, compliant = "flagged", state["current"], False
        else:
            action, response, compliant = "revised", state["current"], True
        if action in ("refused",):
            violations = violations or state["first_violations"]
        result = GuardResult(
            id=str(uuid.uuid4()),
            response=response,
            original=state["original"],
            compliant=compliant,
            action=action,
            violations=violations,
            rounds=state["rounds"],
            abstained=abstained,
            timings_ms={
                "rules": round(state["rules_ms"], 3),
                "model": round(state["model_ms"], 3),
                "total": round((time.perf_counter() - began) * 1000, 3),
            },
            policy=self.policy_info,
        )
        self.runtime.emit(self._audit_record(state, result), "guard")
        return result

    def _refusal(self, violations: list[Violation]) -> str:
        titles = []
        for v in violations:
            principle = self.constitution.principle(v.principle_id)
            title = principle.title or principle.id
            if title not in titles:
                titles.append(title)
        return self.policy.guard.refusal.format(principles="; ".join(titles))

    def _audit_record(self, state, result: GuardResult) -> dict[str, Any]:
        text = self.policy.audit.include_text
        conversation = [m.model_dump() for m in state["conversation"]]
        return {
            "id": result.id,
            "time": now(),
            "policy": self.policy_info,
            "action": result.action,
            "compliant": result.compliant,
            "abstained": result.abstained,
            "principle_ids": sorted({v.principle_id for r in result.rounds for v in r.violations}),
            "violations": [v.model_dump() for v in result.violations],
            "rounds": [r.model_dump() for r in result.rounds],
            "conversation": conversation if text else _sha(json.dumps(conversation, sort_keys=True)),
            "original": result.original if text else _sha(result.original),
            "response": result.response if text else _sha(result.response),
            "timings_ms": result.timings_ms,
        }


def _rule_critique(state, principle_id: str) -> str | None:
    messages = [v.message for v in state["violations"] if v.principle_id == principle_id and v.critic != "model"]
    return "; ".join(messages) or None
