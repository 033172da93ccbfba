"""What the runtime guard works with, built once per policy: the resolved constitution, the critic, reviser and judge
(models load on first use), the deterministic checks and their repairs, the refusal text and the audit.

An :class:`~cai_engine.guard.engine.Engine` builds one :class:`GuardComponents` and hands it to every
:class:`~cai_engine.guard.loop.Guard` pass; the bundle knows nothing of the engine.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

from cai_engine.checks.rules import RULES, RuleIndex, check_principle
from cai_engine.constitution.model import Constitution, Message, Phase, Principle
from cai_engine.errors import ConfigError
from cai_engine.guard.audit import JsonlAuditSink, audit_record
from cai_engine.guard.policy import Policy, resolve_policy
from cai_engine.models.options import ModelOptions
from cai_engine.models.runtime import Runtime
from cai_engine.plugins.refs import ComponentRef
from cai_engine.records import CritiqueTask, GuardResult, Violation
from cai_engine.text.textnorm import fold


class GuardComponents:
    """A policy's guard components on one runtime.

    Building it resolves the policy's constitution and validates every component's options, so a bad policy fails
    here, before any model loads; the critic, reviser and judge are built on first use. When the policy names an
    audit file, its sink is registered on the runtime's plugin manager until :meth:`close`.
    """

    def __init__(self, policy: Policy, runtime: Runtime, base_dir: Path | None = None) -> None:
        self.policy = policy
        self.runtime = runtime
        self.constitution: Constitution = resolve_policy(policy, runtime.registry, base_dir)
        self.principles: list[Principle] = self.constitution.for_phase(Phase.runtime)
        # Validate every component's options now, before any model loads (models load on first use).
        self.critic_ref: ComponentRef | None = None  # only a policy that critiques or revises with a model has one
        if policy.guard.model_critics or policy.guard.action == "revise":
            # guard.threshold is a model critic's P(needs revision) cut-off; a critic with its own calibration (a
            # classifier's threshold: None means the calibrated one) is not given it.
            critic_class = runtime.registry.component("critic", policy.critic.name)
            model_critic = issubclass(getattr(critic_class, "Options", object), ModelOptions)
            extra = {"threshold": policy.guard.threshold} if model_critic else {}
            self.critic_ref = policy.role(policy.critic, "critic", runtime, **extra)
            self.critic_ref.build("critic", runtime)
            policy.role(policy.reviser, "reviser", runtime).build("reviser", runtime)
        policy.role(policy.judge, "judge", runtime).build("judge", runtime)
        self._checks: dict[str, Any] = {}
        self._rail_checks: dict[str, Any] = {}
        self._classifiers_active: bool | None = None
        self._repairers: dict[str, Any] = {}
        self._build_lock = threading.RLock()  # serve's worker threads build these caches concurrently
        for principle in self.principles:  # unknown plugin critics fail now, not mid-request
            for name in principle.checks:
                self.check_critic(name)
        self.audit_sink: JsonlAuditSink | None = None
        if policy.audit.path:
            path = Path(policy.audit.path)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            self.audit_sink = JsonlAuditSink(path)
            runtime.pm.register(self.audit_sink)
        self.policy_info = {
            "name": policy.name,
            "version": policy.version,
            "constitution_hash": self.constitution.content_hash(),
        }

    def model_problems(self) -> list[tuple[str, str]]:
        """``(role, problem)`` for each model the guard would load that cannot be found (checked without loading:
        a missing folder or file, a catalogue model not installed). Endpoints are not contacted."""
        roles = []
        if self.policy.guard.model_critics and self.critic_ref is not None:
            roles.append(("critic", self.critic_ref))
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

    def close(self) -> None:
        """Flush and unregister the audit sink (a no-op without one, or when already closed)."""
        if self.audit_sink is not None:
            self.audit_sink.close()  # fsync what was written
            self.runtime.pm.unregister(self.audit_sink)
            self.audit_sink = None

    # -- components, built once ------------------------------------------------------------------------------

    @functools.cached_property
    def rule_index(self) -> RuleIndex | None:
        """The runtime principles' rule patterns in one RE2 set, when there are enough of them to be worth it."""
        if sum(len(p.rules) for p in self.principles) < RuleIndex.MIN_RULES:
            return None
        return RuleIndex([p for p in self.principles if p.rules])

    @functools.cached_property
    def rule_critic(self):
        return self.runtime.component("critic", RULES)

    @functools.cached_property
    def rule_reviser(self):
        return self.runtime.component("reviser", RULES)

    @functools.cached_property
    def critic(self):
        if self.critic_ref is None:
            raise ConfigError(f"policy {self.policy.name!r} neither critiques nor revises with a model")
        return self.critic_ref.build("critic", self.runtime)

    @functools.cached_property
    def reviser(self):
        return self.policy.role(self.policy.reviser, "reviser", self.runtime).build("reviser", self.runtime)

    @functools.cached_property
    def judge(self):
        if self.policy.model_free:
            raise ConfigError(f"policy {self.policy.name!r} says model: none, so nothing can judge a comparison")
        return self.policy.role(self.policy.judge, "judge", self.runtime).build("judge", self.runtime)

    def check_critic(self, name: str):
        """The deterministic critic a principle names in ``checks:``, built once."""
        with self._build_lock:
            if name not in self._checks:
                self._checks[name] = self.runtime.component("critic", name)
            return self._checks[name]

    def check_classifiers_active(self) -> bool:
        """Whether any plugin check of the policy consults a classifier on answers (``with_classifier``); the first
        call loads those classifiers (seconds), later ones are free."""
        with self._build_lock:
            if self._classifiers_active is None:
                self._classifiers_active = any(
                    getattr(self.check_critic(name), "classifier_active", lambda: False)()
                    for principle in self.principles
                    for name in principle.checks
                )
            return self._classifiers_active

    def rail_check(self, name: str):
        """The check as the rails run it (a request, a stream's window, a tool call's arguments: not a whole answer),
        or None when it has no place there. A check backed by a classifier (``with_classifier``) runs on its rules
        alone: its classifier was trained on whole answers, and on a question or half an answer it flags what is not a
        violation. A check that judges only whole answers (``Critic.answers_only``: a missing caveat) is skipped."""
        critic = self.rules_check(name)
        return None if getattr(type(critic), "answers_only", False) else critic

    def rules_check(self, name: str):
        """The check without its classifier, when it has one (``with_classifier``): the same class, so a subclass's
        overrides stay, told not to consult it."""
        with self._build_lock:
            if name not in self._rail_checks:
                self._rail_checks[name] = self.check_critic(name).rules_only()
            return self._rail_checks[name]

    def repairer(self, critic_name: str, *, rail: bool = False):
        """The deterministic reviser for violations found by ``critic_name`` (None: only the model can fix them).
        ``rail``: the reviser for a rail's text, which is not an answer: one that also repairs what a classifier
        flagged (``with_classifier_repair``) repairs there by its rules alone."""
        if critic_name == RULES:
            return self.rule_reviser
        if critic_name in self.runtime.registry.names("reviser") and critic_name != self.policy.critic.name:
            with self._build_lock:
                if critic_name not in self._repairers:
                    self._repairers[critic_name] = self.runtime.component("reviser", critic_name)
                    self._repairers[f"{critic_name} (rail)"] = self._repairers[critic_name].rules_only()
                return self._repairers[f"{critic_name} (rail)" if rail else critic_name]
        return None

    # -- what the guard asks of them -------------------------------------------------------------------------

    def deterministic_violations(
        self, conversation: list[Message], text: str, *, rail: bool = False
    ) -> list[Violation]:
        """What the runtime principles' rules and plugin checks find in ``text`` (milliseconds; a check backed by a
        classifier adds its classifier's tens). ``rail``: ``text`` is not a whole answer but what a rail checks (a
        request, a stream's window, a tool call's arguments), so such checks run on their rules alone, and checks
        that judge only whole answers not at all (see ``rail_check``)."""
        context = conversation or [Message(role="user", content="")]
        folded = fold(text).text
        violations: list[Violation] = []
        index = self.rule_index
        present = index.present(text) if index is not None else None
        for principle in self.principles:
            if principle.rules:
                if index is not None:
                    violations += index.violations(principle, conversation, text, present)
                else:
                    violations += check_principle(principle, conversation, text)
            for name in principle.checks:  # deterministic critics a plugin ships for its principles
                task = CritiqueTask(conversation=context, response=text, principle=principle)
                check = self.rail_check(name) if rail else self.check_critic(name)
                if check is None:
                    continue
                # the check reads the text as sent; a respelling it would miss is looked for in the folded text too
                # (its repair then works on the original: a reviser that cannot find what it would remove declines,
                # fail closed; a caveat reviser adds the caveat the answer lacks). A classifier reads both in one
                # call (folding garbles some non-Latin text, so neither alone is enough).
                first = self.rules_check(name) if folded != text else check
                critique = first.critique([task])[0]
                if not critique.violations and not critique.needs_revision and folded != text:
                    again = CritiqueTask(conversation=context, response=folded, principle=principle)
                    if first is check:  # no classifier: the text as sent was read in full already
                        critique = check.critique([again])[0]
                    else:
                        sent, folded_critique = check.critique([task, again])
                        critique = sent if sent.violations or sent.needs_revision else folded_critique
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

    def refusal(self, violations: list[Violation]) -> str:
        """The policy's refusal message naming the violated principles."""
        titles = []
        for v in violations:
            principle = self.constitution.principle(v.principle_id)
            title = principle.title or principle.id
            if title not in titles:
                titles.append(title)
        return self.policy.guard.refusal.format(principles="; ".join(titles))

    def audit(self, conversation: list[Message], result: GuardResult) -> None:
        """Emit the audit record of one decision (kind ``guard``) to every ``cai_on_record`` observer, the policy's
        audit file among them."""
        self.runtime.emit(audit_record(conversation, result, self.policy_info, self.policy.audit.include_text), "guard")
