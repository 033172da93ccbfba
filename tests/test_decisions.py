"""Decision targets (`cai export decisions`): labelled requests as SFT examples, trained with the weighted loss."""

from __future__ import annotations

import json

import pytest
from test_pipeline import small

from cai_engine import ConfigError, RunError
from cai_engine.classifiers.decisions import DECLINES, decline_for, export_decisions
from cai_engine.cli import cli
from cai_engine.constitution.model import Message
from cai_engine.pipeline import PipelineConfig, run_pipeline
from cai_engine.plugins.components import GenerationSettings
from cai_engine.text.refusals import refuses

pytestmark = pytest.mark.slow

# the homonym contrast pairs (the same topic asked with harmful and with harmless intent): 10 pairs, 20 requests
PAIRS = [
    {"source": "builtin:pairs", "label": "harmful", "ids": "pr-homonyms-*-h"},
    {"source": "builtin:pairs", "label": "benign", "ids": "pr-homonyms-*-b"},
]


def rows(folder, split):
    path = folder / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_every_decline_names_a_refusal_the_evaluation_reads_and_the_choice_is_seeded():
    assert len(set(DECLINES)) == len(DECLINES) >= 10
    assert all(refuses(text) for text in DECLINES)
    assert decline_for("written:builtin:red-team:rt-001", 0) == decline_for("written:builtin:red-team:rt-001", 0)
    picks = {seed: [decline_for(f"r{i}", seed) for i in range(40)] for seed in (0, 1)}
    assert picks[0] != picks[1] and len(set(picks[0])) > 6


def test_decisions_pair_declines_with_the_models_own_answers(cai_runtime, tiny_model, tmp_path, monkeypatch):
    backend = cai_runtime.backend(str(tiny_model))
    calls = []
    generate = backend.generate
    monkeypatch.setattr(
        backend, "generate", lambda convs, settings: calls.append(len(convs)) or generate(convs, settings)
    )
    options = {"model": str(tiny_model), "requests": PAIRS, "answer_tokens": 6, "heldout": 0.3, "batch_size": 1}
    options["harmless_weight"] = 2.5
    out = tmp_path / "decisions"
    manifest = export_decisions(out, options, cai_runtime)
    train, test = rows(out, "train"), rows(out, "test")
    everything = train + test
    harmful = [r for r in everything if r["source"] == "decline"]
    harmless = [r for r in everything if r["source"] == "own-answer"]
    assert len(harmful) == manifest["declines"] and len(harmless) == manifest["own_answers"]
    # only the harmless requests are sent to the model
    assert sum(calls) == len(harmless) + manifest["own_refusals_dropped"] + manifest["empty_answers_dropped"]
    assert all(r["messages"][1]["content"] in DECLINES and r["weight"] == 1.0 and not r["truncated"] for r in harmful)
    assert all(r["weight"] == 2.5 and not refuses(r["messages"][1]["content"]) for r in harmless)
    # an own answer is marked as cut exactly when it reached the token limit (within two tokens)
    cut = [backend.count_tokens(r["messages"][1]["content"]) >= 6 - 2 for r in harmless]
    assert [r["truncated"] for r in harmless] == cut and manifest["own_answers_truncated"] == sum(cut)
    # the own answers are the model's greedy answers, cut at answer_tokens (batch_size 1: generated alone both times,
    # so padding never enters the arithmetic and the comparison holds on any CPU)
    first = harmless[0]
    again = backend.generate(
        [[Message(role="user", content=first["messages"][0]["content"])]], GenerationSettings(max_new_tokens=6)
    )[0]
    assert again.strip() == first["messages"][1]["content"]
    # both halves of a pair land on one side of the split, and both sides are there
    side = {}
    for split, items in (("train", train), ("test", test)):
        for r in items:
            assert side.setdefault(r["group"], split) == split
    assert train and test
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "declines of harmful requests" in card and "`weight`" in card
    # a second export resumes from answers.jsonl: nothing is generated again
    calls.clear()
    assert export_decisions(out, options, cai_runtime) == manifest and calls == []
    # another answer length is not served from the first one's answers, nor an edited request
    export_decisions(out, {**options, "answer_tokens": 7}, cai_runtime)
    assert sum(calls) == len(harmless) + manifest["own_refusals_dropped"] + manifest["empty_answers_dropped"]
    calls.clear()
    cached = (out / "answers.jsonl").read_text(encoding="utf-8").splitlines()
    edited = [json.loads(line) for line in cached]
    edited[-1]["text"] = "0" * 16  # as if that request's text had changed since it was answered
    (out / "answers.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in edited) + '{"id": "cut sho', encoding="utf-8"
    )  # and a line a kill cut short: skipped, not an error
    export_decisions(out, {**options, "answer_tokens": 7}, cai_runtime)
    assert sum(calls) == 1


def test_decision_preferences_put_each_target_against_the_other_sides_reply(
    cai_runtime, cli_runner, tiny_model, tmp_path, monkeypatch
):
    from cai_engine.classifiers.data import WrittenSource, written_requests

    requests = written_requests([WrittenSource.model_validate(w) for w in PAIRS], cai_runtime.registry)
    declined = next(r["text"] for r in requests if r["kind"] == "harmful")
    backend = cai_runtime.backend(str(tiny_model))
    asked = []

    def answer(text):
        return "I can't help with that." if text == declined else f"Sure: {text[:12]}".strip()

    def generate(convs, settings):
        asked.extend(c[-1].content for c in convs)
        return [answer(c[-1].content) for c in convs]

    monkeypatch.setattr(backend, "generate", generate)
    options = {"model": str(tiny_model), "requests": PAIRS, "answer_tokens": 6, "heldout": 0.3, "seed": 3}
    out = tmp_path / "decisions"
    export_decisions(out, options, cai_runtime)
    assert sorted(asked) == sorted(r["text"] for r in requests if r["kind"] == "benign")
    # with --preferences into the same folder, only the harmful requests are answered: the rest come from the cache
    asked.clear()
    manifest = export_decisions(out, {**options, "preferences": True}, cai_runtime)
    assert sorted(asked) == sorted(r["text"] for r in requests if r["kind"] == "harmful")
    targets = {r["prompt_id"]: (split, r) for split in ("train", "test") for r in rows(out, split)}
    pairs = {split: rows(out / "preferences", split) for split in ("train", "test")}
    counts = manifest["preferences"]
    assert counts["harmful_not_answered"] == 1
    assert counts["train"] == len(pairs["train"]) and counts["test"] == len(pairs["test"]) and pairs["test"]
    seen, cut = set(), 0
    for split, items in pairs.items():
        for pair in items:
            target_split, target = targets[pair["prompt_id"]]
            assert target_split == split and pair["prompt"] == target["messages"][:1]  # the targets' split
            assert pair["chosen"] == target["messages"][1:]
            assert pair["source"] == "intent" and pair["chosen_probability"] == 1.0
            (rejected,) = pair["rejected"]
            request = target["messages"][0]["content"]
            if target["source"] == "decline":
                assert rejected["content"] == answer(request)  # the model's own answer to that request
                own = rejected["content"]
            else:
                assert rejected["content"] == decline_for(pair["prompt_id"], 3)
                own = pair["chosen"][0]["content"]
            cut += backend.count_tokens(own) >= 6 - 2
            seen.add(pair["prompt_id"])
    # one pair a target, but for the harmful request the model declined itself
    assert set(targets) - seen == {r["id"] for r in requests if r["text"] == declined}
    assert counts["decline_over_answer"] == manifest["declines"] - 1 and counts["answers_cut"] == cut
    assert counts["answer_over_decline"] == manifest["own_answers"] == sum(r["kind"] == "benign" for r in requests)
    assert json.loads((out / "preferences" / "export.json").read_text())["sources"] == {"intent": len(seen)}
    assert "preference" in (out / "preferences" / "README.md").read_text(encoding="utf-8")
    assert "Preference pairs" in (out / "README.md").read_text(encoding="utf-8")
    # the pairs are what `cai train dpo` reads
    result = cli_runner.invoke(
        cli,
        ["train", "dpo", "--dataset", str(out / "preferences"), "--model", str(tiny_model), "--out",
         str(tmp_path / "dpo"), "--max_steps", "1", "--per_device_train_batch_size", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "dpo" / "cai_training.json").read_text())
    assert report["train_examples"] == counts["train"] and report["steps"] == 1
    # exported again without --preferences, the folder holds no stale pairs
    assert "preferences" not in export_decisions(out, options, cai_runtime)
    assert not (out / "preferences").exists()


def test_an_answer_the_model_ends_itself_keeps_its_end_of_turn(cai_runtime, tiny_model, tmp_path, monkeypatch):
    backend = cai_runtime.backend(str(tiny_model))
    generate = backend.generate
    short = "Use a tripod."
    monkeypatch.setattr(backend, "generate", lambda convs, settings: [short, *generate(convs[1:], settings)])
    options = {"model": str(tiny_model), "requests": PAIRS, "answer_tokens": 40, "batch_size": 50}
    export_decisions(tmp_path / "d", options, cai_runtime)
    harmless = [r for r in rows(tmp_path / "d", "train") + rows(tmp_path / "d", "test") if r["source"] == "own-answer"]
    ended = [r for r in harmless if r["messages"][1]["content"] == short]
    assert len(ended) == 1 and ended[0]["truncated"] is False
    others = [r for r in harmless if r is not ended[0]]
    assert all(r["truncated"] == (backend.count_tokens(r["messages"][1]["content"]) >= 38) for r in others)


def test_decisions_leave_out_evaluation_copies_and_refuse_one_sided_requests(cai_runtime, tiny_model, tmp_path):
    options = {"model": str(tiny_model), "requests": PAIRS, "answer_tokens": 4}
    from cai_engine.prompts.sets import load_training_prompts

    first = load_training_prompts("builtin:pairs", cai_runtime.registry)[0]
    manifest = export_decisions(
        tmp_path / "d", options, cai_runtime, evaluation_prompts={"eval-1": first.conversation[-1].content}
    )
    assert manifest["evaluation_copies_dropped"] == 1
    texts = [r["messages"][0]["content"] for r in rows(tmp_path / "d", "train") + rows(tmp_path / "d", "test")]
    assert first.conversation[-1].content not in texts
    with pytest.raises(ConfigError, match="only harmful requests"):
        export_decisions(tmp_path / "e", {**options, "requests": PAIRS[:1]}, cai_runtime)


def test_cai_export_decisions_then_cai_train_sft_with_the_weights(cli_runner, tiny_model, tmp_path, monkeypatch):
    from cai_engine.default_plugins import trl_common

    out = tmp_path / "decisions"
    config = tmp_path / "requests.yaml"
    result = cli_runner.invoke(
        cli,
        ["export", "decisions", "--out", str(out), "--model", str(tiny_model), "--answer-tokens", "5",
         "--harmless-weight", "3", "--heldout", "0.2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "declines" in result.output and (out / "export.json").exists()
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["declines"] > 700 and manifest["own_answers"] > 700 and manifest["options"]["harmless_weight"] == 3
    # a shorter dataset for training: forty rows of the export, both kinds
    small = tmp_path / "small"
    small.mkdir()
    picked = [r for r in rows(out, "train") if r["source"] == "decline"][:20]
    picked += [r for r in rows(out, "train") if r["source"] == "own-answer"][:20]
    (small / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked), encoding="utf-8")
    batches = []
    collate = trl_common._ExampleWeights.__call__
    monkeypatch.setattr(
        trl_common._ExampleWeights, "__call__", lambda self, ex: batches.append(collate(self, ex)) or batches[-1]
    )
    config.write_text(
        "decision_weight: 10\ndecision_tokens: 4\n"
        "trl: {max_steps: 2, per_device_train_batch_size: 8, learning_rate: 0.01, logging_steps: 1}\n",
        encoding="utf-8",
    )
    result = cli_runner.invoke(
        cli,
        ["train", "sft", "--config", str(config), "--dataset", str(small), "--model", str(tiny_model), "--out",
         str(tmp_path / "model")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "model" / "cai_training.json").read_text())
    assert report["example_columns"] == ["weight", "truncated"] and report["decision_weight"] == 10
    # each batch row weighs its labelled tokens by its example's weight, 0 on a cut answer's end of turn
    from transformers import AutoTokenizer

    ends = trl_common.end_of_turn_tokens(AutoTokenizer.from_pretrained(tiny_model))
    assert ends >= 1 and len(batches) >= 2
    seen = set()
    for batch in batches:
        for labels, weights in zip(batch["labels"], batch["token_weights"]):
            counted = weights[labels != -100].tolist()
            assert set(counted) in ({1.0}, {3.0, 0.0})
            if 3.0 in counted:
                assert counted[-ends:] == [0.0] * ends and 0.0 not in counted[:-ends]
            seen.add(max(counted))
    assert seen == {1.0, 3.0}


def test_cai_export_decisions_takes_the_labelled_requests_from_written(cli_runner, tiny_model, tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text(
        json.dumps({"id": "m-1", "prompt": "How do I get every weed out of a gravel drive for good?"}) + "\n"
        + json.dumps({"id": "m-2", "prompt": "Which knot holds a tarp down in a strong wind?"}) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    base = ["export", "decisions", "--model", str(tiny_model), "--answer-tokens", "4", "--heldout", "0"]
    written = ["--written", "builtin:pairs=harmful:pr-homonyms-*-h", "--written", f"{mine}=benign"]
    result = cli_runner.invoke(cli, [*base, "--out", str(tmp_path / "d"), *written])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "d" / "export.json").read_text())
    assert (manifest["declines"], manifest["own_answers"]) == (10, 2)
    assert manifest["options"]["requests"] == [
        {"source": "builtin:pairs", "label": "harmful", "ids": "pr-homonyms-*-h"},
        {"source": str(mine), "label": "benign", "ids": None},
    ]
    train = rows(tmp_path / "d", "train")
    asked = {r["messages"][0]["content"]: r["source"] for r in train}
    assert asked["Which knot holds a tarp down in a strong wind?"] == "own-answer"
    assert sum(source == "decline" for source in asked.values()) == 10
    # a label that is neither, a held-out set, and requests of one label: clear errors before any answer is written
    result = cli_runner.invoke(cli, [*base, "--out", str(tmp_path / "e"), "--written", "builtin:pairs=evil"])
    assert result.exit_code == 2 and "expected SOURCE=harmful or SOURCE=benign" in result.output
    result = cli_runner.invoke(
        cli, [*base, "--out", str(tmp_path / "f"), *written, "--written", "builtin:contrast=benign"]
    )
    assert result.exit_code != 0 and "held-out" in result.output
    result = cli_runner.invoke(cli, [*base, "--out", str(tmp_path / "g"), "--written", f"{mine}=benign"])
    assert result.exit_code != 0 and "only benign requests" in result.output
    assert not (tmp_path / "f" / "answers.jsonl").exists() and not (tmp_path / "g" / "answers.jsonl").exists()


def test_a_bad_weight_column_is_a_clear_error(cai_runtime, tiny_model, tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    row = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    (folder / "train.jsonl").write_text(
        json.dumps({**row, "weight": 1.0}) + "\n" + json.dumps({**row, "weight": -2.0}) + "\n", encoding="utf-8"
    )
    trainer = cai_runtime.component("trainer", "sft", {"model": str(tiny_model), "trl": {"max_steps": 1}})
    with pytest.raises(RunError, match="row 2 has weight -2.0"):
        trainer.train(folder, tmp_path / "out")


def write_split(folder, split, rows_):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_), encoding="utf-8")


def chat(request, reply):
    return [{"role": "user", "content": request}, {"role": "assistant", "content": reply}]


def test_the_mix_keeps_each_split_one_side_a_request_and_the_same_columns(tmp_path):
    from cai_engine.classifiers.decisions import MIX_COLUMNS, mix_with_decisions

    phase1, decisions = tmp_path / "sft-dataset", tmp_path / "decisions-dataset"
    write_split(phase1, "train", [
        # a harmful request the teacher declined: agrees with its label, so it wins over the written decline
        {"messages": chat("How do I pick a lock?", "I can't help with that; a locksmith can."), "prompt_id": "rt-1",
         "source": "revision", "round": 1, "principle_id": "harm-001", "weight": 7, "truncated": True},
        # a harmful request the teacher carried out: the decline wins
        {"messages": chat("Write a threat to my neighbour", "Dear neighbour, watch out..."), "prompt_id": "rt-2",
         "source": "revision"},
        # a harmless request the teacher refused: the policy's own answer wins
        {"messages": chat("Bake bread?", "I'm sorry, I can't help with that."), "prompt_id": "bl-1", "source": "revision"},
    ])  # fmt: skip
    write_split(
        phase1, "test", [{"messages": chat("Plan my week", "Monday: ..."), "prompt_id": "h-1", "source": "helpful"}]
    )
    write_split(decisions, "train", [
        {"messages": chat("how do I  PICK a lock?", DECLINES[0]), "prompt_id": "d-1", "source": "decline",
         "weight": 1.0, "truncated": False, "group": "g1"},
        {"messages": chat("Bake bread?", "Mix flour"), "prompt_id": "d-2", "source": "own-answer", "weight": 2.5,
         "truncated": True, "group": "g2"},
    ])  # fmt: skip
    write_split(decisions, "test", [
        {"messages": chat("Fold a shirt?", "Lay it flat"), "prompt_id": "d-3", "source": "own-answer", "weight": 2.5,
         "truncated": False, "group": "g3"},
        {"messages": chat("Write a threat to my neighbour", DECLINES[1]), "prompt_id": "d-4", "source": "decline",
         "weight": 1.0, "truncated": False, "group": "g4"},
    ])  # fmt: skip
    manifest = mix_with_decisions(phase1, decisions, tmp_path / "mix")
    train, test = rows(tmp_path / "mix", "train"), rows(tmp_path / "mix", "test")
    assert [r["prompt_id"] for r in train] == ["rt-1", "d-2"] and [r["prompt_id"] for r in test] == [
        "h-1",
        "d-3",
        "d-4",
    ]
    assert manifest["decisions_replaced"] == 1 and manifest["phase1_replaced"] == 2
    assert (manifest["train"], manifest["test"]) == (2, 3)
    assert all(tuple(r) == MIX_COLUMNS for r in train + test)
    # a phase-1 target weighs 1 and counts as not cut, whatever its row said; a decision target keeps its own
    assert (train[0]["weight"], train[0]["truncated"]) == (1.0, False)
    assert (train[1]["weight"], train[1]["truncated"]) == (2.5, True)
    card = (tmp_path / "mix" / "README.md").read_text()
    assert "1 decision targets left out" in card and "2 phase-1 targets left out" in card
    # without phase 1 the decisions alone; malformed rows are named
    assert mix_with_decisions(tmp_path / "none", decisions, tmp_path / "alone")["train"] == 2
    write_split(phase1, "test", [{"messages": [{"role": "user"}]}])
    with pytest.raises(RunError, match=r"test.jsonl:1: each message needs a role and a text content"):
        mix_with_decisions(phase1, decisions, tmp_path / "bad")
    write_split(decisions, "train", [{"prompt_id": "x"}])
    with pytest.raises(RunError, match=r"train.jsonl:1: a row needs a `messages` list"):
        mix_with_decisions(None, decisions, tmp_path / "bad")


def test_cai_run_adds_the_decision_targets_to_the_sft_stage(cai_runtime, tiny_model, tmp_path):
    out = tmp_path / "pipe"
    config = small(tiny_model, out)
    config["stages"], config["seed"] = ["sl", "sft"], 3
    # the contrast pairs and the first red-team requests, which phase 1 answers too (its limit: 3 a source)
    requests = [*PAIRS, {"source": "builtin:red-team", "label": "harmful", "ids": None}]
    config["decisions"] = {"requests": requests, "answer_tokens": 4, "batch_size": 8, "harmless_weight": 2.0}
    config["sft"] = {"decision_weight": 5, "decision_tokens": 2, **config["sft"]}
    assert PipelineConfig.model_validate(config).decisions.model == str(tiny_model)
    lines = []
    summary = run_pipeline(config, runtime=cai_runtime, progress=False, echo=lines.append)
    decisions = summary["decisions_dataset"]
    assert decisions["options"]["seed"] == 3 and decisions["options"]["harmless_weight"] == 2.0
    marker = json.loads((out / "sft-model" / "cai_stage.json").read_text())
    assert marker["dataset"] == str(out / "sft-mix") and marker["options"]["decision_weight"] == 5
    mixed = rows(out / "sft-mix", "train") + rows(out / "sft-mix", "test")
    phase1 = rows(out / "sft-dataset", "train") + rows(out / "sft-dataset", "test")
    made = rows(out / "decisions-dataset", "train") + rows(out / "decisions-dataset", "test")
    requests_of = lambda rs: [" ".join(r["messages"][0]["content"].lower().split()) for r in rs]  # noqa: E731
    overlap = set(requests_of(phase1)) & set(requests_of(made))
    assert overlap, "phase 1 and the decision targets should share the first red-team requests"
    # the rule, computed here from the two exports: phase 1's target stays where it agrees with the label
    declined = {q for q, r in zip(requests_of(made), made) if r["source"] == "decline"}
    agrees = [q not in overlap or refuses(r["messages"][-1]["content"]) == (q in declined)
              for q, r in zip(requests_of(phase1), phase1)]  # fmt: skip
    kept_phase1 = {q for q, ok in zip(requests_of(phase1), agrees) if ok}
    expected = sum(agrees) + sum(q not in kept_phase1 for q in requests_of(made))
    mix = summary["sft_mix"]
    assert len(mixed) == expected == mix["train"] + mix["test"]
    assert mix["phase1_replaced"] == len(agrees) - sum(agrees)
    assert {r["source"] for r in mixed} >= {"decline", "own-answer"}
    # a request's targets come from one side only, and sit on one side of the split
    train_requests = set(requests_of(rows(out / "sft-mix", "train")))
    assert not train_requests & set(requests_of(rows(out / "sft-mix", "test")))
    sources = {}
    for q, r in zip(requests_of(mixed), mixed):
        sources.setdefault(q, set()).add(r["source"] in ("decline", "own-answer"))
    assert all(len(sides) == 1 for sides in sources.values())
    assert any("sft-mix:" in line for line in lines)
    assert summary["sft_mix"]["train"] == len(rows(out / "sft-mix", "train"))
    # a second run finds the model trained on the mix and makes nothing again
    again = []
    second = run_pipeline(config, runtime=cai_runtime, progress=False, echo=again.append)
    assert any("sft-model exists; skipped" in line for line in again) and not any("note:" in x for x in again)
    assert "decisions_dataset" not in second.model_dump() and "sft_mix" not in second.model_dump()
    # a model trained without the decision targets is named as such when decisions is set later
    marker = out / "sft-model" / "cai_stage.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "dataset": str(out / "sft-dataset")}))
    third = []
    run_pipeline({**config, "stages": ["sft"]}, runtime=cai_runtime, progress=False, echo=third.append)
    assert any("without the decision targets" in line for line in third)


def test_decisions_need_an_sft_trainer_that_reads_conversations(cai_runtime, tiny_model, tmp_path):
    config = {**small(tiny_model, tmp_path / "p"), "decisions": {}, "sft_trainer": "dpo", "sft": {}}
    with pytest.raises(ConfigError, match="decisions: the SFT stage's trainer 'dpo' trains on preferences"):
        run_pipeline(config, runtime=cai_runtime, progress=False, echo=lambda _: None)
    assert not (tmp_path / "p").exists()
    # requests of one kind only are refused before phase 1 generates anything
    config = {**small(tiny_model, tmp_path / "q"), "decisions": {"requests": PAIRS[:1]}}
    with pytest.raises(ConfigError, match="the sources give only harmful requests"):
        run_pipeline(config, runtime=cai_runtime, progress=False, echo=lambda _: None)
    assert not (tmp_path / "q").exists()
    # preference pairs would be answered for nothing: cai run trains no DPO on them
    config = {**small(tiny_model, tmp_path / "r"), "decisions": {"preferences": True}}
    with pytest.raises(ConfigError, match="cai export decisions --preferences"):
        run_pipeline(config, runtime=cai_runtime, progress=False, echo=lambda _: None)
    assert not (tmp_path / "r").exists()
    # a model that is not a plain name validates (the pipeline's model fills the section's)
    custom = {"name": "hf", "model": str(tiny_model)}
    assert PipelineConfig.model_validate({"model": custom, "decisions": {}}).decisions.model == custom
