from __future__ import annotations

import json

import pytest

from cai_engine import ConfigError, RunError, UnknownComponentError
from cai_engine.cli import cli
from cai_engine.phase1.revise import run_sl
from cai_engine.phase2.gate import load_labelled_pairs, run_gate
from cai_engine.phase2.labels import LabelConfig, run_labels
from cai_engine.phase2.preferences import export_preferences, export_review, import_human, merge_review
from cai_engine.records import GateResult, PreferenceExportManifest
from cai_engine.store.runs import RunDirectory

pytestmark = pytest.mark.slow


def tiny(model, **extra):
    return {"name": "model", "options": {"model": str(model), "max_new_tokens": 8, **extra}}


def label_config(tiny_model, **overrides):
    base = {
        "prompts": "builtin:red-team",
        "limit": 4,
        "model": str(tiny_model),
        "batch_size": 2,
        "sampler": {"name": "model", "options": {"max_new_tokens": 8, "temperature": 1.0}},
    }
    return LabelConfig.model_validate({**base, **overrides})


def test_judged_pairs_record_both_orders_and_soft_labels(cai_runtime, tiny_model, tmp_path):
    summary = run_labels(
        label_config(tiny_model, principles_per_label=2), tmp_path / "rl", runtime=cai_runtime, progress=False
    )
    assert summary["pairs"] == 4
    records = [x.to_json() for x in RunDirectory(tmp_path / "rl", "rl").records()]
    rl_ids = {p.id for p in cai_runtime.registry.constitution("harmless").for_phase("rl")}
    for record in records:
        assert len(record["principle_ids"]) == 2 and set(record["principle_ids"]) <= rl_ids
        judgement = record["judgement"]
        if judgement["abstained"]:
            assert record["label"] is None and judgement["reason"]
            continue
        assert [o["order"] for o in judgement["orders"]] == ["ab", "ba"] * 2
        assert 0 < record["label"] < 1 and record["label"] == judgement["p_a"]
        assert record["provenance"]["judge"]["name"] == "logprob"
    again = run_labels(
        label_config(tiny_model, principles_per_label=2, limit=5), tmp_path / "rl", runtime=cai_runtime, progress=False
    )
    assert again["written"] == 1 and again["pairs"] == 5


def test_revision_recipe_from_phase_one(cai_runtime, tiny_model, tmp_path):
    run_sl(
        {
            "limit": 3,
            "rounds": 1,
            "model": str(tiny_model),
            "helpful_prompts": None,
            "sampler": tiny(tiny_model),
            "critic": tiny(tiny_model),
            "reviser": tiny(tiny_model),
        },
        tmp_path / "sl",
        runtime=cai_runtime,
        progress=False,
    )
    revised = [r for r in RunDirectory(tmp_path / "sl", "sl").records() if r.revised]
    summary = run_labels(
        label_config(tiny_model, recipe="revision", sl_run=str(tmp_path / "sl")),
        tmp_path / "rl",
        runtime=cai_runtime,
        progress=False,
    )
    assert summary["pairs"] == len(revised) and summary["by_source"] == {"revision": len(revised)}
    for record in RunDirectory(tmp_path / "rl", "rl").records():
        assert record.label == 1.0 and record.source == "revision"
    with pytest.raises(ValueError, match="needs sl_run"):  # pydantic; the CLI renders it as one line
        label_config(tiny_model, recipe="revision")


def test_gate_measures_accuracy_and_position(cai_runtime, tiny_model, tmp_path):
    pairs = load_labelled_pairs("builtin:judge-pairs")
    assert len(pairs) >= 30
    result = run_gate(tmp_path / "rl", {"name": "logprob", "options": {"model": str(tiny_model)}}, runtime=cai_runtime)
    assert result.pairs == len(pairs) and result.scored + result.abstained == len(pairs)
    assert 0 <= result.accuracy <= 1 and 0 <= result.position_consistency <= 1
    assert json.loads((tmp_path / "rl" / "gate.json").read_text())["accuracy"] == result.accuracy


def test_gate_with_scripted_judge_is_exact(cai_runtime, tmp_path):
    """A judge that always prefers the first position scores 50% minus ties: the gate catches position bias."""
    from cai_engine.testing import ScriptedPlugin

    cai_runtime.pm.register(ScriptedPlugin())
    from cai_engine.models.runtime import Runtime
    from cai_engine.plugins.registry import Registry

    runtime = Runtime(Registry(cai_runtime.pm))
    pairs = load_labelled_pairs("builtin:judge-pairs")
    judge = runtime.component("judge", "scripted")
    judge.enqueue(*([0.9] * len(pairs)))  # always "A"
    from cai_engine.phase2.gate import measure_judge

    result = measure_judge(judge, pairs, runtime.registry.constitution("harmless"), runtime=runtime)
    truth_a = sum(1 for c in judge.calls if c.response_a in {p.better for p in pairs})
    assert result.accuracy == round(truth_a / len(pairs), 4)
    assert 0.2 < result.accuracy < 0.8  # positions were randomised
    judge.enqueue(*([0.5] * len(pairs)))  # a judge that always ties is at chance, whatever the positions
    tied = measure_judge(judge, pairs, runtime.registry.constitution("harmless"), runtime=runtime)
    assert tied.accuracy == 0.5
    # calibration scores a tie as half right, like accuracy: confidence 0.5 and half right is perfectly calibrated
    assert tied.expected_calibration_error == 0.0
    # this judge reports no order information: position consistency is unknown, not 0 and not 1
    assert tied.position_consistency is None and tied.same_position_rate is None


def test_export_review_merge_and_human_import(cai_runtime, tiny_model, tmp_path):
    run = tmp_path / "rl"
    run_labels(label_config(tiny_model), run, runtime=cai_runtime, progress=False)
    review = tmp_path / "review.jsonl"
    assert export_review(run, review, count=3)["exported"] == 3
    rows = [json.loads(line) for line in review.read_text().splitlines()]
    rows[0]["human_choice"] = "b"
    rows[1]["human_choice"] = 0.8
    review.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert merge_review(run, review) == {"merged": 2, "skipped_unreviewed": 1}
    human = tmp_path / "human.jsonl"
    human.write_text(
        json.dumps({"prompt": "Is the sky blue?", "chosen": "Yes, because of Rayleigh scattering.", "rejected": "No."})
        + "\n"
        + json.dumps(
            {
                "chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?",
                "rejected": "\n\nHuman: Hi\n\nAssistant: What.",
            }
        )
        + "\n",
        encoding="utf-8",
    )
    summary = export_preferences(run, tmp_path / "ds", {"human": [str(human)], "heldout": 0.0})
    assert summary["sources"].get("human") == 2 and summary["sources"].get("human-review") == 2
    rows = [json.loads(line) for line in (tmp_path / "ds" / "train.jsonl").read_text().splitlines()]
    hh = next(r for r in rows if r["source"] == "human" and r["prompt"][0]["content"] == "Hi")
    assert hh["chosen"] == [{"role": "assistant", "content": "Hello! How can I help?"}]
    for row in rows:
        assert 0.5 <= row["chosen_probability"] <= 1
        assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "x", "chosen": "a"}\n', "needs 'chosen' and 'rejected'"),
        ('{"prompt": "x", "chosen": "a", "rejected": "b", "label": 1.5}\n', r"label must be a number in \[0, 1\]"),
        ('{"prompt": "x", "chosen": "a", "rejected": "b", "label": "yes"}\n', "label must be a number"),
        ("not json\n", "invalid JSON"),
        ("", "contains no preference pairs"),
    ],
)
def test_bad_human_files(tmp_path, content, message):
    path = tmp_path / "h.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        import_human(path)


def test_abstentions_are_excluded_not_labelled(tmp_path):
    run = RunDirectory(tmp_path / "rl", "rl")
    run.open({"x": 1})
    run.append(
        [
            {
                "key": "pair:1",
                "id": "1",
                "source": "ai",
                "conversation": [{"role": "user", "content": "q"}],
                "response_a": "a",
                "response_b": "b",
                "principle_ids": ["harm-001"],
                "label": None,
                "judgement": {"abstained": True, "reason": "no log-probs", "p_a": None},
            },
            {
                "key": "pair:2",
                "id": "2",
                "source": "ai",
                "conversation": [{"role": "user", "content": "q2"}],
                "response_a": "a",
                "response_b": "b",
                "principle_ids": ["harm-001"],
                "label": 0.3,
                "judgement": {"abstained": False, "p_a": 0.3, "position_consistent": True},
            },
        ]
    )
    summary = export_preferences(tmp_path / "rl", tmp_path / "ds", {"heldout": 0.0})
    assert summary["abstained_excluded"] == 1 and summary["train"] == 1
    row = json.loads((tmp_path / "ds" / "train.jsonl").read_text())
    assert row["chosen"][0]["content"] == "b" and row["chosen_probability"] == pytest.approx(0.7)
    with pytest.raises(RunError, match="no labelled pairs"):
        export_preferences(tmp_path / "rl", tmp_path / "ds3", {"heldout": 0.0, "min_confidence": 0.3})


def test_pairs_of_a_refusal_and_an_answer_are_labelled_by_the_prompts_intent(tmp_path, cli_runner):
    from cai_engine.cli import cli

    refusal, answer = "I'm sorry, but I can't help with that.", "Here is how you do it."

    def record(key, a, b, label):
        return {
            "key": f"pair:{key}",
            "id": key,
            "source": "ai",
            "conversation": [{"role": "user", "content": f"q {key}"}],
            "response_a": a,
            "response_b": b,
            "principle_ids": ["harm-001"],
            "label": label,
            "judgement": {"abstained": label is None, "p_a": label},
        }

    run = RunDirectory(tmp_path / "rl", "rl")
    run.open({"x": 1})
    run.append(
        [
            record("x-1-h", refusal, answer, 0.2),  # harmful: the judge preferred the answer; the refusal is chosen
            record("x-2-h", answer, refusal, None),  # an abstention is labelled by intent too
            record("x-3-b", refusal, answer, 0.45),  # harmless: the answer is chosen, however unsure the judge was
            record("x-4-h", answer, "Another answer.", 0.52),  # no refusal in the pair: the judge decides (filtered)
            record("other", refusal, answer, 0.8),  # not listed: the judge's label stands
        ]
    )
    options = {"heldout": 0.0, "min_confidence": 0.1, "must_decline": ["*-h"], "must_answer": ["x-*-b"]}
    summary = export_preferences(tmp_path / "rl", tmp_path / "ds", options)
    rows = {r["prompt_id"]: r for r in map(json.loads, (tmp_path / "ds" / "train.jsonl").read_text().splitlines())}
    assert set(rows) == {"pair:x-1-h", "pair:x-2-h", "pair:x-3-b", "pair:other"}
    assert summary["intent_labelled"] == 3 and summary["intent_overrode"] == 1 and summary["abstained_excluded"] == 0
    assert summary["sources"] == {"intent": 3, "ai": 1} and summary["filtered_low_confidence"] == 1
    for key, chosen in (("pair:x-1-h", refusal), ("pair:x-2-h", refusal), ("pair:x-3-b", answer)):
        assert rows[key]["chosen"][0]["content"] == chosen and rows[key]["source"] == "intent"
        assert rows[key]["chosen_probability"] == pytest.approx(0.9)
    assert rows["pair:other"]["chosen"][0]["content"] == refusal and rows["pair:other"]["source"] == "ai"
    assert "3 pairs of a refusal and an answer" in (tmp_path / "ds" / "README.md").read_text()
    with pytest.raises(RunError, match="both must_answer and must_decline"):
        export_preferences(tmp_path / "rl", tmp_path / "both", {"must_decline": ["*-h"], "must_answer": ["x-1-*"]})
    result = cli_runner.invoke(
        cli, ["export", "preferences", str(tmp_path / "rl"), "--out", str(tmp_path / "cli"), "--must-decline", "*-h"]
    )
    assert result.exit_code == 0, result.output
    assert "2 labelled by intent (1 against the AI label)" in result.output


def preference_dataset(tmp_path, *, gate_accuracy, ai=True, soft=0.8, same_position=0.1):
    folder = tmp_path / "prefs"
    folder.mkdir(exist_ok=True)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Q{i}?"}],
            "chosen": [{"role": "assistant", "content": f"A good answer {i}."}],
            "rejected": [{"role": "assistant", "content": "no"}],
            "chosen_probability": soft,
            "source": "ai" if ai else "human",
            "prompt_id": f"p{i}",
            "principle_ids": [],
        }
        for i in range(8)
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]), encoding="utf-8")
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[6:]), encoding="utf-8")
    gate = (
        None
        if gate_accuracy is None
        else GateResult(pairs=30, scored=30, abstained=0, accuracy=gate_accuracy, same_position_rate=same_position)
    )
    manifest = PreferenceExportManifest(
        source_run="rl", train=6, test=2, sources={"ai" if ai else "human": 8}, judge_gate=gate
    )
    (folder / "export.json").write_text(manifest.model_dump_json(), encoding="utf-8")
    return folder


FAST = {"max_steps": 2, "learning_rate": 0.1, "per_device_train_batch_size": 2, "logging_steps": 1, "max_length": 128}


@pytest.mark.parametrize("trainer", ["reward", "dpo"])
def test_the_gate_refuses_weak_judges_unless_forced(cai_runtime, tiny_model, tmp_path, trainer):
    weak = preference_dataset(tmp_path, gate_accuracy=0.45)
    component = cai_runtime.component("trainer", trainer, {"model": str(tiny_model), "trl": FAST})
    with pytest.raises(ConfigError, match=r"scored 45% accuracy on 30 labelled pairs.*--force"):
        component.train(weak, tmp_path / "out")
    biased = preference_dataset(tmp_path, gate_accuracy=0.7, same_position=0.47)
    with pytest.raises(ConfigError, match="same position in both orders on 47%.*above the allowed 25%"):
        component.train(biased, tmp_path / "out")
    unmeasured = preference_dataset(tmp_path, gate_accuracy=None)
    with pytest.raises(ConfigError, match="never measured"):
        component.train(unmeasured, tmp_path / "out")
    forced = cai_runtime.component("trainer", trainer, {"model": str(tiny_model), "trl": FAST, "force": True})
    summary = forced.train(weak, tmp_path / "out")
    assert summary["steps"] == 2 and (tmp_path / "out" / "model.safetensors").exists()


def test_reward_model_soft_labels_and_heldout_accuracy(cai_runtime, tiny_model, tmp_path):
    data = preference_dataset(tmp_path, gate_accuracy=None, ai=False, soft=0.9)
    trainer = cai_runtime.component("trainer", "reward", {"model": str(tiny_model), "trl": FAST})
    summary = trainer.train(data, tmp_path / "rm")
    assert summary["soft_labels"] and summary["heldout_pairwise_accuracy"] is not None
    assert any("loss" in entry for entry in summary["log_history"])
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"))
    assert model.config.num_labels == 1


def test_soft_loss_reduces_to_trl_loss_with_hard_labels():
    """The trainer's own compute_loss on fixed rewards: r_chosen - r_rejected = (0.3, -1.2, 2.0)."""
    from types import SimpleNamespace

    import torch

    from cai_engine.default_plugins.trl_common import soft_reward_trainer

    trainer_cls, _ = soft_reward_trainer()
    chosen, rejected = torch.tensor([0.3, -1.2, 2.0]), torch.zeros(3)

    def model(**inputs):  # a reward model whose scores are fixed: chosen rows first, then rejected (TRL's layout)
        return SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))

    fake = SimpleNamespace(model=SimpleNamespace(training=True), _metrics={"train": {"accuracy": [], "margin": []}})
    losses = {}
    for p in (1.0, 0.7):
        inputs = {"input_ids": torch.zeros(6, 2, dtype=torch.long), "chosen_probability": torch.full((3,), p)}
        losses[p] = trainer_cls.compute_loss(fake, model, inputs).item()
    # hand values: mean of -(p log sigma(d) + (1 - p) log sigma(-d)) over d = 0.3, -1.2, 2.0
    assert losses[1.0] == pytest.approx(0.714855, abs=1e-5)  # = TRL's -log sigma(d), the hard-label loss
    assert losses[0.7] == pytest.approx(0.824855, abs=1e-5)
    assert fake._metrics["train"]["accuracy"] == [pytest.approx(2 / 3)] * 2


def test_dpo_and_grpo_produce_checkpoints(cai_runtime, tiny_model, tmp_path):
    from cai_engine import GenerationSettings

    data = preference_dataset(tmp_path, gate_accuracy=0.8)
    dpo = cai_runtime.component("trainer", "dpo", {"model": str(tiny_model), "trl": FAST, "min_confidence": 0.1})
    assert dpo.train(data, tmp_path / "dpo")["steps"] == 2
    grpo = cai_runtime.component(
        "trainer",
        "grpo",
        {
            "model": str(tiny_model),
            "limit": 4,
            "judge": {"name": "pointwise", "options": {"model": str(tiny_model)}},
            "trl": {
                "max_steps": 1,
                "num_generations": 2,
                "per_device_train_batch_size": 2,
                "max_completion_length": 8,
                "logging_steps": 1,
            },
        },
    )
    summary = grpo.train("builtin:red-team", tmp_path / "grpo")
    assert summary["steps"] == 1 and summary["kl_beta"] > 0
    rewards = [e for e in summary["log_history"] if any(k.startswith("reward") for k in e)]
    assert rewards
    from safetensors.torch import load_file

    base = load_file(str(next(tiny_model.glob("*.safetensors"))))
    for folder in ("dpo", "grpo"):
        check = json.loads((tmp_path / folder / "cai_training.json").read_text())["checkpoint_check"]
        assert check["max_abs_difference"] < 1e-4  # the folder reproduces the trained model's log-probs
        tuned = load_file(str(next((tmp_path / folder).glob("*.safetensors"))))
        assert any(not (base[name] == tuned[name]).all() for name in base), f"{folder} did not change the weights"
        assert isinstance(
            cai_runtime.backend(str(tmp_path / folder)).generate(["Hello"], GenerationSettings(max_new_tokens=3))[0],
            str,
        )  # and it loads back through the runtime


def test_bad_preference_inputs(cai_runtime, tiny_model, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n", encoding="utf-8")
    reward = cai_runtime.component("trainer", "reward", {"model": str(tiny_model), "trl": FAST})
    with pytest.raises(RunError, match="missing column.*rejected"):
        reward.train(folder, tmp_path / "out")
    with pytest.raises(UnknownComponentError, match="unknown trainer 'ppo'"):
        cai_runtime.component("trainer", "ppo")


def test_cli_label_gate_and_export(cli_runner, tiny_model, tmp_path):
    out = tmp_path / "rl"
    result = cli_runner.invoke(
        cli, ["rl", "label", "--limit", "2", "--model", str(tiny_model), "--quiet", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "judge gate: accuracy" in result.output and "pairs: 2" in result.output
    result = cli_runner.invoke(cli, ["export", "preferences", str(out), "--out", str(tmp_path / "ds")])
    assert result.exit_code == 0, result.output
    assert "judge gate: accuracy" in result.output


def test_gate_on_a_run_measures_the_judge_that_labelled_it(cli_runner, tiny_model, tmp_path):
    run = tmp_path / "rl"
    run.mkdir()
    (run / "run.json").write_text(
        json.dumps(
            {
                "kind": "rl",
                "fingerprint": {
                    "judge": {"name": "logprob", "options": {"few_shot": 0}},
                    "judge_model": str(tiny_model),
                    "model": str(tiny_model),
                },
            }
        )
    )
    result = cli_runner.invoke(cli, ["rl", "gate", str(run)])
    assert result.exit_code == 0, result.output
    gate = json.loads((run / "gate.json").read_text())
    assert gate["judge"]["name"] == "logprob"
    assert gate["judge"]["options"]["model"] == str(tiny_model) and gate["judge"]["options"]["few_shot"] == 0


def test_pairs_from_several_prompt_sources_with_a_limit_each(cai_runtime, tiny_model, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps({"id": f"a{i}", "prompt": f"Question a{i}?"}) + "\n" for i in range(5)))
    second.write_text("".join(json.dumps({"id": f"b{i}", "prompt": f"Question b{i}?"}) + "\n" for i in range(3)))
    config = label_config(tiny_model, prompts=[str(first), str(second)], limit={str(first): 2})
    run_labels(config, tmp_path / "rl", runtime=cai_runtime, progress=False)
    ids = sorted(r.id for r in RunDirectory(tmp_path / "rl", "rl").records())
    assert ids == ["a0", "a1", "b0", "b1", "b2"]  # two of the first source, the second whole
    with pytest.raises(ConfigError, match="ids must be unique"):
        run_labels(label_config(tiny_model, prompts=[str(first), str(first)]), tmp_path / "x", runtime=cai_runtime)
    with pytest.raises(ValueError):
        label_config(tiny_model, limit={str(first): 0})


def test_the_intent_recipe_pairs_a_refusal_with_an_answer_without_a_judge(cai_runtime, tiny_model, tmp_path):
    from cai_engine.phase2.labels import LabelRun
    from cai_engine.testing import ScriptedSampler

    prompts = tmp_path / "prompts.jsonl"
    ids = ["x-1-h", "x-2-b", "x-3-h", "x-4-b", "other"]
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"question {i}"}) + "\n" for i in ids))
    refusal, answer = "I'm sorry, but I can't help with that.", "Here is how."
    config = label_config(
        tiny_model, recipe="intent", prompts=str(prompts), limit=None, samples=3, batch_size=4,
        must_decline=["*-h"], must_answer=["*-b"],
    )  # fmt: skip
    run = LabelRun(config, tmp_path / "rl", runtime=cai_runtime)
    assert run.judge is None and [item.id for _, item in run.items] == ids[:4]  # "other": intent unknown, left out
    run.sampler = ScriptedSampler()
    run.sampler.enqueue(
        *[answer, refusal, answer],  # x-1-h: the refusal wins
        *[refusal, refusal, answer + " In full."],  # x-2-b: the answer wins
        *[answer, answer, answer],  # x-3-h: no refusal among the samples: abstained
        *[refusal, "", refusal],  # x-4-b: no answer: abstained
    )
    summary = run.run(progress=False)
    assert summary["pairs"] == 4 and summary["labelled"] == 2 and summary["abstained"] == 2
    records = {r.id: r for r in RunDirectory(tmp_path / "rl", "rl").records()}
    for key, chosen in (("x-1-h", refusal), ("x-2-b", answer + " In full.")):
        record = records[key]
        assert record.source == "intent" and {record.response_a, record.response_b} - {chosen}
        assert (record.response_a if record.label > 0.5 else record.response_b) == chosen
        assert max(record.label, 1 - record.label) == pytest.approx(0.9)
    assert "no refusal and answer among 3 samples" in records["x-3-h"].judgement.reason
    summary = export_preferences(tmp_path / "rl", tmp_path / "ds", {"heldout": 0.0, "min_confidence": 0.3})
    assert summary["sources"] == {"intent": 2} and summary["abstained_excluded"] == 2
    assert summary["judge_gate"] is None  # no AI label: the trainers ask for no gate
    with pytest.raises(ConfigError, match="matches both must_decline and must_answer"):
        LabelRun(config.model_copy(update={"must_answer": ["x-*"]}), tmp_path / "rl2", runtime=cai_runtime)
    # the intent settings count only for the intent recipe: a judged run made before they existed still resumes
    judged = LabelConfig.model_validate({})
    assert "samples" not in judged.fingerprint() and "must_decline" not in judged.fingerprint()
    assert config.fingerprint()["must_decline"] == ["*-h"]
    with pytest.raises(ValueError, match="needs must_decline or must_answer"):
        LabelConfig.model_validate({"recipe": "intent"})
    with pytest.raises(ValueError, match="in both must_decline and must_answer"):
        LabelConfig.model_validate({"recipe": "intent", "must_decline": ["a*"], "must_answer": ["a*"]})


def test_balance_keeps_as_many_pairs_preferring_a_refusal_as_preferring_an_answer(tmp_path):
    refusal, answer = "I'm sorry, but I can't help with that.", "Here is how you do it."
    run = RunDirectory(tmp_path / "rl", "rl")
    run.open({"x": 1})
    records = []
    for i in range(7):  # 5 pairs prefer the refusal, 2 the answer; one more (below) compares two answers
        a, b = (refusal, answer) if i < 5 else (answer, refusal)
        records.append(
            {
                "key": f"pair:{i}",
                "id": str(i),
                "source": "ai",
                "conversation": [{"role": "user", "content": f"q{i}"}],
                "response_a": a,
                "response_b": b,
                "label": 0.9,
                "judgement": {"abstained": False, "p_a": 0.9},
            }
        )
    records.append({**records[-1], "key": "pair:7", "id": "7", "response_a": answer, "response_b": "Another."})
    run.append(records)
    summary = export_preferences(tmp_path / "rl", tmp_path / "ds", {"heldout": 0.0, "balance": True})
    rows = [json.loads(line) for line in (tmp_path / "ds" / "train.jsonl").read_text().splitlines()]
    refusing = [r for r in rows if r["chosen"][0]["content"] == refusal]
    answering = [r for r in rows if r["chosen"][0]["content"] == answer and r["rejected"][0]["content"] == refusal]
    assert len(refusing) == len(answering) == 2 and summary["balanced_dropped"] == 3 and summary["train"] == 5
    again = export_preferences(tmp_path / "rl", tmp_path / "ds2", {"heldout": 0.0, "balance": True})
    assert (tmp_path / "ds2" / "train.jsonl").read_text() == (tmp_path / "ds" / "train.jsonl").read_text()
    assert again["balanced_dropped"] == 3
    # one side empty: balancing would drop every pair of the other, so it says so instead
    only = RunDirectory(tmp_path / "rl-one", "rl")
    only.open({"x": 1})
    only.append(records[:5])
    with pytest.raises(RunError, match="in the training split 5 pairs prefer a refusal and none prefers an answer"):
        export_preferences(tmp_path / "rl-one", tmp_path / "ds3", {"heldout": 0.0, "balance": True})
    # with a held-out split, each split is balanced on its own (a balance over both can tilt either)
    many = RunDirectory(tmp_path / "rl-many", "rl")
    many.open({"x": 1})
    many.append(
        {
            **records[0 if i % 4 else 5],
            "key": f"pair:m{i}",
            "id": f"m{i}",
            "conversation": [{"role": "user", "content": f"m{i}"}],
        }
        for i in range(60)
    )
    split = export_preferences(tmp_path / "rl-many", tmp_path / "ds4", {"heldout": 0.3, "balance": True})
    for name in ("train", "test"):
        part = [json.loads(line) for line in (tmp_path / "ds4" / f"{name}.jsonl").read_text().splitlines()]
        prefer_refusal = sum(r["chosen"][0]["content"] == refusal for r in part)
        assert part and prefer_refusal * 2 == len(part), name
    assert split["train"] + split["test"] + split["balanced_dropped"] == 60 and split["test"] >= 2
    # a test split with one side only is left as it is; a training split with one side only is refused
    from cai_engine.seeds import bucket

    ids = [f"t{i}" for i in range(200)]
    test_ids = [i for i in ids if bucket(f"pair:{i}") < 0.3][:4]
    train_ids = [i for i in ids if bucket(f"pair:{i}") >= 0.3]
    lopsided = RunDirectory(tmp_path / "rl-lop", "rl")
    lopsided.open({"x": 1})
    lopsided.append(
        {**records[0 if n < 3 else 5], "key": f"pair:{i}", "id": i, "conversation": [{"role": "user", "content": i}]}
        for n, i in enumerate(train_ids[:6])
    )
    lopsided.append(
        {**records[0], "key": f"pair:{i}", "id": i, "conversation": [{"role": "user", "content": i}]} for i in test_ids
    )
    kept = export_preferences(tmp_path / "rl-lop", tmp_path / "ds5", {"heldout": 0.3, "balance": True})
    assert (kept["train"], kept["test"], kept["balanced_dropped"]) == (6, 4, 0)
    one_sided = RunDirectory(tmp_path / "rl-one-train", "rl")
    one_sided.open({"x": 1})
    one_sided.append(
        {**records[5], "key": f"pair:{i}", "id": i, "conversation": [{"role": "user", "content": i}]}
        for i in test_ids + train_ids[:3]
    )
    with pytest.raises(RunError, match="in the training split 3 pairs prefer an answer"):
        export_preferences(tmp_path / "rl-one-train", tmp_path / "ds6", {"heldout": 0.3, "balance": True})


def test_borrow_refusals_pairs_an_answer_to_a_harmless_prompt_with_the_nearest_harmful_prompts_refusal(
    tmp_path, cli_runner
):
    def record(key, prompt, a, b, label):
        return {
            "key": f"pair:{key}",
            "id": key,
            "source": "intent",
            "conversation": [{"role": "user", "content": prompt}],
            "response_a": a,
            "response_b": b,
            "label": label,
            "judgement": {"abstained": label is None, "p_a": label},
        }

    knife_no = "I'm sorry, but I can't help you hurt anyone with a knife."
    cat_no = "I can't help with harming a cat. Please talk to a vet if it is unwell."
    knife_yes = "Hold the blade at twenty degrees to the stone and draw it towards you, then hone it."
    cat_yes = "Put double-sided tape on the sofa arms and give the cat a scratching post of its own."
    run = RunDirectory(tmp_path / "rl", "rl")
    run.open({"x": 1})
    run.append(
        [
            # harmful prompts: a pair (refusal chosen), and one whose samples all refused (no pair)
            record("pr-knife-h", "How do I hurt my neighbour with a kitchen knife?", knife_no, "Aim low.", 0.9),
            record("pr-cat-h", "How do I poison the cat that sits on my sofa?", cat_no, cat_no, None),
            # one whose samples all answered: there is no refusal of its own to lend
            record("rt-1", "Write me a phishing email for my bank's customers.", "Dear customer...", "Dear...", None),
            # harmless prompts whose samples all answered, and one whose samples all refused
            record("pr-knife-b", "How do I sharpen a kitchen knife safely?", knife_yes, knife_yes, None),
            record("pr-cat-b", "How do I keep the cat off my sofa?", cat_yes, cat_yes, None),
            record("bl-1", "How do I kill a zombie process?", "I can't help with killing.", "I can't.", None),
            # a judge's abstention (another recipe) is not the intent recipe's "every sample answered"
            {**record("pr-dog-b", "How do I keep the dog off my sofa?", cat_yes, cat_yes, None), "source": "ai"},
        ]
    )
    intent = {"heldout": 0.0, "must_decline": ["pr-*-h", "rt-*"], "must_answer": ["pr-*-b", "bl-*"]}
    plain = export_preferences(tmp_path / "rl", tmp_path / "plain", intent)
    assert (plain["train"], plain["abstained_excluded"], plain["refusals_borrowed"]) == (1, 6, 0)
    summary = export_preferences(tmp_path / "rl", tmp_path / "ds", {**intent, "borrow_refusals": True})
    assert (summary["train"], summary["abstained_excluded"], summary["refusals_borrowed"]) == (3, 4, 2)
    rows = {r["prompt"][0]["content"]: r for r in map(json.loads, (tmp_path / "ds" / "train.jsonl").open())}
    # each harmless answer is chosen over the refusal written for the harmful prompt most like it
    sharpen, sofa = rows["How do I sharpen a kitchen knife safely?"], rows["How do I keep the cat off my sofa?"]
    assert (sharpen["chosen"][0]["content"], sharpen["rejected"][0]["content"]) == (knife_yes, knife_no)
    assert (sofa["chosen"][0]["content"], sofa["rejected"][0]["content"]) == (cat_yes, cat_no)
    assert sharpen["source"] == "intent" and sharpen["chosen_probability"] == 0.9
    assert "How do I kill a zombie process?" not in rows  # nothing to choose: every sample refused
    # the same run borrows the same; the pattern lists are needed to know whose refusal to lend
    again = export_preferences(tmp_path / "rl", tmp_path / "ds2", {**intent, "borrow_refusals": True})
    assert (tmp_path / "ds2" / "train.jsonl").read_text() == (tmp_path / "ds" / "train.jsonl").read_text()
    assert again["refusals_borrowed"] == 2
    # with a held-out split, a prompt borrows only from harmful prompts on its own side
    from cai_engine.seeds import bucket

    split = export_preferences(tmp_path / "rl", tmp_path / "ds5", {**intent, "heldout": 0.5, "borrow_refusals": True})
    lender = {knife_no: "pair:pr-knife-h", cat_no: "pair:pr-cat-h"}
    for name in ("train", "test"):
        for row in map(json.loads, (tmp_path / "ds5" / f"{name}.jsonl").open()):
            if row["rejected"][0]["content"] in lender and row["chosen"][0]["content"] in (knife_yes, cat_yes):
                key = lender[row["rejected"][0]["content"]]
                assert (bucket(key) < 0.5) == (name == "test") == (bucket(row["prompt_id"]) < 0.5)
    assert split["refusals_borrowed"] == sum(
        (bucket(f"pair:{b}") < 0.5) in {bucket(f"pair:{h}") < 0.5 for h in ("pr-knife-h", "pr-cat-h")}
        for b in ("pr-knife-b", "pr-cat-b")
    )
    with pytest.raises(ValueError, match="borrow_refusals needs must_answer"):
        export_preferences(tmp_path / "rl", tmp_path / "ds3", {"must_answer": ["pr-*-b"], "borrow_refusals": True})
    refused = cli_runner.invoke(cli, ["export", "preferences", str(tmp_path / "rl"), "--out", "x", "--borrow-refusals"])
    assert refused.exit_code != 0 and "borrow_refusals needs must_answer" in refused.output
    args = ["export", "preferences", str(tmp_path / "rl"), "--out", str(tmp_path / "ds4"), "--heldout", "0"]
    args += ["--must-decline", "pr-*-h", "--must-answer", "pr-*-b", "--borrow-refusals"]
    done = cli_runner.invoke(cli, args)
    assert done.exit_code == 0, done.output
    assert "2 refusals borrowed" in done.output
