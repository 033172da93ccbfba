"""`cai sl`: phase 1 (SL-CAI), sample then critique and revise."""

from __future__ import annotations

import time
from pathlib import Path

import click

from cai_engine.cli.base import (
    cli,
    config_option,
    constitution_option,
    current_runtime,
    load_config_file,
    merge_flags,
    print_sl_summary,
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
    "--model",
    help=f"Model for every role: {DEFAULT_MODEL}, a catalogue name (`cai models list`), a model folder, a .gguf "
    "file, a Hub id org/name[@revision] or an endpoint http://host:port/v1#name.",
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
        click.echo(f"merged {merged.shards} shards ({merged.records} records) into {out}")
        counts = summarise(out)
        summary = SLSummary(
            written=merged.records,
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
