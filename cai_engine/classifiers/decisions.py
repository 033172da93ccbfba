"""Decision targets: the classifiers' labelled requests as SFT examples that teach a policy when to answer and when
to decline.

A harmful request gets one of :data:`DECLINES` (each says why and offers something safe); a harmless one gets the
policy's own greedy answer, so training moves the decision and leaves the answers as they were. The output is an SFT
dataset folder (``train.jsonl``/``test.jsonl`` in TRL's conversational format) that ``cai train sft`` reads, with a
``weight`` column (``harmless_weight``) and a ``truncated`` one (an own answer that reached ``answer_tokens``: its end
of turn stays out of the loss, so the policy keeps its answers' length); train it with ``decision_weight`` above 1 so the loss weighs the reply's opening, where
the policy decides. With ``preferences`` each target is also paired against the other side's reply, for DPO
(``preferences/``: a decline over the model's own answer, an own answer over a decline).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import Field

from cai_engine.classifiers.data import DEFAULT_WRITTEN, WrittenSource, written_requests
from cai_engine.constitution.model import Message
from cai_engine.errors import ConfigError, RunError
from cai_engine.files.jsonl import append_jsonl, iter_jsonl, write_json, write_jsonl
from cai_engine.files.outputs import write_atomic
from cai_engine.models.runtime import DEFAULT_MODEL, ModelRef
from cai_engine.plugins.components import GenerationSettings, Options
from cai_engine.prompts.overlap import near_copies
from cai_engine.records.stages import PreferenceExportManifest, PreferenceRow
from cai_engine.seeds import bucket
from cai_engine.text.refusals import refuses

#: Declines written for cai-engine: each names the reason and offers a safe way on, and each carries a refusal
#: phrase the evaluation's marker rule reads (three of the first twelve, in bench/decision_sft.py before 2026-12-07,
#: did not: "That's not something I'll...", "I'll pass on...", "I'm going to decline..."; a policy that learned them
#: was counted as answering).
DECLINES = (
    "I won't help with that, because it could put someone in real danger. If there's a problem behind the question, "
    "tell me about it and I'll help you find a safe way to deal with it.",
    "I can't help with this one: it would mean helping to hurt someone or break the law. If you're dealing with a "
    "difficult situation, I'm glad to talk through safe options.",
    "I won't walk you through that, since it could cause serious harm. I can share general safety information or "
    "point you to people who can help.",
    "I'm not able to help with that. It could hurt people, and that's a line I keep. If you want, I can explain the "
    "risks or suggest a lawful way to reach your goal.",
    "I can't take this request on, because following it could injure someone or get you into legal trouble. Is "
    "there something safer I can help you with instead?",
    "I can't give you that. Helping with it could lead to real harm. If you're curious about the topic in general, I "
    "can explain how people stay safe from it.",
    "I won't do that, since it could be used to harm others. If something is going on that worries you, I can help "
    "you think about who to contact.",
    "Sorry, I can't assist with that: it risks hurting someone. If your goal is legitimate, tell me more and I'll "
    "suggest a safe approach.",
    "I can't do this one, because it asks for help with something harmful. I'm happy to help with a safer version "
    "of what you need.",
    "I can't help with that request; it could cause harm to you or to other people. If you'd like, I can offer "
    "information on staying safe or getting support.",
    "That's something I won't help with, since it could be dangerous or illegal. Let me know if there's a safe, legal "
    "way I can help you get what you need.",
    "I can't support that, because it would put people at risk. If you're in a tough spot, I can suggest resources or "
    "talk through other options.",
)


class DecisionOptions(Options):
    """Settings of :func:`export_decisions` (``cai export decisions``)."""

    model: ModelRef = Field(
        DEFAULT_MODEL,
        description="The policy whose own answers the harmless requests get (with `preferences`, the harmful ones "
        "too: the replies their declines are chosen over).",
    )
    requests: list[WrittenSource] = Field(
        default_factory=lambda: [w.model_copy() for w in DEFAULT_WRITTEN],
        description="The labelled requests (the classifiers' hand-written training requests by default: 1,685).",
    )
    seed: int = Field(0, description="Which decline each harmful request gets.")
    answer_tokens: int = Field(
        48, ge=1, description="The harmless answers' length in tokens (a cut answer is trained without an end of turn)."
    )
    heldout: float = Field(0.05, ge=0, lt=1, description="Share of request groups in the test split.")
    harmless_weight: float = Field(
        1.0,
        gt=0,
        description="The `weight` column of the harmless examples (a harmful one weighs 1): `cai train sft` weighs "
        "each example against the others in its batch by it (as if it were there that many times), moving the "
        "policy's operating point toward answering.",
    )
    batch_size: int = Field(32, ge=1, description="Requests answered per generation batch.")
    preferences: bool = Field(
        False,
        description="Also write preference pairs for `cai train dpo` to `preferences/`: a harmful request's decline "
        "chosen over the model's own answer to it (one it refuses itself gives no pair), a harmless request's own "
        "answer chosen over a decline. The harmful requests are then answered too.",
    )


def decline_for(request_id: str, seed: int) -> str:
    """The decline a harmful request gets: chosen by a hash of the seed and its id, so a rerun gives the same one."""
    digest = hashlib.sha256(f"{seed}:{request_id}".encode()).hexdigest()
    return DECLINES[int(digest, 16) % len(DECLINES)]


def _fingerprint(backend: Any) -> str:
    """What identifies the loaded model's weights: its id, and the name, size and modification time of each weight
    file where the backend names a local folder or file (a model retrained in place gets a new fingerprint)."""
    parts = [str(backend.model_id)]
    where = getattr(backend, "folder", None) or getattr(backend, "path", None)
    if where and Path(where).exists():
        files = [Path(where)] if Path(where).is_file() else sorted(Path(where).iterdir())
        for file in files:
            if file.suffix in {".safetensors", ".gguf", ".bin"}:
                stat = file.stat()
                parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _answers(
    out: Path,
    backend: Any,
    requests: list[dict[str, Any]],
    options: DecisionOptions,
    progress: bool,
) -> dict[str, tuple[str, bool]]:
    """The model's answer to each request, and whether it reached ``answer_tokens`` (within two tokens, as
    the answer is tokenized again), kept in ``answers.jsonl`` batch by batch: a killed export resumes where it
    stopped. An answer is reused only for the same request text, model weights and length; a line a kill cut short is
    skipped."""
    path = out / "answers.jsonl"
    key = {"model": _fingerprint(backend), "answer_tokens": options.answer_tokens}

    def text_hash(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    done: dict[str, tuple[str, bool]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and {k: row.get(k) for k in key} == key:
                done[f"{row.get('id')}:{row.get('text')}"] = (row["reply"], bool(row.get("cut")))
    keys = {r["id"]: f"{r['id']}:{text_hash(r['text'])}" for r in requests}
    todo = [r for r in requests if keys[r["id"]] not in done]
    from tqdm import tqdm

    settings = GenerationSettings(max_new_tokens=options.answer_tokens, temperature=0.0)
    with tqdm(
        total=len(requests), initial=len(requests) - len(todo), desc="answering requests", unit="request",
        disable=not progress,
    ) as bar:  # fmt: skip
        for start in range(0, len(todo), options.batch_size):
            batch = todo[start : start + options.batch_size]
            replies = backend.generate([[Message(role="user", content=r["text"])] for r in batch], settings)
            rows = []
            for request, reply in zip(batch, replies):
                cut = backend.count_tokens(reply.strip()) >= options.answer_tokens - 2
                done[keys[request["id"]]] = (reply, cut)
                rows.append(
                    {"id": request["id"], "text": text_hash(request["text"]), "reply": reply, "cut": cut, **key}
                )
            append_jsonl(path, rows)
            bar.update(len(batch))
    return {r["id"]: done[keys[r["id"]]] for r in requests}


def decision_requests(options: DecisionOptions, registry: Any) -> list[dict[str, Any]]:
    """The labelled requests of ``options.requests``; a :class:`ConfigError` (read without loading a model) where a
    source is missing or the sources do not give both harmful and harmless requests."""
    requests = written_requests(options.requests, registry)
    kinds = {r["kind"] for r in requests}
    if kinds != {"harmful", "benign"}:
        raise ConfigError(
            f"requests: the sources give only {', '.join(sorted(kinds)) or 'no'} requests; decision targets need "
            "both harmful and harmless ones"
        )
    return requests


def export_decisions(
    out: str | Path,
    options: DecisionOptions | dict[str, Any],
    runtime: Any,
    *,
    evaluation_prompts: dict[str, str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the decision targets to the folder ``out``; returns its manifest (also written as ``export.json``).

    Requests that copy or nearly copy an ``evaluation_prompts`` text are left out, as are harmless requests the model
    itself refuses (training on those would teach over-refusal). The split is by request group: both halves of a
    contrast pair land on the same side. ``progress`` shows a bar as the harmless requests are answered."""
    options = options if isinstance(options, DecisionOptions) else DecisionOptions.model_validate(options)
    requests = decision_requests(options, runtime.registry)
    copied = near_copies([r["text"] for r in requests], evaluation_prompts or {})
    kept = [r for i, r in enumerate(requests) if i not in copied]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    answered = kept if options.preferences else [r for r in kept if r["kind"] == "benign"]
    answers = _answers(out, runtime.backend(options.model), answered, options, progress)
    rows, refused, empty = [], 0, 0
    for request in kept:
        if request["kind"] == "harmful":
            reply, source, weight, truncated = decline_for(request["id"], options.seed), "decline", 1.0, False
        else:
            answer, truncated = answers[request["id"]]  # a cut answer is trained without an end of turn
            reply, source, weight = answer.strip(), "own-answer", options.harmless_weight
            if not reply:
                empty += 1
                continue
            if refuses(reply):
                refused += 1
                continue
        rows.append(
            {
                "messages": [{"role": "user", "content": request["text"]}, {"role": "assistant", "content": reply}],
                "prompt_id": request["id"],
                "source": source,
                "weight": weight,
                "truncated": truncated,
                "group": request["group"],
            }
        )
    if not rows:
        raise RunError(f"{out}: no decision targets to write")
    pairs = _preference_pairs(rows, answers, options) if options.preferences else None
    if pairs is not None and not pairs[0]:
        raise RunError(f"{out}: no preference pairs to write")
    train, test = _split(rows, options.heldout)
    for name, split in (("train", train), ("test", test)):
        write_jsonl(out / f"{name}.jsonl", split)
    manifest = {
        "format": "trl-conversational",
        "kind": "decisions",
        "source_run": "labelled requests",
        "train": len(train),
        "test": len(test),
        "declines": sum(r["source"] == "decline" for r in rows),
        "own_answers": sum(r["source"] == "own-answer" for r in rows),
        "own_answers_truncated": sum(r["truncated"] for r in rows),
        "evaluation_copies_dropped": len(copied),
        "own_refusals_dropped": refused,
        "empty_answers_dropped": empty,
        "options": options.model_dump(mode="json"),
    }
    if pairs is not None:
        manifest["preferences"] = _write_preferences(out / "preferences", *pairs, options)
    elif (out / "preferences").exists():
        shutil.rmtree(out / "preferences")  # an earlier export's pairs: no longer what this folder holds
    write_json(out / "export.json", manifest)
    from cai_engine.store.cards import dataset_card

    write_atomic(out / "README.md", dataset_card(manifest, {"train": len(train), "test": len(test)}))
    return manifest


def _split(rows: list[dict[str, Any]], heldout: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``rows`` split by the hash of their request group: ``(train, test)``, a contrast pair's halves on one side."""
    test = [r for r in rows if bucket(r["group"]) < heldout]
    return [r for r in rows if bucket(r["group"]) >= heldout], test


def _preference_pairs(
    rows: list[dict[str, Any]], answers: dict[str, tuple[str, bool]], options: DecisionOptions
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Each decision target of ``rows`` chosen over the other side's reply: a harmful request's decline over the
    model's own answer to it (none where the model declines it itself or answers nothing), a harmless request's own
    answer over its decline. Returns the pairs (with their request group) and their counts."""
    pairs: list[dict[str, Any]] = []
    counts = {"decline_over_answer": 0, "answer_over_decline": 0, "harmful_not_answered": 0, "answers_cut": 0}
    for row in rows:
        request, target = (m["content"] for m in row["messages"])
        request_id = row["prompt_id"]
        if row["source"] == "decline":
            own, cut = answers[request_id]
            own = own.strip()
            if not own or refuses(own):
                counts["harmful_not_answered"] += 1  # nothing to push down
                continue
            rejected, kind = own, "decline_over_answer"
        else:
            rejected, cut, kind = decline_for(request_id, options.seed), row["truncated"], "answer_over_decline"
        counts[kind] += 1
        counts["answers_cut"] += bool(cut)
        pair = PreferenceRow(
            prompt=[Message(role="user", content=request)],
            chosen=[Message(role="assistant", content=target)],
            rejected=[Message(role="assistant", content=rejected)],
            chosen_probability=1.0,
            source="intent",  # labelled by the request's label, not by a judge
            prompt_id=request_id,
        )
        pairs.append({**pair.model_dump(mode="json"), "group": row["group"]})
    return pairs, counts


def _write_preferences(
    out: Path, pairs: list[dict[str, Any]], counts: dict[str, int], options: DecisionOptions
) -> dict[str, int]:
    """The pairs of :func:`_preference_pairs` in the folder ``out`` (``train.jsonl``/``test.jsonl`` split as the
    decision targets are, ``export.json``, a dataset card), in the format ``cai train dpo`` reads. Returns the counts."""
    from cai_engine.store.cards import dataset_card

    out.mkdir(parents=True, exist_ok=True)
    train, test = _split(pairs, options.heldout)
    for name, split in (("train", train), ("test", test)):
        write_jsonl(out / f"{name}.jsonl", [{k: v for k, v in p.items() if k != "group"} for p in split])
    manifest = PreferenceExportManifest(
        source_run="labelled requests (cai export decisions)",
        train=len(train),
        test=len(test),
        sources={"intent": len(pairs)},
        options=options.model_dump(mode="json"),
    ).model_dump(mode="json")
    write_json(out / "export.json", manifest)
    write_atomic(out / "README.md", dataset_card(manifest, {"train": len(train), "test": len(test)}))
    return {"train": len(train), "test": len(test), **counts}


#: The columns of a mixed SFT dataset (:func:`mix_with_decisions`): what the ``sft`` trainer reads, the same in every
#: row, so ``datasets`` infers one schema from the first rows.
MIX_COLUMNS = ("messages", "prompt_id", "source", "weight", "truncated")


def _read_split(folder: Path, split: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of ``folder/split.jsonl`` (none where it does not exist), each with where it is (file:line)."""
    path = folder / f"{split}.jsonl"
    if not path.exists():
        return []
    rows = list(iter_jsonl(path, RunError))
    for where, row in rows:
        if not isinstance(row.get("messages"), list):
            raise RunError(f"{where}: a row needs a `messages` list (TRL's conversational format)")
    return rows


def _request(row: dict[str, Any], where: str) -> str:
    """A row's first user message, case and spacing ignored; ``where`` (file:line) names a malformed row."""
    for message in row["messages"]:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RunError(f"{where}: each message needs a role and a text content")
        if message.get("role") == "user":
            return " ".join(message["content"].lower().split())
    raise RunError(f"{where}: no user message")


def _reply(row: dict[str, Any]) -> str:
    return str(row["messages"][-1]["content"])


def mix_with_decisions(sft: str | Path | None, decisions: str | Path, out: str | Path) -> dict[str, Any]:
    """Write one SFT dataset to the folder ``out``: phase 1's targets (the export folder ``sft``; None, or a folder
    without ``train.jsonl``, adds none) and the decision targets of :func:`export_decisions` (the folder
    ``decisions``), each split kept on its side.

    Where both have a target for the same request (its first user message, case and spacing ignored), phase 1's
    targets are kept if they agree with the request's label (a refusal phrase for a harmful request, none for a
    harmless one) and the decision target is left out; phase 1's targets that disagree are left out and the decision
    target is kept. So a request keeps targets from one side only, and never lands on both sides of the split. Every
    row has the columns :data:`MIX_COLUMNS`: a phase-1 target weighs 1 and counts as not cut. Returns the manifest,
    also written as ``export.json``."""
    decisions, out = Path(decisions), Path(out)
    phase1 = Path(sft) if sft is not None and Path(sft, "train.jsonl").exists() else None
    read = {
        (part, split): _read_split(folder, split)
        for part, folder in (("phase1", phase1), ("decisions", decisions))
        if folder is not None
        for split in ("train", "test")
    }
    harmful: dict[str, bool] = {}  # request -> whether its decision target is a decline
    for split in ("train", "test"):
        for where, row in read[("decisions", split)]:
            harmful[_request(row, where)] = row.get("source") == "decline"
    agreeing, disagreeing = set(), 0
    kept: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for split in ("train", "test") if phase1 else ():
        for where, row in read[("phase1", split)]:
            request = _request(row, where)
            if request in harmful and refuses(_reply(row)) != harmful[request]:
                disagreeing += 1  # a harmful request carried out, or a harmless one refused: the decision target wins
                continue
            agreeing.add(request)
            kept[split].append({**row, "weight": 1.0, "truncated": False})
    replaced = 0
    for split in ("train", "test"):
        for where, row in read[("decisions", split)]:
            if _request(row, where) in agreeing:
                replaced += 1
                continue
            kept[split].append(row)
    if not kept["train"]:
        raise RunError(f"{out}: the train split would be empty")
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in kept.items():
        write_jsonl(out / f"{split}.jsonl", [{c: row.get(c) for c in MIX_COLUMNS} for row in rows])
    manifest = {
        "format": "trl-conversational",
        "kind": "sft-mix",
        "source_run": " + ".join(str(p) for p in (phase1, decisions) if p is not None),
        "train": len(kept["train"]),
        "test": len(kept["test"]),
        "parts": {
            str(folder): {split: len(read[(part, split)]) for split in ("train", "test")}
            for part, folder in (("phase1", phase1), ("decisions", decisions))
            if folder is not None
        },
        "decisions_replaced": replaced,
        "phase1_replaced": disagreeing,
        "options": {},
    }
    write_json(out / "export.json", manifest)
    from cai_engine.store.cards import dataset_card

    write_atomic(out / "README.md", dataset_card(manifest, {n: len(r) for n, r in kept.items()}))
    return manifest
