"""`cai train`: train with a registered trainer, configured as TRL's own scripts are (`trl sft --config x.yaml`)."""

from __future__ import annotations

import argparse
import difflib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from cai_engine.cli.base import (
    cli,
    current_runtime,
    load_config_file,
    parse_settings,
    push,
    push_options,
    state,
    training_line,
)
from cai_engine.errors import ConfigError
from cai_engine.models.runtime import DEFAULT_MODEL

MODEL_HELP = (
    f"Base model (TRL: model_name_or_path): {DEFAULT_MODEL} (the embedded default), a catalogue name once installed "
    "(`cai models list`, `cai models install NAME`), a model folder (config.json and .safetensors weights), a .gguf "
    "file, or a Hugging Face Hub id org/name[@revision], read from the local HF cache (downloaded into it first "
    "unless HF_HUB_OFFLINE=1). [default: the trainer's, " + DEFAULT_MODEL + "]"
)

# Our names for what TRL's scripts call otherwise: `trl sft` reads model_name_or_path, dataset_name and output_dir.
TRL_NAMES = {"model_name_or_path": "model", "dataset_name": "dataset", "output_dir": "out", "use_peft": "lora"}
# TRL's ModelConfig fields that are the trainer's own options of the same name when it has them (sft: LoRA).
MODEL_CONFIG_OPTIONS = ("dtype", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
# What `cai train` handles itself rather than passing to the trainer: where the data is and where the checkpoint goes.
COMMAND_KEYS = ("dataset", "out", "push_to_hub", "private")
COMMAND_LINE = "the command line"
# TRL's Hub settings: cai pushes the checkpoint folder itself (TRL's trainer would push its intermediate folder).
HUB_KEYS = ("push_to_hub", "hub_model_id", "hub_private_repo")


def _trl_classes(trainer_cls: type) -> tuple[type, ...] | None:
    """The dataclasses TRL's own script for this trainer parses (ScriptArguments, the trainer's config class,
    ModelConfig), or None for a trainer that takes no TRL settings. A trainer names its config class in
    ``trl_config_class`` (``"SFTConfig"``) and takes the settings in a ``trl`` option."""
    name = getattr(trainer_cls, "trl_config_class", None)
    if not name or "trl" not in trainer_cls.Options.model_fields:  # type: ignore[attr-defined]
        return None
    import trl

    return trl.ScriptArguments, getattr(trl, name), trl.ModelConfig


class _Parser:
    """TRL's argument parser (``trl.TrlParser``, an ``HfArgumentParser``) for one trainer, used to read settings from
    a file and from flags the way ``trl sft`` does: every field of the config class, types converted by transformers'
    own rules, ``--flag value`` and ``--flag=value``, ``--no_flag`` for flags that default to true."""

    def __init__(self, classes: tuple[type, ...], prog: str = "cai train") -> None:
        import dataclasses

        script, config, model = classes
        self.classes, self.prog = classes, prog
        self.config = config
        self.names = {action.dest for action in self._make()._actions if action.dest != "help"}
        self.config_fields = {f.name for f in dataclasses.fields(config)}
        # ScriptArguments' and ModelConfig's fields, which `cai train` maps onto its own or leaves alone
        self.defaults = {f.name: f.default for cls in (script, model) for f in dataclasses.fields(cls)}

    def _make(self) -> argparse.ArgumentParser:
        from trl import TrlParser

        # allow_abbrev=False: a typo is an error, never taken for another flag it is a prefix of
        parser = TrlParser(self.classes, prog=self.prog, allow_abbrev=False)

        def error(message: str) -> Any:
            raise ConfigError(message)

        parser.error = error  # type: ignore[method-assign]
        return parser

    def read(self, values: dict[str, Any], argv: list[str], source: str, suggest: Iterable[str]) -> dict[str, Any]:
        """The settings ``values`` (from a file) and ``argv`` (flags) give, typed; only those given."""
        unknown = [k for k in values if k not in self.names]
        if unknown:
            raise ConfigError(_unknown(unknown, source, [*self.names, *suggest], self.prog))
        parser = self._make()
        for action in parser._actions:
            action.required = False
            action.default = values.get(action.dest, argparse.SUPPRESS)  # strings are converted as flags would be
        namespace, rest = parser.parse_known_args(argv)
        if rest:
            flags = [a for a in rest if a.startswith("-")]
            if not flags:
                raise ConfigError(f"unexpected argument(s) {' '.join(rest)}; TRL settings are written --name value")
            keys = [f.lstrip("-").split("=")[0] for f in flags]
            raise ConfigError(_unknown(keys, source, [*self.names, *suggest], self.prog))
        return vars(namespace)


def _unknown(keys: list[str], source: str, known: Iterable[str], prog: str) -> str:
    known = sorted(set(known))
    parts = []
    for key in keys:
        close = difflib.get_close_matches(key.replace("-", "_"), known, n=3, cutoff=0.6)
        parts.append(f"{key}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return (
        f"{source}: unknown setting(s): {'; '.join(parts)}. `{prog} --trl-help` lists every TRL setting the trainer "
        "takes"
    )


def _shown(value: Any) -> str:
    """A value as a user wrote it: paths as text, not as ``PosixPath(...)``."""
    return repr(str(value)) if isinstance(value, Path) else repr(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (str, Path)) and isinstance(b, (str, Path)):
        return Path(a).expanduser() == Path(b).expanduser()
    return bool(a == b)


class _Level:
    """The settings one source gives (the --config file, or the command line), by our name; the same setting given
    twice in one source (``out`` and ``output_dir``, ``--set max_steps=3`` and ``--max_steps 5``) with different
    values is an error."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.values: dict[str, Any] = {}
        self.spelled: dict[str, str] = {}

    def put(self, key: str, value: Any, spelled: str) -> None:
        if value is None:
            return
        if key in self.values and not _same(self.values[key], value):
            raise ConfigError(
                f"{self.source}: {self.spelled[key]} and {spelled} are the same setting with different values "
                f"({_shown(self.values[key])} and {_shown(value)}); give it once"
            )
        self.values.setdefault(key, value)
        self.spelled.setdefault(key, spelled)


def _split(
    level: _Level, trl: _Level, typed: dict[str, Any], options: Iterable[str], parser: _Parser, trainer: str
) -> None:
    """Route TRL-named settings: our names for TRL's, the trainer's own options, TRL settings."""
    hub = {k: typed.pop(k) for k in HUB_KEYS if k in typed}
    flag = level.source == COMMAND_LINE
    for key in list(typed):
        value = typed.pop(key)
        spelled = f"--{key}" if flag else key
        if key in TRL_NAMES:
            ours = TRL_NAMES[key]
            if ours == "lora" and "lora" not in options:
                raise ConfigError(f"{level.source}: {key}: trainer {trainer!r} has no LoRA option")
            level.put(ours, str(value) if ours in ("model", "dataset", "out") else value, spelled)
        elif key in MODEL_CONFIG_OPTIONS and key in options:
            level.put(key, value, spelled)
        elif key in parser.defaults:  # ScriptArguments and ModelConfig fields cai train has no use for
            if not _same(value, parser.defaults[key]):
                raise ConfigError(
                    f"{level.source}: {key}: not supported by `cai train` (the dataset is an export folder "
                    "from `cai export` or, for grpo, a prompt source; the model loads as --model says)"
                )
        else:
            trl.put(key, value, spelled)
    if hub.get("push_to_hub") is True:
        if not hub.get("hub_model_id"):
            raise ConfigError(f"{level.source}: push_to_hub needs hub_model_id (owner/name), or --push-to-hub REPO")
        level.put("push_to_hub", hub["hub_model_id"], "push_to_hub with hub_model_id")
    if hub.get("hub_private_repo"):
        level.put("private", True, "hub_private_repo")


def resolve_train_settings(
    trainer: str,
    trainer_cls: type,
    data: dict[str, Any],
    source: str,
    flags: dict[str, Any],
    settings: dict[str, Any],
    argv: list[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the command needs: dataset, out, push_to_hub, private; the trainer's options) from a config file's
    mapping ``data``, our flags, ``--set`` settings and the remaining command-line words ``argv`` (TRL flags).

    The file may use our names (``dataset``, ``out``, ``model``, the trainer's options, a ``trl:`` block) and TRL's
    (``model_name_or_path``, ``dataset_name``, ``output_dir`` and every field of the trainer's TRL config class);
    flags override the file."""
    options = set(trainer_cls.Options.model_fields)  # type: ignore[attr-defined]
    classes = _trl_classes(trainer_cls)
    suggest = [*options, *COMMAND_KEYS, *TRL_NAMES]
    file, cmd = _Level(source), _Level(COMMAND_LINE)
    file_trl, cmd_trl = _Level(source), _Level(COMMAND_LINE)
    data = dict(data)
    block = data.pop("trl", None) or {}
    if not isinstance(block, dict):
        raise ConfigError(f"{source}: trl: must be a mapping of TRL settings")
    rest: dict[str, Any] = {}
    for key, value in data.items():
        if key in options or (key in COMMAND_KEYS and not (key == "push_to_hub" and isinstance(value, bool))):
            file.put(key, value, key)
        else:
            rest[key] = value
    for key, value in flags.items():
        cmd.put(key, value, f"--{key.replace('_', '-')}")
    if classes is None:
        if argv:
            raise ConfigError(
                f"unexpected argument(s) {' '.join(argv)}: trainer {trainer!r} takes no TRL flags "
                "(its options go in --config)"
            )
        for key, value in rest.items():
            file.put(key, value, key)  # the trainer's Options reject what they do not know
        file_trl.values.update(block)
        cmd_trl.values.update(settings)
    else:
        parser = _Parser(classes, prog=f"cai train {trainer}")
        for level, trl, given, words, where in (
            (file, file_trl, {**rest}, [], source),
            (cmd, cmd_trl, {}, argv, COMMAND_LINE),
        ):
            typed = parser.read(given, words, where, suggest)
            # the trl: block and --set hold TRL settings only; read by the same parser, typed the same way
            where_block = f"{where}: trl:" if level is file else f"{where}: --set"
            extra = parser.read(block if level is file else settings, [], where_block, [])
            for key in (extra.keys() - parser.config_fields) | (extra.keys() & {*TRL_NAMES, *HUB_KEYS}):
                hint = f"write {key}: at the top level" if level is file else f"write --{key}"
                raise ConfigError(f"{where_block} {key} is not a {parser.config.__name__} setting here; {hint}")
            for key, value in extra.items():
                trl.put(key, value, f"trl.{key}" if level is file else f"--set {key}")
            _split(level, trl, typed, options, parser, trainer)
    command = {**file.values, **cmd.values}
    trl_settings = {**file_trl.values, **cmd_trl.values}
    chosen = {k: command.pop(k) for k in list(command) if k not in COMMAND_KEYS}
    if trl_settings:
        chosen["trl"] = trl_settings
    return command, chosen


def trl_settings_help(trainer_cls: type) -> str:
    """TRL's own ``--help`` for the trainer's settings (its parser's, as ``trl sft --help`` prints it)."""
    classes = _trl_classes(trainer_cls)
    if classes is None:
        return "this trainer takes no TRL settings"
    return _Parser(classes, prog=f"cai train {trainer_cls.name}")._make().format_help()  # type: ignore[attr-defined]


@cli.command(
    "train",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    epilog="Examples: cai train sft --config sft.yaml --learning_rate 1e-4 --max_steps 50; "
    "cai train dpo --dataset prefs/ --model runs/sft-model --out runs/dpo --set beta=0.2",
)
@click.argument("trainer")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML/JSON settings: TRL's own flat file (model_name_or_path, dataset_name, output_dir, learning_rate, any "
    "field of the trainer's TRL config, an `env:` mapping of environment variables) and/or ours (dataset, out, model, "
    "the trainer's options, a `trl:` block). Flags override it.",
)
@click.option(
    "--dataset", help="Dataset folder from `cai export` (grpo: a prompt source). TRL: dataset_name (same folder)."
)
@click.option("--model", help=MODEL_HELP)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where the checkpoint goes (TRL: output_dir; TRL's own checkpoints go to OUT/trainer).",
)
@click.option("--lora/--no-lora", default=None, help="Train LoRA adapters and merge them (sft). TRL: use_peft.")
@click.option(
    "--force", is_flag=True, default=None, help="Train on AI labels even if the judge gate failed (reward, dpo)."
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="A TRL setting, e.g. --set max_steps=20 (repeatable); the same as --max_steps 20.",
)
@click.option("--trl-help", is_flag=True, help="List every TRL setting the trainer takes (as --name value), then exit.")
@push_options("checkpoint")
@click.pass_context
def train_command(
    ctx, trainer, config_path, dataset, model, out, lora, force, settings, trl_help, push_to_hub, private
):
    """Train with a registered trainer (sft, reward, dpo, grpo, ...) and write a safetensors checkpoint.

    TRAINER's data is an export folder (sft, reward, dpo) or, for grpo, a prompt source such as builtin:red-team.

    Any other --name value is a TRL setting, read by TRL's own parser against the trainer's config class (sft:
    SFTConfig, reward: RewardConfig, dpo: DPOConfig, grpo: GRPOConfig), exactly as `trl sft` reads it: every
    TrainingArguments field works, and an unknown one is an error. A setting given twice in one place (output_dir
    and out, --set and --name) with different values is an error.
    """
    trainer_cls = state().registry.trainer(trainer)
    if trl_help:
        click.echo(trl_settings_help(trainer_cls))
        return
    data, source = (load_config_file(config_path), str(config_path)) if config_path else ({}, "--config")
    environment = data.pop("env", None) or {}
    if not isinstance(environment, dict):
        raise ConfigError(f"{source}: env: must be a mapping of environment variables")
    os.environ.update({str(k): str(v) for k, v in environment.items()})  # as TRL's scripts do, before anything loads
    flags = {"dataset": dataset, "out": out, "model": model, "lora": lora, "force": force, "push_to_hub": push_to_hub}
    command, options = resolve_train_settings(
        trainer,
        trainer_cls,
        data,
        source,
        {k: v for k, v in flags.items() if v is not None} | ({"private": True} if private else {}),
        parse_settings(settings, "--set"),
        list(ctx.args),
    )
    if not command.get("dataset") or not command.get("out"):
        raise ConfigError(
            "give the data and the output folder: --dataset and --out, or in --config `dataset:`/`out:` "
            "(TRL's dataset_name/output_dir)"
        )
    out = Path(command["out"])
    component = current_runtime().component("trainer", trainer, options)
    result = _result(component.train(command["dataset"], out), trainer, out)
    metrics = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.metrics.items()}
    if result.get("heldout_pairwise_accuracy") is not None:
        click.echo(f"held-out pairwise accuracy: {result['heldout_pairwise_accuracy']:.3f}")
    click.echo(f"checkpoint: {training_line(result)}")
    click.echo(f"metrics: {json.dumps(metrics)}")
    push(result.checkpoint, command.get("push_to_hub"), "model", bool(command.get("private")))


def _result(summary: Any, trainer: str, out: Path):
    from cai_engine.records import TrainingResult

    return TrainingResult.of(summary, trainer=trainer, checkpoint=str(out))
