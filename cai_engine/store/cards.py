"""Model and dataset cards: the ``README.md`` the Hugging Face Hub shows, written beside every checkpoint and export.

A model card says what the checkpoint is (base model, trainer, steps), which constitution shaped it (name, version
and content hash, read from the dataset's ``export.json``), what it was trained on and the run's metrics. A dataset
card says how the rows load (``configs`` for ``datasets.load_dataset``), where they came from and how they were
mixed. Both are built with ``huggingface_hub``'s ``ModelCard``/``ModelCardData`` and ``DatasetCard``/
``DatasetCardData``, so the YAML metadata block the Hub reads (licence, base model, datasets, tags, library, task, and
the constitution: name, version, content hash) is what the Hub's own library writes and reads back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cai_engine.version import __version__

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _card_text(card_class: Any, data: Any, body: list[str]) -> str:
    """A ``ModelCard``/``DatasetCard`` made of ``data`` (its ``CardData``, the YAML metadata block) and the Markdown
    ``body``, as the text of its ``README.md``; the card parses its own metadata back, so a block the Hub's library
    cannot read fails here, not on the Hub."""
    card = card_class("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body) + "\n")
    return str(card)


def _constitution_metadata(constitution: dict[str, Any] | None) -> dict[str, Any] | None:
    """The constitution as card metadata: name, version and content hash (what ``cai export`` recorded)."""
    if not constitution:
        return None
    kept = {k: constitution.get(k) for k in ("name", "version", "hash") if constitution.get(k) is not None}
    return kept or None


def hub_dataset_ids(dataset: str | None) -> list[str] | None:
    """The card's ``datasets``: Hub dataset ids only (the Hub links each one), so a local export folder or a prompt
    source is left out of the metadata; the card's text names it."""
    if dataset and HUB_ID.match(dataset) and not Path(dataset).exists():
        return [dataset]
    return None


def _constitution_line(constitution: dict[str, Any] | None) -> str:
    if not constitution:
        return "not recorded (the dataset has no `export.json` from `cai export`)"
    return (
        f"`{constitution.get('name')}` version {constitution.get('version', '?')}, content hash "
        f"`{constitution.get('hash', '?')}`"
    )


def _export_manifest(dataset: str | None) -> dict[str, Any]:
    if not dataset:
        return {}
    path = Path(dataset) / "export.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def model_card(summary: dict[str, Any], *, task: str | None = None, auto_class: str = "AutoModelForCausalLM") -> str:
    """The model card of a checkpoint from a trainer's ``summary`` (``cai_training.json``).

    Its metadata: ``license`` and ``base_model`` of the model it was trained from (the catalogue's upstream Hub id
    for the embedded default and catalogue models, the id itself for a Hub id, the card of a local checkpoint
    folder; see ``models.files.upstream_model``), ``datasets``, ``tags``, ``library_name``, ``pipeline_tag`` and the
    ``constitution`` (name, version, content hash).

    :param task: the Hugging Face task (``pipeline_tag``), as the trainer declares it (``Trainer.task``).
    :param auto_class: the transformers class that loads the checkpoint (``Trainer.auto_class``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from cai_engine.models.files import upstream_model

    trainer = str(summary.get("trainer", "?"))
    base = str(summary.get("base_model", ""))
    dataset = summary.get("dataset") or summary.get("prompts")
    export = _export_manifest(summary.get("dataset"))
    constitution = summary.get("constitution") or export.get("constitution")  # grpo: the judge's
    upstream, license_id = upstream_model(base) if base else (None, None)
    data = ModelCardData(
        license=license_id or "unknown",
        base_model=upstream,  # the Hub only accepts Hub ids here
        datasets=hub_dataset_ids(str(dataset) if dataset else None),
        library_name="transformers",
        pipeline_tag=task,
        tags=["cai-engine", "constitutional-ai", "trl", trainer],
        constitution=_constitution_metadata(constitution),
    )
    metrics = summary.get("metrics") or {}
    rows = "\n".join(f"| {k} | {round(v, 4) if isinstance(v, float) else v} |" for k, v in metrics.items())
    gate = summary.get("judge_gate") or export.get("judge_gate")
    lines = [
        f"# {Path(str(summary.get('checkpoint', 'checkpoint'))).name}",
        "",
        f"A `{trainer}` checkpoint trained by cai-engine {__version__} "
        "(Constitutional AI: phase 1 revises answers against a constitution and trains on them; phase 2 trains on "
        "preferences an AI judge labelled against the same principles).",
        "",
        f"- **Base model**: `{base or '?'}`",
        f"- **Constitution**: {_constitution_line(constitution)}",
        f"- **Data**: `{summary.get('dataset', '?')}`: {summary.get('train_examples', '?')} training and "
        f"{summary.get('test_examples', 0)} held-out examples"
        + (f" (sources: {export.get('sources')})" if export.get("sources") else ""),
        f"- **Training**: {summary.get('steps', '?')} steps in {summary.get('seconds', '?')} s"
        + (f"; TRL settings {json.dumps(summary['trl'])}" if summary.get("trl") else ""),
    ]
    if gate:
        lines.append(
            f"- **Judge gate** (the labelling judge on labelled pairs): accuracy {gate.get('accuracy')}, same "
            f"position {gate.get('same_position_rate')}, {gate.get('pairs')} pairs"
        )
    if summary.get("heldout_pairwise_accuracy") is not None:
        lines.append(f"- **Held-out pairwise accuracy**: {summary['heldout_pairwise_accuracy']}")
    check = summary.get("checkpoint_check") or {}
    if check:
        lines.append(
            f"- **Checkpoint check**: the saved weights reproduce the trained model on a fixed sentence (largest "
            f"difference {check.get('max_abs_difference')})"
        )
    if rows:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |", rows]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import {auto_class}, AutoTokenizer",
        "",
        f'model = {auto_class}.from_pretrained("PATH_OR_REPO")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        "```",
        "",
        "The full record of the run is in `cai_training.json` beside this card.",
    ]
    return _card_text(ModelCard, data, lines)


def dataset_card(manifest: dict[str, Any], splits: dict[str, int]) -> str:
    """The dataset card of an export folder from its ``export.json`` manifest and the rows in each split."""
    from huggingface_hub import DatasetCard, DatasetCardData

    kind = "preference" if manifest.get("format") == "trl-conversational-preference" else "sft"
    data = DatasetCardData(
        license="unknown",  # written by the run's models under their licences; the user decides
        task_categories=["text-generation"],
        tags=["cai-engine", "constitutional-ai", "trl", kind],
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": name, "path": f"{name}.jsonl"} for name, rows in splits.items() if rows],
            }
        ],
        constitution=_constitution_metadata(manifest.get("constitution")),
    )
    columns = (
        "`prompt`, `chosen`, `rejected` (messages), `chosen_probability` (how sure the label is), `source`, "
        "`prompt_id`, `principle_ids`"
        if kind == "preference"
        else "`messages` (the request and the trained reply: a decline, or the policy's own answer), `prompt_id`, "
        "`source` (`decline` or `own-answer`), `weight` (the example's loss weight), `truncated` (a reply cut at a length "
        "limit: its end of turn is left out of the loss), `group` (the split group)"
        if manifest.get("kind") == "decisions"
        else "`messages`, `prompt_id`, `source` (a phase-1 target's source, or `decline` or `own-answer`), `weight`, "
        "`truncated`"
        if manifest.get("kind") == "sft-mix"
        else "`messages` (the conversation ending with the trained answer), `prompt_id`, `source`, `round`, "
        "`principle_id`"
    )
    lines = [
        f"# {kind} data from a Constitutional AI run",
        "",
        f"Exported by cai-engine {__version__} from `{manifest.get('source_run', '?')}` in TRL's "
        f'{manifest.get("format", "?")} format; loads with `datasets.load_dataset("json", data_files=...)` or by '
        "this folder's `configs`.",
        "",
        f"- **Rows**: {', '.join(f'{n} {r}' for n, r in splits.items())}",
        f"- **Columns**: {columns}",
        f"- **Constitution**: {_constitution_line(manifest.get('constitution'))}",
        f"- **Export options**: `{json.dumps(manifest.get('options', {}))}`",
    ]
    if manifest.get("kind") == "decisions":
        lines.append(
            f"- **Mix**: {manifest.get('declines')} declines of harmful requests and {manifest.get('own_answers')} "
            "of the policy's own answers to harmless ones (left out: "
            f"{manifest.get('evaluation_copies_dropped', 0)} requests that copy an evaluation prompt, "
            f"{manifest.get('own_refusals_dropped', 0)} harmless requests the policy itself refused, "
            f"{manifest.get('empty_answers_dropped', 0)} empty answers)"
        )
        if manifest.get("preferences"):
            pairs = manifest["preferences"]
            lines.append(
                f"- **Preference pairs** (`preferences/`, for DPO): {pairs['decline_over_answer']} declines chosen "
                f"over the policy's own answer, {pairs['answer_over_decline']} own answers chosen over a decline"
            )
    elif manifest.get("kind") == "sft-mix":
        parts = "; ".join(
            f"`{folder}`: {', '.join(f'{n} {split}' for split, n in split_counts.items())}"
            for folder, split_counts in (manifest.get("parts") or {}).items()
        )
        lines.append(
            f"- **Mix**: {parts}; where both have a target for a request, {manifest.get('decisions_replaced', 0)} "
            f"decision targets left out (phase 1's agree with the request's label) and "
            f"{manifest.get('phase1_replaced', 0)} phase-1 targets left out (a harmful request carried out or a "
            "harmless one refused)"
        )
    elif kind == "sft":
        lines.append(
            f"- **Mix**: {manifest.get('revisions')} revisions and {manifest.get('helpful')} helpfulness samples "
            f"({manifest.get('duplicates_dropped', 0)} duplicates dropped, "
            f"{manifest.get('repeats_dropped', 0)} revisions beyond `max_repeats` copies of one reply and "
            f"{manifest.get('refusals_dropped', 0)} refusals of `must_answer` prompts and "
            f"{manifest.get('compliance_dropped', 0)} non-refusals of `must_decline` prompts dropped)"
        )
        if manifest.get("written") or manifest.get("written_dropped"):
            left_out = ", ".join(f"{n} ({why})" for why, n in (manifest.get("written_dropped") or {}).items())
            lines.append(
                f"- **Written by people**: {manifest.get('written', 0)} targets from labelled exchanges "
                f"(`written`: {', '.join(manifest.get('options', {}).get('written', []))})"
                + (f"; left out: {left_out}" if left_out else "")
            )
    else:
        lines.append(
            f"- **Sources**: {manifest.get('sources')}; {manifest.get('abstained_excluded', 0)} abstentions and "
            f"{manifest.get('filtered_low_confidence', 0)} low-confidence labels left out"
        )
        if manifest.get("intent_labelled"):
            lines.append(
                f"- **Labelled by intent**: {manifest['intent_labelled']} pairs of a refusal and an answer to a prompt "
                f"listed in `must_decline`/`must_answer` (the AI label had preferred the other reply in "
                f"{manifest.get('intent_overrode', 0)})"
            )
        gate = manifest.get("judge_gate")
        lines.append(
            "- **Judge gate**: "
            + (
                f"accuracy {gate.get('accuracy')} on {gate.get('pairs')} labelled pairs, same position "
                f"{gate.get('same_position_rate')}"
                if gate
                else "not measured"
            )
        )
    lines += [
        "",
        "The split is by prompt: every row of a prompt lands in the same split. `export.json` holds the rest.",
    ]
    return _card_text(DatasetCard, data, lines)
