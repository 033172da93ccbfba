"""`cai rl`: phase 2 (RLAIF), preference labels, the judge gate and human review."""

from __future__ import annotations

import json
from pathlib import Path

import click
from pydantic import ValidationError

from cai_engine.cli.base import (
    CaiGroup,
    cli,
    config_option,
    constitution_option,
    current_runtime,
    gate_line,
    intent_options,
    load_config_file,
    merge_flags,
    parse_settings,
    shard_options,
    validate_config,
)
from cai_engine.models.runtime import DEFAULT_MODEL


@cli.group("rl", cls=CaiGroup)
def rl_group() -> None:
    """Phase 2 (RLAIF): label preference pairs with the judge, measure the judge, and involve humans."""


@rl_group.command("label")
@config_option()
@constitution_option
@click.option(
    "--recipe",
    type=click.Choice(["judged", "revision", "intent"]),
    help="judged: sample two responses and let the judge label them; revision: prefer phase-1 revisions "
    "over originals; intent: pair a refusal with an answer among --samples, labelled by the prompt's known intent "
    "(--must-decline/--must-answer; no judge). [default: judged]",
)
@click.option("--prompts", help="Prompt source for 'judged' and 'intent'. [default: builtin:red-team]")
@intent_options("'intent' prefers the refusal", "'intent' prefers the answer")
@click.option("--samples", type=int, help="'intent': responses sampled per prompt. [default: 4]")
@click.option("--sl-run", type=click.Path(path_type=Path), help="Phase-1 run directory for 'revision'.")
@click.option("--limit", type=int, help="Use only the first N prompts or records.")
@click.option(
    "--model",
    help="The policy that samples pairs (e.g. an SFT checkpoint; any model reference: a catalogue name, a folder, a "
    f".gguf file, a Hub id or an endpoint). [default: {DEFAULT_MODEL}]",
)
@click.option("--judge", "judge_name", help="Judge: logprob, cot, pointwise or a plugin's. [default: logprob]")
@click.option("--judge-model", help="Model for the judge, if not the policy's.")
@click.option("--principles-per-label", type=int, help="Principles per comparison (an ensemble). [default: 1]")
@click.option("--seed", type=int)
@click.option("--batch-size", type=int)
@click.option(
    "--gate/--no-gate",
    default=True,
    show_default=True,
    help="Measure the judge on labelled pairs first and store it with the run (the trainers check it).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="Run directory.")
@click.option("--quiet", is_flag=True)
@shard_options
def rl_label_command(config_path, out, quiet, gate, judge_name, sl_run, shards, executor, ray_address, **flags):
    """Label preference pairs: both orders, soft labels from log-probs, abstentions kept and counted."""
    from cai_engine.phase2.gate import run_gate
    from cai_engine.phase2.labels import LabelConfig, run_labels

    for key in ("must_decline", "must_answer"):
        flags[key] = list(flags[key]) or None  # an empty repeatable flag leaves the config file's list
    data = merge_flags(load_config_file(config_path), sl_run=str(sl_run) if sl_run else None, **flags)
    if judge_name:
        data["judge"] = {"name": judge_name}
    config = validate_config(LabelConfig, data, str(config_path or "options"))
    runtime = current_runtime()
    if gate and config.recipe != "intent" and not (out / "gate.json").exists():
        result = run_gate(
            out, config.judge_ref(runtime), constitution=config.constitution, runtime=runtime, seed=config.seed
        )
        click.echo(gate_line(result))
    if shards:
        import time

        from cai_engine.phase2.labels import summarise_preferences
        from cai_engine.records import LabelSummary
        from cai_engine.stages import run_sharded

        began = time.perf_counter()
        merged = run_sharded(
            "rl", config.model_dump(mode="json"), out, shards, executor=executor, ray_address=ray_address
        )
        click.echo(f"merged {merged.shards} shards ({merged.records} records) into {out}")
        summary = LabelSummary(
            **summarise_preferences(out).model_dump(),
            written=merged.records,
            resumed=False,
            run_dir=str(out),
            seconds=round(time.perf_counter() - began, 1),
        )
    else:
        summary = run_labels(config, out, runtime=runtime, progress=not quiet)
    click.echo(f"run directory: {summary.run_dir}{' (resumed)' if summary.resumed else ''}")
    click.echo(
        f"pairs: {summary.pairs} (written now: {summary.written}), labelled: {summary.labelled}, "
        f"abstained: {summary.abstained}, position consistency: {summary.position_consistency}"
    )
    click.echo(f"next: cai export preferences {out} --out {out}-dataset")


@rl_group.command("gate")
@click.argument("run", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--judge", "judge_name", help="The judge to measure. [default: RUN's labelling judge, else logprob]")
@click.option("--judge-model", help=f"Its model. [default: RUN's judge model, else {DEFAULT_MODEL}]")
@click.option("--constitution", default="harmless", show_default=True)
@click.option(
    "--pairs",
    default="builtin:judge-pairs",
    show_default=True,
    help="Labelled pairs (JSONL: id, prompt, better, worse[, principle]).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--judge-option",
    "judge_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A judge option, e.g. --judge-option few_shot=0 --judge-option layout=chat (repeatable).",
)
def rl_gate_command(run, judge_name, judge_model, constitution, pairs, seed, judge_options):
    """Measure a judge on pairs with known answers: accuracy, position consistency, calibration.

    With RUN, the judge that labelled the run is measured (unless --judge/--judge-model/--judge-option say
    otherwise) and the result is stored as RUN/gate.json, which `cai export preferences` carries to the trainers;
    they refuse a gate that measured another judge than the one that labelled the pairs.
    """
    from cai_engine.errors import UnknownComponentError
    from cai_engine.models.options import with_model
    from cai_engine.phase2.gate import run_gate
    from cai_engine.phase2.labels import LabelConfig
    from cai_engine.plugins.refs import ComponentRef

    runtime = current_runtime()
    ref = None
    if run is not None and (Path(run) / "run.json").exists():
        manifest = json.loads((Path(run) / "run.json").read_text(encoding="utf-8"))
        if manifest.get("kind") == "rl" and manifest.get("fingerprint"):
            try:
                ref = LabelConfig.model_validate(manifest["fingerprint"]).judge_ref(runtime)
            except ValidationError:
                ref = None
            except UnknownComponentError:
                if not (judge_name or judge_model):
                    raise  # the run's judge is not registered here, and no other judge was named
                ref = None
    if ref is None or judge_name or judge_model or judge_options:
        base = ref.options if ref is not None and not (judge_name or judge_model) else {}
        options = {**base, **parse_settings(judge_options, "--judge-option")}
        if judge_model:
            options["model"] = judge_model
        name = judge_name or (ref.name if ref is not None else "logprob")
        ref = with_model(ComponentRef(name=name, options=options), "judge", runtime, DEFAULT_MODEL)
    click.echo(f"measuring judge {ref.name} on {ref.options.get('model')}", err=True)
    result = run_gate(run, ref, constitution=constitution, pairs=pairs, runtime=runtime, seed=seed)
    click.echo(gate_line(result))


@rl_group.group("review", cls=CaiGroup)
def rl_review_group() -> None:
    """Hand the judge's least confident pairs to humans and merge their labels back."""


@rl_review_group.command("export")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--count", type=int, default=50, show_default=True)
def rl_review_export(run, out, count):
    """Write abstained, order-inconsistent and least confident pairs for review (fill in human_choice)."""
    from cai_engine.phase2.preferences import export_review

    click.echo(f"wrote {export_review(run, out, count=count).exported} pairs to {out}")


@rl_review_group.command("merge")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("reviewed", type=click.Path(path_type=Path, exists=True, dir_okay=False))
def rl_review_merge(run, reviewed):
    """Merge reviewed labels ('a', 'b' or a probability); they override the AI's at export."""
    from cai_engine.phase2.preferences import merge_review

    result = merge_review(run, reviewed)
    click.echo(f"merged {result.merged} reviewed label(s); {result.skipped_unreviewed} left unreviewed")
