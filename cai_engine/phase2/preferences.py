"""Preference data in and out of a labelling run: human labels, a review round trip, and the TRL preference export."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cai_engine.constitution.model import Message
from cai_engine.errors import ConfigError, RunError, describe_validation
from cai_engine.files.jsonl import append_jsonl, iter_jsonl, write_json, write_jsonl
from cai_engine.files.outputs import write_atomic
from cai_engine.phase2.gate import judge_identity
from cai_engine.prompts.sets import id_matches, iter_dataset_rows
from cai_engine.records import (
    GateResult,
    PreferenceExportManifest,
    PreferenceRecord,
    PreferenceRow,
    Review,
    ReviewExport,
    ReviewItem,
    ReviewMerge,
)
from cai_engine.seeds import bucket
from cai_engine.store.cards import dataset_card
from cai_engine.store.runs import RunDirectory, now
from cai_engine.text.refusals import refuses

TRANSCRIPT_TURN = r"\n\n(Human|Assistant):"


def _as_messages(value: Any, where: str, default_role: str) -> list[Message]:
    if isinstance(value, str):
        return [Message(role=default_role, content=value)]  # type: ignore[arg-type]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        try:
            return [Message(role=m["role"], content=m["content"]) for m in value]
        except ValidationError:
            pass
    raise ConfigError(f"{where}: expected text or a list of {{role, content}} messages (system, user or assistant)")


def _split_transcript(text: str) -> list[Message]:
    import re

    parts = re.split(TRANSCRIPT_TURN, "\n\n" + text.strip() if not text.startswith("\n\n") else text)
    return [
        Message(role="user" if role == "Human" else "assistant", content=content.strip())
        for role, content in zip(parts[1::2], parts[2::2])
    ]


def import_human(path: str | Path) -> list[PreferenceRow]:
    """Human preference pairs from the common Hugging Face layouts, as preference rows (source ``human``).

    Accepted per line (JSONL) or per row (a ``datasets`` folder / parquet): ``prompt`` + ``chosen`` + ``rejected``
    (text or messages, TRL's explicit-prompt format); or ``chosen`` + ``rejected`` full conversations sharing a
    prefix (TRL's implicit-prompt format and Anthropic hh-rlhf's ``Human:/Assistant:`` transcripts). An optional
    ``label`` / ``chosen_probability`` in [0, 1] gives a soft label.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    rows = (
        iter_dataset_rows(path, ConfigError)
        if path.is_dir() or path.suffix in (".parquet", ".arrow")
        else iter_jsonl(path)
    )
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
        if not prompt or prompt[-1].role != "user" or not chosen or not rejected:
            raise ConfigError(f"{where}: could not find a prompt ending with a user turn and two replies")
        blob = json.dumps([m.model_dump() for m in prompt], sort_keys=True)
        out.append(
            PreferenceRow(
                prompt=prompt,
                chosen=chosen,
                rejected=rejected,
                chosen_probability=float(label),
                source="human",
                prompt_id="human:" + hashlib.sha1(blob.encode()).hexdigest()[:12],
            )
        )
    if not out:
        raise ConfigError(f"{path}: contains no preference pairs")
    return out


def export_review(run: str | Path, out: str | Path, *, count: int = 50) -> ReviewExport:
    """The judge's least confident and most disputed pairs, as a JSONL file for human review.

    Abstentions come first, then pairs whose two orders disagreed, then by closeness of the label to 0.5. Reviewers
    fill ``human_choice`` with "a", "b" or a probability that A is better; `merge_review` brings them back.
    """
    directory = RunDirectory(run, "rl", PreferenceRecord)
    rows = []
    for record in directory.records():
        p = record.label
        consistent = record.judgement.position_consistent
        priority = (0 if p is None else 1 if consistent is False else 2, abs(p - 0.5) if p is not None else 0)
        rows.append(
            (
                priority,
                ReviewItem(
                    key=record.key,
                    conversation=record.conversation,
                    response_a=record.response_a,
                    response_b=record.response_b,
                    ai_p_a=p,
                    position_consistent=consistent,
                    principle_ids=record.principle_ids,
                ),
            )
        )
    rows.sort(key=lambda r: r[0])
    chosen = [r for _, r in rows[:count]]
    write_jsonl(out, chosen)
    return ReviewExport(exported=len(chosen), out=str(out))


def merge_review(run: str | Path, reviewed: str | Path) -> ReviewMerge:
    """Bring reviewed labels back: they override the AI label of their pair at export (source ``human-review``)."""
    directory = RunDirectory(run, "rl", PreferenceRecord)
    keys = directory.done_ids()
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
        lines.append(Review(key=row["key"], p_a=p, reviewed=now()))
        merged += 1
    append_jsonl(Path(run) / "reviews.jsonl", lines)
    return ReviewMerge(merged=merged, skipped_unreviewed=skipped)


class PreferenceExportOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_confidence: float = Field(0.0, ge=0, lt=0.5, description="Drop AI labels with |p - 0.5| below this.")
    heldout: float = Field(0.1, ge=0, lt=1, description="Share of prompts in the test split.")
    human: list[str] = Field(default_factory=list, description="Human preference files to mix in.")
    must_decline: list[str] = Field(
        default_factory=list,
        description="Prompt ids (shell-style patterns such as 'pr-*-h') of requests known to be harmful: of a pair in "
        "which one reply declines (a refusal phrase) and the other does not, the declining one is chosen, whatever "
        "the judge said (source 'intent'). A small judge is at chance on exactly these pairs.",
    )
    must_answer: list[str] = Field(
        default_factory=list,
        description="Prompt ids of requests known to be harmless however they sound: of a pair in which one reply "
        "declines and the other does not, the answer is chosen (source 'intent').",
    )
    intent_probability: float = Field(
        0.9, gt=0.5, le=1, description="The chosen_probability of a pair labelled by its prompt's intent."
    )
    borrow_refusals: bool = Field(
        False,
        description="A prompt listed in `must_answer` that got no pair because every reply the policy sampled "
        "answered it (an abstention of the `intent` recipe) is paired anyway: its answer is chosen over a refusal "
        "the same policy wrote for the `must_decline` prompt (in the same split) whose request shares the most words "
        "with it (source 'intent'; one refusal may be lent to several prompts). A policy that seldom refuses harmless "
        "prompts otherwise gives few pairs that prefer an answer, and `balance` then keeps few of either side.",
    )
    balance: bool = Field(
        False,
        description="Keep as many pairs that prefer a refusal to an answer as pairs that prefer an answer to a "
        "refusal, in the training and the test split each (the surplus side loses pairs chosen by a hash of the "
        "prompt id; rows from `human` files count too; a test split with only one side is left as it is). "
        "A small policy trained on more of one kind learns to refuse more or less often, not what to refuse.",
    )

    @model_validator(mode="after")
    def _borrowing_needs_both_intents(self) -> PreferenceExportOptions:
        if self.borrow_refusals and not (self.must_answer and self.must_decline):
            raise ValueError(
                "borrow_refusals needs must_answer (--must-answer: the prompts to pair) and must_decline "
                "(--must-decline: whose refusals are borrowed)"
            )
        return self


def read_reviews(run: str | Path) -> dict[str, float]:
    """The reviewed labels of a run (``reviews.jsonl``): P(A is better) by pair key, the latest review winning."""
    path = Path(run) / "reviews.jsonl"
    if not path.exists():
        return {}
    reviews = {}
    for where, row in iter_jsonl(path, RunError):
        try:
            review = Review.model_validate(row)
        except ValidationError as exc:
            raise RunError(f"{where}: not a review line ({describe_validation(exc)}); was the file edited?") from None
        reviews[review.key] = review.p_a
    return reviews


def read_gate(run: str | Path) -> GateResult | None:
    """The run's judge gate result (``gate.json``), or None when the judge was not measured."""
    path = Path(run) / "gate.json"
    if not path.exists():
        return None
    try:
        return GateResult.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise RunError(f"{path}: not a gate result ({describe_validation(exc)}); rerun `cai rl gate`") from None


def export_preferences(
    run: str | Path, out: str | Path, options: PreferenceExportOptions | dict[str, Any] | None = None
) -> PreferenceExportManifest:
    """``train.jsonl``/``test.jsonl`` in TRL's conversational preference format plus a soft label; returns the
    export's manifest (also written as ``export.json``).

    Each row: ``prompt`` (messages), ``chosen`` and ``rejected`` (assistant messages), ``chosen_probability`` (how
    sure the label is that ``chosen`` is better, in [0.5, 1] for AI labels), ``source`` (ai, revision, human,
    human-review). The run's judge gate result is carried into ``export.json`` for the trainers.
    """
    options = (
        options
        if isinstance(options, PreferenceExportOptions)
        else PreferenceExportOptions.model_validate(options or {})
    )
    directory = RunDirectory(run, "rl", PreferenceRecord)
    manifest = directory.manifest()
    if manifest.get("kind") != "rl":
        raise RunError(f"{run}: not a preference-labelling (rl) run directory")
    reviews = read_reviews(run)
    borrowed = _borrowed_refusals(directory.records(), options) if options.borrow_refusals else {}
    rows: list[PreferenceRow] = []
    abstained = filtered = intent_labelled = intent_overrode = lent = 0
    labelling_judges = set()
    for record in directory.records():
        p = record.label
        source: Literal["ai", "revision", "human-review", "intent"] = record.source
        if source == "ai":
            labelling_judges.add(json.dumps(judge_identity(record.provenance.get("judge")), sort_keys=True))
        if record.key in reviews:
            p, source = reviews[record.key], "human-review"
        elif source == "ai":
            by_intent = _intent_label(record, options)
            if by_intent is not None:
                intent_labelled += 1
                intent_overrode += p is not None and p != 0.5 and (p > 0.5) != (by_intent > 0.5)
                p, source = by_intent, "intent"
        if p is None and record.key in borrowed:
            lent += 1
            rows.append(
                PreferenceRow(
                    prompt=record.conversation,
                    chosen=[Message(role="assistant", content=record.response_a)],
                    rejected=[Message(role="assistant", content=borrowed[record.key])],
                    chosen_probability=options.intent_probability,
                    source="intent",
                    prompt_id=record.key,
                    principle_ids=record.principle_ids,
                )
            )
            continue
        if p is None:
            abstained += 1
            continue
        if source == "ai" and abs(p - 0.5) < options.min_confidence:
            filtered += 1
            continue
        if p == 0.5:
            filtered += 1
            continue
        better, worse = (record.response_a, record.response_b) if p > 0.5 else (record.response_b, record.response_a)
        rows.append(
            PreferenceRow(
                prompt=record.conversation,
                chosen=[Message(role="assistant", content=better)],
                rejected=[Message(role="assistant", content=worse)],
                chosen_probability=max(p, 1 - p),
                source=source,
                prompt_id=record.key,
                principle_ids=record.principle_ids,
            )
        )
    for human_file in options.human:
        rows += import_human(human_file)
    if not rows:
        raise RunError(f"{run}: no labelled pairs to export ({abstained} abstained, {filtered} filtered)")
    test = [r for r in rows if bucket(r.prompt_id) < options.heldout]
    train = [r for r in rows if bucket(r.prompt_id) >= options.heldout]
    if options.heldout and not test and len(train) > 1:
        test, train = train[-1:], train[:-1]
    balanced_dropped = 0
    if options.balance:
        # each split on its own: a balance over both could leave the training split tilted either way
        before = len(train) + len(test)
        train = _balance(train)
        test = _balance(test, strict=False)
        balanced_dropped = before - len(train) - len(test)
        rows = train + test
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        write_jsonl(out / f"{name}.jsonl", part)
    gate = read_gate(run)
    gate_matches = None
    if gate is not None and labelling_judges:
        gate_matches = labelling_judges == {json.dumps(judge_identity(gate.judge), sort_keys=True)}
    sources: dict[str, int] = {}
    for r in rows:
        sources[r.source] = sources.get(r.source, 0) + 1
    summary = PreferenceExportManifest(
        source_run=str(run),
        train=len(train),
        test=len(test),
        sources=sources,
        abstained_excluded=abstained,
        filtered_low_confidence=filtered,
        intent_labelled=intent_labelled,
        intent_overrode=intent_overrode,
        refusals_borrowed=lent,
        balanced_dropped=balanced_dropped,
        options=options.model_dump(),
        judge_gate=gate,
        judge_gate_matches=gate_matches,
        constitution=manifest.get("provenance", {}).get("constitution"),
    )
    write_json(out / "export.json", summary)
    write_atomic(out / "README.md", dataset_card(summary.to_json(), {"train": len(train), "test": len(test)}))
    return summary


def _intent_label(record: PreferenceRecord, options: PreferenceExportOptions) -> float | None:
    """P(A is better) from the prompt's known intent, for a pair in which exactly one reply declines; else None."""
    harmful = bool(options.must_decline) and id_matches(record.key, options.must_decline)
    harmless = bool(options.must_answer) and id_matches(record.key, options.must_answer)
    if harmful and harmless:
        raise RunError(f"{record.key} matches both must_answer and must_decline; a prompt is harmless or it is not")
    a, b = refuses(record.response_a), refuses(record.response_b)
    if a == b or not (harmful or harmless):
        return None
    a_wins = a if harmful else b
    return options.intent_probability if a_wins else 1 - options.intent_probability


def _words(record: PreferenceRecord) -> set[str]:
    text = " ".join(m.content for m in record.conversation if m.role == "user").lower()
    return {w.strip(".,!?;:'\"()") for w in text.split()} - {""}


def _borrowed_refusals(records: Any, options: PreferenceExportOptions) -> dict[str, str]:
    """For each ``must_answer`` prompt of the ``intent`` recipe whose sampled replies all answered (an abstention
    with an answer), a refusal the policy wrote for a ``must_decline`` prompt on the same side of the held-out split:
    the one whose request shares the most words with it (Jaccard), ties broken by a hash of the two keys, so the same
    run always borrows the same."""
    refusals: dict[bool, list[tuple[str, set[str], str]]] = {True: [], False: []}
    wanting: list[PreferenceRecord] = []
    for record in records:
        if id_matches(record.key, options.must_decline):
            reply = next((r for r in (record.response_a, record.response_b) if r.strip() and refuses(r)), None)
            if reply is not None:
                refusals[bucket(record.key) < options.heldout].append((record.key, _words(record), reply))
        elif (
            record.source == "intent"
            and record.label is None
            and id_matches(record.key, options.must_answer)
            and record.response_a.strip()
            and not refuses(record.response_a)
        ):
            wanting.append(record)
    borrowed = {}
    for record in wanting:
        pool = refusals[bucket(record.key) < options.heldout]  # a test row never rejects a training row's refusal
        if not pool:
            continue
        words = _words(record)
        ranked = sorted(
            (-len(words & other) / max(1, len(words | other)), bucket(f"borrow:{record.key}:{key}"), reply)
            for key, other, reply in pool
        )
        borrowed[record.key] = ranked[0][2]
    return borrowed


def _balance(rows: list[PreferenceRow], strict: bool = True) -> list[PreferenceRow]:
    """As many rows preferring a refusal to an answer as rows preferring an answer to a refusal; the rest as they are.
    With only one side present, ``strict`` refuses (balancing would drop them all); otherwise the rows stay as they
    are (a small test split)."""
    sides: dict[bool, list[int]] = {True: [], False: []}
    for i, row in enumerate(rows):
        chosen, rejected = refuses(row.chosen[-1].content), refuses(row.rejected[-1].content)
        if chosen != rejected:
            sides[chosen].append(i)
    if bool(sides[True]) != bool(sides[False]):
        if not strict:
            return rows
        have, lack = ("a refusal", "an answer") if sides[True] else ("an answer", "a refusal")
        raise RunError(
            f"balance: in the training split {len(sides[True] or sides[False])} pairs prefer {have} and none prefers "
            f"{lack}; balancing would drop them all (sample more prompts of the other intent, or export without "
            "balance)"
        )
    n = min(len(sides[True]), len(sides[False]))
    dropped = set()
    for indices in sides.values():
        ranked = sorted(indices, key=lambda i: (bucket("balance:" + rows[i].prompt_id), i))
        dropped.update(ranked[n:])
    return [row for i, row in enumerate(rows) if i not in dropped]
