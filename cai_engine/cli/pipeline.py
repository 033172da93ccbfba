"""`cai run`, `cai demo` and `cai eval`: the whole pipeline and its evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cai_engine.cli.base import (
    cli,
    current_runtime,
    gate_line,
    load_config_file,
    merge_flags,
    parse_settings,
    print_sl_summary,
    shard_options,
    state,
    validate_config,
)
from cai_engine.models.runtime import DEFAULT_MODEL

if TYPE_CHECKING:
    from cai_engine.records import PipelineSummary

DEMO_PIPELINE: dict[str, Any] = {
    "sl": {
        "prompts": "builtin:red-team",
        "limit": 4,
        "rounds": 2,
        "helpful_limit": 4,
        "batch_size": 4,
        "sampler": {"name": "model", "options": {"max_new_tokens": 96}},
        "critic": {"name": "model", "options": {"max_new_tokens": 64}},
        "reviser": {"name": "model", "options": {"max_new_tokens": 128}},
    },
    "sft": {"trl": {"max_steps": 8, "per_device_train_batch_size": 2, "learning_rate": 2e-5, "max_length": 384}},
    # A 135M judge is expected to fail the gate, so the demo's preferences come from the revision recipe
    # (revision preferred over original, CAI-SPEC G1's fallback); the gate still runs and is reported.
    "rl": {"recipe": "revision"},
    "reward": {"trl": {"max_steps": 4, "per_device_train_batch_size": 2, "max_length": 384}},
    "policy": {
        "trainer": "grpo",
        "options": {
            "limit": 4,
            "trl": {
                "max_steps": 2,
                "num_generations": 2,
                "per_device_train_batch_size": 2,
                "max_completion_length": 32,
            },
        },
    },
}


@cli.command("run")
@click.argument("config_path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--out", help="Override the config's output folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run_command(config_path: Path, out: str | None, quiet: bool) -> None:
    """The whole pipeline from one config: SL-CAI -> SFT -> preference labels -> judge gate -> preference model -> RL.

    Each stage resumes, and a stage whose checkpoint exists is skipped. See examples/pipeline.yaml.
    """
    from cai_engine.pipeline import PipelineConfig, run_pipeline

    data = merge_flags(load_config_file(config_path), out=out)
    config = validate_config(PipelineConfig, data, str(config_path))
    summary = run_pipeline(config, runtime=current_runtime(), progress=not quiet, echo=click.echo)
    _print_pipeline(summary)


def _print_pipeline(summary: PipelineSummary) -> None:
    click.echo(f"\noutputs in {summary.out} (pipeline-summary.json has every number)")
    if summary.sl is not None:
        print_sl_summary(summary.sl)
    for stage, result in (("sft", summary.sft), ("reward", summary.reward), ("policy", summary.policy)):
        if result is not None:
            accuracy = result.get("heldout_pairwise_accuracy")
            extra = f", held-out pairwise accuracy {accuracy}" if accuracy is not None else ""
            click.echo(f"{stage}: {result.checkpoint} ({result.steps} steps, {result.seconds} s{extra})")


@cli.command("demo")
@click.option("--out", default="runs/demo", show_default=True, help="Output folder (resumable).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Base model for every role.")
def demo_command(out: str, model: str) -> None:
    """The main job: a small version of the whole pipeline on the embedded default model.

    Validates the installed constitutions, runs SL-CAI on 4 red-team prompts (2 rounds), fine-tunes on the result,
    measures the judge, builds preference pairs, trains a preference model and takes a few GRPO steps, printing
    where everything is and a summary. A few minutes on 2 CPU cores.
    """
    from cai_engine.pipeline import PipelineConfig, run_pipeline

    registry = state().registry
    for name in registry.constitution_names():
        registry.constitution(name)
    click.echo(f"constitutions ok: {', '.join(registry.constitution_names())}")
    config = PipelineConfig.model_validate({**DEMO_PIPELINE, "out": out, "model": model})
    summary = run_pipeline(config, runtime=current_runtime(), echo=click.echo)
    _print_pipeline(summary)
    if summary.gate is not None:
        click.echo(gate_line(summary.gate))
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file() and not f.is_symlink())
    click.echo(f"{out}: {size / 1e6:,.0f} MB on disk (the trained models' final weights; `rm -r {out}` reclaims it)")


@cli.command("eval")
@click.option(
    "--models",
    required=True,
    help="Comma-separated models; the first is the baseline. 'base' means "
    "the embedded default. Folders, .gguf files and endpoints work too.",
)
@click.option("--names", help="Comma-separated labels for the models.")
@click.option("--prompts", "harmful", default="builtin:heldout", show_default=True, help="Held-out red-team prompts.")
@click.option(
    "--benign",
    default="builtin:benign-scary",
    show_default=True,
    help="Benign prompts that sound dangerous (over-refusal).",
)
@click.option("--helpful", default="builtin:heldout-helpful", show_default=True, help="Ordinary requests.")
@click.option("--limit", type=int, help="At most N prompts from each set.")
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
    sl_run,
    policies,
    max_new_tokens,
    no_principles,
    out,
):
    """Is the model harmless without becoming evasive? Harm, over-refusal, evasiveness, win rates, judge quality.

    Writes results.json and a self-contained report.html (charts embedded) to --out.
    """
    from cai_engine.evaluation.run import EvalConfig, evaluate

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
            "harmful": harmful,
            "benign": benign,
            "helpful": helpful,
            "limit": limit,
            "judge_model": judge_model,
            "judge_options": parse_settings(judge_options, "--judge-option"),
            "harm_score": not no_harm_score,
            "sl_run": sl_run,
            "max_new_tokens": max_new_tokens,
            "principle_rates": not no_principles,
            "policies": [p.strip() for p in policies.split(",")] if policies else [],
            "shard": shard,
        },
        "options",
    )
    from cai_engine.evaluation.run import summary_lines
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
    click.echo(f"report: {Path(out) / 'report.html'}")


@cli.command("merge")
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.argument("shard_dirs", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
def merge_command(out: Path, shard_dirs: tuple[Path, ...]) -> None:
    """Merge the shard folders of one `cai sl`, `cai rl label` or `cai eval` run (each made with --shard I/N) into OUT.

    The shards must come from the same config (everything but --shard) and cover 0..N-1 exactly once. A merged
    `cai sl` or `cai rl label` run is an ordinary run directory, ready for `cai export`; a merged evaluation gets
    its metrics, results.json and report computed again from every shard's answers.
    """
    from cai_engine.stages import merge

    summary = merge(out, list(shard_dirs))
    click.echo(f"merged {summary['shards']} {summary['kind']} shards ({summary['records']} records) into {out}")
