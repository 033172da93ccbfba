"""Built-in trainers: thin wrappers over TRL, imported only when training starts. Each returns (and writes beside
its checkpoint) a :class:`~cai_engine.records.TrainingResult`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field

from cai_engine import DEFAULT_MODEL, RunError, Trainer, TrainingResult, hookimpl
from cai_engine.default_plugins.trl_common import (
    PREFERENCE_COLUMNS,
    JudgeReward,
    TrainerOptions,
    check_judge_gate,
    cpu_loss,
    last_checkpoint,
    load_base,
    load_dataset_folder,
    preference_data,
    remove_if_empty,
    save_checkpoint,
    soft_reward_trainer,
    trl_config,
)

SFT_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 5e-5,
    "lr_scheduler_type": "constant",
    "logging_steps": 5,
    "max_length": 512,
    "assistant_only_loss": False,
    "seed": 0,
    "dataset_num_proc": None,
    "disable_tqdm": False,
}


class SFT(Trainer):
    """Supervised fine-tuning on a conversational (``messages``) dataset with ``trl.SFTTrainer``."""

    name = "sft"
    trl_config_class = "SFTConfig"  # `cai train sft` reads TRL flags and files against trl.SFTConfig
    trains_on = "conversations"

    class Options(TrainerOptions):
        lora: bool = Field(False, description="Train LoRA adapters (peft) and merge them into the saved model.")
        lora_r: int = Field(8, ge=1, description="LoRA rank.")
        lora_alpha: int = Field(16, ge=1, description="LoRA scaling.")
        lora_dropout: float = Field(0.05, ge=0, lt=1)
        lora_target_modules: list[str] | str = Field("all-linear", description="Modules LoRA adapts.")
        trl: dict[str, Any] = Field(
            default_factory=dict, description="Settings passed to trl.SFTConfig as they are (max_steps, ...)."
        )

    def _config(self, output_dir: Path):
        from trl import SFTConfig

        return trl_config(SFTConfig, self.name, SFT_DEFAULTS, self.options.trl, output_dir)

    def train(self, dataset, output_dir) -> TrainingResult:
        from trl import SFTTrainer

        output_dir = Path(output_dir)
        config = self._config(output_dir)  # bad TRL settings fail before anything loads
        data = load_dataset_folder(dataset)
        if "messages" not in data["train"].column_names:
            raise RunError(
                f"{dataset}: expected a 'messages' column (TRL conversational format); found "
                f"{', '.join(data['train'].column_names)}"
            )
        tokenizer, model, model_id = load_base(self.options.model, dtype=self.options.dtype)
        peft_config = None
        if self.options.lora:
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=self.options.lora_r,
                lora_alpha=self.options.lora_alpha,
                lora_dropout=self.options.lora_dropout,
                task_type="CAUSAL_LM",
                target_modules=self.options.lora_target_modules,
            )
        keep = ["messages"]
        train = data["train"].select_columns(keep)
        test = data["test"].select_columns(keep) if "test" in data else None
        trainer = cpu_loss(SFTTrainer)(
            model=model,
            args=config,
            train_dataset=train,
            eval_dataset=test,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        began = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=last_checkpoint(output_dir))
        remove_if_empty(output_dir / "trainer")
        metrics = dict(result.metrics)
        if test is not None and len(test):
            metrics.update(trainer.evaluate())
        trained = trainer.model
        if self.options.lora:
            trained = trained.merge_and_unload()  # a plain model folder that loads without peft
        report = {
            "trainer": self.name,
            "base_model": model_id,
            "dataset": str(dataset),
            "lora": self.options.lora,
            "train_examples": len(train),
            "test_examples": len(test) if test is not None else 0,
            "steps": trainer.state.global_step,
            "seconds": round(time.perf_counter() - began, 1),
            "metrics": metrics,
            "log_history": trainer.state.log_history,
            "trl": {k: v for k, v in config.to_dict().items() if k in {**SFT_DEFAULTS, **self.options.trl}},
        }
        return save_checkpoint(trained, tokenizer, output_dir, report, trainer, made_by=self)


# -- phase 2 ------------------------------------------------------------------------------------------------------


REWARD_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-5,
    "logging_steps": 5,
    "max_length": 512,
    "seed": 0,
    "remove_unused_columns": False,
}


class RewardTrainer(Trainer):
    """A preference model (sequence classifier with one output) trained on soft or hard preference labels."""

    name = "reward"
    trl_config_class = "RewardConfig"  # `cai train reward` reads TRL flags and files against trl.RewardConfig
    task = "text-classification"
    auto_class = "AutoModelForSequenceClassification"

    class Options(TrainerOptions):
        soft_labels: bool = Field(True, description="Use `chosen_probability` as a soft target (else hard labels).")
        min_judge_accuracy: float = Field(0.6, ge=0, le=1, description="Refuse AI labels from a weaker judge.")
        max_same_position_rate: float = Field(
            0.25, ge=0, le=1, description="Refuse AI labels from a judge whose orders agree on a position this often."
        )
        force: bool = Field(False, description="Train even if the judge gate fails (not recommended).")
        trl: dict[str, Any] = Field(default_factory=dict, description="Settings passed to trl.RewardConfig.")

    def train(self, dataset, output_dir) -> TrainingResult:
        from trl import RewardConfig

        output_dir = Path(output_dir)
        config = trl_config(RewardConfig, self.name, REWARD_DEFAULTS, self.options.trl, output_dir)
        data = preference_data(dataset)
        gate = check_judge_gate(
            dataset, self.options.min_judge_accuracy, self.options.force, self.options.max_same_position_rate
        )
        tokenizer, model, model_id = load_base(self.options.model, reward_head=True, dtype=self.options.dtype)
        columns = list(PREFERENCE_COLUMNS) + (
            ["chosen_probability"]
            if self.options.soft_labels and "chosen_probability" in data["train"].column_names
            else []
        )
        train = data["train"].select_columns(columns)
        test = data["test"].select_columns(columns) if "test" in data and len(data["test"]) else None
        trainer_cls, collator_cls = soft_reward_trainer()
        trainer = trainer_cls(
            model=model,
            args=config,
            train_dataset=train,
            eval_dataset=test,
            processing_class=tokenizer,
            data_collator=collator_cls(pad_token_id=tokenizer.pad_token_id),
        )
        began = time.perf_counter()
        metrics = dict(trainer.train(resume_from_checkpoint=last_checkpoint(output_dir)).metrics)
        remove_if_empty(output_dir / "trainer")
        if test is not None:
            metrics.update(trainer.evaluate())
        report = {
            "trainer": self.name,
            "base_model": model_id,
            "dataset": str(dataset),
            "soft_labels": "chosen_probability" in columns,
            "train_examples": len(train),
            "test_examples": len(test) if test is not None else 0,
            "steps": trainer.state.global_step,
            "seconds": round(time.perf_counter() - began, 1),
            "metrics": metrics,
            "heldout_pairwise_accuracy": metrics.get("eval_accuracy"),
            "judge_gate": gate,
            "log_history": trainer.state.log_history,
        }
        return save_checkpoint(trainer.model, tokenizer, output_dir, report, trainer, made_by=self)


DPO_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 1,
    "per_device_train_batch_size": 2,
    "learning_rate": 5e-6,
    "beta": 0.1,
    "logging_steps": 5,
    "max_length": 512,
    "seed": 0,
}


class DPO(Trainer):
    """Direct preference optimisation on chosen/rejected pairs (filtered by label confidence) with trl.DPOTrainer."""

    name = "dpo"
    trl_config_class = "DPOConfig"  # `cai train dpo` reads TRL flags and files against trl.DPOConfig

    class Options(TrainerOptions):
        model: str = Field(DEFAULT_MODEL, description="The policy to train (e.g. the SFT checkpoint).")
        min_confidence: float = Field(
            0.0, ge=0, lt=0.5, description="Keep pairs whose chosen_probability is at least 0.5 + this."
        )
        min_judge_accuracy: float = Field(0.6, ge=0, le=1)
        max_same_position_rate: float = Field(0.25, ge=0, le=1)
        force: bool = Field(False)
        trl: dict[str, Any] = Field(
            default_factory=dict,
            description="Settings passed to trl.DPOConfig (e.g. label_smoothing for noisy labels).",
        )

    def train(self, dataset, output_dir) -> TrainingResult:
        from trl import DPOConfig, DPOTrainer

        output_dir = Path(output_dir)
        config = trl_config(DPOConfig, self.name, DPO_DEFAULTS, self.options.trl, output_dir)
        data = preference_data(dataset)
        gate = check_judge_gate(
            dataset, self.options.min_judge_accuracy, self.options.force, self.options.max_same_position_rate
        )
        threshold = 0.5 + self.options.min_confidence
        keep = lambda row: row.get("chosen_probability", 1.0) >= threshold  # noqa: E731
        train = data["train"].filter(keep).select_columns(list(PREFERENCE_COLUMNS))
        if len(train) == 0:
            raise RunError(f"{dataset}: no pairs left with chosen_probability >= {threshold}")
        test = (
            data["test"].filter(keep).select_columns(list(PREFERENCE_COLUMNS))
            if "test" in data and len(data["test"])
            else None
        )
        tokenizer, model, model_id = load_base(self.options.model, dtype=self.options.dtype)
        trainer = DPOTrainer(
            model=model,
            args=config,
            train_dataset=train,
            eval_dataset=test if test is not None and len(test) else None,
            processing_class=tokenizer,
        )
        began = time.perf_counter()
        metrics = dict(trainer.train(resume_from_checkpoint=last_checkpoint(output_dir)).metrics)
        remove_if_empty(output_dir / "trainer")
        report = {
            "trainer": self.name,
            "base_model": model_id,
            "dataset": str(dataset),
            "train_examples": len(train),
            "dropped_low_confidence": len(data["train"]) - len(train),
            "steps": trainer.state.global_step,
            "seconds": round(time.perf_counter() - began, 1),
            "metrics": metrics,
            "judge_gate": gate,
            "log_history": trainer.state.log_history,
        }
        return save_checkpoint(trainer.model, tokenizer, output_dir, report, trainer, made_by=self)


GRPO_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,
    "num_generations": 4,
    "max_completion_length": 64,
    "learning_rate": 1e-6,
    "beta": 0.04,
    "logging_steps": 5,
    "seed": 0,
    "temperature": 0.9,
}


class GRPO(Trainer):
    """Online RL with trl.GRPOTrainer: the policy samples, a reward model or the judge scores, with a KL penalty
    (``beta``) to the starting policy."""

    name = "grpo"
    trl_config_class = "GRPOConfig"  # `cai train grpo` reads TRL flags and files against trl.GRPOConfig
    trains_on = "prompts"

    class Options(TrainerOptions):
        model: str = Field(DEFAULT_MODEL, description="The policy to train (e.g. the SFT checkpoint).")
        reward: str = Field(
            "judge",
            description="'judge' (the pointwise judge, d-RLAIF) or a reward-model folder "
            "trained with `cai train reward`.",
        )
        judge: dict[str, Any] = Field(
            default_factory=lambda: {"name": "pointwise"}, description="The judge for reward 'judge': {name, options}."
        )
        constitution: str = Field("harmless", description="Whose rl principles the judge scores against.")
        limit: int | None = Field(None, ge=1, description="Use only the first N prompts.")
        allow_heldout: bool = Field(False, description="Allow an evaluation-only prompt set as training prompts.")
        prompts: str | None = Field(
            None, description="Prompt source when used in a pipeline (else the dataset argument)."
        )
        trl: dict[str, Any] = Field(
            default_factory=dict, description="Settings passed to trl.GRPOConfig (beta is the KL coefficient)."
        )

    def train(self, dataset, output_dir) -> TrainingResult:
        import datasets as hf_datasets
        from trl import GRPOConfig, GRPOTrainer

        from cai_engine import ComponentRef, load_training_prompts

        output_dir = Path(output_dir)
        config = trl_config(GRPOConfig, self.name, GRPO_DEFAULTS, self.options.trl, output_dir)
        items = load_training_prompts(
            str(dataset), self.runtime.registry, limit=self.options.limit, allow_heldout=self.options.allow_heldout
        )
        train = hf_datasets.Dataset.from_list(
            [{"prompt": [m.model_dump() for m in item.conversation]} for item in items]
        )
        scored_against: dict[str, Any] = {}
        if self.options.reward == "judge":
            constitution = self.runtime.registry.constitution(self.options.constitution)
            scored_against = {
                "constitution": {
                    "name": constitution.name,
                    "version": constitution.version,
                    "hash": constitution.content_hash(),
                }
            }
            judge = ComponentRef.model_validate(self.options.judge).build("judge", self.runtime)
            reward_funcs: Any = JudgeReward(judge, constitution.for_phase("rl"))
        else:
            folder = Path(self.options.reward)
            if not (folder / "config.json").exists():
                raise RunError(f"{folder}: not a reward model folder; train one with `cai train reward`")
            reward_funcs = str(folder)
        tokenizer, model, model_id = load_base(self.options.model, dtype=self.options.dtype)
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward_funcs, args=config, train_dataset=train, processing_class=tokenizer
        )
        began = time.perf_counter()
        metrics = dict(trainer.train(resume_from_checkpoint=last_checkpoint(output_dir)).metrics)
        remove_if_empty(output_dir / "trainer")
        report = {
            "trainer": self.name,
            "base_model": model_id,
            "prompts": str(dataset),
            "train_prompts": len(train),
            "reward": self.options.reward,
            "steps": trainer.state.global_step,
            "seconds": round(time.perf_counter() - began, 1),
            "metrics": metrics,
            "kl_beta": config.beta,
            **scored_against,
            "log_history": trainer.state.log_history,
            **(
                {"judge_rewards": {"scored": reward_funcs.scored, "abstained": reward_funcs.abstained}}
                if isinstance(reward_funcs, JudgeReward)
                else {}
            ),
        }
        return save_checkpoint(trainer.model, tokenizer, output_dir, report, trainer, made_by=self)


@hookimpl
def cai_register_trainers(register):
    register(SFT)
    register(RewardTrainer)
    register(DPO)
    register(GRPO)
