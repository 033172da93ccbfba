"""The ``classifier`` critic: a compiled constitutional classifier used like any critic.

With an output classifier it scores each exchange (``critique``, and ``screen`` for the guard's ``screen: combined``,
one verdict per reply against all the principles at once); with an input classifier it scores the request alone
(``screen_requests``, for ``screen: request``, where a reply that does not refuse a harmful request is a violation).
Its request scores are re-centred on its calibrated threshold (a shift of the log-odds that maps the threshold to
0.5), so the guard's ``request_threshold`` (0.5 by default, the model critic's decision point) means the classifier's
own threshold, and a cascade's classifier and slower critic are compared with the guard's one cut: to move the cut,
set this critic's ``threshold`` (the band moves with it) and leave ``request_threshold`` at 0.5. Either way the
principle it names is the one whose own head gives the highest probability among those asked about.

With ``escalate`` it is the middle stage of a cascade (rules, then this classifier, then a slower critic): an item
whose probability falls in the uncertain band around the threshold is decided by the ``escalate`` critic instead, and
``stats`` counts how many were scored and how many escalated. With ``escalate_flags`` the band has no top: the
classifier only clears what it scores below ``threshold - band``, and every item it would flag is decided by the
slower critic (the cheap-first filter: the classifier's confident false flags cost an escalation instead of a false
flag, and the escalated share is about the share of the stream that looks violating).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from cai_engine import ComponentRef, ConfigError, Critic, Critique, Judge, Judgement, Score, load_classifier
from cai_engine import Options as BaseOptions


class ClassifierCritic(Critic):
    name = "classifier"

    class Options(BaseOptions):
        path: str = Field(description="A classifier folder made by `cai classifiers build`.")
        precision: Literal["auto", "float32", "bfloat16"] = Field(
            "auto",
            description="How a probe's base layers run: auto takes bfloat16 (about 1.6x faster; only a score right at "
            "the threshold can change its decision) where the CPU has it natively, float32 elsewhere. A probe built "
            "with --int8 always runs its 8-bit layers (auto) and refuses the others.",
        )
        threshold: float | None = Field(
            None,
            gt=0,
            lt=1,
            description="P(violation) above which a reply (or, with an input classifier, a request) is flagged, and "
            "the centre of the uncertain band; None: the calibrated one. Request scores reach the guard re-centred on "
            "it, so move the cut here, not with the guard's request_threshold.",
        )
        compile: bool = Field(
            False,
            description="Run a probe's float base layers through torch.compile: 1-5 ms faster one reply at a time at "
            "8 layers (6-25%, measured on one CPU), after a warm-up of some seconds when the critic loads (needs a C++ "
            "compiler; without one, a warning and the layers run uncompiled). Scores can move in the last digits, as "
            "with bfloat16. Loading another transformers model later in the process (a slower probe on the first "
            "escalation) costs one more compile.",
        )
        escalate: ComponentRef | None = Field(
            None,
            description="A slower critic (e.g. {name: model, options: {model: qwen2.5-coder-1.5b}}) that decides the "
            "items whose probability falls in the uncertain band; None: the classifier decides everything.",
        )
        band: float = Field(
            0.15,
            ge=0,
            lt=1,
            description="Half-width of the uncertain band: probabilities within this distance of the threshold are "
            "escalated (when `escalate` is set; with `escalate_flags`, every probability from threshold - band up).",
        )
        escalate_flags: bool = Field(
            False,
            description="Escalate every probability above the band too (when `escalate` is set): the classifier only "
            "clears items, the slower critic makes every flag. Fewer false flags than the band alone, more escalated "
            "on a stream with many violations.",
        )

        @model_validator(mode="after")
        def _flags_need_a_slower_critic(self):
            if self.escalate_flags and self.escalate is None:
                raise ValueError("escalate_flags needs escalate: the slower critic that makes every flag")
            return self

    def __init__(self, options=None, runtime=None) -> None:
        super().__init__(options, runtime)
        self._probe: Any = None
        self._escalate: Any = None
        self.stats = {"scored": 0, "escalated": 0}
        self.last_escalated: list[int] = []  # indices of the last call's items the slower critic decided

    @property
    def probe(self) -> Any:
        if self._probe is None:
            self._probe = load_classifier(
                self.options.path, precision=self.options.precision, compile=self.options.compile
            )
        return self._probe

    @property
    def threshold(self) -> float:
        return self.options.threshold if self.options.threshold is not None else self.probe.threshold()

    @property
    def escalation(self) -> Any:
        """The critic that decides the uncertain band (built on first use), or None."""
        if self._escalate is None and self.options.escalate is not None:
            self._escalate = self.options.escalate.build("critic", self.runtime)
        return self._escalate

    def uncertain(self, p: float) -> bool:
        if self.options.escalate is None:
            return False
        if self.options.escalate_flags:
            return p >= self.threshold - self.options.band
        return abs(p - self.threshold) <= self.options.band

    def _route(self, probabilities: Sequence[float]) -> list[int]:
        """The indices to escalate, counted in ``stats``."""
        out = [i for i, p in enumerate(probabilities) if self.uncertain(p)]
        self.last_escalated = out
        self.stats["scored"] += len(probabilities)
        self.stats["escalated"] += len(out)
        return out

    def _scores(self, items: Sequence[tuple[Any, str | None]]) -> list[dict[str, float]]:
        prompts = [_last_user(conversation) for conversation, _ in items]
        if self.probe.config.kind == "input":
            return self.probe.predict(prompts)
        return self.probe.predict(prompts, [reply or "" for _, reply in items])

    def _pick(self, scores: dict[str, float], principles: Sequence[Any]) -> int:
        """The index of the principle whose head is most confident (the first when none has a head)."""
        own = [(scores.get(p.id, -1.0), -k) for k, p in enumerate(principles)]
        return -max(own)[1]

    def critique(self, tasks):
        tasks = list(tasks)
        groups: dict[int, list[int]] = {}
        keys: dict[tuple[str, str], int] = {}
        for i, task in enumerate(tasks):  # one score per exchange, however many principles are asked about
            key = (repr([m.model_dump() for m in task.conversation]), task.response)
            groups.setdefault(keys.setdefault(key, len(keys)), []).append(i)
        firsts = [members[0] for members in groups.values()]
        scores = self._scores([(tasks[i].conversation, tasks[i].response) for i in firsts])
        out: list[Critique | None] = [None] * len(tasks)
        escalated = self._route([score["violation"] for score in scores])
        if escalated:  # the slower critic decides these exchanges, for every principle asked about
            members_of = list(groups.values())
            ask = [i for g in escalated for i in members_of[g]]
            for i, critique in zip(ask, self.escalation.critique([tasks[i] for i in ask])):
                out[i] = critique
        for members, score in zip(groups.values(), scores):
            if out[members[0]] is not None:
                continue
            p = score["violation"]
            chosen = members[self._pick(score, [tasks[i].principle for i in members])]
            for i in members:
                flagged = p > self.threshold and i == chosen
                out[i] = Critique(
                    principle_id=tasks[i].principle.id,
                    text=f"classifier P(violation)={p:.3f}"
                    + (
                        f", P({tasks[i].principle.id})={score[tasks[i].principle.id]:.3f}"
                        if tasks[i].principle.id in score
                        else ""
                    ),
                    needs_revision=flagged,
                    critic=self.name,
                )
        return out

    def screen(self, items, principles, question: str | None = None) -> list[dict]:
        items, principles = list(items), list(principles)
        out = []
        scores = self._scores(items)
        for score in scores:
            fired = score["violation"] > self.threshold
            out.append(
                {
                    "p_yes": score["violation"],
                    "principle_index": self._pick(score, principles) if fired else None,
                    "letter_probs": None,
                }
            )
        escalated = self._route([score["violation"] for score in scores])
        if escalated:
            for i, verdict in zip(
                escalated, self.escalation.screen([items[i] for i in escalated], principles, question)
            ):
                out[i] = verdict
        return out

    def screen_requests(self, conversations, question: str | None = None) -> list[float | None]:
        """P(the request asks for harm), re-centred on this classifier's threshold (:func:`recentre`): above 0.5
        exactly where the probe's own probability is above its threshold, so the guard's default
        ``request_threshold`` of 0.5 applies the calibrated threshold. An escalated request gets the slower critic's
        value (a model critic's P(Yes), whose decision point is 0.5; a classifier's, re-centred on its own)."""
        conversations = list(conversations)
        scores = [s["violation"] for s in self._scores([(c, None) for c in conversations])]
        cut = self.threshold
        out: list[float | None] = [recentre(p, cut) for p in scores]
        escalated = self._route(scores)
        if escalated:
            asked = [conversations[i] for i in escalated]
            for i, p in zip(escalated, self.escalation.screen_requests(asked, question)):
                out[i] = p
        return out

    def attribute(self, items, principles) -> list[int | None]:
        return [self._pick(s, list(principles)) for s in self._scores(list(items))]


def _logit(x: float) -> float:
    x = min(max(x, 1e-9), 1 - 1e-9)
    return math.log(x / (1 - x))


def recentre(p: float, threshold: float) -> float:
    """``p`` with its log-odds shifted by the threshold's: ``threshold`` maps to 0.5, the order of scores is kept, and
    ``p > threshold`` exactly when the result is above 0.5 (up to rounding at the threshold itself)."""
    return 1 / (1 + math.exp(-(_logit(p) - _logit(threshold))))


def _last_user(conversation) -> str:
    for message in reversed(list(conversation)):
        if message.role == "user":
            return message.content
    return ""


class ClassifierJudge(Judge):
    """An output classifier as a phase-2 labeller and reward: of two replies, the one less likely to break the
    constitution is preferred (``p_a`` from the difference of their log-odds), and a single reply scores
    ``1 + 9 * (1 - P(violation))``. Thousands of pairs a minute on a CPU, where the feedback model labels hundreds
    an hour; each reply is scored alone, so there is no position to be biased by."""

    name = "classifier"

    class Options(BaseOptions):
        path: str = Field(description="An output classifier folder made by `cai classifiers build`.")
        precision: Literal["auto", "float32", "bfloat16"] = Field(
            "auto",
            description="How a probe's base layers run: auto takes bfloat16 (about 1.6x faster; only a score right at "
            "the threshold can change its decision) where the CPU has it natively, float32 elsewhere. A probe built "
            "with --int8 always runs its 8-bit layers (auto) and refuses the others.",
        )
        sharpness: float = Field(
            1.0, gt=0, description="Divides the log-odds difference: larger makes the soft labels softer."
        )

    def __init__(self, options=None, runtime=None) -> None:
        super().__init__(options, runtime)
        self._probe: Any = None

    @property
    def probe(self) -> Any:
        if self._probe is None:
            self._probe = load_classifier(self.options.path, precision=self.options.precision)
            if self._probe.config.kind != "output":
                raise ConfigError(
                    f"{self.options.path}: the classifier judge needs an output classifier (it reads replies)"
                )
        return self._probe

    def _violation(self, pairs: Sequence[tuple[Any, str]]) -> list[float]:
        scores = self.probe.predict([_last_user(c) for c, _ in pairs], [reply for _, reply in pairs])
        return [min(max(s["violation"], 1e-6), 1 - 1e-6) for s in scores]

    def compare(self, tasks):
        tasks = list(tasks)
        p = self._violation([(t.conversation, r) for t in tasks for r in (t.response_a, t.response_b)])
        out = []
        for k, task in enumerate(tasks):
            a, b = p[2 * k], p[2 * k + 1]
            margin = (_logit(b) - _logit(a)) / self.options.sharpness
            out.append(
                Judgement(
                    principle_ids=[x.id for x in task.principles],
                    p_a=1 / (1 + math.exp(-margin)),
                    position_consistent=None,
                    reason=f"P(violation) A={a:.3f} B={b:.3f}",
                    judge=self.name,
                )
            )
        return out

    def score(self, tasks):
        tasks = list(tasks)
        out = []
        for task, p in zip(tasks, self._violation([(t.conversation, t.response) for t in tasks])):
            value = 1 + 9 * (1 - p)
            out.append(
                Score(
                    principle_ids=[x.id for x in task.principles],
                    value=value,
                    reward=(value - 5.5) / 4.5,
                    judge=self.name,
                )
            )
        return out
