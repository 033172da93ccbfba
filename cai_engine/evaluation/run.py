"""Evaluation: is the model harmless without being evasive? (CAI-SPEC §8)

``evaluate`` compares models (a base model, SL-CAI and RL-CAI checkpoints, endpoints) on held-out red-team prompts,
benign prompts that merely sound dangerous, and ordinary requests; ``compare_policies`` shows what the runtime guard
does to the same responses under two policies. Results go to ``results.json`` and a self-contained
``report.html``. Generated responses are cached per model, so a rerun resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from cai_engine.constitution.model import Principle
from cai_engine.evaluation.compare import compare_policies
from cai_engine.evaluation.config import EvalConfig, slug
from cai_engine.evaluation.report import gate_warning, write_report

# The judged classifiers: one Yes/No question each, asked of the judge model about one reply (Yes = the property),
# after a few worked Yes/No examples (a small judge's zero-shot verdicts on these questions are near chance).
from cai_engine.evaluation.rubrics import ENGAGED_RUBRIC, EVASIVE_RUBRIC, HARMFUL_RUBRIC, REFUSAL_RUBRIC
from cai_engine.evaluation.sources import load_set
from cai_engine.evaluation.summary import model_results
from cai_engine.files.jsonl import append_jsonl, write_json, write_jsonl
from cai_engine.models.options import with_model
from cai_engine.models.runtime import Runtime
from cai_engine.plugins.refs import ComponentRef
from cai_engine.prompts.sets import PromptItem
from cai_engine.records import (
    ComparisonTask,
    CritiqueTask,
    EvalResults,
    Example,
    ItemOutcome,
    PairOutcome,
    ScoringTask,
)
from cai_engine.stats import mean_of
from cai_engine.store.runs import now
from cai_engine.store.shards import Shard

# answers are generated and appended to the resumable cache this many prompts at a time: enough to fill a batched
# backend (16 sequences a step by default, two batches of them) while a kill loses little
_CHUNK = 32


class Evaluation:
    def __init__(self, config: EvalConfig, out: str | Path, runtime: Runtime | None = None) -> None:
        self.config = config
        self.out = Path(out)
        self.runtime = runtime or Runtime.default()
        registry = self.runtime.registry
        self.constitution = registry.constitution(config.constitution)
        self.harm = [self.constitution.principle(p) for p in config.harm_principles]
        self.help = [self.constitution.principle(p) for p in config.help_principles]
        self.names = config.names or [slug(m).rsplit("-", 1)[0] for m in config.models]
        if len(self.names) != len(config.models):
            raise ValueError("names must have one label per model")
        self.sets: dict[str, list[PromptItem]] = {}
        self.origin: dict[str, dict[str, str]] = {}  # set -> item id -> the source it came from
        for kind in ("harmful", "benign", "helpful"):
            self.sets[kind], self.origin[kind] = load_set(
                config.sources(kind),
                registry,
                limit=config.limit,
                sample=config.sample.get(kind),
            )
        shard = Shard.parse(config.shard) if config.shard else None
        if shard is not None:  # a shard measures its prompts; judge quality, rounds and policies are shard 0's
            self.sets = {kind: [i for i in items if shard.owns(i.id)] for kind, items in self.sets.items()}
        self.first_shard = shard is None or shard.index == 0
        self.warnings: list[str] = []
        if any(json.dumps(config.judge_model, sort_keys=True) == json.dumps(m, sort_keys=True) for m in config.models):
            self.warnings.append(
                f"the judge model {config.judge_model!r} is also one of the models compared, so it "
                "judges its own answers; set judge_model to a separate, stronger feedback model"
            )
        self.judge = self._judging(config.judge, "judge")
        self.scorer = self._judging(config.scorer, "judge")
        self.critic = self._judging(config.critic, "critic", verdict_only=True)
        self.classifier = self._judging(config.classifier, "critic", verdict_only=True, few_shot=config.classify_shots)
        self.samplers = [
            with_model(
                config.sampler,
                "sampler",
                self.runtime,
                m,
                temperature=0.0,
                seed=config.seed,
                max_new_tokens=config.max_new_tokens,
            ).build("sampler", self.runtime)
            for m in config.models
        ]

    def _judging(self, ref: ComponentRef, kind: str, **settings: Any) -> Any:
        """Build a judging role: ``judge_model`` and this role's ``settings`` filled in by the one rule
        (``with_model``: where the component's options have them; its own options win), and ``judge_options``
        passed as they are (a role's settings replace them, ``judge_model`` replaces their ``model``)."""
        shared = {k: v for k, v in self.config.judge_options.items() if k != "model" and k not in settings}
        filled = with_model(
            ComponentRef(name=ref.name, options={**shared, **ref.options}),
            kind,
            self.runtime,
            self.config.judge_model,
            **settings,
        )
        return filled.build(kind, self.runtime)

    # -- responses (cached: the resumable part) ------------------------------------------------------------

    def responses(self, index: int, progress) -> dict[str, dict[str, str]]:
        # the cache is keyed by the model, the generation settings and the sampler: a longer max_new_tokens must not
        # reuse answers cut at a shorter length, nor another sampler the default's answers (the default keeps the
        # key it always had, so earlier runs resume)
        settings = f"greedy-{self.config.max_new_tokens}t-seed{self.config.seed}"
        if self.config.sampler != EvalConfig.model_fields["sampler"].get_default(call_default_factory=True):
            digest = hashlib.sha256(self.config.sampler.model_dump_json().encode()).hexdigest()[:8]
            settings += f"-{self.config.sampler.name}-{digest}"
        cache = self.out / "responses" / f"{slug(self.config.models[index])}-{settings}.jsonl"
        cache.parent.mkdir(parents=True, exist_ok=True)
        done: dict[str, dict[str, str]] = {k: {} for k in self.sets}
        if cache.exists():
            for line in cache.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut off by a kill
                done.setdefault(row["set"], {})[row["id"]] = row["response"]
        for kind, items in self.sets.items():
            todo = [i for i in items if i.id not in done[kind]]
            for start in range(0, len(todo), _CHUNK):
                chunk = todo[start : start + _CHUNK]
                texts = [row[0] for row in self.samplers[index].sample([i.conversation for i in chunk])]
                append_jsonl(cache, [{"set": kind, "id": i.id, "response": t} for i, t in zip(chunk, texts)])
                done[kind].update((i.id, t) for i, t in zip(chunk, texts))
                progress.update(len(chunk))
        return done

    # -- metrics ---------------------------------------------------------------------------------------------

    def harm_scores(self, items: list[PromptItem], texts: list[str]) -> list[float | None]:
        scores = self.scorer.score(
            [
                ScoringTask(conversation=i.conversation, response=t or " ", principles=self.harm)
                for i, t in zip(items, texts)
            ]
        )
        return [s.value for s in scores]

    def pairwise(self, items: list[PromptItem], ours: list[str], base: list[str], principles) -> list[PairOutcome]:
        """Each of our answers (A) against the baseline's (B) to the same prompt, judged in both orders."""
        tasks = [
            ComparisonTask(
                conversation=i.conversation,
                response_a=a or " ",
                response_b=b or " ",
                principles=principles,
                examples=self.constitution.comparison_examples,
            )
            for i, a, b in zip(items, ours, base)
        ]
        return [
            PairOutcome(
                p_a=j.p_a,
                position_consistent=j.position_consistent,
                log_length_ratio=math.log((len(a) + 1) / (len(b) + 1)),
            )
            for j, a, b in zip(self.judge.compare(tasks), ours, base)
        ]

    def classify(self, items: list[PromptItem], texts: list[str], question: Principle) -> list[bool | None]:
        """One Yes/No verdict of the judge model per response; None where it could not be read (never a guess)."""
        from cai_engine.errors import PromptTooLongError

        try:
            verdicts = self.classifier.critique(
                [
                    CritiqueTask(conversation=i.conversation, response=t or " ", principle=question)
                    for i, t in zip(items, texts)
                ]
            )
        except PromptTooLongError as exc:
            warning = (
                f"the {(question.title or question.id).lower()} classifier's prompts do not fit the judge's context ({exc}); its "
                "verdicts are missing (lower classify_shots or use a judge with a longer context)"
            )
            if warning not in self.warnings:
                self.warnings.append(warning)
            return [None] * len(items)
        return [v.needs_revision for v in verdicts]

    def principle_verdicts(self, items: list[PromptItem], texts: list[str]) -> list[dict[str, bool | None]]:
        """Per answer, the critic's verdict on each principle that asks a yes-means-violation question (a critique
        request is not a yes/no question)."""
        principles = [p for p in self.constitution.for_phase("sl") if p.violation_question]
        tasks = [
            CritiqueTask(conversation=i.conversation, response=t or " ", principle=p)
            for p in principles
            for i, t in zip(items, texts)
        ]
        verdicts = iter(self.critic.critique(tasks))
        out: list[dict[str, bool | None]] = [{} for _ in items]
        for p in principles:
            for row in out:
                row[p.id] = next(verdicts).needs_revision
        return out

    def outcomes(self, responses: list[dict[str, dict[str, str]]], bar: Any) -> list[ItemOutcome]:
        """What was measured about every model's answer to every prompt (the judge's part of the evaluation)."""
        config = self.config
        harmful, benign, helpful = self.sets["harmful"], self.sets["benign"], self.sets["helpful"]
        base = responses[0]
        out: list[ItemOutcome] = []
        for index, name in enumerate(self.names):
            mine = responses[index]
            rows = {
                kind: [
                    ItemOutcome(
                        model=name, set=kind, id=i.id, source=self.origin[kind][i.id], response=mine[kind][i.id]
                    )
                    for i in items
                ]
                for kind, items in self.sets.items()
            }
            harm_rows, benign_rows, help_rows = rows["harmful"], rows["benign"], rows["helpful"]
            harm_texts = [o.response for o in harm_rows]
            if config.harm_score:
                for row, score in zip(harm_rows, self.harm_scores(harmful, harm_texts)):
                    row.harm_score = score
            bar.update(1)
            compare = index and (config.pairwise_against == "all" or index == len(self.names) - 1)
            if compare and "harmlessness" in config.pairwise:
                theirs = [base["harmful"][i.id] for i in harmful]
                for row, pair in zip(harm_rows, self.pairwise(harmful, harm_texts, theirs, self.harm)):
                    row.pairwise["harmlessness"] = pair
            if compare and "helpfulness" in config.pairwise:
                ours, theirs = [o.response for o in help_rows], [base["helpful"][i.id] for i in helpful]
                for row, pair in zip(help_rows, self.pairwise(helpful, ours, theirs, self.help)):
                    row.pairwise["helpfulness"] = pair
            bar.update(1)
            if config.principle_rates:
                for row, verdicts in zip(harm_rows, self.principle_verdicts(harmful, harm_texts)):
                    row.principle_verdicts = verdicts
                bar.update(1)
            if config.classify:
                for row, verdict in zip(harm_rows, self.classify(harmful, harm_texts, HARMFUL_RUBRIC)):
                    row.harmful_verdict = verdict
                benign_texts = [o.response for o in benign_rows]
                for row, verdict in zip(benign_rows, self.classify(benign, benign_texts, REFUSAL_RUBRIC)):
                    row.benign_refusal_verdict = verdict
                safe_at = [k for k, row in enumerate(harm_rows) if row.harmful_verdict is False]
                if config.classify_evasive and safe_at:
                    evasive = self.classify(
                        [harmful[k] for k in safe_at], [harm_texts[k] for k in safe_at], EVASIVE_RUBRIC
                    )
                    for k, verdict in zip(safe_at, evasive):
                        harm_rows[k].evasive_verdict = verdict
                if config.classify_all_refusals:
                    for row, verdict in zip(harm_rows, self.classify(harmful, harm_texts, REFUSAL_RUBRIC)):
                        row.refusal_verdict = verdict
                    help_texts = [o.response for o in help_rows]
                    for row, verdict in zip(help_rows, self.classify(helpful, help_texts, REFUSAL_RUBRIC)):
                        row.refusal_verdict = verdict
            if config.engaged:  # issue #33: recomputed from the cached answers on every run, like every verdict
                for row, verdict in zip(harm_rows, self.classify(harmful, harm_texts, ENGAGED_RUBRIC)):
                    row.engaged_verdict = verdict
            out += harm_rows + benign_rows + help_rows
        return out

    def run(self, *, progress: bool = True) -> EvalResults:
        from tqdm.auto import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        total = sum(len(v) for v in self.sets.values()) * len(self.config.models)
        with tqdm(total=total, unit="response", desc="generating", disable=not progress) as bar:
            responses = [self.responses(i, bar) for i in range(len(self.config.models))]
        steps = len(self.config.models) * (2 + self.config.principle_rates) + 2
        with tqdm(total=steps, unit="step", desc="judging", disable=not progress) as bar:
            outcomes = self.outcomes(responses, bar)
            write_jsonl(self.out / "items.jsonl", outcomes)
            results = EvalResults(
                created=now(),
                config=self.config.model_dump(mode="json"),
                judge={"model": self.config.judge_model, "model_id": self.judge.describe().get("model_id")},
                constitution={"name": self.constitution.name, "hash": self.constitution.content_hash()},
                prompt_counts={k: len(v) for k, v in self.sets.items()},
                models=model_results(outcomes, self.config, self.names),
            )
            if self.config.judge_pairs and self.first_shard:
                from cai_engine.phase2.gate import load_labelled_pairs, measure_judge

                results.judge_quality = measure_judge(
                    self.judge,
                    load_labelled_pairs(self.config.judge_pairs),
                    self.constitution,
                    runtime=self.runtime,
                    seed=self.config.seed,
                )
                gate = gate_warning(results.judge_quality)
                if gate:
                    self.warnings.append(gate)
            bar.update(1)
            if self.config.sl_run and self.first_shard:
                results.harm_by_round = self.harm_by_round(self.config.sl_run)
            bar.update(1)
        if self.config.policies and self.first_shard:
            results.policy_comparison = compare_policies(
                self.config.models[0],
                self.config.policies,
                self.config.sources("harmful")[0],
                self.out,
                limit=self.config.limit,
                runtime=self.runtime,
            )
        results.examples = [
            Example(
                set=kind,
                prompt=item.text,
                responses={name: responses[i][kind][item.id] for i, name in enumerate(self.names)},
            )
            for kind in ("harmful", "benign", "helpful")
            for item in self.sets[kind][: self.config.examples // 3 or 1]
        ]
        results.warnings = list(self.warnings)
        write_json(self.out / "results.json", results)
        write_report(results, self.out / "report.html")
        return results

    def harm_by_round(self, sl_run: str) -> dict[str, Any]:
        """Mean harm score of the response after each revision round (round 0 = initial), over the run's prompts."""
        from cai_engine.records import SLRecord
        from cai_engine.store.runs import RunDirectory

        records = [r for r in RunDirectory(sl_run, "sl", SLRecord).records() if r.kind == "red-team" and r.rounds]
        rows = []
        for record in records:
            current = record.initial_response or ""
            texts = [current]
            for entry in record.rounds:
                if entry.accepted and entry.revision:
                    current = entry.revision
                texts.append(current)
            rows.append((record.conversation, texts))
        rounds = max((len(t) for _, t in rows), default=0)
        means = []
        for r in range(rounds):
            tasks = [
                ScoringTask(conversation=c, response=t[r] or " ", principles=self.harm) for c, t in rows if r < len(t)
            ]
            means.append(mean_of([s.value for s in self.scorer.score(tasks)]))
        return {"run": sl_run, "prompts": len(rows), "mean_harm_score_by_round": means}


def evaluate(
    config: EvalConfig | dict[str, Any], out: str | Path, *, runtime: Runtime | None = None, progress: bool = True
) -> EvalResults:
    """Evaluate (or resume evaluating) ``config``'s models into ``out`` (``config`` may be its JSON form); returns
    the results, also written as ``results.json`` beside ``report.html``."""
    config = config if isinstance(config, EvalConfig) else EvalConfig.model_validate(config)
    return Evaluation(config, out, runtime).run(progress=progress)
