"""The ``rules`` critic and reviser: a constitution's deterministic rules, checked and repaired without a model.

An essential built-in (``plugins.ESSENTIAL_PLUGINS``): the guard checks every response with them, so they cannot be
blocked. Like any critic/reviser pair registered under the same name, the reviser repairs what the critic finds.
"""

from __future__ import annotations

from cai_engine import RULES, Critic, Critique, Reviser, Revision, check_principle, hookimpl, repair


class RuleCritic(Critic):
    """Checks a principle's deterministic ``rules`` (regular expressions); no model, milliseconds per response.

    A principle without rules is reported as compliant with ``needs_revision=None`` (this critic cannot tell).
    """

    name = RULES

    def critique(self, tasks):
        out = []
        for task in tasks:
            if not task.principle.rules:
                out.append(Critique(principle_id=task.principle.id, text="", needs_revision=None, critic=self.name))
                continue
            violations = check_principle(task.principle, task.conversation, task.response, self.name)
            text = "; ".join(f"{v.message} (rule {v.rule_id}: {v.evidence!r})" for v in violations)
            out.append(
                Critique(
                    principle_id=task.principle.id,
                    text=text or "No rule is violated.",
                    needs_revision=bool(violations),
                    violations=violations,
                    critic=self.name,
                )
            )
        return out


class RuleReviser(Reviser):
    """Repairs rule violations with each rule's ``fix`` (redact a match, append a required caveat).

    Keeps what is safe in the response rather than refusing. A violated rule without a ``fix`` cannot be
    repaired here: the revision is rejected with that reason, so a model reviser can take over.
    """

    name = RULES

    def revise(self, tasks):
        out = []
        for task in tasks:
            text, unfixed = repair(task.principle, task.conversation, task.response)
            if unfixed:
                out.append(
                    Revision(
                        principle_id=task.principle.id,
                        text=task.response,
                        accepted=False,
                        reason=f"no automatic fix for rule(s) {', '.join(unfixed)}",
                        reviser=self.name,
                    )
                )
            else:
                out.append(Revision(principle_id=task.principle.id, text=text, accepted=True, reviser=self.name))
        return out


@hookimpl
def cai_register_critics(register):
    register(RuleCritic)


@hookimpl
def cai_register_revisers(register):
    register(RuleReviser)
