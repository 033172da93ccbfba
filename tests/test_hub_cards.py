"""Model and dataset cards beside every checkpoint and export, and --push-to-hub (against a fake Hub: no network)."""

from __future__ import annotations

import json

import pytest
import yaml

from cai_engine import CaiError
from cai_engine.cli import cli
from cai_engine.constitution.model import Message
from cai_engine.phase1.export import export_sft
from cai_engine.records import SLRecord, SLRound
from cai_engine.store.runs import RunDirectory

CONSTITUTION = {"name": "harmless", "version": "3", "hash": "sha256:abc123"}


class FakeHub:
    """Records what would have been sent to the Hub."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail

    def create_repo(self, repo_id, **kwargs):
        if self.fail:
            raise self.fail
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr("cai_engine.store.hub._api", lambda: hub)
    return hub


def front_matter(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def sl_run(tmp_path):
    run = RunDirectory(tmp_path / "sl", "sl")
    run.open({"x": 1}, {"provenance": {"constitution": CONSTITUTION}})
    records = []
    for i in range(6):
        conversation = [Message(role="user", content=f"How do I do thing {i}?")]
        records.append(
            SLRecord(
                key=f"red-team:{i}",
                id=str(i),
                kind="red-team",
                conversation=conversation,
                initial_response="bad",
                rounds=[SLRound(round=1, principle_id="harm-001", revision=f"A careful answer {i}.", accepted=True)],
                final_response=f"A careful answer {i}.",
                revised=True,
            )
        )
    run.append(records)
    return run.path


def test_an_sft_export_has_a_dataset_card_that_datasets_reads(tmp_path, cli_runner, fake_hub):
    result = cli_runner.invoke(
        cli,
        [
            *["export", "sft", str(sl_run(tmp_path)), "--out", str(tmp_path / "ds"), "--heldout", "0.3"],
            *["--push-to-hub", "me/cai-sft-data", "--private"],
        ],
    )
    assert result.exit_code == 0, result.output
    metadata, text = front_matter(tmp_path / "ds" / "README.md")
    assert {"cai-engine", "constitutional-ai", "sft"} <= set(metadata["tags"])
    assert "sha256:abc123" in text and "6 revisions" in text
    from huggingface_hub import DatasetCard

    data = DatasetCard.load(tmp_path / "ds" / "README.md").data  # huggingface_hub reads its metadata back
    assert data.license == "unknown" and data.task_categories == ["text-generation"]
    assert data.constitution == CONSTITUTION and "sft" in data.tags
    import datasets

    loaded = datasets.load_dataset(str(tmp_path / "ds"))  # the card's `configs` name the splits
    manifest = json.loads((tmp_path / "ds" / "export.json").read_text())
    assert len(loaded["train"]) == manifest["train"] and len(loaded["test"]) == manifest["test"] > 0
    assert loaded["train"][0]["messages"][-1]["role"] == "assistant"
    assert fake_hub.calls[0] == (
        "create_repo",
        {"repo_id": "me/cai-sft-data", "repo_type": "dataset", "private": True, "exist_ok": True},
    )
    assert fake_hub.calls[1][1]["folder_path"] == str(tmp_path / "ds")
    assert "pushed" in result.output and "huggingface.co/me/cai-sft-data" in result.output


def test_a_checkpoint_has_a_model_card_and_is_pushed_without_trl_checkpoints(
    tmp_path, tiny_model, cli_runner, fake_hub
):
    folder = tmp_path / "ds"
    export_sft(sl_run(tmp_path), folder, {"heldout": 0.0})
    out = tmp_path / "out"
    result = cli_runner.invoke(
        cli,
        [
            *["train", "sft", "--dataset", str(folder), "--model", str(tiny_model), "--out", str(out)],
            *["--set", "max_steps=1", "--set", "per_device_train_batch_size=2", "--push-to-hub", "me/tiny-cai"],
        ],
    )
    assert result.exit_code == 0, result.output
    metadata, text = front_matter(out / "README.md")
    assert metadata["pipeline_tag"] == "text-generation" and "sft" in metadata["tags"]
    assert "base_model" not in metadata  # a local folder (without a card of its own) is not a Hub id
    assert "`harmless` version 3" in text and "sha256:abc123" in text and "1 steps" in text
    from huggingface_hub import ModelCard

    data = ModelCard.load(out / "README.md").data  # the metadata round-trips through huggingface_hub
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.datasets is None and data.license == "unknown" and data.base_model is None
    assert data.constitution == CONSTITUTION and {"cai-engine", "trl", "sft"} <= set(data.tags)
    # TRL's resume checkpoints (weights and optimizer state) go once the final weights are saved and checked ...
    assert not (out / "trainer").exists()
    upload = dict(fake_hub.calls)["upload_folder"]
    assert upload["repo_type"] == "model" and upload["folder_path"] == str(out)
    assert "trainer/**" in upload["ignore_patterns"]  # ... and a run still in progress never uploads them


@pytest.mark.slow
def test_weights_are_saved_in_the_training_dtype(cai_runtime, tiny_model, tmp_path):
    folder = tmp_path / "ds"
    export_sft(sl_run(tmp_path), folder, {"heldout": 0.0})
    trainer = cai_runtime.component(
        "trainer", "sft", {"model": str(tiny_model), "dtype": "bfloat16", "trl": {"max_steps": 1}}
    )
    summary = trainer.train(folder, tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(next((tmp_path / "out").glob("*.safetensors"))), "pt") as weights:
        dtypes = {str(weights.get_tensor(name).dtype) for name in weights.keys()}  # noqa: SIM118 - safe_open is no dict
    assert dtypes == {"torch.bfloat16"} and summary["dtype"] == "bfloat16"


def test_push_errors_are_one_line(tmp_path, monkeypatch):
    from cai_engine.store.hub import push_folder

    (tmp_path / "x").mkdir()
    with pytest.raises(CaiError, match="owner/name"):
        push_folder(tmp_path / "x", "no-owner")
    monkeypatch.setattr("cai_engine.store.hub._api", lambda: FakeHub(fail=ConnectionError("offline")))
    with pytest.raises(CaiError, match=r"could not push .* to me/x: ConnectionError: offline"):
        push_folder(tmp_path / "x", "me/x")
    with pytest.raises(CaiError, match="nothing to push"):
        push_folder(tmp_path / "missing", "me/x")


def test_model_cards_name_the_upstream_model_and_its_licence(tmp_path):
    """base_model and license: the catalogue's upstream Hub id for the embedded default, the id itself for a Hub id,
    and a checkpoint folder's own card for a model trained from it (lineage through local checkpoints)."""
    from huggingface_hub import ModelCard

    from cai_engine.store.cards import model_card

    def card(summary):
        path = tmp_path / "README.md"
        path.write_text(model_card(summary, task="text-generation"), encoding="utf-8")
        return ModelCard.load(path).data

    folder = tmp_path / "ds"
    export_sft(sl_run(tmp_path), folder, {"heldout": 0.0})
    default = card(
        {"trainer": "sft", "base_model": "smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf)", "dataset": str(folder)}
    )
    assert default.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and default.license == "apache-2.0"
    assert default.datasets is None and default.constitution == CONSTITUTION
    assert card({"trainer": "dpo", "base_model": "qwen2.5-coder-0.5b"}).base_model == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    hub = card({"trainer": "dpo", "base_model": "acme/tiny-chat", "dataset": "acme/prefs"})
    assert hub.base_model == "acme/tiny-chat" and hub.datasets == ["acme/prefs"] and hub.license == "unknown"
    checkpoint = tmp_path / "sft-out"
    checkpoint.mkdir()
    (checkpoint / "README.md").write_text(
        model_card({"trainer": "sft", "base_model": "smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf)"}), encoding="utf-8"
    )
    child = card({"trainer": "dpo", "base_model": str(checkpoint), "dataset": str(folder)})
    assert child.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and child.license == "apache-2.0"
    assert "dpo" in child.tags and child.constitution == CONSTITUTION
    grpo = card(
        {"trainer": "grpo", "base_model": "local.gguf", "prompts": "builtin:red-team", "constitution": CONSTITUTION}
    )  # grpo records the constitution its judge scored against
    assert grpo.base_model is None and grpo.datasets is None and grpo.constitution == CONSTITUTION


def test_the_classifier_card_carries_the_same_metadata(tmp_path):
    from huggingface_hub import ModelCard

    from cai_engine.classifiers.probe import ProbeConfig
    from cai_engine.classifiers.train import write_card

    config = ProbeConfig(
        kind="input",
        layer=4,
        labels=["violation"],
        thresholds={"violation": 0.5},
        constitution=CONSTITUTION,
        data={"train": 10, "test": 4, "train_positives": 5},
        metrics={"report_split": {"auc": 0.9}, "false_alarm_target": 0.05},
    )
    write_card(tmp_path, config, dataset=str(tmp_path / "clf-data"))
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "# harmless input classifier" in text and "AUC: 0.9" in text and "## Use" in text
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.library_name == "cai-engine" and data.pipeline_tag == "text-classification"
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.license == "apache-2.0"
    assert data.datasets is None and data.constitution == CONSTITUTION
    assert {"constitutional-ai", "safety-classifier", "cai-engine"} <= set(data.tags)
