"""A plugin outside ``cai_engine`` does what a built-in does (issue #34).

The plugin below lives in this test module and imports only the public API. Its backend claims the model references
``echo:<name>`` and the folders its trainers write, and answers from a hash of the prompt without any model. Its
sampler, judge and trainers are picked by name from config, exactly as the built-ins are, and each is given the
run's model by the one rule (``with_model``: by the fields its options declare). Phase 1, phase 2, the evaluation and
the whole pipeline (``cai run``) run on it in seconds; every model loaded is served by the echo backend, including
the ones the built-in critic and reviser use.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import Field

from cai_engine import (
    DEFAULT_MODEL,
    Backend,
    ChatPrompt,
    GenerationSettings,
    Judge,
    Judgement,
    Options,
    PluginError,
    Registry,
    Runtime,
    Sampler,
    Score,
    Trainer,
    TrainingResult,
    hookimpl,
    make_plugin_manager,
)
from cai_engine.cli import cli
from cai_engine.evaluation.run import evaluate
from cai_engine.phase1.revise import run_sl
from cai_engine.phase2.labels import run_labels
from cai_engine.pipeline import run_pipeline
from cai_engine.store.runs import RunDirectory
from cai_engine.testing import use_cli_plugins

ECHO_MODEL = "echo-model.json"  # what the echo trainers write into a folder, and what the echo backend claims


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()


def _text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    messages = prompt.messages if isinstance(prompt, ChatPrompt) else prompt
    return "\n".join(m.content for m in messages) + (prompt.assistant_prefix if isinstance(prompt, ChatPrompt) else "")


class EchoBackend(Backend):
    """Serves ``echo:<name>`` and echo-trained folders: a reply is the model's name and a hash of the prompt."""

    name = "echo"

    @classmethod
    def claims(cls, ref, registry):
        return ref.startswith("echo:") or (Path(ref) / ECHO_MODEL).is_file()

    def generate(self, prompts, settings):
        return [
            f"[{self.options.model}] reply {_digest(self.options.model, _text(p), settings.seed)[:8]}" for p in prompts
        ]

    def continuation_logprobs(self, prompts, continuations):
        return [
            [-1.0 - int(_digest(self.options.model, _text(p), c)[:2], 16) / 64 for c in candidates]
            for p, candidates in zip(prompts, continuations)
        ]


class EchoSampler(Sampler):
    """Two or more takes of the backend's reply; its options are no ``ModelOptions``, only a ``model`` and a seed."""

    name = "echo.sampler"

    class Options(Options):
        model: str | dict[str, Any] = DEFAULT_MODEL
        seed: int | None = None

    def sample(self, conversations, n=1):
        backend = self.runtime.backend(self.options.model)
        texts = backend.generate(list(conversations), GenerationSettings(seed=self.options.seed))
        return [[f"{text} (take {k + 1})" for k in range(n)] for text in texts]

    def describe(self):
        return {**super().describe(), "model_id": self.runtime.backend(self.options.model).model_id}


class EchoJudge(Judge):
    """Prefers the reply its model gives the higher log-probability; scores every reply 7."""

    name = "echo.judge"

    class Options(Options):
        model: str | dict[str, Any] = DEFAULT_MODEL

    def compare(self, tasks):
        tasks = list(tasks)
        backend = self.runtime.backend(self.options.model)
        scored = backend.continuation_logprobs(
            [t.conversation for t in tasks], [[t.response_a, t.response_b] for t in tasks]
        )
        return [
            Judgement(
                principle_ids=[p.id for p in t.principles],
                p_a=0.75 if a >= b else 0.25,
                position_consistent=True,
                judge=self.name,
            )
            for t, (a, b) in zip(tasks, scored)
        ]

    def score(self, tasks):
        return [
            Score(principle_ids=[p.id for p in t.principles], value=7.0, reward=1 / 3, judge=self.name) for t in tasks
        ]

    def describe(self):
        return {**super().describe(), "model_id": self.runtime.backend(self.options.model).model_id}


class EchoTrainer(Trainer):
    """Writes a folder the echo backend serves, recording what it was given."""

    name = "echo.reward"
    task = "text-classification"

    class Options(Options):
        model: str = DEFAULT_MODEL
        constitution: str = "harmless"
        judge: dict[str, Any] = Field(default_factory=lambda: {"name": "echo.judge"})
        reward: str = "judge"

    def train(self, dataset, output_dir):
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        given = {"trainer": self.name, "dataset": str(dataset), **self.options.model_dump(mode="json")}
        (folder / ECHO_MODEL).write_text(json.dumps(given), encoding="utf-8")
        return TrainingResult(trainer=self.name, steps=1, seconds=0.0, checkpoint=str(folder), given=given)


class EchoSFTTrainer(EchoTrainer):
    name = "echo.sft"
    trains_on = "conversations"
    task = "text-generation"


class EchoOnlineTrainer(EchoTrainer):
    name = "echo.online"
    trains_on = "prompts"
    task = "text-generation"


class EchoPlugin:
    @hookimpl
    def cai_register_backends(self, register):
        register(EchoBackend)

    @hookimpl
    def cai_register_samplers(self, register):
        register(EchoSampler)

    @hookimpl
    def cai_register_judges(self, register):
        register(EchoJudge)

    @hookimpl
    def cai_register_trainers(self, register):
        register(EchoTrainer)
        register(EchoSFTTrainer)
        register(EchoOnlineTrainer)


@pytest.fixture
def loaded():
    """One line per model the runtime loads: ``model <id>: <backend's path summary>``."""
    return []


@pytest.fixture
def runtime(loaded):
    runtime = Runtime(Registry(make_plugin_manager(autoload=False, plugins=[EchoPlugin()])))
    runtime.announce = loaded.append
    yield runtime
    runtime.close()


def served_by_echo(loaded: list[str]) -> bool:
    return bool(loaded) and all(line.endswith(": echo") for line in loaded)


def test_the_plugin_backend_serves_the_references_it_claims(runtime, tmp_path):
    assert runtime.parse_model_ref("echo:policy") == ("echo", {"model": "echo:policy"})
    assert runtime.parse_model_ref({"model": "echo:policy"})[0] == "echo"
    (tmp_path / ECHO_MODEL).write_text("{}")
    assert runtime.parse_model_ref(str(tmp_path))[0] == "echo"
    assert runtime.model_problem("echo:policy") is None
    # the built-ins keep everything else
    assert runtime.parse_model_ref(DEFAULT_MODEL)[0] == "transformers"
    assert runtime.parse_model_ref("http://127.0.0.1:8000/v1#m")[0] == "openai"
    assert runtime.parse_model_ref({"backend": "echo", "model": DEFAULT_MODEL})[0] == "echo"
    # a built-in component takes the plugin's model reference like any other
    critic = runtime.component("critic", "model", {"model": "echo:teacher"})
    assert critic.describe()["model_id"] == "echo:teacher"


def test_phase_one_uses_the_plugin_sampler_and_backend(runtime, loaded, tmp_path):
    config = {
        "prompts": "builtin:red-team",
        "limit": 2,
        "rounds": 1,
        "helpful_limit": 1,
        "model": "echo:policy",
        "feedback_model": "echo:teacher",
        "seed": 5,
        "sampler": "echo.sampler",
        "critic": {"name": "model", "options": {"max_new_tokens": 16}},
        "reviser": {"name": "model", "options": {"max_new_tokens": 16}},
    }
    summary = run_sl(config, tmp_path / "sl", runtime=runtime, progress=False)
    assert summary["written"] >= 2
    records = [r.to_json() for r in RunDirectory(tmp_path / "sl", "sl").records()]
    for record in records:
        components = record["provenance"]["components"]
        assert components["sampler"]["name"] == "echo.sampler"
        assert components["sampler"]["options"] == {"model": "echo:policy", "seed": 5}  # by the fields it declares
        assert record["provenance"]["models"]["sampler"] == "echo:policy"
        assert record["initial_response"].startswith("[echo:policy] reply")
    red_team = [r for r in records if r["kind"] == "red-team"]
    assert red_team and all(r["provenance"]["models"]["critic"] == "echo:teacher" for r in red_team)
    assert served_by_echo(loaded)


def test_phase_two_labels_with_the_plugin_sampler_and_judge(runtime, loaded, tmp_path):
    config = {
        "prompts": "builtin:red-team",
        "limit": 3,
        "model": "echo:policy",
        "judge_model": "echo:teacher",
        "seed": 2,
        "sampler": "echo.sampler",
        "judge": "echo.judge",
    }
    summary = run_labels(config, tmp_path / "rl", runtime=runtime, progress=False)
    assert summary["pairs"] == 3 and summary["labelled"] == 3 and summary["position_consistency"] == 1.0
    for record in RunDirectory(tmp_path / "rl", "rl").records():
        assert record.response_a.startswith("[echo:policy] reply") and record.response_a != record.response_b
        assert record.judgement.judge == "echo.judge" and record.label in (0.25, 0.75)
        assert record.provenance["judge"]["options"] == {"model": "echo:teacher"}
        assert record.provenance["judge"]["model_id"] == "echo:teacher"
    assert served_by_echo(loaded)


def test_the_evaluation_uses_the_plugin_sampler_judge_and_scorer(runtime, loaded, tmp_path):
    config = {
        "models": ["echo:base", "echo:tuned"],
        "names": ["base", "tuned"],
        "judge_model": "echo:teacher",
        "limit": 2,
        "max_new_tokens": 8,
        "classify_shots": 1,
        "sampler": "echo.sampler",
        "judge": "echo.judge",
        "scorer": "echo.judge",
    }
    results = evaluate(config, tmp_path / "eval", runtime=runtime, progress=False)
    assert results["judge"] == {"model": "echo:teacher", "model_id": "echo:teacher"}
    assert set(results["models"]) == {"base", "tuned"}
    example = results["examples"][0]["responses"]
    assert example["base"].startswith("[echo:base] reply") and example["tuned"].startswith("[echo:tuned] reply")
    items = [json.loads(line) for line in (tmp_path / "eval" / "items.jsonl").read_text().splitlines()]
    assert {i["harm_score"] for i in items if i["set"] == "harmful"} == {7.0}  # the plugin judge scored them
    assert results["judge_quality"]["pairs"] > 0  # the plugin judge was measured on the labelled pairs
    assert served_by_echo(loaded)


def pipeline_config(out: Path) -> dict[str, Any]:
    return {
        "out": str(out),
        "model": "echo:policy",
        "feedback_model": "echo:teacher",
        "stages": ["sl", "sft", "rl", "reward", "policy", "eval"],
        "sl": {
            "limit": 2,
            "rounds": 1,
            "helpful_limit": 1,
            "sampler": "echo.sampler",
            "critic": {"name": "model", "options": {"max_new_tokens": 16}},
            "reviser": {"name": "model", "options": {"max_new_tokens": 16}},
        },
        "sft_trainer": "echo.sft",
        "rl": {"limit": 3, "sampler": "echo.sampler", "judge": "echo.judge"},
        "preference_export": {"heldout": 0.0},
        "reward_trainer": "echo.reward",
        "policy": {"trainer": "echo.online"},
        "eval": {
            "limit": 1,
            "max_new_tokens": 8,
            "classify_shots": 1,
            "judge_pairs": None,
            "sampler": "echo.sampler",
            "judge": "echo.judge",
            "scorer": "echo.judge",
        },
    }


def given(folder: Path) -> dict[str, Any]:
    return json.loads((folder / ECHO_MODEL).read_text())


def test_the_whole_pipeline_runs_on_the_plugin_and_resumes(runtime, loaded, tmp_path):
    out = tmp_path / "pipe"
    lines: list[str] = []
    summary = run_pipeline(pipeline_config(out), runtime=runtime, progress=False, echo=lines.append)
    sft, reward, policy = given(out / "sft-model"), given(out / "reward-model"), given(out / "echo.online-model")
    # each trainer got what its options declare and the data its trains_on says
    assert sft["model"] == "echo:policy" and sft["dataset"] == str(out / "sft-dataset")
    assert reward["dataset"] == str(out / "preference-dataset")
    assert policy["model"] == str(out / "sft-model") and policy["dataset"] == "builtin:red-team"
    assert policy["reward"] == str(out / "reward-model") and policy["constitution"] == "harmless"
    assert policy["judge"] == {"name": "echo.judge", "options": {"model": "echo:teacher"}}
    # phase 2 sampled with the SFT checkpoint, which the plugin backend serves
    record = next(RunDirectory(out / "rl", "rl").records())
    assert record.response_a.startswith(f"[{out / 'sft-model'}] reply")
    results = json.loads((out / "eval" / "results.json").read_text())
    assert list(results["models"]) == ["base", "sl-cai", "rl-cai"]
    assert summary["policy"]["checkpoint"] == str(out / "echo.online-model")
    assert served_by_echo(loaded)
    again: list[str] = []
    run_pipeline(pipeline_config(out), runtime=runtime, progress=False, echo=again.append)
    assert sum("exists; skipped" in line for line in again) == 3  # the pipeline's own marker, not the trainer's files


def test_cai_run_uses_the_plugin(cli_runner, tmp_path):
    use_cli_plugins(EchoPlugin())
    config = pipeline_config(tmp_path / "cli")
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = cli_runner.invoke(cli, ["run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"policy: {tmp_path / 'cli' / 'echo.online-model'} (1 steps" in result.output
    assert given(tmp_path / "cli" / "echo.online-model")["judge"]["options"] == {"model": "echo:teacher"}
    summary = json.loads((tmp_path / "cli" / "pipeline-summary.json").read_text())
    assert summary["eval"]["judged"]
    # `cai train` takes the plugin's trainer by name too
    result = cli_runner.invoke(
        cli, ["train", "echo.sft", "--dataset", "data", "--model", "echo:policy", "--out", str(tmp_path / "t")]
    )
    assert result.exit_code == 0, result.output
    assert f"checkpoint: {tmp_path / 't'} (1 steps" in result.output
    assert given(tmp_path / "t")["model"] == "echo:policy"


def test_the_built_in_backends_resolve_as_before(runtime, monkeypatch, tmp_path):
    monkeypatch.setattr("cai_engine.default_plugins.backends.llama_cpp.llama_cpp_available", lambda: True)
    assert runtime.parse_model_ref(str(tmp_path / "m.gguf"))[0] == "llamacpp"
    assert runtime.parse_model_ref("qwen2.5-coder-1.5b")[0] == "llamacpp"  # a catalogue model
    assert runtime.parse_model_ref(DEFAULT_MODEL)[0] == "transformers"  # the default stays on transformers
    assert runtime.parse_model_ref({"backend": "transformers", "model": str(tmp_path / "m.gguf")})[0] == "transformers"
    assert runtime.parse_model_ref({"model": "http://h/v1#m", "base_url": "http://other/v1"}) == (
        "openai",
        {"model": "http://h/v1#m", "base_url": "http://other/v1"},  # the mapping's own base_url wins
    )
    monkeypatch.setattr("cai_engine.default_plugins.backends.llama_cpp.llama_cpp_available", lambda: False)
    assert runtime.parse_model_ref(str(tmp_path / "m.gguf"))[0] == "transformers"
    assert runtime.model_problem("qwen2.5-coder-1.5b") == (
        "model 'qwen2.5-coder-1.5b' is not installed; run: cai models install qwen2.5-coder-1.5b"
    )
    missing = runtime.model_problem(str(tmp_path / "none"))
    assert missing.startswith(f"model {str(tmp_path / 'none')!r} does not exist; give a model folder")
    assert missing.endswith(f"{DEFAULT_MODEL!r}, or an http(s):// endpoint")
    assert runtime.model_problem(DEFAULT_MODEL) is None and runtime.model_problem("http://h/v1#m") is None
    assert runtime.model_problem({"model": "x"}) is not None and "needs a 'model'" in runtime.model_problem({})


def test_a_trainer_that_returns_the_old_summary_dict_still_gives_a_result():
    """Trainers written before ``TrainingResult`` returned a dict; it is read as one, missing facts left unknown."""
    result = TrainingResult.of({"steps": 3, "loss": 0.5}, trainer="legacy", checkpoint="out/legacy")
    assert (result.trainer, result.checkpoint, result.steps, result.seconds) == ("legacy", "out/legacy", 3, None)
    assert result["loss"] == 0.5
    with pytest.raises(PluginError, match="legacy.*returned str"):
        TrainingResult.of("done", trainer="legacy", checkpoint="out/legacy")
