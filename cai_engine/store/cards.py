"""Model and dataset cards: the ``README.md`` the Hugging Face Hub shows, written beside every checkpoint and export.

A model card says what the checkpoint is (base model, trainer, steps), which constitution shaped it (name, version
and content hash, read from the dataset's ``export.json``), what it was trained on and the run's metrics. A dataset
card says how the rows load (``configs`` for ``datasets.load_dataset``), where they came from and how they were
mixed. Both carry the YAML metadata block the Hub reads (tags, base model, task).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from cai_engine.version import __version__

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _front_matter(metadata: dict[str, Any]) -> str:
    kept = {k: v for k, v in metadata.items() if v not in (None, [], {})}
    return "---\n" + yaml.safe_dump(kept, sort_keys=False, allow_unicode=True) + "---\n"


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

    :param task: the Hugging Face task (``pipeline_tag``), as the trainer declares it (``Trainer.task``).
    :param auto_class: the transformers class that loads the checkpoint (``Trainer.auto_class``).
    """
    trainer = str(summary.get("trainer", "?"))
    base = str(summary.get("base_model", ""))
    export = _export_manifest(summary.get("dataset"))
    metadata = {
        "library_name": "transformers",
        "base_model": base if HUB_ID.match(base) else None,  # the Hub only accepts Hub ids here
        "pipeline_tag": task,
        "tags": ["cai-engine", "constitutional-ai", "trl", trainer],
    }
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
        f"- **Constitution**: {_constitution_line(export.get('constitution'))}",
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
    return _front_matter(metadata) + "\n" + "\n".join(lines) + "\n"


def dataset_card(manifest: dict[str, Any], splits: dict[str, int]) -> str:
    """The dataset card of an export folder from its ``export.json`` manifest and the rows in each split."""
    kind = "preference" if manifest.get("format") == "trl-conversational-preference" else "sft"
    metadata = {
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": name, "path": f"{name}.jsonl"} for name, rows in splits.items() if rows],
            }
        ],
        "tags": ["cai-engine", "constitutional-ai", "trl", kind],
        "task_categories": ["text-generation"],
    }
    columns = (
        "`prompt`, `chosen`, `rejected` (messages), `chosen_probability` (how sure the label is), `source`, "
        "`prompt_id`, `principle_ids`"
        if kind == "preference"
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
    if kind == "sft":
        lines.append(
            f"- **Mix**: {manifest.get('revisions')} revisions and {manifest.get('helpful')} helpfulness samples "
            f"({manifest.get('duplicates_dropped', 0)} duplicates dropped, "
            f"{manifest.get('repeats_dropped', 0)} revisions beyond `max_repeats` copies of one reply dropped)"
        )
    else:
        lines.append(
            f"- **Sources**: {manifest.get('sources')}; {manifest.get('abstained_excluded', 0)} abstentions and "
            f"{manifest.get('filtered_low_confidence', 0)} low-confidence labels left out"
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
    return _front_matter(metadata) + "\n" + "\n".join(lines) + "\n"
