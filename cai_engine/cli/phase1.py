"""Phase 1 commands: `cai sl` and `cai export`."""

from __future__ import annotations

import time
from pathlib import Path

import click

from cai_engine.cli.base import (
    CaiGroup,
    cli,
    config_option,
    constitution_option,
    current_runtime,
    load_config_file,
    merge_flags,
    print_sl_summary,
    push,
    push_options,
    shard_options,
    validate_config,
)
from cai_engine.models.runtime import DEFAULT_MODEL


@cli.command("sl")
@config_option()
@constitution_option
@click.option(
    "--prompts",
    help="builtin:<set>, <plugin>:<set>, or a .jsonl/.csv/.txt file or datasets folder. [default: builtin:red-team]",
)
@click.option("--field", help="Field holding the prompt in a JSONL/CSV/datasets source.")
@click.option("--limit", type=int, help="Use only the first N prompts.")
@click.option("--rounds", type=int, help="Critique/revision rounds per prompt. [default: 4]")
@click.option("--critique/--no-critique", default=None, help="Critique before revising (default) or revise directly.")
@click.option("--stop-early/--no-stop-early", default=None, help="Stop once the critic finds nothing to revise.")
@click.option("--seed", type=int, help="Seed for principle draws and sampling. [default: 0]")
@click.option("--batch-size", type=int, help="Items per batched model call. [default: 8]")
@click.option(
    "--model", help=f"Model for every role: {DEFAULT_MODEL}, a folder, a .gguf file or http://host:port/v1#name."
)
@click.option(
    "--helpful-prompts",
    multiple=True,
    help="Prompts answered without critique for the helpfulness mix; repeat to mix several sources "
    "(e.g. builtin:helpful and builtin:borderline), 'none' to skip. [default: builtin:helpful]",
)
@click.option(
    "--helpful-limit", type=int, help="How many prompts from each helpfulness source. [default: as many as red-team]"
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Run directory; rerunning with the same settings resumes it.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@shard_options
def sl_command(config_path, out, quiet, helpful_prompts, shards, executor, ray_address, **flags):
    """Phase 1 (SL-CAI): sample, then critique and revise for several rounds; write records to --out.

    Each round draws one principle at random (with replacement, seeded) from the constitution's sl principles.
    Records are JSONL with full provenance; a killed run resumes where it stopped. Export the result with
    `cai export sft RUN --out DATASET`.
    """
    from cai_engine.phase1.revise import SLConfig, run_sl

    data = merge_flags(load_config_file(config_path), **flags)
    if helpful_prompts:  # "none" must survive the merge, which ignores unset (None) flags
        sources = [s for s in helpful_prompts if s.lower() != "none"]
        data["helpful_prompts"] = (sources[0] if len(sources) == 1 else sources) if sources else None
    config = validate_config(SLConfig, data, str(config_path or "options"))
    if shards:
        from cai_engine.phase1.revise import summarise
        from cai_engine.records import SLSummary
        from cai_engine.stages import run_sharded

        began = time.perf_counter()
        merged = run_sharded(
            "sl", config.model_dump(mode="json"), out, shards, executor=executor, ray_address=ray_address
        )
        click.echo(f"merged {merged['shards']} shards ({merged['records']} records) into {out}")
        counts = summarise(out)
        summary = SLSummary(
            written=merged["records"],
            skipped_done=0,
            errors=counts.error_items,
            resumed=False,
            run_dir=str(out),
            seconds=round(time.perf_counter() - began, 1),
            **counts.model_dump(),
        )
    else:
        summary = run_sl(config, out, runtime=current_runtime(), progress=not quiet)
    print_sl_summary(summary)


@cli.group("export", cls=CaiGroup)
def export_group() -> None:
    """Turn run directories into datasets in the formats TRL reads."""


@export_group.command("sft")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="Dataset folder.")
@click.option(
    "--train-on",
    type=click.Choice(["all_rounds", "last_round"]),
    default="all_rounds",
    show_default=True,
    help="Every accepted revision, or only each prompt's final one.",
)
@click.option(
    "--helpful-ratio", type=float, default=0.27, show_default=True, help="Share of helpfulness samples in the mix."
)
@click.option("--heldout", type=float, default=0.1, show_default=True, help="Share of prompts in the test split.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--max-repeats",
    type=click.IntRange(min=1),
    default=None,
    help="Keep at most N revisions with the same reply (e.g. one stock refusal); default: keep all.",
)
@push_options("dataset")
def export_sft_command(run, out, train_on, helpful_ratio, heldout, seed, max_repeats, push_to_hub, private):
    """An SFT dataset (TRL conversational `messages`) from an SL-CAI run: train.jsonl and test.jsonl."""
    from cai_engine.phase1.export import ExportOptions, export_sft

    options = validate_config(
        ExportOptions,
        {
            "train_on": train_on,
            "helpful_ratio": helpful_ratio,
            "heldout": heldout,
            "seed": seed,
            "max_repeats": max_repeats,
        },
        "options",
    )
    summary = export_sft(run, out, options)
    click.echo(
        f"wrote {out}: {summary.train} train / {summary.test} test examples "
        f"({summary.revisions} revisions, {summary.helpful} helpfulness, "
        f"{summary.duplicates_dropped} duplicates dropped, {summary.repeats_dropped} repeated replies dropped)"
    )
    push(out, push_to_hub, "dataset", private)


@export_group.command("preferences")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="Dataset folder.")
@click.option(
    "--min-confidence", type=float, default=0.0, show_default=True, help="Drop AI labels with |p - 0.5| below this."
)
@click.option("--heldout", type=float, default=0.1, show_default=True, help="Share of prompts in the test split.")
@click.option(
    "--human",
    multiple=True,
    type=click.Path(path_type=Path, exists=True),
    help="Human preference file(s) to mix in (prompt/chosen/rejected, or hh-rlhf style).",
)
@push_options("dataset")
def export_preferences_command(run, out, min_confidence, heldout, human, push_to_hub, private):
    """A preference dataset (TRL conversational prompt/chosen/rejected + chosen_probability) from a labelling run."""
    from cai_engine.phase2.preferences import PreferenceExportOptions, export_preferences

    options = validate_config(
        PreferenceExportOptions,
        {"min_confidence": min_confidence, "heldout": heldout, "human": [str(h) for h in human]},
        "options",
    )
    summary = export_preferences(run, out, options)
    gate = summary.judge_gate
    click.echo(
        f"wrote {out}: {summary.train} train / {summary.test} test pairs {summary.sources}; "
        f"{summary.abstained_excluded} abstained and {summary.filtered_low_confidence} low-confidence "
        f"excluded; judge gate: {'accuracy ' + str(gate.accuracy) if gate else 'not measured'}"
    )
    push(out, push_to_hub, "dataset", private)
