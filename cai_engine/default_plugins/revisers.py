"""Built-in revisers: model revisions, from-scratch rewrites, and the constitutional ensemble."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cai_engine import (
    ComparisonTask,
    ComponentRef,
    CritiqueTask,
    Message,
    ModelComponent,
    ModelOptions,
    Options,
    Reviser,
    Revision,
    RevisionTask,
    ScoringTask,
    hookimpl,
)
from cai_engine.default_plugins.critics import few_shot_examples
from cai_engine.text.layouts import (
    REVISION_STOPS,
    TURN_MARKERS,
    chat_revision,
    clean_revision,
    rewrite_guidance,
    transcript,
    transcript_block,
)


class ModelReviser(ModelComponent, Reviser):
    """Asks a model to rewrite the response per the principle's revision request (after the critique, if any).

    The output is cleaned of role leakage and preambles ("Sure, here is a revised response:"); an empty revision
    or one that copies the critique is rejected and the response is kept.
    """

    name = "model"

    class Options(ModelOptions):
        max_new_tokens: int = Field(192, ge=1, le=4096, description="Upper bound on a revision's tokens.")

    def _prompt(self, task: RevisionTask):
        critique_request = task.principle.critique_request or task.principle.comparison or ""
        revision_request = task.principle.revision_request or "Rewrite the reply so it follows the principle."
        examples = few_shot_examples(task, self.options.few_shot)
        if self.chat:
            return chat_revision(
                examples, task.conversation, task.response, critique_request, task.critique, revision_request
            )
        with_critique = task.critique is not None
        shots = "".join(
            transcript_block(
                e.conversation,
                e.response,
                critique_request if with_critique else None,
                e.critique if with_critique else None,
                revision_request,
                e.revision,
            )
            for e in examples
        )
        return shots + transcript_block(
            task.conversation,
            task.response,
            critique_request if with_critique else None,
            task.critique,
            revision_request,
        )

    def revise(self, tasks):
        tasks = list(tasks)
        if not tasks:
            return []
        raws = self.backend.generate([self._prompt(t) for t in tasks], self.settings(stop=REVISION_STOPS))
        out = []
        for task, raw in zip(tasks, raws):
            text, reason = clean_revision(raw, task.response, task.critique)
            out.append(
                Revision(
                    principle_id=task.principle.id,
                    text=text if text is not None else task.response,
                    accepted=text is not None,
                    reason=reason,
                    raw=raw,
                    reviser=self.name,
                )
            )
        return out


class RewriteReviser(ModelReviser):
    """Writes, from scratch, the reply the assistant should have given under the principle.

    The model sees the conversation and what the reply will be judged by (the principle's comparison question, or
    its revision request), never the response being replaced, so a harmful draft cannot anchor it. With a capable
    feedback model this gives cleaner phase-1 targets than editing a small policy's answer; it is CAI's
    critique -> revision step with the critique and the draft removed (a form of context distillation).
    """

    name = "rewrite"

    class Options(ModelOptions):
        max_new_tokens: int = Field(256, ge=1, le=4096, description="Upper bound on the reply's tokens.")
        few_shot: int = Field(0, ge=0, le=0, description="Unused: the reply is written from the principle alone.")

    def _prompt(self, task: RevisionTask):
        principle = task.principle
        guidance = rewrite_guidance(principle)
        conversation = list(task.conversation)
        if self.chat:
            if conversation and conversation[0].role == "system":
                conversation[0] = Message(role="system", content=f"{conversation[0].content.strip()}\n\n{guidance}")
            else:
                conversation.insert(0, Message(role="system", content=guidance))
            return conversation
        return f"{guidance}{transcript(conversation)}"

    def revise(self, tasks):
        tasks = list(tasks)
        if not tasks:
            return []
        stops = () if self.chat else TURN_MARKERS
        raws = self.backend.generate([self._prompt(t) for t in tasks], self.settings(stop=stops))
        out = []
        for task, raw in zip(tasks, raws):
            text, reason = clean_revision(raw, task.response, None)
            out.append(
                Revision(
                    principle_id=task.principle.id,
                    text=text if text is not None else task.response,
                    accepted=text is not None,
                    reason=reason,
                    raw=raw,
                    reviser=self.name,
                )
            )
        return out


class EnsembleMember(BaseModel):
    model_config = ConfigDict(extra="forbid")

    critic: ComponentRef | None = Field(None, description="Critic for this member (None: direct revision).")
    reviser: ComponentRef = Field(description="Reviser for this member, typically on its own model.")


class EnsembleReviser(Reviser):
    """The constitutional ensemble: several critic/reviser members propose revisions; a judge panel votes.

    ``vote: pairwise`` compares every pair of candidates with every judge in both orders and picks the candidate
    with the highest mean preference; ``vote: pointwise`` picks the highest mean 1-10 score. Every candidate and
    every vote are kept in ``Revision.details``. Abstentions are counted, never turned into votes.
    """

    name = "ensemble"

    class Options(Options):
        members: list[EnsembleMember] = Field(min_length=2, description="Two or more critic/reviser members.")
        judges: list[ComponentRef] = Field(
            default_factory=lambda: [ComponentRef(name="logprob")], min_length=1, description="The voting panel."
        )
        vote: Literal["pairwise", "pointwise"] = Field("pairwise", description="How the panel votes.")

    def __init__(self, options=None, runtime=None) -> None:
        super().__init__(options, runtime)
        # Build members and judges now, so every nested option is validated before any model loads.
        self.members = [
            (m.critic.build("critic", self.runtime) if m.critic else None, m.reviser.build("reviser", self.runtime))
            for m in self.options.members
        ]
        self.judges = [j.build("judge", self.runtime) for j in self.options.judges]

    def revise(self, tasks):
        tasks = list(tasks)
        proposals: list[list[tuple[int, Revision]]] = [[] for _ in tasks]
        critiques_by_member = []
        for index, (critic, reviser) in enumerate(self.members):
            critiques = (
                critic.critique(
                    [
                        CritiqueTask(
                            conversation=t.conversation, response=t.response, principle=t.principle, examples=t.examples
                        )
                        for t in tasks
                    ]
                )
                if critic
                else [None] * len(tasks)
            )
            critiques_by_member.append(critiques)
            revision_tasks = [
                t.model_copy(update={"critique": c.text if c else t.critique}) for t, c in zip(tasks, critiques)
            ]
            for k, revision in enumerate(reviser.revise(revision_tasks)):
                if revision.accepted:
                    proposals[k].append((index, revision))
        return [
            self._vote(task, props, [c[k] for c in critiques_by_member])
            for k, (task, props) in enumerate(zip(tasks, proposals))
        ]

    def _vote(self, task: RevisionTask, props, critiques) -> Revision:
        candidates = [
            {"member": i, "text": r.text, "reviser": r.reviser, "critique": critiques[i].text if critiques[i] else None}
            for i, r in props
        ]
        if not props:
            return Revision(
                principle_id=task.principle.id,
                text=task.response,
                accepted=False,
                reason="no ensemble member produced an acceptable revision",
                reviser=self.name,
                details={"candidates": candidates, "votes": []},
            )
        scores = [0.0] * len(props)
        counts = [0] * len(props)
        votes, abstained = [], 0
        if len(props) == 1:
            winner: int | None = 0
        elif self.options.vote == "pairwise":
            pairs = [(a, b) for a in range(len(props)) for b in range(a + 1, len(props))]
            for judge in self.judges:
                verdicts = judge.compare(
                    [
                        ComparisonTask(
                            conversation=task.conversation,
                            response_a=props[a][1].text,
                            response_b=props[b][1].text,
                            principles=[task.principle],
                        )
                        for a, b in pairs
                    ]
                )
                for (a, b), verdict in zip(pairs, verdicts):
                    votes.append(
                        {"judge": judge.name, "a": a, "b": b, "p_a": verdict.p_a, "abstained": verdict.abstained}
                    )
                    if verdict.p_a is None:
                        abstained += 1
                        continue
                    scores[a] += verdict.p_a
                    scores[b] += 1 - verdict.p_a
                    counts[a] += 1
                    counts[b] += 1
            winner = _argmax(scores, counts)
        else:
            for judge in self.judges:
                results = judge.score(
                    [
                        ScoringTask(conversation=task.conversation, response=r.text, principles=[task.principle])
                        for _, r in props
                    ]
                )
                for c, result in enumerate(results):
                    votes.append(
                        {"judge": judge.name, "candidate": c, "value": result.value, "abstained": result.abstained}
                    )
                    if result.value is None:
                        abstained += 1
                        continue
                    scores[c] += result.value
                    counts[c] += 1
            winner = _argmax(scores, counts)
        details = {
            "candidates": candidates,
            "votes": votes,
            "abstentions": abstained,
            "winner": winner,
            "mean_scores": [s / c if c else None for s, c in zip(scores, counts)],
        }
        if winner is None:
            return Revision(
                principle_id=task.principle.id,
                text=task.response,
                accepted=False,
                reason="every judge abstained on every comparison",
                reviser=self.name,
                details=details,
            )
        return Revision(
            principle_id=task.principle.id,
            text=props[winner][1].text,
            accepted=True,
            reviser=self.name,
            details=details,
        )


def _argmax(scores: list[float], counts: list[int]) -> int | None:
    means = [s / c if c else None for s, c in zip(scores, counts)]
    ranked = [(m, -i) for i, m in enumerate(means) if m is not None]
    if not ranked:
        return 0 if len(scores) == 1 else None
    return -max(ranked)[1]


@hookimpl
def cai_register_revisers(register):
    register(ModelReviser)
    register(RewriteReviser)
    register(EnsembleReviser)
