"""The whole pipeline from one config: phase 1 -> SFT -> phase 2 labels -> judge gate -> preference model -> RL.

Every stage writes into ``out``; rerunning resumes runs and skips stages whose outputs exist, so a killed pipeline
continues where it stopped. :func:`run_pipeline` returns what each stage did, a
:class:`~cai_engine.records.PipelineSummary`, and writes it as ``pipeline-summary.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai_engine.evaluation.config import EvalConfig
from cai_engine.files.jsonl import write_json
from cai_engine.models.runtime import DEFAULT_MODEL, ModelRef, Runtime
from cai_engine.phase1.export import ExportOptions, export_sft
from cai_engine.phase1.revise import SLConfig, run_sl
from cai_engine.phase2.gate import run_gate
from cai_engine.phase2.labels import RLConfig, run_labels
from cai_engine.phase2.preferences import PreferenceExportOptions, export_preferences
from cai_engine.records import EvalSummary, PipelineSummary

STAGES = ("sl", "sft", "rl", "reward", "policy")
ALL_STAGES = (*STAGES, "eval")


class TrainerStage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trainer: str = Field(description="A registered trainer name.")
    options: dict[str, Any] = Field(default_factory=dict, description="The trainer's options (e.g. trl: {...}).")


class PipelineEvalConfig(EvalConfig):
    """The pipeline's ``eval`` section: the settings of ``cai eval``, whose models default to the pipeline's own."""

    models: list[ModelRef] = Field(
        default_factory=list,
        description="Models to compare; default: the base model, then the SL-CAI and RL-CAI checkpoints (those this "
        "run trains, or an earlier run left in `out`).",
    )


class PipelineConfig(BaseModel):
    """One file for both phases. Sections take the same settings as `cai sl`, `cai export`, `cai rl label`, `cai train`
    and `cai eval`; the shared values (constitution, model, feedback model, the phase-1 run) are filled into the
    sections that leave them unset, so a section's error names the section and field before anything loads."""

    model_config = ConfigDict(extra="forbid")

    out: str = Field("runs/pipeline", description="Folder for every stage's outputs.")
    model: ModelRef = Field(DEFAULT_MODEL, description="The base model (the policy that is trained).")
    feedback_model: ModelRef | None = Field(
        None,
        description="The feedback model: critic, reviser and verifier in phase 1, judge in phase 2 and in "
        "the evaluation (e.g. 'qwen2.5-coder-1.5b'). None: the base model does everything.",
    )
    constitution: str = Field("harmless", description="Constitution for both phases.")
    stages: list[Literal["sl", "sft", "rl", "reward", "policy", "eval"]] = Field(
        default_factory=lambda: list(STAGES),  # type: ignore[arg-type]
        description="Which stages to run, in pipeline order.",
    )
    sl: SLConfig = Field(
        default_factory=SLConfig,
        description="SL-CAI settings (as `cai sl`); constitution, model and feedback_model default to the pipeline's.",
    )
    sft_export: ExportOptions = Field(default_factory=ExportOptions, description="SFT export settings.")
    sft: dict[str, Any] = Field(default_factory=dict, description="Options of the `sft` trainer.")
    rl: RLConfig = Field(
        default_factory=RLConfig,
        description="Labelling settings (as `cai rl label`); the policy defaults to the SFT checkpoint, the judge "
        "model to the feedback model and sl_run to the pipeline's phase-1 run.",
    )
    gate: bool = Field(True, description="Measure the judge before exporting its labels.")
    preference_export: PreferenceExportOptions = Field(
        default_factory=PreferenceExportOptions, description="Preference export settings."
    )
    reward: dict[str, Any] = Field(default_factory=dict, description="Options of the `reward` trainer.")
    policy: TrainerStage = Field(
        default_factory=lambda: TrainerStage(trainer="grpo"),
        description="The RL (or DPO) stage; grpo uses the reward model when it exists.",
    )
    eval: PipelineEvalConfig = Field(
        default_factory=PipelineEvalConfig,
        description="`cai eval` settings for the eval stage; it "
        "compares base -> SL-CAI -> RL-CAI, judged by "
        "the feedback model.",
    )

    @model_validator(mode="before")
    @classmethod
    def _shared_values(cls, data: Any) -> Any:
        """Fill the pipeline's shared values into the stage sections that leave them unset."""
        if not isinstance(data, dict):
            return data
        defaults = cls.model_fields
        model = data.get("model", defaults["model"].default)
        feedback = data.get("feedback_model") or model
        constitution = data.get("constitution", defaults["constitution"].default)
        out = Path(data.get("out", defaults["out"].default))
        shared = {
            "sl": {"constitution": constitution, "model": model, "feedback_model": data.get("feedback_model")},
            "rl": {"constitution": constitution, "judge_model": feedback, "sl_run": str(out / "sl")},
            "eval": {"constitution": constitution, "judge_model": feedback},
        }
        filled = dict(data)
        for name, values in shared.items():
            section = data.get(name, {})
            if isinstance(section, BaseModel):  # a section built in Python: what it set, over the shared values
                section = section.model_dump(exclude_unset=True)
            if isinstance(section, dict):
                filled[name] = {**values, **section}
        return filled


def _done(folder: Path) -> bool:
    return (folder / "cai_training.json").exists()


def run_pipeline(
    config: PipelineConfig | dict[str, Any], *, runtime: Runtime | None = None, progress: bool = True, echo=print
) -> PipelineSummary:
    """Run (or resume) the stages ``config`` names (``config`` may be its JSON form), printing progress with
    ``echo``; returns what each stage did this time, also written as ``out/pipeline-summary.json``."""
    config = config if isinstance(config, PipelineConfig) else PipelineConfig.model_validate(config)
    import time

    from cai_engine.evaluation.run import evaluate

    runtime = runtime or Runtime.default()
    out = Path(config.out)
    feedback = config.feedback_model or config.model
    # The sections were validated with the config; the trainers validate their own options, here, before any model
    # loads.
    sl_config = config.sl
    sft_dir, sft_options = out / "sft-model", {"model": config.model, **config.sft}
    runtime.component("trainer", "sft", sft_options)
    policy_model = str(sft_dir) if "sft" in config.stages or _done(sft_dir) else config.model
    rl_config = _unless_set(config.rl, model=policy_model)
    reward_dir, reward_options = out / "reward-model", {"model": config.model, **config.reward}
    runtime.component("trainer", "reward", reward_options)
    policy_options = {"model": policy_model, **config.policy.options}
    if config.policy.trainer == "grpo":
        policy_options.setdefault("constitution", config.constitution)
        policy_options.setdefault("judge", {"name": "pointwise", "options": {"model": feedback}})
        if "reward" in config.stages or _done(reward_dir):
            policy_options.setdefault("reward", str(reward_dir))
    runtime.component("trainer", config.policy.trainer, policy_options)
    policy_dir = out / f"{config.policy.trainer}-model"
    eval_models = [("base", config.model)]
    if "sft" in config.stages or _done(sft_dir):
        eval_models.append(("sl-cai", str(sft_dir)))
    if "policy" in config.stages or _done(policy_dir):
        eval_models.append(("rl-cai", str(policy_dir)))
    eval_config = _unless_set(config.eval, models=[m for _, m in eval_models], names=[n for n, _ in eval_models])
    summary = PipelineSummary(out=str(out))
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        summary.stage_seconds[stage] = round(now - clock, 1)
        echo(f"   {stage}: {now - clock:.0f} s")
        clock = now

    if "sl" in config.stages:
        echo("== phase 1: SL-CAI")
        summary.sl = run_sl(sl_config, out / "sl", runtime=runtime, progress=progress)
        summary.sft_dataset = export_sft(out / "sl", out / "sft-dataset", config.sft_export)
        lap("sl")
    if "sft" in config.stages:
        runtime.close()  # free the generation models (a 1.5B feedback model is GBs) before training
        echo("== supervised fine-tuning")
        if _done(sft_dir):
            echo(f"   {sft_dir} exists; skipped")
        else:
            summary.sft = runtime.component("trainer", "sft", sft_options).train(out / "sft-dataset", sft_dir)
        lap("sft")
    if "rl" in config.stages:
        echo("== phase 2: preference labels")
        if config.gate and not (out / "rl" / "gate.json").exists():
            gate = run_gate(
                out / "rl",
                rl_config.judge_ref(),
                constitution=config.constitution,
                runtime=runtime,
                seed=rl_config.seed,
            )
            summary.gate = gate
            echo(f"   judge gate: accuracy {gate.accuracy}, position consistency {gate.position_consistency}")
        summary.rl = run_labels(rl_config, out / "rl", runtime=runtime, progress=progress)
        summary.preference_dataset = export_preferences(
            out / "rl", out / "preference-dataset", config.preference_export
        )
        lap("rl")
    if "reward" in config.stages:
        runtime.close()
        echo("== preference model")
        if _done(reward_dir):
            echo(f"   {reward_dir} exists; skipped")
        else:
            summary.reward = runtime.component("trainer", "reward", reward_options).train(
                out / "preference-dataset", reward_dir
            )
        lap("reward")
    if "policy" in config.stages:
        runtime.close()
        echo(f"== policy optimisation ({config.policy.trainer})")
        if _done(policy_dir):
            echo(f"   {policy_dir} exists; skipped")
        else:
            data = (
                out / "preference-dataset"
                if config.policy.trainer != "grpo"
                else config.policy.options.get("prompts", sl_config.prompt_sources[0])
            )
            trainer = runtime.component("trainer", config.policy.trainer, policy_options)
            summary.policy = trainer.train(data, policy_dir)
        lap("policy")
    if "eval" in config.stages:
        echo(f"== evaluation ({', '.join(n for n, _ in eval_models)}; judge {feedback})")
        results = evaluate(eval_config, out / "eval", runtime=runtime, progress=progress)
        summary.eval = EvalSummary(
            results=str(out / "eval" / "results.json"),
            report=str(out / "eval" / "report.html"),
            judged={name: entry.judged for name, entry in results.models.items()},
        )
        lap("eval")
    (out / "pipeline-summary.json").parent.mkdir(parents=True, exist_ok=True)
    write_json(out / "pipeline-summary.json", summary)
    return summary


Section = TypeVar("Section", bound=BaseModel)


def _unless_set(section: Section, **values: Any) -> Section:
    """``section`` with ``values`` for the fields its config left unset (what the pipeline decides as it runs)."""
    return section.model_copy(update={k: v for k, v in values.items() if k not in section.model_fields_set})
