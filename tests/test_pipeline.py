from __future__ import annotations

import json

import pytest
import yaml

from cai_engine.cli import cli
from cai_engine.pipeline import PipelineConfig, run_pipeline

pytestmark = pytest.mark.slow


def small(tiny_model, out):
    opts = {"max_new_tokens": 8}
    return {
        "out": str(out),
        "model": str(tiny_model),
        "sl": {
            "limit": 3,
            "rounds": 1,
            "helpful_limit": 2,
            "sampler": {"name": "model", "options": opts},
            "critic": {"name": "model", "options": opts},
            "reviser": {"name": "model", "options": opts},
        },
        "sft": {"trl": {"max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 0.1}},
        "rl": {"limit": 3, "sampler": {"name": "model", "options": {**opts, "temperature": 1.0}}},
        "preference_export": {"heldout": 0.0},
        "reward": {"force": True, "trl": {"max_steps": 1, "per_device_train_batch_size": 2}},
        "policy": {
            "trainer": "grpo",
            "options": {
                "limit": 2,
                "trl": {
                    "max_steps": 1,
                    "num_generations": 2,
                    "per_device_train_batch_size": 2,
                    "max_completion_length": 6,
                },
            },
        },
    }


def test_whole_pipeline_runs_and_resumes(cai_runtime, tiny_model, tmp_path):
    out = tmp_path / "pipe"
    lines = []
    summary = run_pipeline(small(tiny_model, out), runtime=cai_runtime, progress=False, echo=lines.append)
    for folder in ("sl", "sft-dataset", "sft-model", "rl", "preference-dataset", "reward-model", "grpo-model"):
        assert (out / folder).exists(), folder
    assert summary["gate"]["pairs"] >= 30
    assert json.loads((out / "rl" / "run.json").read_text())["config"]["model"] == str(out / "sft-model")
    assert summary["policy"]["reward"] == str(out / "reward-model")
    again = []
    second = run_pipeline(small(tiny_model, out), runtime=cai_runtime, progress=False, echo=again.append)
    assert sum("exists; skipped" in line for line in again) == 3
    assert second["sl"]["written"] == 0 and second["rl"]["written"] == 0


def test_pipeline_config_is_validated_before_anything_runs(cai_runtime, tiny_model, tmp_path):
    bad = small(tiny_model, tmp_path / "bad")
    bad["sft"] = {"trl": {}, "lorra": True}
    with pytest.raises(Exception, match="lorra"):
        run_pipeline(bad, runtime=cai_runtime, progress=False, echo=lambda _: None)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="stages"):
        PipelineConfig.model_validate({"stages": ["sl", "ppo"]})


def test_cli_run(cli_runner, tiny_model, tmp_path, cai_registry):
    config = small(tiny_model, tmp_path / "cli")
    config["stages"] = ["sl", "sft"]
    # people's targets join the teacher's, and the pipeline hands the export the evaluation prompts not to copy
    from cai_engine.prompts.sets import load_prompts

    heldout = load_prompts("builtin:benign-scary", cai_registry)[0].conversation[-1].content
    written = tmp_path / "written.jsonl"
    rows = [(heldout, "A plain answer."), ("How do I store flour so weevils stay out?", "Use an airtight tin.")]
    written.write_text("".join(json.dumps({"prompt": p, "response": r, "violates": False}) + "\n" for p, r in rows))
    config["sft_export"] = {"written": [str(written)]}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = cli_runner.invoke(cli, ["run", str(path), "--quiet", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "== phase 1: SL-CAI" in result.output and "sft: " in result.output
    summary = json.loads((tmp_path / "cli" / "pipeline-summary.json").read_text())
    # one seed reaches every stage, and the summary names the machine the result depends on
    assert summary["seed"] == 3 and summary["machine"]["cpu"]["cores"] >= 1
    assert isinstance(summary["machine"]["cpu"]["features"], list) and summary["machine"]["packages"]["torch"]
    assert json.loads((tmp_path / "cli" / "sl" / "run.json").read_text())["config"]["seed"] == 3
    bad = dict(config, out=str(tmp_path / "bad"), sft_export={"written": [str(tmp_path / "missing.jsonl")]})
    path.write_text(yaml.safe_dump(bad), encoding="utf-8")
    failed = cli_runner.invoke(cli, ["run", str(path), "--quiet"])  # before phase 1 generates anything
    assert failed.exit_code != 0 and "sft_export.written" in failed.output and not (tmp_path / "bad" / "sl").exists()
    exported = json.loads((tmp_path / "cli" / "sft-dataset" / "export.json").read_text())
    assert exported["written"] == 1 and exported["written_dropped"] == {
        "request is a near-copy of an evaluation prompt": 1
    }
    trained = json.loads((tmp_path / "cli" / "sft-model" / "cai_stage.json").read_text())
    assert trained["options"]["trl"]["seed"] == 3 and trained["options"]["trl"]["max_steps"] == 1


def test_the_feedback_model_serves_phase_one_phase_two_and_the_evaluation(
    cai_runtime, tiny_model, tiny_plain_model, tmp_path
):
    out = tmp_path / "fb"
    config = small(tiny_model, out)
    config.update(
        feedback_model=str(tiny_plain_model),
        stages=["sl", "eval"],
        eval={
            "limit": 1,
            "max_new_tokens": 4,
            "harm_score": False,
            "principle_rates": False,
            "judge_pairs": None,
            "classify_shots": 1,
        },
    )  # the tiny model's tokenizer is character-level
    lines = []
    summary = run_pipeline(config, runtime=cai_runtime, progress=False, echo=lines.append)
    record = json.loads((out / "sl" / "records.jsonl").read_text().splitlines()[0])
    assert record["provenance"]["models"]["sampler"] == str(tiny_model)
    assert record["provenance"]["models"]["critic"] == str(tiny_plain_model)
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["judge"]["model"] == str(tiny_plain_model) and results["warnings"] == []
    assert list(results["models"]) == ["base"]  # no SFT or policy checkpoint in this run
    assert set(summary["stage_seconds"]) == {"sl", "eval"}
    assert any(line.startswith("== evaluation (base; judge") for line in lines)


def test_the_shipped_teacher_student_config_is_valid_and_never_forces_the_gate():
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "teacher-student.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    config = PipelineConfig.model_validate(data)
    assert config.feedback_model == "qwen2.5-coder-1.5b" and config.model == "smollm2"
    assert config.gate and "eval" in config.stages
    assert "force" not in json.dumps(data)
