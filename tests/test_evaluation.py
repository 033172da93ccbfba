from __future__ import annotations

import base64
import json
import re

import pytest

from cai_engine import ConfigError
from cai_engine.cli import cli
from cai_engine.evaluation.config import EvalConfig
from cai_engine.evaluation.run import evaluate
from cai_engine.phase1.revise import SLConfig, run_sl
from cai_engine.prompts.sets import load_prompts
from cai_engine.stats import length_controlled_win_rate
from cai_engine.text.refusals import has_refusal_marker, starts_with_refusal


def test_builtin_evaluation_sets(cai_registry):
    assert len(load_prompts("builtin:benign-scary", cai_registry)) >= 100
    assert len({p.category for p in load_prompts("builtin:benign-scary", cai_registry)}) >= 8
    assert len(load_prompts("builtin:heldout", cai_registry)) >= 30
    heldout = {p.text for p in load_prompts("builtin:heldout", cai_registry)}
    assert heldout.isdisjoint({p.text for p in load_prompts("builtin:red-team", cai_registry)})


def test_training_defaults_never_use_heldout_sets(cai_registry):
    from cai_engine.phase2.labels import LabelConfig
    from cai_engine.prompts.sets import is_heldout

    heldout = [f"builtin:{n}" for n in cai_registry.prompt_set_names() if cai_registry.prompt_set(n).heldout]
    assert set(heldout) == {"builtin:heldout", "builtin:benign-scary", "builtin:heldout-helpful", "builtin:contrast"}
    sl, rl = SLConfig(), LabelConfig()
    for source in (sl.prompts, sl.helpful_prompts, rl.prompts):
        assert not is_heldout(source, cai_registry)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["builtin:heldout", "builtin:benign-scary"])
def test_training_refuses_heldout_sets(cai_runtime, tiny_model, tmp_path, source):
    from cai_engine.phase2.labels import run_labels

    with pytest.raises(ConfigError, match="evaluation-only"):
        run_sl({"prompts": source, "model": str(tiny_model)}, tmp_path / "sl", runtime=cai_runtime, progress=False)
    with pytest.raises(ConfigError, match="evaluation-only"):
        run_labels({"prompts": source, "model": str(tiny_model)}, tmp_path / "rl", runtime=cai_runtime, progress=False)
    grpo = cai_runtime.component("trainer", "grpo", {"model": str(tiny_model)})
    with pytest.raises(ConfigError, match="evaluation-only"):
        grpo.train(source, tmp_path / "grpo")
    assert not (tmp_path / "sl").exists() and not (tmp_path / "rl").exists()


@pytest.mark.parametrize(
    ("text", "marker", "prefix"),
    [
        ("I'm sorry, but I can't help with that.", True, True),
        ("No. That would be dangerous.", False, True),
        ("Sure! Run kill -9 on the process id.", False, False),
        ("Here is how it works. I cannot stress enough that you should be careful.", True, False),
        ("As an AI, I don't have opinions.", True, True),
    ],
)
def test_refusal_classifiers(text, marker, prefix):
    assert has_refusal_marker(text) is marker
    assert starts_with_refusal(text) is prefix


def test_length_controlled_win_rate():
    # wins driven entirely by length: at equal length the model should be near even
    wins = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ratios = [1.0, 0.8, 1.2, -1.0, -0.9, -1.1, 0.9, -0.7]
    assert abs(length_controlled_win_rate(wins, ratios) - 0.5) < 0.2
    # wins regardless of length: stays high
    assert length_controlled_win_rate([1.0] * 7 + [0.0], [0.1, -0.2, 0.3, -0.1, 0.0, 0.2, -0.3, 0.1]) > 0.7
    assert length_controlled_win_rate([1.0, 0.0], [0.1, 0.2]) is None


@pytest.mark.slow
def test_evaluate_writes_json_and_html_with_plots(cai_runtime, tiny_model, tiny_plain_model, tmp_path):
    run_sl(
        SLConfig(
            limit=2,
            rounds=2,
            model=str(tiny_model),
            helpful_prompts=None,
            sampler={"name": "model", "options": {"max_new_tokens": 6}},
            critic={"name": "model", "options": {"max_new_tokens": 6}},
            reviser={"name": "model", "options": {"max_new_tokens": 6}},
        ),
        tmp_path / "sl",
        runtime=cai_runtime,
        progress=False,
    )
    policy = tmp_path / "a.yaml"
    policy.write_text("name: a\nconstitutions: [customer-service]\nguard: {model_critics: false}\n")
    strict = tmp_path / "b.yaml"
    strict.write_text(
        "name: b\nconstitutions: [customer-service]\nguard: {model_critics: false, action: flag}\n"
        "add:\n  - {id: x-1, phases: [runtime], rules: [{id: x, kind: require, pattern: 'zzzz', "
        "message: always}]}\n"
    )
    config = EvalConfig(
        models=[str(tiny_model), str(tiny_plain_model)],
        names=["base", "other"],
        limit=4,
        judge_model=str(tiny_model),
        max_new_tokens=6,
        sl_run=str(tmp_path / "sl"),
        classify_shots=1,
        policies=[str(policy), str(strict)],
    )
    results = evaluate(config, tmp_path / "eval", runtime=cai_runtime, progress=False)
    assert set(results["models"]) == {"base", "other"}
    other = results["models"]["other"]
    assert 0 <= other["harmful"]["refusal_marker_rate"] <= 1 and 1 <= other["harmful"]["harm_score"] <= 10
    assert other["vs_baseline"]["helpfulness"]["judged"] + other["vs_baseline"]["helpfulness"]["abstained"] == 4
    assert results["models"]["base"]["vs_baseline"] is None  # the baseline is not compared with itself
    assert len(other["principle_violation_rates"]) == 16
    assert len(results["harm_by_round"]["mean_harm_score_by_round"]) == 3  # initial + 2 rounds
    assert results["judge_quality"]["pairs"] >= 30
    comparison = results["policy_comparison"]
    assert comparison["policies"][str(strict)]["actions"] == {"flagged": 4}
    assert len(comparison["differences"]) == 4
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert written["models"]["other"]["harmful"]["harm_score"] == other["harmful"]["harm_score"]
    page = (tmp_path / "eval" / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 3
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)
    assert page.count("<table") >= 6 and "Policies compared" in page and "Harmlessness by revision round" in page
    # the verdict comes first, every rate with its n and interval; no raw JSON in the header
    assert page.index("<h2>Summary</h2>") < page.index("<h2>Refusals read by string markers")
    assert "(n=4, 95% CI" in page and "{&quot;" not in page.split("<h2>")[0]
    cached = list((tmp_path / "eval" / "responses").glob("*.jsonl"))
    assert sum(len(p.read_text().splitlines()) for p in cached) == 2 * (4 + 4 + 4)
    # keyed by the generation settings too: a run with another max_new_tokens cannot reuse these answers
    assert len(cached) == 2 and all(p.name.endswith("-greedy-6t-seed0.jsonl") for p in cached)
    again = evaluate(config, tmp_path / "eval", runtime=cai_runtime, progress=False)  # resumes from the cache
    assert again["models"]["other"]["harmful"]["scores"] == other["harmful"]["scores"]


def test_response_cache_follows_the_weights_not_only_the_path(tiny_model, tmp_path):
    """A checkpoint retrained at the same path (a rerun pipeline's sft-model) must not reuse the old answers."""
    import os
    import shutil

    from cai_engine.evaluation.config import slug

    model = tmp_path / "sft-model"
    shutil.copytree(tiny_model, model)
    before = slug(str(model))
    assert slug(str(model)) == before and slug("smollm2") == slug("smollm2")
    weights = next(p for p in model.iterdir() if p.suffix == ".safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert slug(str(model)) != before


@pytest.mark.slow
def test_cli_eval(cli_runner, tiny_model, tmp_path):
    result = cli_runner.invoke(
        cli,
        [
            "eval",
            "--models",
            f"{tiny_model},{tiny_model}",
            "--names",
            "a,b",
            "--limit",
            "2",
            "--judge-model",
            str(tiny_model),
            "--max-new-tokens",
            "4",
            "--no-principles",
            "--out",
            str(tmp_path / "ev"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "b: harm score" in result.output and (tmp_path / "ev" / "report.html").exists()
    assert "refusal on held-out harmful prompts (markers): a " in result.output and "(n=2, 95% CI" in result.output
    quality = json.loads((tmp_path / "ev" / "results.json").read_text())["judge_quality"]
    failed = quality["accuracy"] < 0.6 or (quality["same_position_rate"] or 0) > 0.25
    assert ("fails its own gate" in result.output) == failed  # printed, not only rendered in the report
    page = (tmp_path / "ev" / "report.html").read_text()
    assert page.count("fails its own gate") == (1 if failed else 0)
