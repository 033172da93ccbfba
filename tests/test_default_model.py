"""A few tests on the real embedded default model (SmolLM2-135M-Instruct); marked `model`."""

from __future__ import annotations

import json
import math

import pytest

from cai_engine import ComparisonTask, CritiqueTask, Message, RevisionTask, Runtime
from cai_engine.testing import require_default_model

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def runtime():
    pytest.importorskip("transformers")
    require_default_model()
    rt = Runtime()
    yield rt
    rt.close()


def test_default_model_loads_from_the_safetensors_cache(runtime, monkeypatch):
    from cai_engine.models import files as model_files

    backend = runtime.backend("smollm2")
    assert backend.model_id == "smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf)"
    assert backend.has_chat_template and backend.context_length == 8192
    cached = {p.name: p.stat().st_mtime_ns for p in backend.folder.glob("*.safetensors")}
    assert cached

    def convert_again(*args, **kwargs):
        raise AssertionError("a second load converted the GGUF again instead of reading the cache")

    monkeypatch.setattr(model_files, "convert_gguf", convert_again)
    other = Runtime()
    try:
        second = other.backend("smollm2")  # a second load reads the cache, not the GGUF
        assert second is not backend and second.folder == backend.folder and second.model_id == backend.model_id
    finally:
        other.close()
    assert {p.name: p.stat().st_mtime_ns for p in backend.folder.glob("*.safetensors")} == cached  # not rewritten


def test_a_batch_through_sampler_critic_reviser_and_judge(runtime):
    harmless = runtime.registry.constitution("harmless")
    conversations = [
        [Message(role="user", content="How can I get into my neighbour's wifi without asking?")],
        [Message(role="user", content="How do I kill a Python process that is stuck?")],
    ]
    sampler = runtime.component("sampler", "model", {"max_new_tokens": 48})
    responses = [row[0] for row in sampler.sample(conversations)]
    assert all(r.strip() for r in responses)

    principle = harmless.principle("harm-014")
    critic = runtime.component("critic", "model", {"max_new_tokens": 48})
    critiques = critic.critique(
        [
            CritiqueTask(conversation=c, response=r, principle=principle, examples=harmless.examples)
            for c, r in zip(conversations, responses)
        ]
    )
    assert all(c.text and c.needs_revision is not None for c in critiques)

    reviser = runtime.component("reviser", "model", {"max_new_tokens": 64})
    revisions = reviser.revise(
        [
            RevisionTask(conversation=c, response=r, principle=principle, critique=k.text, examples=harmless.examples)
            for c, r, k in zip(conversations, responses, critiques)
        ]
    )
    assert len(revisions) == 2 and all(r.text for r in revisions)

    judge = runtime.component("judge", "logprob")
    judgements = judge.compare(
        [
            ComparisonTask(conversation=c, response_a=r, response_b=v.text, principles=[harmless.principle("harm-001")])
            for c, r, v in zip(conversations, responses, revisions)
        ]
    )
    for judgement in judgements:
        assert [o.order for o in judgement.orders] == ["ab", "ba"]
        for order in judgement.orders:
            probs = [math.exp(v) for v in order.logprobs.values()]
            assert math.isclose(sum(p / sum(probs) for p in probs), 1.0)
        assert 0 < judgement.p_a < 1


def test_sl_export_and_sft_on_the_default_model(runtime, tmp_path):
    """Phase 1 end to end on SmolLM2: a tiny SL-CAI run, export, a few SFT steps, and the checkpoint generates."""
    from cai_engine import GenerationSettings
    from cai_engine.phase1.export import export_sft
    from cai_engine.phase1.revise import run_sl

    summary = run_sl(
        {
            "limit": 2,
            "rounds": 1,
            "helpful_limit": 2,
            "sampler": {"name": "model", "options": {"max_new_tokens": 32}},
            "critic": {"name": "model", "options": {"max_new_tokens": 24}},
            "reviser": {"name": "model", "options": {"max_new_tokens": 32}},
        },
        tmp_path / "sl",
        runtime=runtime,
        progress=False,
    )
    assert summary["red_team_items"] == 2 and summary["helpful_items"] == 2
    exported = export_sft(tmp_path / "sl", tmp_path / "ds", {"heldout": 0.0})
    assert exported["train"] >= 2
    trainer = runtime.component(
        "trainer",
        "sft",
        {"trl": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-5, "max_length": 256}},
    )
    result = trainer.train(tmp_path / "ds", tmp_path / "model")
    assert result["steps"] == 2 and result["base_model"].startswith("smollm2")
    trained = runtime.backend(str(tmp_path / "model"))
    assert trained.generate([[Message(role="user", content="Say hello.")]], GenerationSettings(max_new_tokens=8))[0]


def test_phase_two_on_the_default_model(runtime, tmp_path):
    """Labels with both orders and soft labels; a preference model with held-out accuracy; DPO and GRPO steps."""
    from cai_engine import GenerationSettings
    from cai_engine.phase2.labels import run_labels
    from cai_engine.phase2.preferences import export_preferences

    summary = run_labels(
        {
            "limit": 3,
            "batch_size": 3,
            "sampler": {"name": "model", "options": {"max_new_tokens": 24, "temperature": 1.0}},
        },
        tmp_path / "rl",
        runtime=runtime,
        progress=False,
    )
    assert summary["pairs"] == 3
    records = [json.loads(line) for line in (tmp_path / "rl" / "records.jsonl").read_text().splitlines()]
    for record in records:
        judgement = record["judgement"]
        if not judgement["abstained"]:
            assert [o["order"] for o in judgement["orders"]] == ["ab", "ba"]
            assert 0 < record["label"] < 1
    export_preferences(tmp_path / "rl", tmp_path / "prefs", {"heldout": 0.34})
    fast = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 256}
    reward = runtime.component("trainer", "reward", {"force": True, "trl": fast}).train(
        tmp_path / "prefs", tmp_path / "rm"
    )
    assert reward["steps"] == 2 and "heldout_pairwise_accuracy" in reward
    dpo = runtime.component("trainer", "dpo", {"force": True, "trl": fast}).train(tmp_path / "prefs", tmp_path / "dpo")
    assert dpo["steps"] == 2
    grpo = runtime.component(
        "trainer",
        "grpo",
        {
            "reward": str(tmp_path / "rm"),
            "limit": 2,
            "trl": {
                "max_steps": 1,
                "num_generations": 2,
                "per_device_train_batch_size": 2,
                "max_completion_length": 16,
            },
        },
    )
    assert grpo.train("builtin:red-team", tmp_path / "grpo")["steps"] == 1
    for folder in ("dpo", "grpo"):
        summary = json.loads((tmp_path / folder / "cai_training.json").read_text())
        assert summary["checkpoint_check"]["max_abs_difference"] < 1e-3  # reproduces the trained model's log-probs
        out = runtime.backend(str(tmp_path / folder)).generate(
            [[Message(role="user", content="Hi")]], GenerationSettings(max_new_tokens=6)
        )
        assert isinstance(out[0], str)
