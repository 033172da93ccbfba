"""Sharded phase-1 and labelling runs: a deterministic split by prompt id, `cai merge`, and shards run as Ray tasks.

The merged run must equal the unsharded run with the same seeds (greedy decoding, one item per batch so that
padding cannot differ between the two).
"""

from __future__ import annotations

import json

import pytest

from cai_engine import ConfigError, RunError
from cai_engine.cli import cli
from cai_engine.phase1.revise import run_sl
from cai_engine.stages import merge, run_sharded
from cai_engine.store.runs import RunDirectory
from cai_engine.store.shards import Shard, merge_runs, shard_dirs

pytestmark = pytest.mark.slow

PROMPTS = [f"Tell me about thing number {i}." for i in range(10)]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def sl_config(tiny_model, prompt_file):
    greedy = {"max_new_tokens": 6, "temperature": 0.0}
    return {
        "prompts": str(prompt_file),
        "rounds": 1,
        "model": str(tiny_model),
        "batch_size": 1,
        "helpful_limit": 3,
        "helpful_prompts": str(prompt_file),
        "allow_heldout": False,
        "sampler": {"name": "model", "options": greedy},
        "critic": {"name": "model", "options": {"max_new_tokens": 6}},
        "reviser": {"name": "model", "options": {"max_new_tokens": 6}},
    }


def contents(run_dir, kind="sl"):
    """Each record's JSON form by key, without the time it was written."""
    return {
        r.key: {k: v for k, v in r.to_json().items() if k != "created"} for r in RunDirectory(run_dir, kind).records()
    }


def test_shards_partition_the_ids():
    ids = [f"id-{i}" for i in range(200)]
    owners = [[s for s in range(4) if Shard(index=s, count=4).owns(i)] for i in ids]
    assert all(len(o) == 1 for o in owners)  # every id in exactly one shard ...
    assert all(20 < sum(o == [s] for o in owners) < 80 for s in range(4))  # ... and the shards are balanced
    assert str(Shard.parse("1/4")) == "1/4"
    for bad in ("4/4", "a/b", "1", "-1/2"):
        with pytest.raises(ConfigError, match="i/n"):
            Shard.parse(bad)


def test_merged_shards_equal_the_unsharded_run(cai_runtime, tiny_model, prompt_file, tmp_path):
    config = sl_config(tiny_model, prompt_file)
    run_sl(config, tmp_path / "whole", runtime=cai_runtime, progress=False)
    merged = run_sharded("sl", config, tmp_path / "merged", 2, executor="local")
    assert merged["shards"] == 2 and merged["records"] == len(contents(tmp_path / "whole"))
    sizes = [len(contents(folder)) for folder in shard_dirs(tmp_path / "merged", 2)]
    assert sum(sizes) == merged["records"] and all(sizes)  # each shard did part of the work
    assert contents(tmp_path / "merged") == contents(tmp_path / "whole")
    # the merged folder is an ordinary run: it exports like one
    result = cli_runner_invoke(["export", "sft", str(tmp_path / "merged"), "--out", str(tmp_path / "ds")])
    assert result.exit_code == 0, result.output


def cli_runner_invoke(args):
    from click.testing import CliRunner

    return CliRunner().invoke(cli, args)


def test_merge_refuses_mismatched_incomplete_or_repeated_shards(cai_runtime, tiny_model, prompt_file, tmp_path):
    config = sl_config(tiny_model, prompt_file)
    for index in range(2):
        run_sl({**config, "shard": f"{index}/2"}, tmp_path / f"s{index}", runtime=cai_runtime, progress=False)
    run_sl({**config, "shard": "1/2", "seed": 5}, tmp_path / "other", runtime=cai_runtime, progress=False)
    with pytest.raises(RunError, match="missing"):
        merge_runs(tmp_path / "m1", [tmp_path / "s0"])
    with pytest.raises(RunError, match="both shard 0/2"):
        merge_runs(tmp_path / "m2", [tmp_path / "s0", tmp_path / "s0"])
    with pytest.raises(RunError, match="different config.*seed"):
        merge_runs(tmp_path / "m3", [tmp_path / "s0", tmp_path / "other"])
    run_sl(config, tmp_path / "whole", runtime=cai_runtime, progress=False)
    with pytest.raises(RunError, match="not a shard"):
        merge_runs(tmp_path / "m4", [tmp_path / "whole"])
    result = cli_runner_invoke(["merge", str(tmp_path / "ok"), str(tmp_path / "s1"), str(tmp_path / "s0")])
    assert result.exit_code == 0 and "merged 2 sl shards" in result.output
    assert contents(tmp_path / "ok") == contents(tmp_path / "whole")


def test_labelling_shards_merge_with_the_gate(cai_runtime, tiny_model, prompt_file, tmp_path):
    from cai_engine.phase2.labels import run_labels

    run_sl(sl_config(tiny_model, prompt_file), tmp_path / "sl", runtime=cai_runtime, progress=False)
    config = {
        "recipe": "revision",
        "sl_run": str(tmp_path / "sl"),
        "model": str(tiny_model),
        "batch_size": 1,
        "judge": {"name": "logprob", "options": {"model": str(tiny_model), "few_shot": 0}},
    }
    run_labels(config, tmp_path / "whole", runtime=cai_runtime, progress=False)
    for index in range(2):
        run_labels({**config, "shard": f"{index}/2"}, tmp_path / f"r{index}", runtime=cai_runtime, progress=False)
    (tmp_path / "r0" / "gate.json").write_text(json.dumps({"pairs": 1, "scored": 1, "abstained": 0}))
    merge_runs(tmp_path / "merged", [tmp_path / "r0", tmp_path / "r1"])
    whole, merged = contents(tmp_path / "whole", "rl"), contents(tmp_path / "merged", "rl")
    assert whole.keys() == merged.keys() and whole
    for key in whole:
        assert merged[key]["label"] == pytest.approx(whole[key]["label"], abs=1e-4)
        assert merged[key]["response_a"] == whole[key]["response_a"]
    assert (tmp_path / "merged" / "gate.json").exists()


def test_shards_run_as_ray_tasks(tiny_model, prompt_file, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")
    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    config = sl_config(tiny_model, prompt_file)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        merged = run_sharded("sl", config, tmp_path / "merged", 2, executor="ray")
    finally:
        ray.shutdown()
    run_sl(config, tmp_path / "whole", progress=False)
    assert merged["shards"] == 2
    assert contents(tmp_path / "merged") == contents(tmp_path / "whole")


def test_evaluation_shards_merge_to_the_same_metrics(cai_runtime, tiny_model, tiny_plain_model, tmp_path):
    """A shard runs a subset of the prompts, so with batches of several prompts its batches (and their padding and
    shared prefixes) would differ from the whole run's, and greedy answers and scores with them by rounding, an
    amount that depends on the CPU. One prompt per forward pass (batch_size 1, as in the SL tests above) makes each
    prompt's arithmetic the same in both runs, so the merged metrics equal the whole run's by construction."""
    from cai_engine.evaluation.run import evaluate

    def one_at_a_time(model):
        return {"model": str(model), "batch_size": 1}

    config = {
        "models": [one_at_a_time(tiny_model), one_at_a_time(tiny_plain_model)],
        "names": ["base", "other"],
        "limit": 6,
        "judge_model": one_at_a_time(tiny_model),
        "max_new_tokens": 6,
        "classify_shots": 1,
        "classify_all_refusals": True,
        "judge_pairs": None,
    }
    whole = evaluate(config, tmp_path / "whole", runtime=cai_runtime, progress=False)
    shards = []
    for index in range(2):
        evaluate({**config, "shard": f"{index}/2"}, tmp_path / f"e{index}", runtime=cai_runtime, progress=False)
        shards.append(tmp_path / f"e{index}")
    summary = merge(tmp_path / "merged", shards)
    assert summary["kind"] == "eval" and summary["shards"] == 2
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["prompt_counts"] == whole["prompt_counts"]
    for name in ("base", "other"):
        a, b = merged["models"][name], whole["models"][name]
        assert a["evasiveness"] == b["evasiveness"] and a["mean_length"] == pytest.approx(b["mean_length"])
        assert a["harmful"]["harm_score"] == pytest.approx(b["harmful"]["harm_score"], abs=1e-4)
        assert a["over_refusal"] == b["over_refusal"] and a["refusal_on_harmful"] == b["refusal_on_harmful"]
        assert a["judged"]["harmful_verdicts"] == b["judged"]["harmful_verdicts"]
        assert a["principle_violation_rates"] == pytest.approx(b["principle_violation_rates"], abs=1e-6)
    versus_a, versus_b = merged["models"]["other"]["vs_baseline"], whole["models"]["other"]["vs_baseline"]
    for aspect in ("harmlessness", "helpfulness"):
        assert versus_a[aspect]["win_rate_ci"] == versus_b[aspect]["win_rate_ci"]
        assert versus_a[aspect]["soft_win_rate"] == pytest.approx(versus_b[aspect]["soft_win_rate"], abs=1e-4)
    assert (tmp_path / "merged" / "report.html").exists()
    with pytest.raises(RunError, match="0..n-1"):
        merge(tmp_path / "merged-again", shards[:1])


def test_the_cli_runs_and_merges_shards(tiny_model, prompt_file, tmp_path):
    common = ["--prompts", str(prompt_file), "--model", str(tiny_model), "--rounds", "1", "--batch-size", "1"]
    result = cli_runner_invoke(
        [
            "sl",
            *common,
            "--helpful-prompts",
            "none",
            "--out",
            str(tmp_path / "sl"),
            "--shards",
            "2",
            "--executor",
            "local",
        ]
    )
    assert result.exit_code == 0, result.output
    assert "merged 2 shards (10 records)" in result.output and "red-team items: 10" in result.output
    result = cli_runner_invoke(
        [
            *["rl", "label", "--recipe", "revision", "--sl-run", str(tmp_path / "sl"), "--model", str(tiny_model)],
            *["--no-gate", "--out", str(tmp_path / "rl"), "--shards", "2", "--executor", "local", "--batch-size", "2"],
        ]
    )
    assert result.exit_code == 0, result.output
    assert "merged 2 shards" in result.output
    assert len(list(RunDirectory(tmp_path / "rl", "rl").records())) == len(
        [r for r in RunDirectory(tmp_path / "sl", "sl").records() if r.revised]
    )
    bad = cli_runner_invoke(["sl", *common, "--out", str(tmp_path / "x"), "--shard", "2/2"])
    assert bad.exit_code == 1 and "0 <= i < n" in bad.output
