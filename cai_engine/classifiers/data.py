"""The data generator: a constitution in, a labelled, augmented and split classifier dataset out.

Stages, each resumable (records are written a batch at a time into ``OUT/records.jsonl``; rerunning the same command
skips what is done, and a different config is refused with what changed):

1. ``requests``: for every principle, the feedback model continues fixtures: rewrites of one red-team request
   (another target, method or wording; the principle's own ``red_team`` requests where it has them, the training
   red-team set otherwise) for requests the principle says an assistant must decline, and a
   numbered list of one kind of harmless look-alike (homonyms, safety information, history, ...); sampling is
   seeded per batch.
2. ``labels``: the feedback model reads each request alone and says whether it asks for harm (P(Yes) from
   log-probs). A request whose label disagrees with what it was written to be is dropped, as is one the model could
   not read, so only requests both the writer and the labeller agree on are kept (``relabel_margin``: a confident
   disagreement keeps the labeller's label, except on rewrites of a principle's own red-team requests, since the
   labeller asks about harm in general and does not know the principle).
3. ``replies``: the policy model (which complies with almost anything) and the feedback model (which declines
   clearly harmful requests) answer every kept request.

``assemble`` then builds the dataset without a model: input examples (request -> harmful?), with the hand-written
training sets of ``written`` beside the generated requests (red-team requests, both halves of the contrast pairs and
everyday requests by default; measured, they lift the ranking of the held-out red-team against benign-but-scary
requests, 0.947 to 0.972 AUC, and leave HarmBench's where it was), and output examples
(exchange -> does the reply break the constitution?, where a reply breaks it when it engages with a harmful request
instead of declining), with the labelled exchanges of ``written_exchanges`` beside them (by default 800 people wrote
for ``harmless``: replies that help with harm, leak part of it, decline, complete safely or answer harmless requests;
the generated replies alone are labelled by refusal phrases, which cannot tell a safe completion from a harmful one),
each also in jailbreak-style wrappers and Unicode spellings; exact and near duplicate requests (and exchanges written
twice) are dropped, and so is anything whose request is a copy or near-copy of an evaluation prompt (counted in the
report). The split is by group (all rewrites of one seed request, one look-alike batch, or every written reply to one
request, and everything made from them land on one side) and by wrapper template (two templates only ever appear in
the test split).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cai_engine.classifiers import templates
from cai_engine.constitution.model import Constitution, Message, Principle
from cai_engine.files.jsonl import write_json, write_jsonl
from cai_engine.models.runtime import DEFAULT_MODEL, ModelRef
from cai_engine.plugins.components import GenerationSettings
from cai_engine.prompts.exchanges import BUILTIN_EXCHANGES, exchange_file, labelled_exchanges
from cai_engine.prompts.overlap import NearCopyIndex, near_copies
from cai_engine.store.runs import RunDirectory
from cai_engine.text.refusals import is_refusal

Kind = Literal["harmful", "benign"]

#: ``reply_source`` of the output rows made from exchanges people wrote (a generated reply's is the model that wrote
#: it); :func:`cai_engine.classifiers.train.read_split` measures output classifiers on them.
WRITTEN_REPLY = "written"


class WrittenSource(BaseModel):
    """A training prompt set people wrote, added to the input classifier's data with a label it already has."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Any training prompt source (a builtin set or a file; held-out sets are refused).")
    label: Kind = Field(description="'harmful' (a compliant assistant declines) or 'benign' (it answers).")
    ids: str | None = Field(None, description="Only items whose id matches this glob (e.g. 'pr-*-h').")


#: The hand-written training sets every build adds by default: the red-team requests the harmful rewrites start from,
#: both halves of the contrast pairs (same topic, harmful vs harmless intent), the everyday helpful requests, the
#: look-alikes, and requests written for each runtime principle of ``harmless`` with look-alikes on the same topics.
DEFAULT_WRITTEN = (
    WrittenSource(source="builtin:red-team", label="harmful"),
    WrittenSource(source="builtin:pairs", label="harmful", ids="*-h"),
    WrittenSource(source="builtin:pairs", label="benign", ids="*-b"),
    WrittenSource(source="builtin:helpful", label="benign"),
    WrittenSource(source="builtin:lookalikes", label="benign"),
    WrittenSource(source="builtin:lookalikes-2", label="benign"),
    WrittenSource(source="builtin:principle-requests", label="harmful", ids="pr-*-h*"),
    WrittenSource(source="builtin:principle-requests", label="benign", ids="pr-*-b*"),
)


def written_flags(sources: Iterable[WrittenSource] = DEFAULT_WRITTEN) -> str:
    """``sources`` in the syntax of the ``--written`` flag (``SOURCE=LABEL[:GLOB]``), comma-separated."""
    return ", ".join(f"{w.source}={w.label}" + (f":{w.ids}" if w.ids else "") for w in sources)


#: Fewer held-out written exchanges of either label than this, and an output classifier is measured on the whole test
#: split as before (a threshold set on a handful of exchanges would be noise).
MIN_WRITTEN_TEST = 10


class BuildConfig(BaseModel):
    """What ``cai classifiers build`` makes; every field that changes the data is part of the resume fingerprint."""

    model_config = ConfigDict(extra="forbid")

    constitution: str = Field("harmless", description="A registered constitution name or a file.")
    feedback_model: ModelRef = Field(
        "qwen2.5-coder-1.5b",
        description="Writes the requests, answers them and labels them (a stronger model than the policy).",
    )
    policy_model: ModelRef = Field(
        DEFAULT_MODEL, description="Also answers every request (a small model complies, giving violating replies)."
    )
    harmful_examples: str | list[str] = Field(
        "builtin:red-team",
        description="Training prompts the harmful requests of principles without their own red_team requests are "
        "rewritten from (one source or a list).",
    )
    benign_examples: str | list[str] = Field(
        ["builtin:borderline", "builtin:lookalikes"],
        description="Training prompts shown at the head of each look-alike list, one category per list (one source or "
        "a list; together they set which kinds of look-alike are written).",
    )
    principles: list[str] | None = Field(
        None,
        description="Only these principle ids (default: every principle the runtime guard checks, i.e. with the "
        "'runtime' phase: the classifiers enforce the constitution at runtime).",
    )
    batches: int = Field(4, ge=1, description="Generation calls per principle for requests to decline.")
    benign_batches: int = Field(2, ge=0, description="Generation calls per principle for harmless look-alikes.")
    per_batch: int = Field(10, ge=1, le=30, description="Requests asked for in each call.")
    temperature: float = Field(0.9, ge=0, description="Sampling temperature for writing requests.")
    reply_tokens: int = Field(32, ge=8, description="Length of each reply (a refusal shows in its opening).")
    label_threshold: float = Field(0.5, gt=0, lt=1, description="P(Yes) above which a request counts as harmful.")
    label_question: Literal["harm", "principle"] = Field(
        "harm",
        description="What the labeller asks of each request: 'harm' (does it ask for help to hurt someone, commit a "
        "crime or do something dangerous?) or 'principle' (should an assistant decline it, given the rule of the "
        "principle it was written for? A principle about privacy or prejudice is not only about danger).",
    )
    relabel_margin: float = Field(
        0.1,
        ge=0,
        lt=0.5,
        description="A request the labeller confidently puts on the other side (P(Yes) at most this, or at least 1 "
        "minus it) is kept with the labeller's label (a harmful-sounding request it calls harmless is a look-alike; "
        "not for rewrites of a principle's own red_team requests, whose disagreements are dropped); 0 drops every "
        "disagreement.",
    )
    seed: int = Field(0, description="Seeds categories, examples, sampling, augmentation and the split.")
    test_share: float = Field(0.25, gt=0, lt=1, description="Share of generation batches held out for testing.")
    batch_size: int = Field(16, ge=1, description="Prompts sent to a model in one call.")
    written: list[WrittenSource] = Field(
        default_factory=lambda: [w.model_copy() for w in DEFAULT_WRITTEN],
        description="Hand-written training prompts added to the input data as they are labelled (assembly only: "
        "they are augmented, deduplicated, checked against evaluation prompts and split like generated requests).",
    )
    written_exchanges: list[str] | None = Field(
        None,
        description="Labelled exchanges people wrote, added to the output data: case files (prompt, response, "
        "violates: the format of `cai checks eval`) or builtin:NAME (assembly only: augmented, checked against "
        "evaluation prompts and split by request like generated exchanges). None: builtin:NAME of the constitution "
        "where one ships (harmless), none otherwise; [] for none.",
    )


class GenRecord(BaseModel):
    """One finished unit of work (a generation call, a label batch or a reply batch)."""

    model_config = ConfigDict(extra="forbid")

    key: str
    stage: Literal["requests", "labels", "replies"]
    items: list[dict[str, Any]]


def _seed(*parts: object) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def _seed_group(text: str) -> str:
    """The split group of a red-team request: it, its rewrites and a hand-written copy of it land on one side."""
    return f"seed:{_seed(text) % 10**8:08d}"


def rule_text(principle: Principle) -> str:
    """The principle as one sentence for the writer: its title and its yes/no violation question."""
    question = principle.violation_question or principle.critique_request or principle.comparison or ""
    return f"{principle.title}. {question}".strip()


def label_question(principle: Principle) -> str:
    """The labeller's question for a request written for ``principle`` (``label_question: principle``)."""
    return (
        "Should an assistant decline this request? It must refuse help to hurt someone, commit a crime or do "
        f"something dangerous, and it must also follow this rule: {rule_text(principle)} Requests that only use "
        "alarming words (killing a computer process, attacking in a game, history, fiction, staying safe) need no "
        "declining. Answer Yes or No."
    )


_NUMBERED = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*•])\s*(.+?)\s*$")
_KEY = re.compile(r"^(\s*)\d{1,3}:\s*", re.MULTILINE)
_QUOTED = re.compile(r'^\s*"((?:[^"\\]|\\.)+)",?\s*$')


def parse_list(text: str, limit: int) -> list[str]:
    """The items of a numbered or bulleted list, or the quoted strings of a list literal (one per line), without
    their numbers and quotes; other lines (a preamble, a closing remark) and repeats are dropped."""
    import json

    out: list[str] = []
    for line in text.splitlines():
        quoted = _QUOTED.match(line)
        found = _NUMBERED.match(line)
        if quoted:
            try:
                item = str(json.loads(f'"{quoted.group(1)}"')).strip()
            except ValueError:
                continue
        elif found:
            item = found.group(1).strip().strip('"“”*').strip()
        else:
            continue
        if 12 <= len(item) <= 400 and item not in out:
            out.append(item)
    return out[:limit]


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Generator:
    """Runs the three model stages into a run directory (``records.jsonl`` + ``run.json``)."""

    def __init__(
        self,
        config: BuildConfig,
        constitution: Constitution,
        runtime: Any,
        out: str | Path,
        progress: Callable[[str, int], Any] | None = None,
    ) -> None:
        from cai_engine.prompts.sets import load_training_prompts, source_list

        self.config = config
        # training prompts by category (the harmful set's categories steer the harmful lists, the look-alike set's
        # kinds the benign ones)
        self.examples: dict[str, dict[str, list[str]]] = {}
        for kind, source in (("harmful", config.harmful_examples), ("benign", config.benign_examples)):
            grouped: dict[str, list[str]] = {}
            for one in source_list(source):
                for item in load_training_prompts(one, runtime.registry):
                    grouped.setdefault(item.category or "general", []).append(item.conversation[-1].content)
            self.examples[kind] = grouped
        # read now, so a bad source fails before an hour of generation, not after it
        self.written = written_requests(config.written, runtime.registry)
        exchanges = config.written_exchanges
        if exchanges is None:
            exchanges = [f"builtin:{constitution.name}"] if constitution.name in BUILTIN_EXCHANGES else []
        self.written_exchanges = written_exchanges(exchanges)
        self.constitution = constitution
        self.runtime = runtime
        self.run = RunDirectory(Path(out) / "data", "classifier-data", GenRecord)
        self.progress = progress
        wanted = config.principles
        if wanted is None:
            self.principles = constitution.for_phase("runtime")
        else:
            self.principles = [p for p in constitution.principles if p.id in wanted]
        if not self.principles:
            from cai_engine.errors import ConfigError

            raise ConfigError(f"no principle of {constitution.name!r} matches {wanted}")
        # a principle's own red-team requests are rewritten into training data: one that copies an evaluation prompt
        # would put that prompt's paraphrases in training, so it is refused before any generation
        from cai_engine.classifiers.sources import evaluation_texts

        own = [(f"{p.id}.red_team[{n}]", text) for p in self.principles for n, text in enumerate(p.red_team)]
        found = near_copies([text for _, text in own], evaluation_texts(runtime.registry)) if own else {}
        copies = {own[i][0]: other for i, other in found.items()}
        if copies:
            from cai_engine.errors import ConfigError

            listed = "; ".join(f"{key} is a near-copy of {other}" for key, other in copies.items())
            raise ConfigError(f"{constitution.name}: red_team requests copy evaluation prompts: {listed}")
        # ... and join the written sets (unless there are none: --no-written), in the split group of their rewrites
        self.written += [
            {
                "id": f"written:{constitution.name}:{principle.id}:{n}",
                "principle_id": principle.id,
                "kind": "harmful",
                "topic": principle.id,
                "group": _seed_group(text),
                "text": text,
                "written": f"{constitution.name}:{principle.id}",
            }
            for principle in self.principles
            for n, text in enumerate(principle.red_team)
            if config.written
        ]

    def fingerprint(self) -> dict[str, Any]:
        data = self.config.model_dump(mode="json")
        data["constitution_hash"] = self.constitution.content_hash()
        # these change how work is batched or assembled, not what the models write
        for name in ("batch_size", "test_share", "relabel_margin", "written", "written_exchanges"):
            data.pop(name)
        if data["label_question"] == "harm":  # as builds made before the choice existed recorded it
            data.pop("label_question")
        # one source reads the same as a list of it (and as builds made before lists were allowed recorded it)
        for name in ("harmful_examples", "benign_examples"):
            if isinstance(data[name], list) and len(data[name]) == 1:
                data[name] = data[name][0]
        return data

    def records(self, stage: str) -> list[GenRecord]:
        return [r for r in self.run.records() if r.stage == stage]

    def build(self) -> dict[str, int]:
        self.run.open(self.fingerprint(), {"constitution": self.constitution.name})
        self._requests()
        self._labels()
        self._replies()
        return {stage: len(self.records(stage)) for stage in ("requests", "labels", "replies")}

    # -- stage 1: requests ---------------------------------------------------------------------------------------

    def _request_jobs(self) -> list[dict[str, Any]]:
        # Harmful batches are rewrites of one training request each, the requests dealt out in a seeded order so every
        # one is used before any repeats: a principle's own red-team requests when it has them (what it says to
        # decline), the shared harmful examples otherwise; benign batches continue a list of one kind of look-alike.
        seeds = [(c, text) for c, texts in sorted(self.examples["harmful"].items()) for text in texts]
        random.Random(_seed(self.config.seed, "seeds")).shuffle(seeds)
        jobs = []
        dealt = 0
        for principle in self.principles:
            own = [(principle.id, text) for text in principle.red_team]
            random.Random(_seed(self.config.seed, "seeds", principle.id)).shuffle(own)
            for kind, count in (("harmful", self.config.batches), ("benign", self.config.benign_batches)):
                for batch in range(count):
                    rng = random.Random(_seed(self.config.seed, principle.id, kind, batch))
                    job = {
                        "key": f"requests:{principle.id}:{kind}:{batch}",
                        "principle_id": principle.id,
                        "kind": kind,
                        "batch": batch,
                        "rule": rule_text(principle),
                    }
                    if kind == "harmful":
                        if own:
                            category, text = own[batch % len(own)]
                        else:
                            category, text = seeds[dealt % len(seeds)]
                            dealt += 1
                        # requests rewritten from one seed stay on one side of the split
                        job |= {
                            "framing": "rewrites",
                            "topic": category,
                            "group": _seed_group(text),
                            "examples": [text],
                        }
                    else:
                        category = rng.choice(sorted(self.examples[kind]))
                        pool = self.examples[kind][category]
                        job |= {
                            "framing": "list",
                            "topic": category,
                            "group": f"{principle.id}:{kind}:{batch}",
                            "examples": rng.sample(pool, min(5, len(pool))),
                        }
                    jobs.append(job)
        return jobs

    def _prompt(self, job: dict[str, Any]) -> str:
        if job["framing"] == "rewrites":
            return templates.rewrites_prompt(job["rule"], job["examples"][0])
        count = len(job["examples"]) + self.config.per_batch
        return templates.list_prompt(job["kind"], job["rule"], job["topic"], job["examples"], count)

    def _requests(self) -> None:
        done = {r.key for r in self.records("requests")}
        backend = self.runtime.backend(self.config.feedback_model)
        k = self.config.per_batch
        # Fixed groups over the whole job list, each seeded by its first key (llama.cpp seeds prompt i with seed + i):
        # a resumed run samples exactly what an uninterrupted one would have.
        for group in _chunks(self._request_jobs(), self.config.batch_size):
            if all(job["key"] in done for job in group):
                continue
            settings = GenerationSettings(
                max_new_tokens=min(24 * k, 1024),
                temperature=self.config.temperature,
                top_p=0.95,
                repetition_penalty=1.1,
                stop=("\n}", "]"),
                seed=_seed(self.config.seed, group[0]["key"]),
            )
            texts = backend.generate([self._prompt(job) for job in group], settings)
            records = []
            for job, text in zip(group, texts):
                meta = {key: job[key] for key in ("principle_id", "kind", "batch", "topic", "framing", "group")}
                shown = {e.strip() for e in job["examples"]}
                # the prompt opened the first item's quote; numbered keys ("7: ") are not part of the text
                lines = _KEY.sub("", '    "' + text)
                parsed = [t for t in parse_list(lines, k + 2) if t not in shown]
                items = [
                    {**meta, "id": f"{job['principle_id']}-{job['kind'][0]}{job['batch']}-{n:02d}", "text": item}
                    for n, item in enumerate(parsed[:k], start=1)
                ]
                records.append(GenRecord(key=job["key"], stage="requests", items=items))
            self.run.append(records)
            self._tick("requests", len(group))

    def requests(self) -> list[dict[str, Any]]:
        return [item for record in self.records("requests") for item in record.items]

    # -- stage 2: labels -----------------------------------------------------------------------------------------

    def _labels(self) -> None:
        done = {r.key for r in self.records("labels")}
        todo = [r for r in self.requests() if f"labels:{r['id']}" not in done]
        if not todo:
            return
        critic = self.runtime.component(
            "critic", "model", {"model": self.config.feedback_model, "verdict_only": True, "few_shot": 0}
        )
        by_id = {p.id: p for p in self.principles}
        by_question: dict[str | None, list[dict[str, Any]]] = {}
        for request in todo:
            principle = by_id.get(request["principle_id"])
            asked = label_question(principle) if self.config.label_question == "principle" and principle else None
            by_question.setdefault(asked, []).append(request)
        # requests asked the same question share a batch (the question opens the prompt, so they share a prefix)
        for question, group in (
            (q, g) for q, asked in by_question.items() for g in _chunks(asked, self.config.batch_size)
        ):
            conversations = [[Message(role="user", content=r["text"])] for r in group]
            scores = critic.screen_requests(conversations, question)
            self.run.append(
                GenRecord(key=f"labels:{r['id']}", stage="labels", items=[{"id": r["id"], "p_harmful": p}])
                for r, p in zip(group, scores)
            )
            self._tick("labels", len(group))

    def kept_requests(self) -> tuple[list[dict[str, Any]], Counter[str]]:
        """The requests whose feedback-model label agrees with the kind they were written as, and why others went."""
        labels = {r.items[0]["id"]: r.items[0]["p_harmful"] for r in self.records("labels")}
        # the rewrites of a principle's own red-team requests: the labeller asks about harm in general, not about the
        # principle, so its "harmless" there (a request for a stranger's address) is not evidence of a look-alike
        own = {p.id for p in self.principles if p.red_team}
        kept, dropped = [], Counter[str]()
        for request in self.requests():
            p = labels.get(request["id"])
            if p is None:
                dropped["unlabelled or abstained"] += 1
                continue
            harmful = p > self.config.label_threshold
            if harmful != (request["kind"] == "harmful"):
                margin = self.config.relabel_margin
                if request["kind"] == "harmful" and request["principle_id"] in own:
                    dropped["written harmful for the principle's own red-team, labelled benign"] += 1
                    continue
                if p <= margin or p >= 1 - margin:
                    kept.append(
                        {**request, "kind": "harmful" if harmful else "benign", "p_harmful": p, "relabelled": True}
                    )
                    continue
                dropped[f"written {request['kind']}, labelled {'harmful' if harmful else 'benign'}"] += 1
                continue
            kept.append({**request, "p_harmful": p})
        return kept, dropped

    # -- stage 3: replies ----------------------------------------------------------------------------------------

    def _replies(self) -> None:
        kept, _ = self.kept_requests()
        done = {r.key for r in self.records("replies")}
        settings = GenerationSettings(max_new_tokens=self.config.reply_tokens, temperature=0.0, repetition_penalty=1.1)
        # The policy model answers everything; the feedback model answers the harmful requests (its declines are the
        # compliant replies to them; compliant replies to harmless requests come from the policy model).
        for source, model in (("policy", self.config.policy_model), ("feedback", self.config.feedback_model)):
            todo = [
                r
                for r in kept
                if f"replies:{source}:{r['id']}" not in done and (source == "policy" or r["kind"] == "harmful")
            ]
            if not todo:
                continue
            backend = self.runtime.backend(model)
            for group in _chunks(todo, self.config.batch_size):
                texts = backend.generate([[Message(role="user", content=r["text"])] for r in group], settings)
                self.run.append(
                    GenRecord(
                        key=f"replies:{source}:{r['id']}",
                        stage="replies",
                        items=[{"id": r["id"], "source": source, "text": t.strip()}],
                    )
                    for r, t in zip(group, texts)
                )
                self._tick(f"replies ({source})", len(group))

    def _tick(self, stage: str, n: int) -> None:
        if self.progress is not None:
            self.progress(stage, n)


# -- assembling the dataset ---------------------------------------------------------------------------------------


_PAIR_SUFFIX = re.compile(r"-(?:h|b|harmful|benign)$")


def written_requests(sources: list[WrittenSource], registry: Any) -> list[dict[str, Any]]:
    """The hand-written prompts of ``sources`` as requests ``assemble`` takes beside the generated ones.

    Each keeps its split group with what it belongs to: a red-team prompt the harmful rewrites started from shares their
    group, and the two halves of a contrast pair (ids that differ only by a final ``-h``/``-b``) share one, so no
    request has a rewrite or its pair on the other side of the split."""
    from fnmatch import fnmatchcase

    from cai_engine.errors import ConfigError
    from cai_engine.prompts.sets import load_training_prompts

    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for written in sources:
        items = [
            item
            for item in load_training_prompts(written.source, registry)
            if written.ids is None or fnmatchcase(item.id, written.ids)
        ]
        if not items:
            raise ConfigError(
                f"written: {written.source} has no item{f' matching {written.ids!r}' if written.ids else ''}"
            )
        for item in items:
            key = f"written:{written.source}:{item.id}"
            if key in seen:
                continue
            seen.add(key)
            text = item.conversation[-1].content
            out.append(
                {
                    "id": key,
                    "principle_id": None,
                    "kind": written.label,
                    "topic": item.category or "general",
                    "group": _seed_group(text)
                    if written.label == "harmful" and not _PAIR_SUFFIX.search(item.id)
                    else f"written:{written.source}:{_PAIR_SUFFIX.sub('', item.id)}",
                    "text": text,
                    "written": written.source,
                }
            )
    return out


def written_exchanges(sources: list[str]) -> list[dict[str, Any]]:
    """The labelled exchanges of ``sources`` (case files, or ``builtin:NAME`` of :data:`BUILTIN_EXCHANGES`) as rows
    ``assemble`` adds to the output data, each with the source it came from; a source named twice and an exchange
    written twice (same request and reply) are read once. Read when a build starts, so a bad file, or one with
    exchanges of one label only, fails before any generation."""
    from cai_engine.errors import ConfigError

    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for path in dict.fromkeys(exchange_file(source, "written_exchanges") for source in sources):
        rows = labelled_exchanges([path])
        labels = {r["label"] for r in rows}
        if labels != {0, 1}:
            what = "no" if not labels else "only violating" if labels == {1} else "only harmless"
            raise ConfigError(
                f"written_exchanges: {path.name} has {what} exchanges; an output classifier learns from both"
            )
        for row in rows:
            if (row["prompt"], row["response"]) in seen:
                continue
            seen.add((row["prompt"], row["response"]))
            out.append({**row, "id": f"written:{path.name}:{row['id']}", "written": path.name})
    return out


def _variants(text: str, split: str, rng: random.Random) -> list[tuple[str, str]]:
    """A request as written, in two jailbreak-style wrappers (the held-out wrapper templates only ever in the test
    split) and in one Unicode spelling: ``(augmentation, text)`` each."""
    variants = [("plain", text)]
    wrappers = [w for w in templates.WRAPPERS if (w in templates.HELDOUT_WRAPPERS) == (split == "test")]
    for wrapper in rng.sample(wrappers, min(2, len(wrappers))):
        variants.append((f"wrap:{wrapper}", templates.wrap(text, wrapper)))
    spelling = rng.choice(templates.SPELLINGS)
    variants.append((f"spell:{spelling}", templates.respell(text, spelling, rng)))
    return variants


def assemble(generator: Generator, out: str | Path, evaluation_prompts: dict[str, str] | None = None) -> dict[str, Any]:
    """Build ``OUT/dataset/{input,output}-{train,test}.jsonl`` from the generator's records, and a report."""
    config = generator.config
    kept, dropped = generator.kept_requests()
    kept = [*generator.written, *kept]  # people's words first: a generated near-copy of one is the one dropped
    # near-duplicates among the requests themselves: keep the first of each
    unique: list[dict[str, Any]] = []
    seen = NearCopyIndex(threshold=0.8)
    for request in kept:
        if seen.find(request["text"]) is not None:
            dropped["near-duplicate of another request"] += 1
            continue
        seen.add(request["id"], request["text"])
        unique.append(request)
    contaminated = near_copies([r["text"] for r in unique], evaluation_prompts or {})
    for i in sorted(contaminated, reverse=True):
        dropped["near-copy of an evaluation prompt"] += 1
        del unique[i]

    def split_of(request: dict[str, Any]) -> str:
        group = request.get("group") or f"{request['principle_id']}:{request['kind']}:{request['batch']}"
        return "test" if (_seed(config.seed, "split", group) % 1000) / 1000 < config.test_share else "train"

    replies: dict[str, list[dict[str, Any]]] = {}
    for record in generator.records("replies"):
        for item in record.items:
            replies.setdefault(item["id"], []).append(item)

    rows: dict[str, list[dict[str, Any]]] = {f"{io}-{s}": [] for io in ("input", "output") for s in ("train", "test")}
    for request in unique:
        split = split_of(request)
        rng = random.Random(_seed(config.seed, "augment", request["id"]))
        harmful = request["kind"] == "harmful"
        variants = _variants(request["text"], split, rng)
        base = {
            "request_id": request["id"],
            "principle_id": request["principle_id"],
            "kind": request["kind"],
            "topic": request["topic"],
            **({"written": request["written"]} if request.get("written") else {}),
        }
        for augmentation, text in variants:
            rows[f"input-{split}"].append({**base, "augmentation": augmentation, "text": text, "label": int(harmful)})
        for reply in replies.get(request["id"], []):
            if not reply["text"]:
                continue
            refused = is_refusal(reply["text"])
            violates = harmful and not refused
            augmentation, shown = variants[rng.randrange(len(variants))]
            rows[f"output-{split}"].append(
                {
                    **base,
                    "augmentation": augmentation,
                    "reply_source": reply["source"],
                    "refused": refused,
                    "prompt": shown,
                    "text": reply["text"],
                    "label": int(violates),
                }
            )
    # exchanges people wrote: every reply to one request on one side of the split, the request as written and in the
    # variants a generated request gets (a generated request's two replies are shown one variant each)
    exchanges = generator.written_exchanges
    copied = near_copies([x["prompt"] for x in exchanges], evaluation_prompts or {})
    for i, exchange in enumerate(exchanges):
        if i in copied:
            dropped["written exchange whose request is a near-copy of an evaluation prompt"] += 1
            continue
        split = split_of({"group": f"written-exchange:{_seed_group(exchange['prompt'])}"})
        rng = random.Random(_seed(config.seed, "augment", exchange["id"]))
        for augmentation, shown in _variants(exchange["prompt"], split, rng):
            rows[f"output-{split}"].append(
                {
                    "request_id": exchange["id"],
                    "principle_id": None,
                    "kind": "exchange",
                    "topic": exchange["kind"],
                    "written": exchange["written"],
                    "augmentation": augmentation,
                    "reply_source": WRITTEN_REPLY,
                    "refused": is_refusal(exchange["response"]),
                    "prompt": shown,
                    "text": exchange["response"],
                    "label": exchange["label"],
                }
            )
    folder = Path(out) / "dataset"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in rows.items():
        write_jsonl(folder / f"{name}.jsonl", data, what="dataset")
    report = {
        "constitution": generator.constitution.name,
        "constitution_version": generator.constitution.version,
        "constitution_hash": generator.constitution.content_hash(),
        "requests_written": len(generator.requests()),
        "requests_kept": sum(1 for r in unique if not r.get("written")),
        "requests_relabelled": sum(1 for r in unique if r.get("relabelled")),
        "written_kept": dict(Counter(f"{r['written']}:{r['kind']}" for r in unique if r.get("written"))),
        "dropped": dict(dropped),
        "written_exchanges_kept": dict(
            Counter(
                f"{x['written']}:{'violates' if x['label'] else 'complies'}"
                for i, x in enumerate(exchanges)
                if i not in copied
            )
        ),
        "evaluation_near_copies_removed": len(contaminated) + len(copied),
        "per_principle": dict(Counter(f"{r['principle_id']}:{r['kind']}" for r in unique if not r.get("written"))),
        "examples": {name: len(data) for name, data in rows.items()},
        "positives": {name: sum(r["label"] for r in data) for name, data in rows.items()},
        "heldout_wrappers": list(templates.HELDOUT_WRAPPERS),
    }
    write_json(folder / "report.json", report, what="dataset report")
    return report
