from __future__ import annotations

import json

import pytest

from cai_engine import ConfigError, RunError
from cai_engine.cli import cli

pytestmark = pytest.mark.slow

ROWS = [
    {
        "messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}],
        "prompt_id": f"p{i}",
        "source": "revision",
    }
    for i in range(8)
]


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:6]), encoding="utf-8")
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[6:]), encoding="utf-8")
    return folder


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(next(folder.glob("*.safetensors"))))


# learning_rate=0.1 because the tiny model's gradients are tiny and a few steps must visibly move every parameter
FAST = {"max_steps": 3, "learning_rate": 0.1, "per_device_train_batch_size": 2, "logging_steps": 1}


def test_sft_trains_and_the_checkpoint_loads_back(cai_runtime, tiny_model, dataset, tmp_path):
    trainer = cai_runtime.component("trainer", "sft", {"model": str(tiny_model), "trl": FAST})
    summary = trainer.train(dataset, tmp_path / "out")
    assert summary["steps"] == 3
    assert any("loss" in entry for entry in summary["log_history"])
    assert "eval_loss" in summary["metrics"]
    before, after = weights(tiny_model), weights(tmp_path / "out")
    assert before.keys() == after.keys()
    unchanged = [name for name in before if (before[name] == after[name]).all()]
    assert unchanged == []
    assert not list((tmp_path / "out").glob("*.bin"))
    # TRL's resume checkpoints are removed once the final weights are saved and checked (a finished run is never
    # resumed; test_a_killed_run_resumes_from_its_last_checkpoint covers resuming)
    assert not (tmp_path / "out" / "trainer").exists()
    # the saved folder reproduced the trained model's log-probs on a fixed sentence when it was written ...
    check = json.loads((tmp_path / "out" / "cai_training.json").read_text())["checkpoint_check"]
    assert check["max_abs_difference"] < 1e-4
    # ... and it is a different model from the base: the same text scores differently through the runtime
    text = check["text"]
    base = cai_runtime.backend(str(tiny_model)).continuation_logprobs(["Question 1?"], [[" Answer 1."]])[0][0]
    tuned = cai_runtime.backend(str(tmp_path / "out")).continuation_logprobs(["Question 1?"], [[" Answer 1."]])[0][0]
    assert text and abs(tuned - base) > 1e-3


def test_a_killed_run_resumes_from_its_last_checkpoint(cai_runtime, tiny_model, dataset, tmp_path, monkeypatch):
    """TRL's own checkpointing: save every step, then a rerun continues from the newest checkpoint-N."""
    from cai_engine.default_plugins import trainers
    from cai_engine.default_plugins.trl_common import last_checkpoint

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies after TRL's last step, before the final weights are saved

    settings = {**FAST, "save_strategy": "steps", "save_steps": 1, "max_steps": 2}
    with monkeypatch.context() as patch:
        patch.setattr(trainers, "save_checkpoint", killed)
        with pytest.raises(KeyboardInterrupt):
            cai_runtime.component("trainer", "sft", {"model": str(tiny_model), "trl": settings}).train(
                dataset, tmp_path / "o"
            )
    assert not (tmp_path / "o" / "cai_training.json").exists()
    assert last_checkpoint(tmp_path / "o") == str(tmp_path / "o" / "trainer" / "checkpoint-2")
    longer = {"model": str(tiny_model), "trl": {**settings, "max_steps": 3, "learning_rate": 0.05}}
    summary = cai_runtime.component("trainer", "sft", longer).train(dataset, tmp_path / "o")
    assert summary["steps"] == 3
    logged = {e["step"]: e["learning_rate"] for e in summary["log_history"] if "loss" in e}
    assert logged[1] == logged[2] == 0.1  # steps 1-2 come from the checkpoint (a fresh run would log 0.05)
    # a finished run is never resumed: training into it again starts afresh
    assert last_checkpoint(tmp_path / "o") is None and not (tmp_path / "o" / "trainer").exists()


def test_cpu_keeps_fp32_and_an_accelerator_keeps_trl_defaults(monkeypatch, tmp_path):
    from trl import SFTConfig

    from cai_engine.default_plugins import trainers
    from cai_engine.default_plugins import trl_common as training

    monkeypatch.setattr(training, "has_accelerator", lambda: False)
    cpu = training.trl_config(SFTConfig, "sft", trainers.SFT_DEFAULTS, {}, tmp_path)
    assert cpu.bf16 is False and cpu.report_to in ("none", [], ["none"])
    assert cpu.save_strategy != "no"  # TRL's checkpointing is on, as on any machine
    fields = {f.name: f.default for f in __import__("dataclasses").fields(SFTConfig)}
    monkeypatch.setattr(training, "has_accelerator", lambda: True)
    assert "bf16" not in trainers.SFT_DEFAULTS and "use_cpu" not in trainers.SFT_DEFAULTS
    accelerated = training.trl_config(SFTConfig, "sft", trainers.SFT_DEFAULTS, {"use_cpu": True}, tmp_path)
    assert accelerated.use_cpu is True and fields["use_cpu"] is False  # --set still reaches TRL


def test_lora_is_merged_into_a_plain_checkpoint(cai_runtime, tiny_model, dataset, tmp_path):
    trainer = cai_runtime.component(
        "trainer", "sft", {"model": str(tiny_model), "lora": True, "lora_r": 2, "trl": FAST}
    )
    trainer.train(dataset, tmp_path / "lora")
    after = weights(tmp_path / "lora")
    assert not any("lora" in name for name in after)
    before = weights(tiny_model)
    assert any(not (before[n] == after[n]).all() for n in before if "proj" in n)
    cai_runtime.backend(str(tmp_path / "lora"))


def test_bad_trl_setting_fails_before_loading(cai_runtime, tiny_model, dataset, tmp_path):
    trainer = cai_runtime.component("trainer", "sft", {"model": str(tiny_model), "trl": {"max_stepz": 3}})
    with pytest.raises(ConfigError, match="invalid TRL setting for trainer 'sft'.*max_stepz"):
        trainer.train(dataset, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


def test_bad_datasets(cai_runtime, tiny_model, tmp_path):
    trainer = cai_runtime.component("trainer", "sft", {"model": str(tiny_model), "trl": FAST})
    with pytest.raises(RunError, match="no such dataset"):
        trainer.train(tmp_path / "missing", tmp_path / "out")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "train.jsonl").write_text(json.dumps({"text": "hello"}) + "\n", encoding="utf-8")
    with pytest.raises(RunError, match="expected a 'messages' column"):
        trainer.train(wrong, tmp_path / "out")


def test_unknown_trainer_and_cli(cli_runner, tiny_model, dataset, tmp_path):
    result = cli_runner.invoke(cli, ["train", "ppo", "--dataset", str(dataset), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "unknown trainer 'ppo'; known trainers: dpo, grpo, reward, sft" in result.output
    result = cli_runner.invoke(
        cli,
        [
            "train",
            "sft",
            "--dataset",
            str(dataset),
            "--model",
            str(tiny_model),
            "--out",
            str(tmp_path / "cli"),
            "--set",
            "max_steps=2",
            "--set",
            "learning_rate=0.1",
            "--set",
            "per_device_train_batch_size=2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 steps" in result.output and (tmp_path / "cli" / "cai_training.json").exists()
    result = cli_runner.invoke(
        cli, ["train", "sft", "--dataset", str(dataset), "--out", str(tmp_path / "y"), "--set", "oops"]
    )
    assert result.exit_code == 1 and "--set expects KEY=VALUE" in result.output


def test_cai_train_takes_a_flat_trl_yaml_and_trl_flags(cli_runner, tiny_model, dataset, tmp_path):
    """The file `trl sft --config` reads, as it is; the flags after it override it (TRL's own parser reads both)."""
    config = tmp_path / "trl.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model}\n"
        f"dataset_name: {dataset}\n"  # an export folder
        f"output_dir: {tmp_path / 'trl-out'}\n"
        "learning_rate: 1e-4\n"
        "max_steps: 5\n"
        "per_device_train_batch_size: 2\n"
        "lr_scheduler_type: constant\n"
        "logging_steps: 1\n"
        "report_to: none\n",
        encoding="utf-8",
    )
    # learning_rate=0.1 because the tiny model's gradients are tiny and the steps must visibly move the weights
    result = cli_runner.invoke(
        cli, ["train", "sft", "--config", str(config), "--learning_rate", "0.1", "--max_steps=2"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "trl-out" / "cai_training.json").read_text())
    assert summary["steps"] == 2 and summary["base_model"] == str(tiny_model)
    assert summary["trl"]["learning_rate"] == 0.1 and summary["trl"]["lr_scheduler_type"] == "constant"
    assert [e["learning_rate"] for e in summary["log_history"] if "loss" in e] == [0.1, 0.1]
    before, after = weights(tiny_model), weights(tmp_path / "trl-out")
    assert all(not (before[n] == after[n]).all() for n in before)


def test_numbers_written_the_yaml_1_1_way_are_coerced(cai_runtime, tiny_model, dataset, tmp_path):
    from cai_engine.cli.base import parse_setting

    assert parse_setting("2e-5") == 2e-5 and parse_setting("3") == 3 and parse_setting("true") is True
    assert parse_setting("no") == "no" and parse_setting("false") is False  # save_strategy=no stays a word
    from trl import SFTConfig

    from cai_engine.default_plugins.trl_common import coerce_numbers

    assert coerce_numbers(SFTConfig, "sft", {"save_strategy": False})["save_strategy"] == "no"  # `save_strategy: no`
    trainer = cai_runtime.component(
        "trainer", "sft", {"model": str(tiny_model), "trl": {**FAST, "learning_rate": "1e-1", "max_steps": "2"}}
    )  # what yaml.safe_load gives for `learning_rate: 1e-1`
    assert trainer.train(dataset, tmp_path / "out")["steps"] == 2
    bad = cai_runtime.component("trainer", "sft", {"model": str(tiny_model), "trl": {"learning_rate": "fast"}})
    with pytest.raises(ConfigError, match="learning_rate must be a number, got 'fast'"):
        bad.train(dataset, tmp_path / "out2")


def test_judge_reward_turns_an_abstention_into_no_signal_not_zero():
    """GRPO's judge reward: an abstaining judge gives None (TRL masks it out of the group baseline), never 0.0."""
    from cai_engine.default_plugins.trl_common import JudgeReward
    from cai_engine.records import Score

    class Judge:
        name = "scripted"

        def score(self, tasks):
            return [
                Score(principle_ids=["p"], value=None, reward=None, abstained=True, judge="scripted")
                if "??" in t.response
                else Score(principle_ids=["p"], value=10.0, reward=1.0, judge="scripted")
                for t in tasks
            ]

    from cai_engine.constitution.model import Principle

    reward = JudgeReward(Judge(), [Principle(id="p-001", violation_question="Is it rude?")])
    prompts = [[{"role": "user", "content": "hi"}]] * 3
    completions = [[{"role": "assistant", "content": c}] for c in ("Hello!", "??", "Hi there.")]
    assert reward(prompts, completions) == [1.0, None, 1.0]
    assert (reward.scored, reward.abstained) == (2, 1)


def test_a_hub_id_loads_from_a_prefilled_hf_cache(cai_runtime, tiny_model, tmp_path, monkeypatch):
    """`org/name` resolves through the standard Hugging Face cache; with HF_HUB_OFFLINE=1 nothing is downloaded."""
    import shutil

    from cai_engine.errors import ModelError
    from cai_engine.models.files import resolve_model_folder

    cache = tmp_path / "hf" / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--acme--tiny-chat" / "snapshots" / commit
    shutil.copytree(tiny_model, snapshot)
    (cache / "models--acme--tiny-chat" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-chat" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder, model_id = resolve_model_folder("acme/tiny-chat")
    assert folder == snapshot and model_id == "acme/tiny-chat"
    assert cai_runtime.model_problem("acme/tiny-chat") is None
    by_id = cai_runtime.backend("acme/tiny-chat").continuation_logprobs(["Question 1?"], [[" Answer 1."]])[0][0]
    by_path = cai_runtime.backend(str(tiny_model)).continuation_logprobs(["Question 1?"], [[" Answer 1."]])[0][0]
    assert abs(by_id - by_path) < 1e-4  # the same weights, found through the cache
    with pytest.raises(ModelError, match="not in the Hugging Face cache and HF_HUB_OFFLINE=1"):
        resolve_model_folder("acme/missing")
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_folder(str(tmp_path / "no" / "such"))  # a local path is never taken for a Hub id


def test_two_processes_under_accelerate_train_one_model(tiny_model, dataset, tmp_path):
    """`accelerate launch` with two CPU processes (torchrun's launcher, gloo): DDP over the same data.

    accelerate's own `--cpu` flag starts several processes only through MPI, so the launcher here is the one
    `--multi_gpu` selects; on a machine without GPUs the processes train on the CPU over gloo (use_cpu is the CPU
    default). Both replicas must end with the same weights, and only the main process writes the checkpoint.
    """
    import os
    import shutil
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate is installed with the train extra"
    out = tmp_path / "out"
    command = [
        *[accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(port)],
        *["-m", "cai_engine.cli", "train", "sft", "--dataset", str(dataset), "--model", str(tiny_model)],
        *["--out", str(out), "--set", "max_steps=2", "--set", "per_device_train_batch_size=2"],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "cai_training.json").read_text())
    assert summary["world_size"] == 2 and len(set(summary["replica_digests"])) == 1
    assert summary["steps"] == 2 and summary["metrics"]["epoch"] == 1.0  # 2 steps x 2 per process x 2 = 8 rows
    assert not (out / "trainer").exists()  # resume checkpoints go once the final weights are saved
    assert len(list(out.glob("*.safetensors"))) == 1 and (out / "README.md").exists()
    assert done.stdout.count("checkpoint:") == 2  # each process reports; one wrote


def test_opening_weights_mark_the_first_tokens_of_each_reply():
    import torch

    from cai_engine.default_plugins.trl_common import opening_weights

    counted = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 0],  # one reply of four tokens
            [0, 1, 0, 0, 1, 1, 1],  # two replies in one packed row: each opening counts
            [0, 0, 0, 0, 0, 0, 0],  # nothing labelled
        ],
        dtype=torch.bool,
    )
    weights = opening_weights(counted, 10.0, 2)
    assert weights.tolist() == [
        [0, 0, 10, 10, 1, 1, 0],
        [0, 10, 0, 0, 10, 10, 1],
        [0, 0, 0, 0, 0, 0, 0],
    ]
    assert opening_weights(counted, 1.0, 2).tolist() == counted.float().tolist()


def test_the_weighted_loss_is_the_models_own_loss_at_weight_one_and_weighs_the_opening_above(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from cai_engine.default_plugins.trl_common import opening_weighted

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt of four tokens, then a reply of five
    labels[1, :6] = -100
    labels[1, 8] = -100  # padding
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        plain = opening_weighted(object, 1.0, 2)().compute_loss(model, dict(batch))
        assert plain.item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)
        weighted = opening_weighted(object, 10.0, 2)().compute_loss(model, dict(batch))
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        # targets are the labels shifted by one: row 0 predicts tokens 4-8 (the first two weigh 10), row 1 tokens 6-7
        terms = [(0, 3, 10), (0, 4, 10), (0, 5, 1), (0, 6, 1), (0, 7, 1), (1, 5, 10), (1, 6, 10)]
        expected = sum(w * nll[r, t] for r, t, w in terms) / sum(w for _, _, w in terms)
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(weighted.item() - plain.item()) > 1e-4


def test_sft_with_a_decision_weight_trains_on_the_replies_only(cai_runtime, tiny_model, dataset, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from cai_engine.default_plugins import trl_common

    seen = []
    original = trl_common.opening_weights
    monkeypatch.setattr(
        trl_common, "opening_weights", lambda counted, *a: seen.append(counted.clone()) or original(counted, *a)
    )
    options = {"model": str(tiny_model), "decision_weight": 5, "decision_tokens": 2, "trl": FAST}
    summary = cai_runtime.component("trainer", "sft", options).train(dataset, tmp_path / "out")
    assert summary["steps"] == 3 and summary["decision_weight"] == 5
    assert not all((a == b).all() for a, b in zip(weights(tiny_model).values(), weights(tmp_path / "out").values()))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    reply = len(tokenizer("Answer 0.", add_special_tokens=False)["input_ids"])
    opening = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Question 0?"}], add_generation_prompt=True, tokenize=False
    )
    prompt = len(tokenizer(opening, add_special_tokens=False)["input_ids"])
    labelled = [int(n) for batch in seen for n in batch.sum(dim=1)]
    # each row's loss covers its reply and the end of turn, never the prompt the conversation opens with
    assert labelled and all(reply <= n <= reply + 3 for n in labelled) and reply + 3 < prompt

    with pytest.raises(ConfigError, match="the loss must be on the reply"):
        bad = {**options, "trl": {**FAST, "completion_only_loss": False}}
        cai_runtime.component("trainer", "sft", bad).train(dataset, tmp_path / "bad")
    unanswered = tmp_path / "unanswered"
    unanswered.mkdir()
    row = {"messages": [{"role": "user", "content": "Hello?"}]}
    (unanswered / "train.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(RunError, match="end with an assistant reply after at least one message; row 1 ends"):
        cai_runtime.component("trainer", "sft", options).train(unanswered, tmp_path / "out2")


def weighted_dataset(tmp_path, rows_train, rows_test=None):
    folder = tmp_path / "weighted"
    folder.mkdir(exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_train), encoding="utf-8")
    if rows_test is not None:
        (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_test), encoding="utf-8")
    return folder


def test_gradient_accumulation_gives_the_same_weighted_step(cai_runtime, tiny_model, tmp_path):
    """Two micro-batches of 2 accumulated make the same update as one batch of 4 when every row weighs the same and
    the rows are alike in length (the weighted mean is per micro-batch, like the Trainer's own loss)."""
    data = weighted_dataset(tmp_path, [{**r, "weight": 2.0} for r in ROWS[:4]])
    common = {"max_steps": 1, "learning_rate": 0.05, "logging_steps": 1, "shuffle_dataset": False, "seed": 0}
    settings = {
        "one": {**common, "per_device_train_batch_size": 4},
        "two": {**common, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
    }
    for name, trl in settings.items():
        options = {"model": str(tiny_model), "decision_weight": 3, "trl": trl}
        cai_runtime.component("trainer", "sft", options).train(data, tmp_path / name)
    one, two, base = weights(tmp_path / "one"), weights(tmp_path / "two"), weights(tiny_model)
    moved = max((one[n] - base[n]).abs().max().item() for n in base)
    apart = max((one[n] - two[n]).abs().max().item() for n in base)
    assert moved > 1e-3 and apart < moved * 0.05


def test_weighted_evaluation_and_the_settings_the_weighted_loss_refuses(cai_runtime, tiny_model, tmp_path):
    rows = [{**r, "weight": 2.0, "truncated": i % 2 == 0} for i, r in enumerate(ROWS)]
    data = weighted_dataset(tmp_path, rows[:6], [{k: v for k, v in r.items() if k != "weight"} for r in rows[6:]])
    options = {"model": str(tiny_model), "trl": FAST}
    summary = cai_runtime.component("trainer", "sft", options).train(data, tmp_path / "out")
    assert summary["example_columns"] == ["weight", "truncated"] and summary["metrics"]["eval_loss"] > 0
    for setting, value in (("packing", True), ("loss_type", "dft"), ("label_smoothing_factor", 0.1)):
        bad = {**options, "trl": {**FAST, setting: value}}
        with pytest.raises(ConfigError, match=f"weighted cross-entropy of its own, which TRL's {setting}"):
            cai_runtime.component("trainer", "sft", bad).train(data, tmp_path / "bad")
    rows[3] = {**rows[3], "truncated": "yes"}
    with pytest.raises(RunError, match="train row 4 has truncated 'yes'"):
        cai_runtime.component("trainer", "sft", options).train(weighted_dataset(tmp_path, rows), tmp_path / "bad")
