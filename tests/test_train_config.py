"""`cai train --config`: TRL's own flat YAML and flags, read with TRL's parser, next to our names (no training)."""

from __future__ import annotations

import os

import pytest

from cai_engine.cli import cli
from cai_engine.cli.train import resolve_train_settings
from cai_engine.default_plugins.trainers import DPO, GRPO, SFT
from cai_engine.errors import ConfigError


def resolve(cls, data=None, flags=None, settings=None, argv=()):
    return resolve_train_settings(cls.name, cls, data or {}, "x.yaml", flags or {}, settings or {}, list(argv))


def test_a_flat_trl_file_maps_onto_our_names():
    data = {
        "model_name_or_path": "runs/sft",
        "dataset_name": "data/sft",
        "output_dir": "runs/out",
        "learning_rate": "1e-4",  # what a YAML 1.1 loader gives: typed by TRL's parser as a float
        "max_steps": 5,
        "lr_scheduler_type": "cosine",
        "gradient_checkpointing": False,
        "use_peft": True,
        "lora_r": 4,
        "dataset_train_split": "train",  # TRL's default: nothing to map
    }
    command, options = resolve(SFT, data)
    assert command == {"dataset": "data/sft", "out": "runs/out"}
    assert options == {
        "model": "runs/sft",
        "lora": True,
        "lora_r": 4,
        "trl": {"learning_rate": 1e-4, "max_steps": 5, "lr_scheduler_type": "cosine", "gradient_checkpointing": False},
    }


def test_flags_override_the_file_and_every_trl_field_is_a_flag():
    data = {"dataset": "d", "out": "o", "learning_rate": 1e-4, "max_steps": 5, "trl": {"warmup_steps": 2}}
    argv = ["--learning_rate", "0.1", "--max_steps=2", "--no_gradient_checkpointing", "--seed", "7"]
    command, options = resolve(SFT, data, flags={"out": "elsewhere"}, settings={"logging_steps": 1}, argv=argv)
    assert command == {"dataset": "d", "out": "elsewhere"}
    assert options["trl"] == {
        "warmup_steps": 2,
        "learning_rate": 0.1,
        "max_steps": 2,
        "gradient_checkpointing": False,
        "seed": 7,
        "logging_steps": 1,
    }
    # the trainer's own options and our names still work, in the file and as flags
    command, options = resolve(DPO, {"dataset": "d", "out": "o", "min_confidence": 0.1}, flags={"force": True})
    assert options == {"min_confidence": 0.1, "force": True}
    _, options = resolve(GRPO, {"beta": "0.2", "constitution": "medical"})
    assert options == {"constitution": "medical", "trl": {"beta": 0.2}}


def test_hub_settings_become_our_push():
    command, options = resolve(SFT, {"push_to_hub": True, "hub_model_id": "me/model", "hub_private_repo": True})
    assert command == {"push_to_hub": "me/model", "private": True} and options == {}
    assert resolve(SFT, {"push_to_hub": "me/model"})[0] == {"push_to_hub": "me/model"}
    with pytest.raises(ConfigError, match="push_to_hub needs hub_model_id"):
        resolve(SFT, {"push_to_hub": True})


@pytest.mark.parametrize(
    ("data", "flags", "settings", "argv", "message"),
    [
        ({"learnng_rate": 0.1}, {}, {}, [], r"x.yaml: unknown setting\(s\): learnng_rate \(did you mean learning_rate"),
        ({}, {}, {}, ["--max_stepz", "3"], r"command line: unknown setting\(s\): max_stepz \(did you mean max_steps"),
        ({}, {}, {"max_stepz": 3}, [], r"--set: unknown setting\(s\): max_stepz \(did you mean max_steps"),
        ({"trl": {"max_stepz": 3}}, {}, {}, [], r"trl:: unknown setting\(s\): max_stepz \(did you mean max_steps"),
        ({"datset": "d"}, {}, {}, [], r"datset \(did you mean dataset"),
        ({}, {}, {}, ["--learn", "0.1"], r"unknown setting\(s\): learn\b"),  # no silent prefix match
        ({}, {}, {}, ["--max_steps", "many"], "invalid int value: 'many'"),
        ({}, {}, {}, ["stray"], "unexpected argument"),
        ({"out": "a", "output_dir": "b"}, {}, {}, [], "out and output_dir are the same setting"),
        ({"model": "a", "model_name_or_path": "b"}, {}, {}, [], "model and model_name_or_path are the same setting"),
        ({"trl": {"max_steps": 3}, "max_steps": 4}, {}, {}, [], r"trl.max_steps and max_steps .* \(3 and 4\)"),
        ({}, {"model": "a"}, {}, ["--model_name_or_path", "b"], "--model and --model_name_or_path are the same"),
        ({}, {}, {"max_steps": 3}, ["--max_steps", "4"], "--set max_steps and --max_steps are the same"),
        ({"trl": {"output_dir": "x"}}, {}, {}, [], "output_dir is not a SFTConfig setting here; write output_dir:"),
        ({"dataset_config": "en"}, {}, {}, [], "dataset_config: not supported by `cai train`"),
    ],
)
def test_mistakes_are_clear_errors(data, flags, settings, argv, message):
    with pytest.raises(ConfigError, match=message):
        resolve(SFT, data, flags, settings, argv)


def test_the_same_value_twice_is_fine_and_lora_needs_a_trainer_that_has_it():
    command, options = resolve(SFT, {"out": "o", "output_dir": "./o", "trl": {"seed": 1}, "seed": 1})
    assert command == {"out": "o"} and options == {"trl": {"seed": 1}}
    with pytest.raises(ConfigError, match="use_peft: trainer 'dpo' has no LoRA option"):
        resolve(DPO, {"use_peft": True})


def test_help_lists_what_model_takes_and_trl_help_lists_every_field(cli_runner):
    text = " ".join(cli_runner.invoke(cli, ["train", "--help"]).output.split())
    for accepted in ("smollm2", "catalogue name", "model folder", ".gguf", "Hub id", "HF cache", "HF_HUB_OFFLINE"):
        assert accepted in text, accepted
    assert "model_name_or_path" in text and "dataset_name" in text and "output_dir" in text
    result = cli_runner.invoke(cli, ["train", "dpo", "--trl-help"])
    assert result.exit_code == 0 and result.output.startswith("usage: cai train dpo")
    import dataclasses

    from trl import DPOConfig

    assert all(f"--{f.name}" in result.output for f in dataclasses.fields(DPOConfig) if f.init)


def test_the_cli_reports_a_bad_file_before_anything_loads(cli_runner, tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_TEST_FROM_TRL_ENV", "no")  # restored after the test, whatever the command set
    config = tmp_path / "trl.yaml"
    config.write_text("model_name_or_path: x\ndataset_name: d\noutput_dir: o\nlearning_rat: 1e-4\n", encoding="utf-8")
    result = cli_runner.invoke(cli, ["train", "sft", "--config", str(config)])
    assert result.exit_code == 1 and "learning_rat (did you mean learning_rate?)" in result.output
    result = cli_runner.invoke(cli, ["train", "sft", "--config", str(config), "--max_steps"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    config.write_text("learning_rate: 1e-4\nenv: {CAI_TEST_FROM_TRL_ENV: 'yes'}\n", encoding="utf-8")
    result = cli_runner.invoke(cli, ["train", "sft", "--config", str(config)])
    assert result.exit_code == 1 and "dataset_name/output_dir" in result.output
    assert os.environ["CAI_TEST_FROM_TRL_ENV"] == "yes"  # TRL's `env:` block sets variables, as `trl sft` does
