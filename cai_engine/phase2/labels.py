"""Phase 2, RLAIF: preference labels from the judge (``run_labels``, what ``cai rl label`` calls).

Three recipes make pairs: ``judged`` samples two responses per prompt and has the judge compare them against
randomly drawn comparison principles, in both orders (the paper); ``revision`` takes phase-1 records and prefers
each final revision over the initial response (the Hugging Face recipe); ``intent`` samples several responses to
prompts whose intent is known (harmful or harmless however they sound) and pairs a refusal with an answer, the refusal
preferred for a harmful prompt and the answer for a harmless one, with no judge. Abstentions are recorded and
counted; they never become labels. The judge's quality gate is ``cai_engine.phase2.gate``; human labels and the TRL export
are ``cai_engine.phase2.preferences``."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from cai_engine.constitution.model import Constitution, Phase, Principle
from cai_engine.errors import ConfigError, RunError
from cai_engine.models.options import with_model
from cai_engine.models.runtime import DEFAULT_MODEL, ModelRef, Runtime
from cai_engine.plugins.refs import ComponentRef
from cai_engine.prompts.sets import (
    PromptItem,
    id_matches,
    load_training_sources,
    source_limit,
    source_list,
)
from cai_engine.records import (
    ComparisonTask,
    LabelCounts,
    LabelSummary,
    PreferenceRecord,
    SLRecord,
    StoredJudgement,
)
from cai_engine.seeds import item_rng
from cai_engine.store.runs import RunDirectory, now
from cai_engine.store.shards import Shard, ShardField, shard_field
from cai_engine.text.refusals import refuses


class LabelConfig(BaseModel):
    """Everything a labelling run depends on. Flags of ``cai rl label`` override a ``--config`` file."""

    model_config = ConfigDict(extra="forbid")

    constitution: str = Field("harmless", description="Constitution name or file (its rl principles are used).")
    recipe: Literal["judged", "revision", "intent"] = Field(
        "judged",
        description="'judged': sample two responses and let the judge label them; 'revision': prefer each "
        "phase-1 revision over its original response; 'intent': sample `samples` responses to prompts listed in "
        "`must_decline`/`must_answer` and pair a refusal with an answer, labelled by the prompt's intent (no judge: "
        "as fast as the policy samples; the 1.5B judge is at chance on these pairs).",
    )
    must_decline: list[str] = Field(
        default_factory=list,
        description="Recipe 'intent': prompt ids (shell-style patterns such as 'rt-*' or 'pr-*-h') of harmful "
        "requests; of a refusal and an answer, the refusal is preferred.",
    )
    must_answer: list[str] = Field(
        default_factory=list,
        description="Recipe 'intent': prompt ids of requests harmless however they sound; the answer is preferred.",
    )
    samples: int = Field(
        4, ge=2, le=16, description="Recipe 'intent': responses sampled per prompt to find a refusal and an answer."
    )
    intent_probability: float = Field(
        0.9, gt=0.5, le=1, description="Recipe 'intent': the label's confidence (a refusal phrase can misread)."
    )
    prompts: str | list[str] = Field(
        "builtin:red-team",
        description="Prompts to sample pairs for (recipe 'judged'): one source or a list (e.g. [builtin:red-team, "
        "builtin:borderline], the second teaching that a harmless request that sounds dangerous deserves an answer).",
    )
    field: str | None = Field(None, description="Which field of the prompt file holds the prompt.")
    limit: PositiveInt | dict[str, PositiveInt] | None = Field(
        None,
        description="Use only the first N prompts (records for 'revision'): of each source, or per source as a "
        "mapping such as {builtin:red-team: 64} (sources it does not name are used whole).",
    )
    sl_run: str | None = Field(None, description="The phase-1 run directory (recipe 'revision').")
    model: ModelRef = Field(DEFAULT_MODEL, description="The policy that samples the pairs (e.g. the SFT checkpoint).")
    sampler: ComponentRef = Field(default_factory=lambda: ComponentRef(name="model", options={"temperature": 1.0}))
    judge: ComponentRef = Field(
        default_factory=lambda: ComponentRef(name="logprob"),
        description="The feedback model; its own `model` option may differ from the policy.",
    )
    judge_model: ModelRef | None = Field(None, description="Shortcut for judge.options.model.")
    principles_per_label: int = Field(1, ge=1, le=16, description="Principles per comparison (>1: an ensemble).")
    allow_heldout: bool = Field(False, description="Allow an evaluation-only prompt set as training data.")
    seed: int = Field(0)
    batch_size: int = Field(8, ge=1, le=256)
    shard: ShardField = shard_field("label")

    @model_validator(mode="after")
    def _recipe_inputs(self) -> LabelConfig:
        if self.recipe == "revision" and not self.sl_run:
            raise ValueError("recipe 'revision' needs sl_run (a phase-1 run directory)")
        if self.recipe == "intent" and not (self.must_decline or self.must_answer):
            raise ValueError("recipe 'intent' needs must_decline or must_answer (which prompts are harmful, which not)")
        both = set(self.must_decline) & set(self.must_answer)
        if both:
            raise ValueError(f"{sorted(both)[0]!r} is in both must_decline and must_answer")
        return self

    def fingerprint(self) -> dict[str, Any]:
        # the intent recipe's settings count only for it: a run of another recipe made before they existed resumes
        intent = {"must_decline", "must_answer", "samples", "intent_probability"}
        return self.model_dump(
            mode="json", exclude={"limit", "batch_size"} | (set() if self.recipe == "intent" else intent)
        )

    @property
    def prompt_sources(self) -> list[str]:
        return source_list(self.prompts)

    def limit_for(self, source: str) -> int | None:
        return source_limit(self.limit, source)

    def sampler_ref(self, runtime: Runtime) -> ComponentRef:
        """The sampler with the policy model and the seed filled in (``with_model``: where its options have them)."""
        return with_model(self.sampler, "sampler", runtime, self.model, seed=self.seed)

    def judge_ref(self, runtime: Runtime) -> ComponentRef:
        """The judge with the feedback model (``judge_model``, else the policy) filled in, by the same rule."""
        return with_model(self.judge, "judge", runtime, self.judge_model or self.model)


def draw_principles(
    runtime: Runtime, constitution: Constitution, item: PromptItem, k: int, rng: random.Random
) -> list[Principle]:
    """``k`` distinct rl principles for comparing two replies to ``item``, through the ``cai_select_principles``
    hook."""
    candidates = constitution.for_phase(Phase.rl)
    if not candidates:
        raise ConfigError(f"constitution {constitution.name!r} has no principles for the rl phase")
    chosen: list[Principle] = []
    for round_index in range(k * 4):
        if len(chosen) == min(k, len(candidates)):
            break
        pool = [p for p in candidates if p not in chosen]
        pick = runtime.hooks.select_principles(
            constitution=constitution,
            candidates=pool,
            item=item.hook_item(),
            phase=Phase.rl,
            round=round_index,
            rng=rng,
        )
        if pick:
            chosen.append(pick[0])
    return chosen


@dataclass(frozen=True)
class Pair:
    """One pair being labelled: its record key, the prompt, where the two responses came from, the responses, and
    the principles drawn to compare them."""

    key: str
    prompt: PromptItem
    source: Literal["ai", "revision", "intent"]
    response_a: str
    response_b: str
    principles: list[Principle]

    @property
    def comparable(self) -> bool:
        """Whether a judge can compare the two responses (both non-empty and different)."""
        a, b = self.response_a.strip(), self.response_b.strip()
        return bool(a and b and a != b)


class LabelRun:
    """A configured labelling run bound to a runtime and a run directory."""

    def __init__(self, config: LabelConfig, out: str | Path, runtime: Runtime | None = None) -> None:
        self.config = config
        self.runtime = runtime or Runtime.default()
        self.constitution = self.runtime.registry.constitution(config.constitution)
        self.judge = None if config.recipe == "intent" else config.judge_ref(self.runtime).build("judge", self.runtime)
        self.sampler = (
            config.sampler_ref(self.runtime).build("sampler", self.runtime) if config.recipe != "revision" else None
        )
        self.dir = RunDirectory(out, "rl", PreferenceRecord)
        self.items: list[tuple[str, Any]]
        if config.recipe != "revision":
            self.items = [
                ("pair", item)
                for item in load_training_sources(
                    config.prompt_sources,
                    self.runtime.registry,
                    field=config.field,
                    limit_for=config.limit_for,
                    allow_heldout=config.allow_heldout,
                    kept_as="pairs",
                )
            ]
            if config.recipe == "intent":
                for _, item in self.items:
                    if id_matches(item.id, config.must_decline) and id_matches(item.id, config.must_answer):
                        raise ConfigError(f"prompt {item.id!r} matches both must_decline and must_answer")
                self.items = [(k, i) for k, i in self.items if self._intent(i.id) is not None]
                if not self.items:
                    raise ConfigError("recipe 'intent': no prompt id matches must_decline or must_answer")
        else:
            assert config.sl_run is not None  # the config's validator requires it for this recipe
            sl = RunDirectory(config.sl_run, "sl", SLRecord)
            sl.manifest()
            records = [r for r in sl.records() if r.kind == "red-team" and r.revised]
            if not records:
                raise RunError(f"{config.sl_run}: has no revised red-team records to build pairs from")
            self.items = [("revision", r) for r in records][: config.limit_for(config.sl_run)]
        if config.shard:
            shard = Shard.parse(config.shard)
            self.items = [(kind, item) for kind, item in self.items if shard.owns(item.id)]
        self.provenance = {
            "constitution": {
                "name": self.constitution.name,
                "version": self.constitution.version,
                "hash": self.constitution.content_hash(),
            },
            "recipe": config.recipe,
            "seed": config.seed,
        }

    def run(self, *, progress: bool = True) -> LabelSummary:
        from tqdm.auto import tqdm

        resumed = self.dir.open(
            self.config.fingerprint(), {"config": self.config.model_dump(mode="json"), "provenance": self.provenance}
        )
        done = self.dir.done_ids()
        todo = [(kind, item) for kind, item in self.items if self._key(kind, item) not in done]
        began = time.perf_counter()
        written = 0
        with tqdm(total=len(todo), unit="pair", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(todo), self.config.batch_size):
                batch = todo[start : start + self.config.batch_size]
                records = self._label(batch)
                self.dir.append(records)
                for record in records:
                    self.runtime.emit(record, "preference")
                written += len(records)
                bar.update(len(batch))
        return LabelSummary(
            **summarise_preferences(self.dir).model_dump(),
            written=written,
            resumed=resumed,
            run_dir=str(self.dir.path),
            seconds=round(time.perf_counter() - began, 1),
        )

    @staticmethod
    def _key(kind: str, item: Any) -> str:
        return f"pair:{item.id}" if kind == "pair" else f"revision:{item.key}"

    def _intent(self, prompt_id: str) -> str | None:
        """'decline', 'answer', or None: what a prompt asks of a reply, by its id (recipe ``intent``)."""
        if id_matches(prompt_id, self.config.must_decline):
            return "decline"
        if id_matches(prompt_id, self.config.must_answer):
            return "answer"
        return None

    def _intent_pairs(self, batch) -> list[Pair]:
        items = [item for _, item in batch]
        assert self.sampler is not None
        samples = self.sampler.sample([i.conversation for i in items], n=self.config.samples)
        pairs = []
        for item, replies in zip(items, samples):
            key = f"pair:{item.id}"
            refusal = next((r for r in replies if r.strip() and refuses(r)), None)
            answer = next((r for r in replies if r.strip() and not refuses(r)), None)
            if refusal is None or answer is None:  # no pair to learn from: recorded as an abstention
                only = replies[0] if replies else ""
                pairs.append(self._pair(key, item, "intent", only, only))
                continue
            a, b = (refusal, answer) if item_rng(self.config.seed, key).random() < 0.5 else (answer, refusal)
            pairs.append(self._pair(key, item, "intent", a, b))
        return pairs

    def _pairs(self, batch) -> list[Pair]:
        """The batch's pairs: two fresh samples per prompt (``judged``), a refusal and an answer among ``samples``
        (``intent``), or a phase-1 record's final revision and initial response (``revision``)."""
        if self.config.recipe == "intent":
            return self._intent_pairs(batch)
        if self.config.recipe == "judged":
            items = [item for _, item in batch]
            assert self.sampler is not None
            samples = self.sampler.sample([i.conversation for i in items], n=2)
            return [self._pair(f"pair:{item.id}", item, "ai", a, b) for item, (a, b) in zip(items, samples)]
        return [
            self._pair(
                f"revision:{record.key}",
                PromptItem(id=record.id, conversation=record.conversation, category=record.category),
                "revision",
                record.final_response or "",
                record.initial_response or "",
            )
            for _, record in batch
        ]

    def _pair(self, key: str, prompt: PromptItem, source: Literal["ai", "revision", "intent"], a: str, b: str) -> Pair:
        """A pair with its principles drawn (seeded by its key, so a resumed or sharded run draws the same)."""
        rng = item_rng(self.config.seed, key)
        principles = draw_principles(self.runtime, self.constitution, prompt, self.config.principles_per_label, rng)
        return Pair(key, prompt, source, a, b, principles)

    def _label(self, batch) -> list[PreferenceRecord]:
        pairs = self._pairs(batch)
        if self.judge is None:
            return [self._record(pair, *self._intent_label(pair), {"name": "intent"}) for pair in pairs]
        judged = [pair for pair in pairs if pair.comparable]
        tasks = [
            ComparisonTask(
                conversation=pair.prompt.conversation,
                response_a=pair.response_a,
                response_b=pair.response_b,
                principles=pair.principles,
                examples=self.constitution.comparison_examples,
            )
            for pair in judged
        ]
        judgements = dict(zip((pair.key for pair in judged), self.judge.compare(tasks))) if tasks else {}
        judge_info = self.judge.describe()
        records = []
        for pair in pairs:
            judgement = judgements.get(pair.key)
            if judgement is None:
                same = pair.response_a.strip() == pair.response_b.strip()
                stored = StoredJudgement(abstained=True, reason="identical responses" if same else "an empty response")
            else:
                stored = StoredJudgement.model_validate(judgement.model_dump(mode="json"))
            # the revision recipe's label: the revision is preferred; the judge's view is kept alongside
            label = 1.0 if pair.source == "revision" else (judgement.p_a if judgement is not None else None)
            records.append(self._record(pair, label, stored, judge_info))
        return records

    def _intent_label(self, pair: Pair) -> tuple[float | None, StoredJudgement]:
        if not pair.comparable:
            reason = f"no refusal and answer among {self.config.samples} samples"
            return None, StoredJudgement(abstained=True, reason=reason)
        want = self._intent(pair.prompt.id)
        a_wins = refuses(pair.response_a) == (want == "decline")
        p = self.config.intent_probability if a_wins else 1 - self.config.intent_probability
        reason = "a harmful request: the refusal" if want == "decline" else "a harmless request: the answer"
        return p, StoredJudgement(abstained=False, p_a=p, reason=f"{reason} is preferred", judge="intent")

    def _record(
        self, pair: Pair, label: float | None, stored: StoredJudgement, judge_info: dict[str, Any]
    ) -> PreferenceRecord:
        return PreferenceRecord(
            key=pair.key,
            id=pair.prompt.id,
            category=pair.prompt.category,
            source=pair.source,
            conversation=pair.prompt.conversation,
            response_a=pair.response_a,
            response_b=pair.response_b,
            principle_ids=[p.id for p in pair.principles],
            label=label,
            judgement=stored,
            provenance={**self.provenance, "judge": judge_info},
            created=now(),
        )


def run_labels(
    config: LabelConfig | dict[str, Any], out: str | Path, *, runtime: Runtime | None = None, progress: bool = True
) -> LabelSummary:
    """Label (or resume labelling) preference pairs into ``out`` (``config`` may be its JSON form); returns the run's
    counts and what was written."""
    if not isinstance(config, LabelConfig):
        config = LabelConfig.model_validate(config)
    return LabelRun(config, out, runtime).run(progress=progress)


def summarise_preferences(run_dir: RunDirectory | str | Path) -> LabelCounts:
    """Counts over a labelling run directory: pairs, labels, abstentions, sources, position consistency."""
    directory = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory(run_dir, "rl", PreferenceRecord)
    total = labelled = abstained = consistent = ordered = 0
    by_source: dict[str, int] = {}
    for record in directory.records():
        total += 1
        by_source[record.source] = by_source.get(record.source, 0) + 1
        j = record.judgement
        if j.abstained:
            abstained += 1
        elif j.p_a is not None and j.position_consistent is not None:
            ordered += 1  # only judges that saw an order can be consistent about it (pointwise: not applicable)
            consistent += j.position_consistent
        labelled += record.label is not None
    return LabelCounts(
        pairs=total,
        labelled=labelled,
        abstained=abstained,
        by_source=by_source,
        position_consistency=round(consistent / ordered, 4) if ordered else None,
    )
