"""Phase 2, RLAIF: preference labels from the judge, the judge quality gate, human feedback, and TRL exports.

Two recipes make pairs: ``judged`` samples two responses per prompt and has the judge compare them against
randomly drawn comparison principles, in both orders (the paper); ``revision`` takes phase-1 records and prefers
each final revision over the initial response (the Hugging Face recipe). Abstentions are recorded and counted;
they never become labels.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .config import ComponentRef
from .errors import ConfigError, RunError
from .jsonl import iter_jsonl
from .models import Constitution, Message, Phase
from .outputs import write_atomic
from .prompts import PromptItem, is_heldout, load_prompt_file, load_prompts, refuse_heldout_content
from .records import ComparisonTask
from .runs import RunDirectory, now
from .runtime import DEFAULT_MODEL, ModelRef, Runtime
from .stats import wilson_interval


class RLConfig(BaseModel):
    """Everything a labelling run depends on. Flags of ``cai rl label`` override a ``--config`` file."""

    model_config = ConfigDict(extra="forbid")

    constitution: str = Field("harmless", description="Constitution name or file (its rl principles are used).")
    recipe: Literal["judged", "revision"] = Field(
        "judged",
        description="'judged': sample two responses and let the judge label them; 'revision': prefer each "
        "phase-1 revision over its original response.",
    )
    prompts: str = Field("builtin:red-team", description="Prompts to sample pairs for (recipe 'judged').")
    field: str | None = Field(None, description="Which field of the prompt file holds the prompt.")
    limit: int | None = Field(None, ge=1, description="Use only the first N prompts.")
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

    @field_validator("sampler", "judge", mode="before")
    @classmethod
    def _ref(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _recipe_inputs(self) -> RLConfig:
        if self.recipe == "revision" and not self.sl_run:
            raise ValueError("recipe 'revision' needs sl_run (a phase-1 run directory)")
        return self

    def fingerprint(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"limit", "batch_size"})

    def sampler_ref(self) -> ComponentRef:
        options = dict(self.sampler.options)
        if self.sampler.name == "model":
            options.setdefault("model", self.model)
            options.setdefault("seed", self.seed)
        return ComponentRef(name=self.sampler.name, options=options)

    def judge_ref(self) -> ComponentRef:
        options = dict(self.judge.options)
        options.setdefault("model", self.judge_model or self.model)
        return ComponentRef(name=self.judge.name, options=options)


def _rng(seed: int, key: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big"))


def draw_principles(
    runtime: Runtime, constitution: Constitution, item: dict[str, Any], k: int, rng: random.Random
) -> list:
    """``k`` distinct rl principles for one comparison, through the ``cai_select_principles`` hook."""
    candidates = constitution.for_phase(Phase.rl)
    if not candidates:
        raise ConfigError(f"constitution {constitution.name!r} has no principles for the rl phase")
    chosen: list = []
    for round_index in range(k * 4):
        if len(chosen) == min(k, len(candidates)):
            break
        pool = [p for p in candidates if p not in chosen]
        pick = runtime.pm.hook.cai_select_principles(
            constitution=constitution, candidates=pool, item=item, phase=Phase.rl, round=round_index, rng=rng
        )
        if pick:
            chosen.append(pick[0])
    return chosen


def judgement_record(judgement) -> dict[str, Any]:
    return judgement.model_dump(mode="json")


class LabelRun:
    def __init__(self, config: RLConfig, out: str | Path, runtime: Runtime | None = None) -> None:
        self.config = config
        self.runtime = runtime or Runtime.default()
        self.constitution = self.runtime.registry.constitution(config.constitution)
        self.judge = config.judge_ref().build("judge", self.runtime)
        self.sampler = config.sampler_ref().build("sampler", self.runtime) if config.recipe == "judged" else None
        self.dir = RunDirectory(out, "rl")
        if config.recipe == "judged" and not config.allow_heldout and is_heldout(config.prompts, self.runtime.registry):
            raise ConfigError(
                f"{config.prompts} is an evaluation-only (held-out) prompt set; labelling it for "
                "training would contaminate evaluation. Choose another set, or set allow_heldout: true"
            )
        self.items: list[tuple[str, Any]]
        if config.recipe == "judged":
            self.items = [
                ("pair", item)
                for item in load_prompts(config.prompts, self.runtime.registry, field=config.field, limit=config.limit)
            ]
            if not config.allow_heldout:
                refuse_heldout_content([item for _, item in self.items], self.runtime.registry, config.prompts)
        else:
            assert config.sl_run is not None  # the config's validator requires it for this recipe
            sl = RunDirectory(config.sl_run, "sl")
            sl.manifest()
            records = [r for r in sl.records() if r.get("kind") == "red-team" and r.get("revised")]
            if not records:
                raise RunError(f"{config.sl_run}: has no revised red-team records to build pairs from")
            self.items = [("revision", r) for r in records][: config.limit]
        self.provenance = {
            "constitution": {
                "name": self.constitution.name,
                "version": self.constitution.version,
                "hash": self.constitution.content_hash(),
            },
            "recipe": config.recipe,
            "seed": config.seed,
        }

    def run(self, *, progress: bool = True) -> dict[str, Any]:
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
        summary = summarise_preferences(self.dir)
        summary.update(
            written=written, resumed=resumed, run_dir=str(self.dir.path), seconds=round(time.perf_counter() - began, 1)
        )
        return summary

    @staticmethod
    def _key(kind: str, item: Any) -> str:
        return f"pair:{item.id}" if kind == "pair" else f"revision:{item['key']}"

    def _label(self, batch) -> list[dict[str, Any]]:
        conversations, pairs, keys, meta = [], [], [], []
        if self.config.recipe == "judged":
            items = [item for _, item in batch]
            assert self.sampler is not None
            samples = self.sampler.sample([i.conversation for i in items], n=2)
            for item, (a, b) in zip(items, samples):
                conversations.append(item.conversation)
                pairs.append((a, b))
                keys.append(f"pair:{item.id}")
                meta.append({"id": item.id, "category": item.category, "source": "ai"})
        else:
            for _, record in batch:
                conversations.append([Message.model_validate(m) for m in record["conversation"]])
                pairs.append((record["final_response"], record["initial_response"]))
                keys.append(f"revision:{record['key']}")
                meta.append({"id": record["id"], "category": record.get("category"), "source": "revision"})
        tasks, task_index = [], []
        principle_ids = []
        for i, (conversation, (a, b)) in enumerate(zip(conversations, pairs)):
            rng = _rng(self.config.seed, keys[i])
            chosen = draw_principles(
                self.runtime,
                self.constitution,
                {"id": meta[i]["id"], "conversation": conversation},
                self.config.principles_per_label,
                rng,
            )
            principle_ids.append([p.id for p in chosen])
            if a.strip() and b.strip() and a.strip() != b.strip():
                tasks.append(
                    ComparisonTask(
                        conversation=conversation,
                        response_a=a,
                        response_b=b,
                        principles=chosen,
                        examples=self.constitution.comparison_examples,
                    )
                )
                task_index.append(i)
        judgements = dict(zip(task_index, self.judge.compare(tasks))) if tasks else {}
        judge_info = self.judge.describe()
        records = []
        for i, conversation in enumerate(conversations):
            a, b = pairs[i]
            judgement = judgements.get(i)
            if judgement is None:
                reason = "identical responses" if a.strip() == b.strip() else "an empty response"
                record_judgement = {"abstained": True, "reason": reason, "p_a": None}
                p_a = None
            else:
                record_judgement = judgement_record(judgement)
                p_a = judgement.p_a
            if meta[i]["source"] == "revision":
                label: float | None = (
                    1.0  # the recipe's label: the revision is preferred; the judge's view is kept alongside
                )
            else:
                label = p_a
            records.append(
                {
                    "key": keys[i],
                    "id": meta[i]["id"],
                    "category": meta[i]["category"],
                    "source": meta[i]["source"],
                    "conversation": [m.model_dump() for m in conversation],
                    "response_a": a,
                    "response_b": b,
                    "principle_ids": principle_ids[i],
                    "label": label,
                    "judgement": record_judgement,
                    "provenance": {**self.provenance, "judge": judge_info},
                    "created": now(),
                }
            )
        return records


def run_labels(
    config: RLConfig | dict[str, Any], out: str | Path, *, runtime: Runtime | None = None, progress: bool = True
) -> dict[str, Any]:
    """Label (or resume labelling) preference pairs into ``out``."""
    if not isinstance(config, RLConfig):
        config = RLConfig.model_validate(config)
    return LabelRun(config, out, runtime).run(progress=progress)


def summarise_preferences(run_dir: RunDirectory | str | Path) -> dict[str, Any]:
    directory = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory(run_dir, "rl")
    total = labelled = abstained = consistent = ordered = 0
    by_source: dict[str, int] = {}
    for record in directory.records():
        total += 1
        by_source[record["source"]] = by_source.get(record["source"], 0) + 1
        j = record.get("judgement") or {}
        if j.get("abstained"):
            abstained += 1
        elif j.get("p_a") is not None and j.get("position_consistent") is not None:
            ordered += 1  # only judges that saw an order can be consistent about it (pointwise: not applicable)
            consistent += bool(j.get("position_consistent"))
        labelled += record.get("label") is not None
    return {
        "pairs": total,
        "labelled": labelled,
        "abstained": abstained,
        "by_source": by_source,
        "position_consistency": round(consistent / ordered, 4) if ordered else None,
    }


# -- the judge quality gate ---------------------------------------------------------------------------------------


class LabelledPair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    prompt: str
    better: str
    worse: str
    principle: str | None = Field(None, description="Principle id the pair tests (default: drawn from rl ones).")
    aspect: str | None = None


def load_labelled_pairs(source: str | Path) -> list[LabelledPair]:
    from .resources import data_dir

    path = data_dir("prompts") / "judge-pairs.jsonl" if str(source) == "builtin:judge-pairs" else Path(source)
    pairs = []
    for where, row in iter_jsonl(path):
        try:
            pairs.append(LabelledPair.model_validate(row))
        except ValueError as exc:
            raise ConfigError(
                f"{where}: not a labelled pair (id, prompt, better, worse): {str(exc).splitlines()[1].strip()}"
            ) from None
    if not pairs:
        raise ConfigError(f"{path}: contains no labelled pairs")
    return pairs


def measure_judge(
    judge, pairs: list[LabelledPair], constitution: Constitution, *, runtime: Runtime, seed: int = 0
) -> dict[str, Any]:
    """Accuracy, position consistency and calibration of ``judge`` on pairs with known answers (CAI-SPEC §8.1).

    Which reply is shown first is randomised (seeded), so a judge that always picks one position scores 50%.
    """
    tasks, truth = [], []
    for pair in pairs:
        rng = _rng(seed, pair.id)
        principle = (
            constitution.principle(pair.principle)
            if pair.principle
            else draw_principles(runtime, constitution, {"id": pair.id}, 1, rng)[0]
        )
        better_first = rng.random() < 0.5
        a, b = (pair.better, pair.worse) if better_first else (pair.worse, pair.better)
        tasks.append(
            ComparisonTask(
                conversation=[Message(role="user", content=pair.prompt)],
                response_a=a,
                response_b=b,
                principles=[principle],
            )
        )
        truth.append(better_first)
    judgements = judge.compare(tasks)
    scored = [(j, t) for j, t in zip(judgements, truth) if j.p_a is not None]
    # a tie (p = 0.5) is half right, whichever reply was better: no tie-break may favour a position
    correct = sum(0.5 if j.p_a == 0.5 else float((j.p_a > 0.5) == t) for j, t in scored)
    ordered = [j for j, _ in scored if j.position_consistent is not None]  # pointwise judges see no order
    consistent = sum(bool(j.position_consistent) for j in ordered)
    # calibration: expected calibration error over 5 bins of the confidence in the chosen answer
    bins: dict[int, list[tuple[float, float]]] = {}
    for j, t in scored:
        confidence = max(j.p_a, 1 - j.p_a)
        right = 0.5 if j.p_a == 0.5 else float((j.p_a > 0.5) == t)  # a tie is half right, as in accuracy
        bins.setdefault(min(int((confidence - 0.5) * 10), 4), []).append((confidence, right))
    ece = (
        sum(
            len(v) / len(scored) * abs(sum(c for c, _ in v) / len(v) - sum(ok for _, ok in v) / len(v))
            for v in bins.values()
        )
        if scored
        else None
    )
    interval = wilson_interval(correct, len(scored))
    return {
        "pairs": len(pairs),
        "scored": len(scored),
        "abstained": len(pairs) - len(scored),
        "scored_share": round(len(scored) / len(pairs), 4) if pairs else None,
        "accuracy": round(correct / len(scored), 4) if scored else None,
        "accuracy_ci95": [round(interval[0], 4), round(interval[1], 4)] if interval else None,
        "position_consistency": round(consistent / len(ordered), 4) if ordered else None,
        "same_position_rate": round(1 - consistent / len(ordered), 4) if ordered else None,
        "expected_calibration_error": round(ece, 4) if ece is not None else None,
        "judge": judge.describe(),
    }


def judge_identity(described: dict[str, Any] | None) -> dict[str, Any] | None:
    """What makes two judges the same judge: component name, options (layout, few-shot, model) and model id."""
    if not described:
        return None
    return {"name": described.get("name"), "options": described.get("options"), "model_id": described.get("model_id")}


def run_gate(
    run: str | Path | None,
    judge_ref: ComponentRef | dict[str, Any],
    *,
    constitution: str = "harmless",
    pairs: str = "builtin:judge-pairs",
    runtime: Runtime | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure a judge; with ``run``, store the result as the run's ``gate.json`` (the trainers read it)."""
    runtime = runtime or Runtime.default()
    ref = judge_ref if isinstance(judge_ref, ComponentRef) else ComponentRef.model_validate(judge_ref)
    judge = ref.build("judge", runtime)
    result = measure_judge(
        judge, load_labelled_pairs(pairs), runtime.registry.constitution(constitution), runtime=runtime, seed=seed
    )
    result.update(pairs_source=str(pairs), measured=now())
    if run is not None:
        path = Path(run) / "gate.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(result, indent=2) + "\n")
    return result


# -- human feedback -----------------------------------------------------------------------------------------------

TRANSCRIPT_TURN = r"\n\n(Human|Assistant):"


def _as_messages(value: Any, where: str, default_role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ConfigError(f"{where}: expected text or a list of {{role, content}} messages")


def _split_transcript(text: str) -> list[dict[str, str]]:
    import re

    parts = re.split(TRANSCRIPT_TURN, "\n\n" + text.strip() if not text.startswith("\n\n") else text)
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return messages


def import_human(path: str | Path) -> list[dict[str, Any]]:
    """Human preference pairs from the common Hugging Face layouts, as preference rows (source ``human``).

    Accepted per line (JSONL) or per row (a ``datasets`` folder / parquet): ``prompt`` + ``chosen`` + ``rejected``
    (text or messages, TRL's explicit-prompt format); or ``chosen`` + ``rejected`` full conversations sharing a
    prefix (TRL's implicit-prompt format and Anthropic hh-rlhf's ``Human:/Assistant:`` transcripts). An optional
    ``label`` / ``chosen_probability`` in [0, 1] gives a soft label.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    if path.is_dir() or path.suffix in (".parquet", ".arrow"):
        import datasets

        ds = (
            datasets.load_from_disk(str(path))
            if path.is_dir()
            else datasets.load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train")
        )
        rows = [(f"{path}[{i}]", dict(r)) for i, r in enumerate(ds)]
    else:
        rows = list(iter_jsonl(path))
    out = []
    for where, row in rows:
        if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
            found = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(
                f"{where}: a preference row needs 'chosen' and 'rejected' (and optionally 'prompt'); found: {found}"
            )
        label = row.get("label", row.get("chosen_probability", 1.0))
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0 <= float(label) <= 1:
            raise ConfigError(f"{where}: label must be a number in [0, 1], got {label!r}")
        if "prompt" in row and row["prompt"] not in (None, ""):
            prompt = _as_messages(row["prompt"], where, "user")
            chosen = _as_messages(row["chosen"], where, "assistant")
            rejected = _as_messages(row["rejected"], where, "assistant")
        else:
            c = (
                _split_transcript(row["chosen"])
                if isinstance(row["chosen"], str)
                else _as_messages(row["chosen"], where, "assistant")
            )
            r = (
                _split_transcript(row["rejected"])
                if isinstance(row["rejected"], str)
                else _as_messages(row["rejected"], where, "assistant")
            )
            shared = 0
            while shared < min(len(c), len(r)) - 1 and c[shared] == r[shared]:
                shared += 1
            prompt, chosen, rejected = c[:shared], c[shared:], r[shared:]
        if not prompt or prompt[-1]["role"] != "user" or not chosen or not rejected:
            raise ConfigError(f"{where}: could not find a prompt ending with a user turn and two replies")
        out.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "chosen_probability": float(label),
                "source": "human",
                "prompt_id": "human:" + hashlib.sha1(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:12],
                "principle_ids": [],
            }
        )
    if not out:
        raise ConfigError(f"{path}: contains no preference pairs")
    return out


def export_review(run: str | Path, out: str | Path, *, count: int = 50) -> dict[str, Any]:
    """The judge's least confident and most disputed pairs, as a JSONL file for human review.

    Abstentions come first, then pairs whose two orders disagreed, then by closeness of the label to 0.5. Reviewers
    fill ``human_choice`` with "a", "b" or a probability that A is better; `merge_review` brings them back.
    """
    directory = RunDirectory(run, "rl")
    rows = []
    for record in directory.records():
        j = record.get("judgement") or {}
        p = record.get("label")
        priority = (
            0 if p is None else 1 if j.get("position_consistent") is False else 2,
            abs(p - 0.5) if p is not None else 0,
        )
        rows.append(
            (
                priority,
                {
                    "key": record["key"],
                    "conversation": record["conversation"],
                    "response_a": record["response_a"],
                    "response_b": record["response_b"],
                    "ai_p_a": p,
                    "position_consistent": j.get("position_consistent"),
                    "principle_ids": record["principle_ids"],
                    "human_choice": None,
                },
            )
        )
    rows.sort(key=lambda r: r[0])
    chosen = [r for _, r in rows[:count]]
    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen))
    return {"exported": len(chosen), "out": str(out)}


def merge_review(run: str | Path, reviewed: str | Path) -> dict[str, Any]:
    """Bring reviewed labels back: they override the AI label of their pair at export (source ``human-review``)."""
    directory = RunDirectory(run, "rl")
    keys = {r["key"] for r in directory.records()}
    merged, skipped, lines = 0, 0, []
    for where, row in iter_jsonl(reviewed):
        if row.get("key") not in keys:
            raise ConfigError(f"{where}: key {row.get('key')!r} is not a pair of {run}")
        choice = row.get("human_choice")
        if choice is None:
            skipped += 1
            continue
        if choice in ("a", "A"):
            p = 1.0
        elif choice in ("b", "B"):
            p = 0.0
        elif isinstance(choice, (int, float)) and not isinstance(choice, bool) and 0 <= choice <= 1:
            p = float(choice)
        else:
            raise ConfigError(f"{where}: human_choice must be 'a', 'b' or a probability in [0, 1], got {choice!r}")
        lines.append({"key": row["key"], "p_a": p, "reviewed": now()})
        merged += 1
    with open(Path(run) / "reviews.jsonl", "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in lines))
    return {"merged": merged, "skipped_unreviewed": skipped}


# -- export -------------------------------------------------------------------------------------------------------


class PreferenceExportOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_confidence: float = Field(0.0, ge=0, lt=0.5, description="Drop AI labels with |p - 0.5| below this.")
    heldout: float = Field(0.1, ge=0, lt=1, description="Share of prompts in the test split.")
    human: list[str] = Field(default_factory=list, description="Human preference files to mix in.")


def _bucket(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def export_preferences(
    run: str | Path, out: str | Path, options: PreferenceExportOptions | dict[str, Any] | None = None
) -> dict[str, Any]:
    """``train.jsonl``/``test.jsonl`` in TRL's conversational preference format plus a soft label.

    Each row: ``prompt`` (messages), ``chosen`` and ``rejected`` (assistant messages), ``chosen_probability`` (how
    sure the label is that ``chosen`` is better, in [0.5, 1] for AI labels), ``source`` (ai, revision, human,
    human-review). The run's judge gate result is carried into ``export.json`` for the trainers.
    """
    options = (
        options
        if isinstance(options, PreferenceExportOptions)
        else PreferenceExportOptions.model_validate(options or {})
    )
    directory = RunDirectory(run, "rl")
    manifest = directory.manifest()
    if manifest.get("kind") != "rl":
        raise RunError(f"{run}: not a preference-labelling (rl) run directory")
    reviews = {}
    if (Path(run) / "reviews.jsonl").exists():
        for line in (Path(run) / "reviews.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                review = json.loads(line)
                reviews[review["key"]] = review["p_a"]
    rows, abstained, filtered = [], 0, 0
    for record in directory.records(required=("key", "source", "conversation", "response_a", "response_b")):
        p, source = record.get("label"), record["source"]
        if record["key"] in reviews:
            p, source = reviews[record["key"]], "human-review"
        if p is None:
            abstained += 1
            continue
        if source == "ai" and abs(p - 0.5) < options.min_confidence:
            filtered += 1
            continue
        if p == 0.5:
            filtered += 1
            continue
        a_better = p > 0.5
        rows.append(
            {
                "prompt": record["conversation"],
                "chosen": [{"role": "assistant", "content": record["response_a" if a_better else "response_b"]}],
                "rejected": [{"role": "assistant", "content": record["response_b" if a_better else "response_a"]}],
                "chosen_probability": max(p, 1 - p),
                "source": source,
                "prompt_id": record["key"],
                "principle_ids": record["principle_ids"],
            }
        )
    for human_file in options.human:
        rows += import_human(human_file)
    if not rows:
        raise RunError(f"{run}: no labelled pairs to export ({abstained} abstained, {filtered} filtered)")
    test = [r for r in rows if _bucket(r["prompt_id"]) < options.heldout]
    train = [r for r in rows if _bucket(r["prompt_id"]) >= options.heldout]
    if options.heldout and not test and len(train) > 1:
        test, train = train[-1:], train[:-1]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        write_atomic(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    gate = None
    if (Path(run) / "gate.json").exists():
        gate = json.loads((Path(run) / "gate.json").read_text(encoding="utf-8"))
    labelling_judges = {
        json.dumps(judge_identity(r.get("provenance", {}).get("judge")), sort_keys=True)
        for r in directory.records()
        if r.get("source") == "ai"
    }
    gate_matches = None
    if gate is not None and labelling_judges:
        gate_matches = labelling_judges == {json.dumps(judge_identity(gate.get("judge")), sort_keys=True)}
    sources: dict[str, int] = {}
    for r in rows:
        sources[r["source"]] = sources.get(r["source"], 0) + 1
    summary = {
        "format": "trl-conversational-preference",
        "source_run": str(run),
        "train": len(train),
        "test": len(test),
        "sources": sources,
        "abstained_excluded": abstained,
        "filtered_low_confidence": filtered,
        "options": options.model_dump(),
        "judge_gate": gate,
        "judge_gate_matches": gate_matches,
        "constitution": manifest.get("provenance", {}).get("constitution"),
    }
    write_atomic(out / "export.json", json.dumps(summary, indent=2) + "\n")
    return summary


def load_prompt_items(source: str, registry: Any, limit: int | None = None) -> list[PromptItem]:
    return load_prompts(source, registry, limit=limit) if ":" in source else load_prompt_file(source)[:limit]
