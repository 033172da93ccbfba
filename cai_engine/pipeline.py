"""The whole pipeline from one config: phase 1 -> SFT -> phase 2 labels -> judge gate -> preference model -> RL.

Every stage writes into ``out``; rerunning resumes runs and skips training stages whose folder is marked done
(``cai_stage.json``, written once the trainer returns), so a killed pipeline continues where it stopped. Every
component, built-in or from a plugin, is picked by name from the config and given its model by one rule
(``with_model``); a trainer gets the data its ``trains_on`` says. :func:`run_pipeline` returns what each stage did,
a :class:`~cai_engine.records.PipelineSummary`, and writes it as ``pipeline-summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai_engine.classifiers.decisions import DecisionOptions, decision_requests, export_decisions, mix_with_decisions
from cai_engine.errors import ConfigError
from cai_engine.evaluation.config import EvalConfig
from cai_engine.files.jsonl import write_json
from cai_engine.models.options import with_model
from cai_engine.models.runtime import DEFAULT_MODEL, ModelRef, Runtime
from cai_engine.phase1.export import ExportOptions, export_sft, read_written
from cai_engine.phase1.revise import SLConfig, run_sl
from cai_engine.phase2.gate import run_gate
from cai_engine.phase2.labels import LabelConfig, run_labels
from cai_engine.phase2.preferences import PreferenceExportOptions, export_preferences
from cai_engine.plugins.refs import ComponentRef
from cai_engine.prompts.overlap import evaluation_texts
from cai_engine.records import EvalSummary, PipelineSummary, TrainingResult
from cai_engine.store.machine import machine_record
from cai_engine.store.runs import now

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
    seed: int | None = Field(
        None,
        description="One seed for every stage: phase-1 draws and sampling, the SFT export's mix, labelling, the "
        "evaluation, and training (TRL's `seed`, or a trainer's own `seed` option); a value a section sets itself "
        "wins. None: each section's own default. Run a recipe with several seeds to see its spread.",
    )
    stages: list[Literal["sl", "sft", "rl", "reward", "policy", "eval"]] = Field(
        default_factory=lambda: list(STAGES),  # type: ignore[arg-type]
        description="Which stages to run, in pipeline order.",
    )
    sl: SLConfig = Field(
        default_factory=SLConfig,
        description="SL-CAI settings (as `cai sl`); constitution, model and feedback_model default to the pipeline's.",
    )
    sft_export: ExportOptions = Field(default_factory=ExportOptions, description="SFT export settings.")
    decisions: DecisionOptions | None = Field(
        None,
        description="Decision targets (the settings of `cai export decisions`) added to the SFT stage's data: a "
        "written decline for each harmful labelled request, the policy's own answer for each harmless one. The SFT "
        "stage then trains on `sft-mix`: phase 1's export where `out` has one (phase 1 ran, now or before) and these; "
        "a request both have a target for keeps phase 1's where they agree with its label, else the decision target. "
        "Pair it with `sft: {decision_weight: 10}` so the loss weighs each reply's opening (phase 1's replies' too, "
        "and the loss is then on the replies only). model and seed default to the pipeline's. None (or an empty "
        "`decisions:` line): phase 1's targets only; `{}`: the defaults.",
    )
    sft_trainer: str = Field("sft", description="The trainer of the SFT stage (a registered trainer name).")
    sft: dict[str, Any] = Field(default_factory=dict, description="Options of the SFT stage's trainer.")
    rl: LabelConfig = Field(
        default_factory=LabelConfig,
        description="Labelling settings (as `cai rl label`); the policy defaults to the SFT checkpoint, the judge "
        "model to the feedback model and sl_run to the pipeline's phase-1 run.",
    )
    gate: bool = Field(True, description="Measure the judge before exporting its labels.")
    preference_export: PreferenceExportOptions = Field(
        default_factory=PreferenceExportOptions, description="Preference export settings."
    )
    reward_trainer: str = Field(
        "reward", description="The trainer of the preference-model stage (a registered trainer name)."
    )
    reward: dict[str, Any] = Field(default_factory=dict, description="Options of the preference-model trainer.")
    policy: TrainerStage = Field(
        default_factory=lambda: TrainerStage(trainer="grpo"),
        description="The RL (or DPO) stage. A trainer with a `reward` option gets the preference model when it "
        "exists; one that trains on prompts gets `prompts` from its options, else phase 1's first prompt source.",
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
        shared: dict[str, dict[str, Any]] = {
            "sl": {"constitution": constitution, "model": model, "feedback_model": data.get("feedback_model")},
            "rl": {"constitution": constitution, "judge_model": feedback, "sl_run": str(out / "sl")},
            "eval": {"constitution": constitution, "judge_model": feedback},
        }
        if data.get("seed") is not None:
            for name in ("sl", "rl", "eval"):
                shared[name]["seed"] = data["seed"]
            shared["sft_export"] = {"seed": data["seed"]}
        if data.get("decisions") is not None:  # None keeps the section off
            shared["decisions"] = {"model": model, **({"seed": data["seed"]} if data.get("seed") is not None else {})}
        filled = dict(data)
        for name, values in shared.items():
            section = data.get(name, {})
            if isinstance(section, BaseModel):  # a section built in Python: what it set, over the shared values
                section = section.model_dump(exclude_unset=True)
            if isinstance(section, dict):
                filled[name] = {**values, **section}
        return filled


STAGE_MARKER = "cai_stage.json"


def _done(folder: Path) -> bool:
    """Whether a training stage finished into ``folder``: the pipeline marked it after its trainer returned. A
    folder trained before the pipeline wrote markers counts too when it holds the built-in trainers' summary
    (``cai_training.json``, written last), so reruns of older pipelines keep resuming."""
    return (folder / STAGE_MARKER).exists() or (folder / "cai_training.json").exists()


def _trained_on(folder: Path) -> str | None:
    """The dataset a finished stage's marker names (None: no marker, or one that cannot be read)."""
    try:
        return str(json.loads((folder / STAGE_MARKER).read_text(encoding="utf-8"))["dataset"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _train(runtime: Runtime, ref: ComponentRef, dataset: str | Path, folder: Path) -> TrainingResult:
    """Run one training stage and mark its folder done (what ``_done`` reads), whatever the trainer writes."""
    result = TrainingResult.of(
        ref.build("trainer", runtime).train(dataset, folder), trainer=ref.name, checkpoint=str(folder)
    )
    folder.mkdir(parents=True, exist_ok=True)
    marker = {"trainer": ref.name, "options": ref.options, "dataset": str(dataset), "finished": now()}
    write_json(folder / STAGE_MARKER, marker)
    return result


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
    if config.sft_export.written:  # read now: a bad file fails before phase 1's hours of generation
        read_written(config.sft_export.written)
        if "sl" not in config.stages:
            echo(
                "   note: sft_export.written is set but phase 1 (sl) is not among the stages; the SFT export, and so the "
                "written targets, are made only when phase 1 runs"
            )

    if config.decisions is not None and "sft" not in config.stages:
        echo("   note: decisions is set but sft is not among the stages; no decision targets are made")
    elif config.decisions is not None:  # checked now: a bad section fails before phase 1's hours of generation
        if config.decisions.preferences:
            raise ConfigError(
                "decisions.preferences: cai run trains nothing on decision preference pairs; make them with "
                "`cai export decisions --preferences` and train with `cai train dpo`"
            )
        trains_on = runtime.registry.trainer(config.sft_trainer).trains_on
        if trains_on != "conversations":
            raise ConfigError(
                f"decisions: the SFT stage's trainer {config.sft_trainer!r} trains on {trains_on}, not on "
                "conversations; decision targets need one that does (e.g. sft)"
            )
        decision_requests(config.decisions, runtime.registry)

    # Every trainer is given what its options declare, by the one rule (with_model): its model, the constitution,
    # and for the policy the preference model once there is one; a `judge` option ({name, options}: the user's, else
    # the trainer's default) gets the feedback model by the same rule.
    def trainer_ref(name: str, options: dict[str, Any], model: ModelRef, **defaults: Any) -> ComponentRef:
        declared = runtime.registry.trainer(name).Options.model_fields
        options = dict(options)
        judge = (
            options.get("judge", declared["judge"].get_default(call_default_factory=True))
            if "judge" in declared
            else None
        )
        if judge is not None:
            options["judge"] = with_model(ComponentRef.model_validate(judge), "judge", runtime, feedback).model_dump()
        if config.seed is not None:  # the pipeline's seed, unless the trainer's options set their own
            if "trl" in declared and isinstance(options.get("trl", {}), dict):
                options["trl"] = {"seed": config.seed, **(options.get("trl") or {})}
            if "seed" in declared:
                defaults = {"seed": config.seed, **defaults}
        ref = with_model(ComponentRef(name=name, options=options), "trainer", runtime, model, **defaults)
        runtime.component("trainer", ref.name, ref.options)  # validated before anything runs
        return ref

    def data_for(ref: ComponentRef) -> str | Path:
        """What the trainer says it trains on (``Trainer.trains_on``): phase 1's SFT export, the preference export,
        or a prompt source (its own ``prompts`` option, else phase 1's first source)."""
        return {
            "conversations": out / "sft-dataset",
            "preferences": out / "preference-dataset",
            "prompts": ref.options.get("prompts") or sl_config.prompt_sources[0],
        }[runtime.registry.trainer(ref.name).trains_on]

    sft_dir = out / "sft-model"
    sft_ref = trainer_ref(config.sft_trainer, config.sft, config.model, constitution=config.constitution)
    policy_model = str(sft_dir) if "sft" in config.stages or _done(sft_dir) else config.model
    rl_config = _unless_set(config.rl, model=policy_model)
    reward_dir = out / "reward-model"
    reward_ref = trainer_ref(config.reward_trainer, config.reward, config.model, constitution=config.constitution)
    rewarded = {"reward": str(reward_dir)} if "reward" in config.stages or _done(reward_dir) else {}
    policy_ref = trainer_ref(
        config.policy.trainer, config.policy.options, policy_model, constitution=config.constitution, **rewarded
    )
    policy_dir = out / f"{config.policy.trainer}-model"
    eval_models = [("base", config.model)]
    if "sft" in config.stages or _done(sft_dir):
        eval_models.append(("sl-cai", str(sft_dir)))
    if "policy" in config.stages or _done(policy_dir):
        eval_models.append(("rl-cai", str(policy_dir)))
    eval_config = _unless_set(config.eval, models=[m for _, m in eval_models], names=[n for n, _ in eval_models])
    summary = PipelineSummary(
        out=str(out),
        seed=config.seed,
        machine=machine_record([config.model, feedback], runtime.registry.catalog),
    )
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        tick = time.perf_counter()
        summary.stage_seconds[stage] = round(tick - clock, 1)
        echo(f"   {stage}: {tick - clock:.0f} s")
        clock = tick

    if "sl" in config.stages:
        echo("== phase 1: SL-CAI")
        summary.sl = run_sl(sl_config, out / "sl", runtime=runtime, progress=progress)
        evaluation = evaluation_texts(runtime.registry) if config.sft_export.written else None
        summary.sft_dataset = export_sft(
            out / "sl", out / "sft-dataset", config.sft_export, evaluation_prompts=evaluation
        )
        lap("sl")
    if "sft" in config.stages:
        runtime.close()  # free the generation models (a 1.5B feedback model is GBs) before training
        echo("== supervised fine-tuning")
        if _done(sft_dir):
            echo(f"   {sft_dir} exists; skipped")
            trained_on = _trained_on(sft_dir)
            if config.decisions is not None and trained_on != str(out / "sft-mix"):
                echo(
                    f"   note: decisions is set, but {sft_dir} was trained on {trained_on or 'another dataset'}, "
                    "without the decision targets; remove the folder to train it again"
                )
        else:
            data = data_for(sft_ref)
            if config.decisions is not None:
                summary.decisions_dataset = _decisions(config.decisions, out, runtime, progress, echo)
                runtime.close()
                summary.sft_mix = mix = mix_with_decisions(
                    out / "sft-dataset", out / "decisions-dataset", out / "sft-mix"
                )
                echo(
                    f"   sft-mix: {mix['train']} train / {mix['test']} test examples from "
                    f"{mix['source_run']} (where both have a target for a request: {mix['decisions_replaced']} "
                    f"decision targets left out, {mix['phase1_replaced']} phase-1 targets that contradict the "
                    "request's label left out)"
                )
                data = out / "sft-mix"
            summary.sft = _train(runtime, sft_ref, data, sft_dir)
        lap("sft")
    if "rl" in config.stages:
        echo("== phase 2: preference labels")
        if config.gate and rl_config.recipe != "intent" and not (out / "rl" / "gate.json").exists():
            gate = run_gate(
                out / "rl",
                rl_config.judge_ref(runtime),
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
            summary.reward = _train(runtime, reward_ref, data_for(reward_ref), reward_dir)
        lap("reward")
    if "policy" in config.stages:
        runtime.close()
        echo(f"== policy optimisation ({config.policy.trainer})")
        if _done(policy_dir):
            echo(f"   {policy_dir} exists; skipped")
        else:
            summary.policy = _train(runtime, policy_ref, data_for(policy_ref), policy_dir)
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


def _decisions(options: DecisionOptions, out: Path, runtime: Runtime, progress: bool, echo) -> dict[str, Any]:
    """The decision targets of ``cai export decisions`` in ``out/decisions-dataset`` (resumes from its answers)."""
    echo(f"   decision targets: declines, and {options.model}'s own answers to the harmless requests")
    return export_decisions(
        out / "decisions-dataset", options, runtime, evaluation_prompts=evaluation_texts(runtime.registry),
        progress=progress,
    )  # fmt: skip


Section = TypeVar("Section", bound=BaseModel)


def _unless_set(section: Section, **values: Any) -> Section:
    """``section`` with ``values`` for the fields its config left unset (what the pipeline decides as it runs)."""
    return section.model_copy(update={k: v for k, v in values.items() if k not in section.model_fields_set})
