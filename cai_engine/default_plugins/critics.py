"""Built-in critics."""

from __future__ import annotations

from cai_engine.components import Critic
from cai_engine.hookspecs import hookimpl
from cai_engine.records import Critique
from cai_engine.rules import check_principle


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


@hookimpl
def cai_register_critics(register):
    register(RuleCritic)
