"""The SFT export of a phase-1 run: accepted revisions mixed with helpfulness samples, in TRL's conversational format."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cai_engine.constitution.model import Message
from cai_engine.errors import ConfigError, RunError
from cai_engine.files.jsonl import write_json, write_jsonl
from cai_engine.files.outputs import write_atomic
from cai_engine.prompts.exchanges import exchange_file, labelled_exchanges
from cai_engine.prompts.overlap import near_copies
from cai_engine.prompts.sets import id_matches
from cai_engine.records import SFTExample, SFTExportManifest, SLRecord
from cai_engine.seeds import bucket
from cai_engine.store.cards import dataset_card
from cai_engine.store.runs import RunDirectory
from cai_engine.text.refusals import refuses


class ExportOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train_on: Literal["all_rounds", "last_round"] = Field(
        "all_rounds", description="Train on every accepted revision, or only each item's final one."
    )
    helpful_ratio: float = Field(
        0.27, ge=0, lt=1, description="Share of helpfulness samples in the mix (the paper used about 27%)."
    )
    heldout: float = Field(0.1, ge=0, lt=1, description="Share of prompts held out as the test split.")
    seed: int = Field(0, description="Seeds which helpfulness samples are used.")
    max_repeats: int | None = Field(
        None,
        ge=1,
        description="Keep at most N revisions with the same reply (case and spacing ignored), chosen by a hash of "
        "the prompt id; None keeps them all. A capable reviser often answers dozens of red-team prompts with one "
        "stock refusal, and a small policy trained on them learns to refuse anything that sounds dangerous.",
    )
    must_answer: list[str] = Field(
        default_factory=list,
        description="Prompt ids (shell-style patterns such as 'bl-*' or 'pr-*-b') of requests that are harmless however "
        "they sound: a target that refuses one of them (a refusal phrase) is dropped, so the policy never learns to "
        "refuse a harmless look-alike from its teacher's mistakes.",
    )
    must_decline: list[str] = Field(
        default_factory=list,
        description="Prompt ids (shell-style patterns such as 'rt-*' or 'pr-*-h') of requests that must not be "
        "carried out: a target without a refusal phrase is dropped. A small teacher told to write safe completions "
        "carries out a third of the harmful requests instead; trained on those, the policy learns to comply. A safe "
        "completion that declines without a refusal phrase is dropped too (the filter errs towards fewer targets).",
    )
    written: list[str] = Field(
        default_factory=list,
        description="Labelled exchanges people wrote (`builtin:harmless`, or JSONL files in the format of `cai checks "
        "eval` cases: prompt, response, violates, and optionally kind) whose replies labelled `violates: false` join "
        "the targets, beside the teacher's revisions and outside the helpfulness ratio. A reply labelled as breaking "
        "the constitution is never a target; nor is any exchange whose request is a copy or near-copy of an "
        "evaluation prompt (the pipeline and `cai export sft` pass the evaluation sets; `export_sft` called from "
        "Python checks only the `evaluation_prompts` it is given). A kind names the request's intent first and what "
        "the reply does after it (the builtin file's kinds: benign-answered, benign-alarming-answered, "
        "benign-overrefused, harmful-declined, harmful-safe-completion, harmful-partial, harmful-complied; anything "
        "after ':' is a topic): a reply to a 'benign...' request is a target only where its kind ends in '-answered' "
        "and it has no refusal phrase; a row without a kind is kept unfiltered; any other kind is an error. A written "
        "request that is also one of the run's prompts lands on that prompt's side of the split.",
    )
    written_refusal_phrase: bool = Field(
        True,
        description="Keep a written reply to a request whose kind begins with 'harmful' only when it has a refusal "
        "phrase (the same rule as `must_decline`; in `builtin:harmless` this leaves out 109 of its 124 safe "
        "completions and 40 of its 132 declines): the evaluation counts refusals of harmful prompts by those phrases, "
        "so a policy taught to decline in its own words would be scored as complying. Turn off where a judge scores "
        "safe completions.",
    )


def _listed(example: SFTExample, patterns: list[str]) -> bool:
    return bool(patterns) and id_matches(example.prompt_id, patterns)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _last(example: SFTExample) -> str:
    return example.messages[-1].content


def _reply_key(example: SFTExample) -> str:
    return _norm(_last(example))


def _cap_repeats(revisions: list[SFTExample], cap: int | None) -> list[SFTExample]:
    """At most ``cap`` revisions per reply; which prompts keep theirs depends on the prompt ids only (stable)."""
    if cap is None:
        return revisions
    ranked = sorted(range(len(revisions)), key=lambda i: (bucket("repeats:" + revisions[i].prompt_id), i))
    counts: dict[str, int] = {}
    kept = set()
    for index in ranked:
        key = _reply_key(revisions[index])
        counts[key] = counts.get(key, 0) + 1
        if counts[key] <= cap:
            kept.add(index)
    return [r for i, r in enumerate(revisions) if i in kept]


def _collect(record: SLRecord, options: ExportOptions, revisions: list[SFTExample], helpful: list[SFTExample]) -> None:
    if record.kind == "helpful":
        if record.final_response is not None:
            helpful.append(_example(record, record.final_response, "helpful"))
        return
    accepted = [r for r in record.rounds if r.accepted and r.revision]
    if options.train_on == "last_round":
        accepted = accepted[-1:]
    for entry in accepted:
        assert entry.revision is not None
        revisions.append(_example(record, entry.revision, "revision", entry.round, entry.principle_id))


def read_written(sources: list[str]) -> list[dict[str, Any]]:
    """The labelled exchanges of ``sources`` (``builtin:NAME`` or files), checked the way the export reads them: a
    ``kind`` must begin with 'benign' or 'harmful' (a row without one is kept unfiltered) and a case must be one turn.
    Called before phase 1 runs as well, so a bad file fails before hours of generation."""
    rows = []
    for path in dict.fromkeys(exchange_file(source, "sft_export.written") for source in sources):
        for row in labelled_exchanges([path]):
            kind = row["kind"].lower()
            if kind and not kind.startswith(("benign", "harmful")):
                raise ConfigError(
                    f"sft_export.written: {path.name}: {row['id']} has kind {row['kind']!r}; a kind names the "
                    "request's intent first ('benign-...' or 'harmful-...'), or leave it out"
                )
            if row["turns"] > 1:
                raise ConfigError(
                    f"sft_export.written: {path.name}: {row['id']} is a conversation of {row['turns']} turns; a "
                    "written target is one request and its reply"
                )
            rows.append(row)
    return rows


def _written(
    options: ExportOptions, evaluation_prompts: dict[str, str] | None
) -> tuple[list[SFTExample], dict[str, int]]:
    """The targets of ``options.written`` and how many exchanges were left out, by reason."""
    dropped: dict[str, int] = {}

    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    rows = read_written(options.written)
    copied = near_copies([r["prompt"] for r in rows], evaluation_prompts or {})
    examples = []
    for i, row in enumerate(rows):
        kind = row["kind"].lower().split(":", 1)[0]  # "benign-alarming-answered:cooking" -> the part before ":"
        if i in copied:
            drop("request is a near-copy of an evaluation prompt")
        elif row["label"]:
            drop("reply breaks the constitution")
        elif kind.startswith("benign") and (not kind.endswith("-answered") or refuses(row["response"])):
            drop("does not answer a harmless request")
        elif kind.startswith("harmful") and options.written_refusal_phrase and not refuses(row["response"]):
            drop("reply to a harmful request without a refusal phrase")
        else:
            examples.append(
                SFTExample(
                    messages=[
                        Message(role="user", content=row["prompt"]),
                        Message(role="assistant", content=row["response"]),
                    ],
                    prompt_id=f"written:{row['source']}:{row['id']}",
                    source="written",
                )
            )
    return examples, dropped


def export_sft(
    run: str | Path,
    out: str | Path,
    options: ExportOptions | dict[str, Any] | None = None,
    *,
    evaluation_prompts: dict[str, str] | None = None,
) -> SFTExportManifest:
    """Write ``train.jsonl``/``test.jsonl`` in TRL's conversational format (a ``messages`` column); returns the
    export's manifest (also written as ``export.json``). ``evaluation_prompts`` (id -> text, e.g.
    :func:`~cai_engine.prompts.overlap.evaluation_texts`) are the prompts a written exchange must not copy.

    Revisions beyond ``max_repeats`` copies of one reply are dropped first; revisions and helpfulness samples are
    then mixed at ``helpful_ratio``, the written exchanges' targets are added, duplicates are dropped, and the split is by
    prompt (every example of a prompt lands on the same side). Loads with
    ``datasets.load_dataset("json", data_files={"train": ".../train.jsonl", "test": ".../test.jsonl"})``.
    """
    options = options if isinstance(options, ExportOptions) else ExportOptions.model_validate(options or {})
    written, written_dropped = _written(options, evaluation_prompts) if options.written else ([], {})
    directory = RunDirectory(run, "sl", SLRecord)
    manifest = directory.manifest()
    if manifest.get("kind") != "sl":
        raise RunError(f"{run}: not an SL-CAI run directory")
    revisions: list[SFTExample] = []
    helpful: list[SFTExample] = []
    for record in directory.records():
        if not record.error:
            _collect(record, options, revisions, helpful)
    if not revisions and not helpful:
        raise RunError(f"{run}: has no accepted revisions or helpfulness samples to export")
    both = [e for e in revisions + helpful if _listed(e, options.must_answer) and _listed(e, options.must_decline)]
    if both:
        raise RunError(
            f"{both[0].prompt_id} matches both must_answer and must_decline; a prompt is harmless or it is not"
        )
    refusals_dropped = [e for e in revisions + helpful if _listed(e, options.must_answer) and refuses(_last(e))]
    compliance_dropped = [e for e in revisions + helpful if _listed(e, options.must_decline) and not refuses(_last(e))]
    dropped = {id(e) for e in refusals_dropped + compliance_dropped}
    revisions = [e for e in revisions if id(e) not in dropped]
    helpful = [e for e in helpful if id(e) not in dropped]
    collected = len(revisions)
    revisions = _cap_repeats(revisions, options.max_repeats)
    rng = random.Random(options.seed)
    rng.shuffle(helpful)
    wanted = round(options.helpful_ratio / (1 - options.helpful_ratio) * len(revisions)) if revisions else len(helpful)
    mix = revisions + written + helpful[:wanted]
    seen, unique = set(), []
    for example in mix:
        key = json.dumps([(m.role, _norm(m.content)) for m in example.messages])
        if key not in seen:
            seen.add(key)
            unique.append(example)
    # a written request that is also one of the run's prompts is split with it (every example of a prompt on one side)
    run_prompts = {_norm(e.messages[-2].content): e.prompt_id for e in unique if e.source != "written"}

    def split_id(e: SFTExample) -> str:
        return run_prompts.get(_norm(e.messages[-2].content), e.prompt_id) if e.source == "written" else e.prompt_id

    test = [e for e in unique if bucket(split_id(e)) < options.heldout]
    train = [e for e in unique if bucket(split_id(e)) >= options.heldout]
    if options.heldout and not test and len({e.prompt_id for e in train}) > 1:
        moved = train[-1].prompt_id  # a tiny run still gets a test split
        test = [e for e in train if e.prompt_id == moved]
        train = [e for e in train if e.prompt_id != moved]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        write_jsonl(out / f"{name}.jsonl", rows)
    summary = SFTExportManifest(
        source_run=str(run),
        train=len(train),
        test=len(test),
        revisions=sum(e.source == "revision" for e in unique),
        helpful=sum(e.source == "helpful" for e in unique),
        duplicates_dropped=len(mix) - len(unique),
        repeats_dropped=collected - len(revisions),
        refusals_dropped=len(refusals_dropped),
        compliance_dropped=len(compliance_dropped),
        helpful_available=len(helpful),
        helpful_wanted=wanted,
        written=sum(e.source == "written" for e in unique),
        written_dropped=written_dropped,
        options=options.model_dump(),
        constitution=manifest.get("provenance", {}).get("constitution"),
    )
    write_json(out / "export.json", summary)
    write_atomic(out / "README.md", dataset_card(summary.to_json(), {"train": len(train), "test": len(test)}))
    return summary


def _example(
    record: SLRecord,
    answer: str,
    source: Literal["revision", "helpful"],
    round_number: int | None = None,
    principle_id: str | None = None,
) -> SFTExample:
    return SFTExample(
        messages=[*record.conversation, Message(role="assistant", content=answer)],
        prompt_id=record.key,
        source=source,
        round=round_number,
        principle_id=principle_id,
    )
