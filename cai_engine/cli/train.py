"""`cai train`: train with a registered trainer."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cai_engine.cli.base import (
    cli,
    config_option,
    current_runtime,
    load_config_file,
    merge_flags,
    parse_settings,
    push,
    push_options,
    training_line,
)
from cai_engine.models.runtime import DEFAULT_MODEL
from cai_engine.records import TrainingResult


@cli.command("train")
@click.argument("trainer")
@config_option("YAML/JSON with `dataset`, `out` and the trainer's options (e.g. `trl:`); flags override it.")
@click.option("--dataset", help="Dataset folder from `cai export` (grpo: a prompt source).")
@click.option("--model", help=f"Base model: {DEFAULT_MODEL}, a model folder or a .gguf file.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), help="Where the checkpoint goes.")
@click.option("--lora/--no-lora", default=None, help="Train LoRA adapters and merge them (sft).")
@click.option(
    "--force", is_flag=True, default=None, help="Train on AI labels even if the judge gate failed (reward, dpo)."
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="A TRL setting, e.g. --set max_steps=20 --set learning_rate=1e-4 (repeatable).",
)
@push_options("checkpoint")
def train_command(trainer, config_path, dataset, model, out, lora, force, settings, push_to_hub, private):
    """Train with a registered trainer (sft, reward, dpo, grpo, ...) and write a safetensors checkpoint.

    DATASET is an export folder (sft, reward, dpo) or, for grpo, a prompt source such as builtin:red-team.

    TRL settings go straight to TRL's own config class; see its documentation for the full list.
    """

    from cai_engine.errors import ConfigError

    data = load_config_file(config_path)
    repo = push_to_hub or data.pop("push_to_hub", None)
    private = private or bool(data.pop("private", False))
    dataset = dataset or data.pop("dataset", None)
    out = out or data.pop("out", None)
    if not dataset or not out:
        raise ConfigError("give --dataset and --out (or `dataset:` and `out:` in --config)")
    options = merge_flags(data, model=model, lora=lora, force=force or None)
    trl = {**(options.get("trl") or {}), **parse_settings(settings, "--set")}
    if trl:
        options["trl"] = trl
    component = current_runtime().component("trainer", trainer, options)
    result = TrainingResult.of(component.train(dataset, out), trainer=trainer, checkpoint=str(out))
    metrics = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.metrics.items()}
    if result.get("heldout_pairwise_accuracy") is not None:
        click.echo(f"held-out pairwise accuracy: {result['heldout_pairwise_accuracy']:.3f}")
    click.echo(f"checkpoint: {training_line(result)}")
    click.echo(f"metrics: {json.dumps(metrics)}")
    push(result.checkpoint, repo, "model", private)
