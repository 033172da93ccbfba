"""Built-in revisers."""

from __future__ import annotations

from cai_engine.components import Reviser
from cai_engine.hookspecs import hookimpl
from cai_engine.records import Revision
from cai_engine.rules import repair


class RuleReviser(Reviser):
    """Repairs rule violations with each rule's ``fix`` (redact a match, append a required caveat).

    Keeps what is safe in the response rather than refusing. A violated rule without a ``fix`` cannot be
    repaired here: the revision is rejected with that reason, so a model reviser can take over.
    """

    name = "rules"

    def revise(self, tasks):
        out = []
        for task in tasks:
            text, unfixed = repair(task.principle, task.conversation, task.response)
            if unfixed:
                out.append(Revision(principle_id=task.principle.id, text=task.response, accepted=False,
                                    reason=f"no automatic fix for rule(s) {', '.join(unfixed)}", reviser=self.name))
            else:
                out.append(Revision(principle_id=task.principle.id, text=text, accepted=True, reviser=self.name))
        return out


@hookimpl
def cai_register_revisers(register):
    register(RuleReviser)
