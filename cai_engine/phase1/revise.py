"""Phase 1, SL-CAI: sample a response, then N rounds of critique -> revision, one principle drawn per round.

``run_sl`` is what ``cai sl`` calls and returns an :class:`~cai_engine.records.SLSummary`; ``summarise`` counts what a
run directory holds. ``cai_engine.phase1.export`` turns a run directory into a TRL conversational dataset.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from cai_engine.constitution.model import Constitution, Phase
from cai_engine.errors import ConfigError, PromptTooLongError, RunError
from cai_engine.models.options import with_model
from cai_engine.models.runtime import DEFAULT_MODEL, ModelRef, Runtime
from cai_engine.plugins.refs import ComponentRef
from cai_engine.prompts.sets import PromptItem, load_training_prompts, load_training_sources, source_limit, source_list
from cai_engine.records import (
    ComparisonTask,
    CritiqueTask,
    RevisionTask,
    SLCounts,
    SLExample,
    SLRecord,
    SLRound,
    SLSummary,
)
from cai_engine.seeds import item_rng
from cai_engine.store.runs import RunDirectory, now
from cai_engine.store.shards import Shard, ShardField, shard_field


class SLConfig(BaseModel):
    """Everything a phase-1 run depends on. Flags of ``cai sl`` override a ``--config`` file's values."""

    model_config = ConfigDict(extra="forbid")

    constitution: str = Field("harmless", description="A registered constitution name or a file path.")
    prompts: str | list[str] = Field(
        "builtin:red-team",
        description="The prompts whose responses are critiqued and revised: 'builtin:<set>', '<plugin>:<set>', a "
        "prompt file, or a list of them (e.g. [builtin:red-team, builtin:borderline], the second so that the targets "
        "also show harmless requests that sound dangerous being answered).",
    )
    field: str | None = Field(None, description="Which field of the prompt file holds the prompt.")
    limit: PositiveInt | dict[str, PositiveInt] | None = Field(
        None,
        description="Use only the first N prompts (raise it later to continue): of each source, or per source as a "
        "mapping such as {builtin:borderline: 40} (sources it does not name are used whole).",
    )
    rounds: int = Field(4, ge=1, le=16, description="Critique/revision rounds per prompt (the paper used 4).")
    critique: bool = Field(True, description="False: revise directly, without a critique (CAI-SPEC §2.5).")
    stop_early: bool = Field(False, description="Stop an item's rounds once the critic says nothing needs revising.")
    allow_heldout: bool = Field(False, description="Allow an evaluation-only prompt set as training data.")
    seed: int = Field(0, description="Seeds principle draws and sampling.")
    batch_size: int = Field(8, ge=1, le=256, description="Items processed together (one batched model call each).")
    model: ModelRef = Field(DEFAULT_MODEL, description="The policy model: it samples the responses to improve.")
    feedback_model: ModelRef | None = Field(
        None,
        description="The model that critiques, revises and verifies (a stronger teacher, e.g. "
        "'qwen2.5-coder-1.5b'); None: the policy model does it all, as in the paper.",
    )
    sampler: ComponentRef = Field(default_factory=lambda: ComponentRef(name="model"))
    critic: ComponentRef = Field(default_factory=lambda: ComponentRef(name="model"))
    reviser: ComponentRef = Field(
        default_factory=lambda: ComponentRef(name="model"),
        description="'model' revises the response (after the critique); 'rewrite' writes from scratch the reply the "
        "assistant should have given under the principle; 'ensemble' lets a judge pick among several.",
    )
    verify: ComponentRef | None = Field(
        None,
        description="A judge that must prefer each revision to the response it replaces (both orders, the "
        "round's principle) before the revision is accepted; None: accept every clean revision.",
    )
    verify_margin: float = Field(0.5, ge=0.5, lt=1, description="P(revision better) the verifier must exceed.")
    helpful_prompts: str | list[str] | None = Field(
        "builtin:helpful",
        description="Prompts answered by the policy without critique, mixed into the SFT data to "
        "keep it helpful: one source or a list (e.g. [builtin:helpful, "
        "builtin:borderline], the second teaching it not to refuse harmless requests "
        "that sound dangerous).",
    )
    helpful_limit: int | None = Field(
        None,
        ge=0,
        description="How many prompts from each helpfulness source (default: as many as the red-team prompts used).",
    )
    shard: ShardField = shard_field("handle")

    def build(self, role: str, runtime: Runtime):
        """Build a role's component; the sampler gets the policy model, the other roles the feedback model."""
        ref = getattr(self, role)
        kind = "judge" if role == "verify" else role
        model = self.model if role == "sampler" else (self.feedback_model or self.model)
        return with_model(ref, kind, runtime, model, seed=self.seed).build(kind, runtime)

    @property
    def prompt_sources(self) -> list[str]:
        return source_list(self.prompts)

    def limit_for(self, source: str) -> int | None:
        return source_limit(self.limit, source)

    @property
    def helpful_sources(self) -> list[str]:
        if not self.helpful_prompts:
            return []
        return [self.helpful_prompts] if isinstance(self.helpful_prompts, str) else list(self.helpful_prompts)

    def fingerprint(self) -> dict[str, Any]:
        # `limit`, `helpful_limit` and the helpfulness sources may grow between runs of the same directory (records
        # are kept per prompt id, and adding prompts does not change what the others' records say); `batch_size`
        # does not change what an item's record says beyond sampling noise, so it may change too.
        return self.model_dump(mode="json", exclude={"limit", "helpful_limit", "helpful_prompts", "batch_size"})


class SLRun:
    """A configured phase-1 run bound to a runtime and a run directory."""

    def __init__(self, config: SLConfig, out: str | Path, runtime: Runtime | None = None) -> None:
        self.config = config
        self.runtime = runtime or Runtime.default()
        registry = self.runtime.registry
        self.constitution: Constitution = registry.constitution(config.constitution)
        self.principles = self.constitution.for_phase(Phase.sl)
        if not self.principles:
            raise ConfigError(f"constitution {self.constitution.name!r} has no principles for the sl phase")
        # Build every component first: bad options fail here, before prompts or models load.
        self.sampler = config.build("sampler", self.runtime)
        self.critic = config.build("critic", self.runtime) if config.critique else None
        self.reviser = config.build("reviser", self.runtime)
        self.verifier = config.build("verify", self.runtime) if config.verify else None
        self.items = load_training_sources(
            config.prompt_sources,
            registry,
            field=config.field,
            limit_for=config.limit_for,
            allow_heldout=config.allow_heldout,
        )
        self.helpful: list[PromptItem] = []
        limit = config.helpful_limit if config.helpful_limit is not None else len(self.items)
        for source in config.helpful_sources:
            items = load_training_prompts(source, registry, limit=limit, allow_heldout=config.allow_heldout)
            self.helpful += items if limit else []
        seen: set[str] = set()
        for item in self.helpful:
            if item.id in seen:
                raise ConfigError(
                    f"helpful_prompts: prompt id {item.id!r} appears twice across "
                    f"{', '.join(config.helpful_sources)}; ids must be unique (records are kept by id)"
                )
            seen.add(item.id)
        if config.shard:  # after the helpfulness limit, which counts the whole set: the shards add up to the run
            shard = Shard.parse(config.shard)
            self.items = [i for i in self.items if shard.owns(i.id)]
            self.helpful = [i for i in self.helpful if shard.owns(i.id)]
        self.dir = RunDirectory(out, "sl", SLRecord)
        self.provenance = {
            "constitution": {
                "name": self.constitution.name,
                "version": self.constitution.version,
                "hash": self.constitution.content_hash(),
            },
            "seed": config.seed,
        }

    # -- driving ---------------------------------------------------------------------------------------------

    def run(self, *, progress: bool = True) -> SLSummary:
        resuming = self.dir.open(
            self.config.fingerprint(), {"config": self.config.model_dump(mode="json"), "provenance": self.provenance}
        )
        done = self.dir.done_ids()
        todo = [("red-team", item) for item in self.items if f"red-team:{item.id}" not in done]
        todo += [("helpful", item) for item in self.helpful if f"helpful:{item.id}" not in done]
        written = errors = 0
        bar = _progress(len(todo), progress)
        began = time.perf_counter()
        size = self.config.batch_size
        for start in range(0, len(todo), size):
            batch = todo[start : start + size]
            records = self._process(batch, bar)
            self.dir.append(records)
            for record in records:
                self.runtime.emit(record, "sl")
            written += len(records)
            errors += sum(1 for r in records if r.error)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{self._tokens_per_second(began):.0f}")
        bar.close()
        return SLSummary(
            written=written,
            skipped_done=len(self.items) + len(self.helpful) - len(todo),
            errors=errors,
            resumed=resuming,
            run_dir=str(self.dir.path),
            seconds=round(time.perf_counter() - began, 1),
            **summarise(self.dir).model_dump(),
        )

    def _tokens_per_second(self, began: float) -> float:
        return self.runtime.generated_tokens / max(time.perf_counter() - began, 1e-9)

    def _process(self, batch: list[tuple[str, PromptItem]], bar) -> list[SLRecord]:
        try:
            return self._process_batch(batch, bar)
        except PromptTooLongError:
            if len(batch) == 1:
                kind, item = batch[0]
                return [self._error_record(kind, item, "the prompt is too long for the model's context")]
            return [r for one in batch for r in self._process([one], bar)]  # find the item that does not fit

    def _process_batch(self, batch, bar) -> list[SLRecord]:
        items = [item for _, item in batch]
        conversations = [item.conversation for item in items]
        if all(kind == "helpful" for kind, _ in batch):
            bar.set_description("helpfulness samples")
        initial = [row[0] for row in self.sampler.sample(conversations)]
        current = list(initial)
        rounds: list[list[SLRound]] = [[] for _ in items]
        active = [kind == "red-team" for kind, _ in batch]
        rngs = [item_rng(self.config.seed, item.id) for item in items]
        for round_index in range(self.config.rounds):
            live = [i for i, a in enumerate(active) if a]
            if not live:
                break
            bar.set_description(f"round {round_index + 1}/{self.config.rounds}")
            chosen = {i: self._select(items[i], round_index, rngs[i]) for i in live}
            critiques = {}
            if self.critic is not None:
                results = self.critic.critique(
                    [
                        CritiqueTask(
                            conversation=conversations[i],
                            response=current[i],
                            principle=chosen[i],
                            examples=self.constitution.examples,
                        )
                        for i in live
                    ]
                )
                critiques = dict(zip(live, results))
            to_revise = []
            for i in live:
                critique = critiques.get(i)
                entry = SLRound(
                    round=round_index + 1,
                    principle_id=chosen[i].id,
                    critique=critique.text if critique else None,
                    needs_revision=critique.needs_revision if critique else None,
                )
                rounds[i].append(entry)
                if self.config.stop_early and critique is not None and critique.needs_revision is False:
                    entry.reason = "critic found nothing to revise"
                    active[i] = False
                else:
                    to_revise.append(i)
            revisions = (
                self.reviser.revise(
                    [
                        RevisionTask(
                            conversation=conversations[i],
                            response=current[i],
                            principle=chosen[i],
                            critique=critiques[i].text if i in critiques else None,
                            examples=self.constitution.examples,
                        )
                        for i in to_revise
                    ]
                )
                if to_revise
                else []
            )
            verdicts = self._verify(to_revise, revisions, conversations, current, chosen)
            for i, revision in zip(to_revise, revisions):
                accepted, reason = revision.accepted, revision.reason
                entry = rounds[i][-1]
                if accepted and _same(revision.text, current[i]):
                    accepted, reason = False, "unchanged: the reviser kept the response as it was"
                    entry.unchanged = True
                if i in verdicts:
                    entry.verify_p_revision = verdicts[i]
                    verdict = verdicts[i]
                    if accepted and (verdict is None or verdict <= self.config.verify_margin):
                        accepted = False
                        reason = (
                            "the verifier abstained"
                            if verdicts[i] is None
                            else f"the verifier preferred the response it replaces (P(revision)={verdicts[i]:.2f})"
                        )
                entry.revision = revision.text if accepted else None
                entry.accepted = accepted
                entry.reason = reason
                entry.candidate = None if accepted or not revision.accepted else revision.text
                if accepted:
                    current[i] = revision.text
        roles = (
            ("sampler", self.sampler),
            ("critic", self.critic),
            ("reviser", self.reviser),
            ("verify", self.verifier),
        )
        models = {role: comp.describe().get("model_id") for role, comp in roles if comp}
        components = {role: comp.describe() for role, comp in roles if comp}
        out = []
        for (kind, item), first, last, item_rounds in zip(batch, initial, current, rounds):
            out.append(
                _record(
                    kind,
                    item,
                    initial_response=first,
                    rounds=item_rounds if kind == "red-team" else [],
                    final_response=last,
                    revised=any(r.accepted for r in item_rounds),
                    provenance={**self.provenance, "models": models, "components": components},
                    created=now(),
                )
            )
        return out

    def _verify(self, indices, revisions, conversations, current, chosen) -> dict[int, float | None]:
        """P(revision better than the response it replaces) from the verifier, for each accepted revision."""
        if self.verifier is None:
            return {}
        todo = [(i, r) for i, r in zip(indices, revisions) if r.accepted and not _same(r.text, current[i])]
        if not todo:
            return {}
        judgements = self.verifier.compare(
            [
                ComparisonTask(
                    conversation=conversations[i],
                    response_a=r.text,
                    response_b=current[i],
                    principles=[chosen[i]],
                    examples=self.constitution.comparison_examples,
                )
                for i, r in todo
            ]
        )
        return {i: j.p_a for (i, _), j in zip(todo, judgements)}

    def _select(self, item: PromptItem, round_index: int, rng: random.Random):
        chosen = self.runtime.hooks.select_principles(
            constitution=self.constitution,
            candidates=self.principles,
            item=item.hook_item(),
            phase=Phase.sl,
            round=round_index,
            rng=rng,
        )
        if not chosen:
            raise RunError("cai_select_principles returned no principle")
        return chosen[0]

    def _error_record(self, kind: str, item: PromptItem, error: str) -> SLRecord:
        return _record(
            kind,
            item,
            error=error,
            provenance=self.provenance,
            created=now(),
        )


def _record(kind: str, item: PromptItem, **fields: Any) -> SLRecord:
    """The record of ``item``: its key, id, kind, category and conversation, plus ``fields``."""
    return SLRecord(
        key=f"{kind}:{item.id}",
        id=item.id,
        kind=kind,  # type: ignore[arg-type]
        category=item.category,
        conversation=item.conversation,
        **fields,
    )


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()).lower() == " ".join(b.split()).lower()


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="item", disable=not enabled, dynamic_ncols=True)


def run_sl(
    config: SLConfig | dict[str, Any], out: str | Path, *, runtime: Runtime | None = None, progress: bool = True
) -> SLSummary:
    """Run (or resume) phase 1 into ``out`` (``config`` may be its JSON form); returns what was written and the run's
    counts."""
    if not isinstance(config, SLConfig):
        config = SLConfig.model_validate(config)
    return SLRun(config, out, runtime).run(progress=progress)


def summarise(run_dir: RunDirectory | str | Path) -> SLCounts:
    """Counts over a run directory: items, revisions, principles used, an example."""
    directory = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory(run_dir, "sl", SLRecord)
    red = helpful = revised = accepted = errors = 0
    principles: dict[str, int] = {}
    example = None
    for record in directory.records():
        if record.error:
            errors += 1
            continue
        if record.kind == "helpful":
            helpful += 1
            continue
        red += 1
        revised += record.revised
        for entry in record.rounds:
            principles[entry.principle_id] = principles.get(entry.principle_id, 0) + 1
            accepted += entry.accepted
        if example is None and record.revised:
            example = SLExample(prompt=record.prompt, before=record.initial_response, after=record.final_response)
    return SLCounts(
        red_team_items=red,
        helpful_items=helpful,
        items_revised=revised,
        accepted_revisions=accepted,
        error_items=errors,
        principles_used=dict(sorted(principles.items())),
        example=example,
    )
