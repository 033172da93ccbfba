"""`cai export`: run directories into the datasets TRL reads (SFT and preferences)."""

from __future__ import annotations

from pathlib import Path

import click

from cai_engine.classifiers.data import written_flags
from cai_engine.cli.base import (
    CaiGroup,
    cli,
    intent_options,
    parse_written,
    push,
    push_options,
    validate_config,
)


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
@intent_options("a target without a refusal phrase is dropped", "a target that refuses one is dropped")
@click.option(
    "--written",
    "written",
    multiple=True,
    metavar="SOURCE",
    help="Labelled exchanges people wrote (builtin:harmless or a JSONL file of prompt, response, violates, kind) whose "
    "replies labelled violates: false join the targets (the kind rules: the training guide); repeatable. Exchanges "
    "whose request copies an evaluation prompt are dropped.",
)
@click.option(
    "--written-any-decline",
    is_flag=True,
    help="Keep written replies to harmful requests that decline without a refusal phrase (safe completions); by "
    "default they are dropped, since the evaluation counts refusals by those phrases.",
)
@push_options("dataset")
def export_sft_command(
    run,
    out,
    train_on,
    helpful_ratio,
    heldout,
    seed,
    max_repeats,
    must_answer,
    must_decline,
    written,
    written_any_decline,
    push_to_hub,
    private,
):
    """An SFT dataset (TRL conversational `messages`) from an SL-CAI run: train.jsonl and test.jsonl."""
    from cai_engine.cli.base import state
    from cai_engine.phase1.export import ExportOptions, export_sft
    from cai_engine.prompts.overlap import evaluation_texts

    options = validate_config(
        ExportOptions,
        {
            "train_on": train_on,
            "helpful_ratio": helpful_ratio,
            "heldout": heldout,
            "seed": seed,
            "max_repeats": max_repeats,
            "must_answer": list(must_answer),
            "must_decline": list(must_decline),
            "written": list(written),
            "written_refusal_phrase": not written_any_decline,
        },
        "options",
    )
    evaluation = evaluation_texts(state().registry) if options.written else None
    summary = export_sft(run, out, options, evaluation_prompts=evaluation)
    click.echo(
        f"wrote {out}: {summary.train} train / {summary.test} test examples "
        f"({summary.revisions} revisions, {summary.helpful} helpfulness, "
        f"{summary.duplicates_dropped} duplicates dropped, {summary.repeats_dropped} repeated replies dropped, {summary.refusals_dropped} refusals of harmless prompts dropped, "
        f"{summary.compliance_dropped} non-refusals of harmful prompts dropped"
        + (f", {summary.written} written targets" if options.written else "")
        + ")"
    )
    for reason, count in summary.written_dropped.items():
        click.echo(f"   written exchanges left out: {count} ({reason})")
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
@intent_options("of a refusal and an answer, the refusal is chosen", "of a refusal and an answer, the answer is chosen")
@click.option(
    "--balance",
    is_flag=True,
    help="As many pairs preferring a refusal to an answer as preferring an answer to a refusal.",
)
@click.option(
    "--borrow-refusals",
    is_flag=True,
    help="Pair the answer to a --must-answer prompt that got no refusal among its samples with a refusal the policy "
    "wrote for the --must-decline prompt most like it.",
)
@push_options("dataset")
def export_preferences_command(
    run, out, min_confidence, heldout, human, must_decline, must_answer, balance, borrow_refusals, push_to_hub, private
):
    """A preference dataset (TRL conversational prompt/chosen/rejected + chosen_probability) from a labelling run."""
    from cai_engine.phase2.preferences import PreferenceExportOptions, export_preferences

    options = validate_config(
        PreferenceExportOptions,
        {
            "min_confidence": min_confidence,
            "heldout": heldout,
            "human": [str(h) for h in human],
            "must_decline": list(must_decline),
            "must_answer": list(must_answer),
            "balance": balance,
            "borrow_refusals": borrow_refusals,
        },
        "options",
    )
    summary = export_preferences(run, out, options)
    gate = summary.judge_gate
    click.echo(
        f"wrote {out}: {summary.train} train / {summary.test} test pairs {summary.sources}; "
        f"{summary.abstained_excluded} abstained and {summary.filtered_low_confidence} low-confidence "
        f"excluded; {summary.intent_labelled} labelled by intent ({summary.intent_overrode} against the AI label); "
        f"{summary.refusals_borrowed} refusals borrowed; "
        f"judge gate: {'accuracy ' + str(gate.accuracy) if gate else 'not measured'}"
    )
    push(out, push_to_hub, "dataset", private)


@export_group.command("decisions")
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="Dataset folder.")
@click.option(
    "--model",
    default=None,
    help="The policy whose own greedy answers the harmless requests get (with --preferences, the harmful ones too; "
    "a model reference). [default: smollm2]",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Which decline each harmful request gets.")
@click.option(
    "--answer-tokens", type=click.IntRange(min=1), default=48, show_default=True, help="Length of the own answers."
)
@click.option(
    "--heldout", type=float, default=0.05, show_default=True, help="Share of request groups in the test split."
)
@click.option(
    "--harmless-weight",
    type=float,
    default=1.0,
    show_default=True,
    help="Loss weight of each harmless example (a harmful one weighs 1); above 1 moves the trained policy toward "
    "answering.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--preferences",
    is_flag=True,
    help="Also write preference pairs for `cai train dpo` to OUT/preferences: each decline chosen over the model's "
    "own answer to the harmful request, each own answer over a decline (the harmful requests are answered too).",
)
@click.option(
    "--written",
    "written",
    multiple=True,
    metavar="SOURCE=harmful|benign[:GLOB]",
    help="Labelled requests: a prompt set (builtin:NAME or a JSONL file) whose prompts (only ids matching GLOB) "
    f"carry this label; repeatable; replaces the default ({written_flags()}: 1,685 requests; give those again to add "
    "to them). Held-out sets are refused.",
)
@push_options("dataset")
def export_decisions_command(
    out, model, seed, answer_tokens, heldout, harmless_weight, batch_size, preferences, written, push_to_hub, private
):
    """An SFT dataset that teaches the decision to answer or decline, from labelled requests.

    Each labelled request (by default the constitutional classifiers' 1,685 hand-written training requests; others
    with --written) becomes one example: a harmful request gets a written decline that says why and offers something
    safe; a harmless one gets the policy's own greedy answer (a harmless request it refuses itself is left out).
    Requests that copy an evaluation prompt are left out. Train it with `cai train sft` and `decision_weight` above 1
    in the config (the loss then weighs each reply's opening, where the policy decides); the folder's `weight` column
    carries --harmless-weight. Interrupted, it resumes from the answers already written.
    """
    from cai_engine.classifiers.decisions import DecisionOptions, export_decisions
    from cai_engine.cli.base import current_runtime
    from cai_engine.prompts.overlap import evaluation_texts

    options = validate_config(
        DecisionOptions,
        {
            "seed": seed,
            "answer_tokens": answer_tokens,
            "heldout": heldout,
            "harmless_weight": harmless_weight,
            "batch_size": batch_size,
            "preferences": preferences,
            **({"model": model} if model else {}),
            **({"requests": [parse_written(w) for w in written]} if written else {}),
        },
        "options",
    )
    runtime = current_runtime()
    manifest = export_decisions(
        out, options, runtime, evaluation_prompts=evaluation_texts(runtime.registry), progress=True
    )
    click.echo(
        f"wrote {out}: {manifest['train']} train / {manifest['test']} test examples ({manifest['declines']} declines, "
        f"{manifest['own_answers']} own answers; left out: {manifest['evaluation_copies_dropped']} copies of "
        f"evaluation prompts, {manifest['own_refusals_dropped']} harmless requests the model refused itself, "
        f"{manifest['empty_answers_dropped']} empty answers)"
    )
    if preferences:
        pairs = manifest["preferences"]
        click.echo(
            f"wrote {Path(out) / 'preferences'}: {pairs['train']} train / {pairs['test']} test pairs "
            f"({pairs['decline_over_answer']} declines over answers, {pairs['answer_over_decline']} answers over "
            f"declines; {pairs['harmful_not_answered']} harmful requests the model declined itself or left "
            f"unanswered give none; {pairs['answers_cut']} answers cut at --answer-tokens)"
        )
    push(out, push_to_hub, "dataset", private)
