"""Built-in trainers: thin wrappers over TRL, imported only when training starts. Each returns (and writes beside
its checkpoint) a :class:`~cai_engine.records.TrainingResult`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field

from cai_engine import DEFAULT_MODEL, ConfigError, RunError, Trainer, TrainingResult, hookimpl
from cai_engine.default_plugins.trl_common import (
    EXAMPLE_COLUMNS,
    PREFERENCE_COLUMNS,
    JudgeReward,
    TrainerOptions,
    check_judge_gate,
    cpu_loss,
    last_checkpoint,
    load_base,
    load_dataset_folder,
    opening_weighted,
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
    """Supervised fine-tuning on a conversational (``messages``) dataset with ``trl.SFTTrainer``.

    A ``weight`` column, where the dataset has one (``cai export decisions`` writes it), weighs each example against
    the others in its micro-batch (as if it were there that many times; with one example per micro-batch it has no
    effect); a ``truncated`` column marks replies cut at a length limit, whose closing end of turn is then left out of
    the loss.
    """

    name = "sft"
    trl_config_class = "SFTConfig"  # `cai train sft` reads TRL flags and files against trl.SFTConfig
    trains_on = "conversations"

    class Options(TrainerOptions):
        lora: bool = Field(False, description="Train LoRA adapters (peft) and merge them into the saved model.")
        lora_r: int = Field(8, ge=1, description="LoRA rank.")
        lora_alpha: int = Field(16, ge=1, description="LoRA scaling.")
        lora_dropout: float = Field(0.05, ge=0, lt=1)
        lora_target_modules: list[str] | str = Field("all-linear", description="Modules LoRA adapts.")
        decision_weight: float = Field(
            1.0,
            ge=1.0,
            description="Weigh the first `decision_tokens` tokens of each reply this many times in the loss (the "
            "rest of the reply weighs 1). Those tokens are where a policy answers or declines; plain SFT spreads "
            "the loss over the whole reply. Above 1 the loss is on the last message (the reply) only: each "
            "conversation becomes a prompt and a completion. In bench/decision_sft.py's own training loop, 10 over "
            "4 tokens lifted SmolLM2-135M's HarmBench refusal 0.725 -> 0.79 and cut its contrast over-refusal 0.20 "
            "-> 0.156 (one seed).",
        )
        decision_tokens: int = Field(4, ge=1, description="How many opening tokens `decision_weight` weighs.")
        trl: dict[str, Any] = Field(
            default_factory=dict, description="Settings passed to trl.SFTConfig as they are (max_steps, ...)."
        )

    def _config(self, output_dir: Path):
        from trl import SFTConfig

        if self.options.decision_weight != 1 and self.options.trl.get("completion_only_loss") is False:
            raise ConfigError(
                f"{self.name}: decision_weight weighs the reply's opening, so the loss must be on the reply: "
                "leave out trl.completion_only_loss: false, or set decision_weight: 1"
            )
        return trl_config(SFTConfig, self.name, SFT_DEFAULTS, self.options.trl, output_dir)

    def _check_weighted_loss(self, config, columns: tuple[str, ...]) -> None:
        """The weighted loss (decision_weight, or a dataset's weight/truncated columns) is a plain cross-entropy of
        its own: TRL settings that change the loss, or packing (which drops the columns), would be silently lost."""
        what = f"decision_weight {self.options.decision_weight:g}" if self.options.decision_weight != 1 else ""
        what = what or f"the dataset's {' and '.join(columns)} column{'s' if len(columns) > 1 else ''}"
        clashes = [
            name
            for name, value, plain in (
                ("packing", getattr(config, "packing", False), False),
                ("eval_packing", getattr(config, "eval_packing", None), None),
                ("loss_type", getattr(config, "loss_type", "nll"), "nll"),
                ("use_liger_kernel", getattr(config, "use_liger_kernel", False), False),
                ("label_smoothing_factor", getattr(config, "label_smoothing_factor", 0.0), 0.0),
            )
            if value not in (plain, False)
        ]
        if clashes:
            raise ConfigError(
                f"{self.name}: {what} trains with a weighted cross-entropy of its own, which TRL's "
                f"{', '.join(clashes)} setting would change or bypass; leave {'them' if len(clashes) > 1 else 'it'} "
                "at TRL's default"
            )

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
        columns = tuple(c for c in EXAMPLE_COLUMNS if c in data["train"].column_names)
        if columns:
            data = _checked_columns(data, dataset, columns)
        keep = ["messages", *columns]
        train = data["train"].select_columns(keep)
        test = data["test"].select_columns(keep) if "test" in data else None
        trainer_cls = cpu_loss(SFTTrainer)
        if columns or self.options.decision_weight != 1:
            self._check_weighted_loss(config, columns)
        if self.options.decision_weight != 1:
            train, test = (split if split is None else _as_completions(split, dataset) for split in (train, test))
        if columns or self.options.decision_weight != 1:
            trainer_cls = opening_weighted(
                SFTTrainer,
                self.options.decision_weight,
                self.options.decision_tokens,
                example_columns=columns,
                max_length=config.max_length,
            )
        trainer = trainer_cls(
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
            "decision_weight": self.options.decision_weight,
            "decision_tokens": self.options.decision_tokens,
            "example_columns": list(columns),
            "train_examples": len(train),
            "test_examples": len(test) if test is not None else 0,
            "steps": trainer.state.global_step,
            "seconds": round(time.perf_counter() - began, 1),
            "metrics": metrics,
            "log_history": trainer.state.log_history,
            "trl": {k: v for k, v in config.to_dict().items() if k in {**SFT_DEFAULTS, **self.options.trl}},
        }
        return save_checkpoint(trained, tokenizer, output_dir, report, trainer, made_by=self)


def _checked_columns(data, dataset, columns: tuple[str, ...]):
    """``data`` with every one of ``columns`` filled in every split (a row or split without a value weighs 1 and is
    not truncated); a weight that is not a finite number above 0, or a ``truncated`` that is not true or false, is an
    error."""
    import math

    defaults = {"weight": 1.0, "truncated": False}
    for name in list(data):
        split = data[name]
        for column in columns:
            if column not in split.column_names:
                split = split.add_column(column, [defaults[column]] * len(split))
            values = split[column]
            if any(v is None for v in values):
                filled = [defaults[column] if v is None else v for v in values]
                split = split.remove_columns(column).add_column(column, filled)
        for row, weight in enumerate(split["weight"] if "weight" in columns else ()):
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not math.isfinite(weight)
                or weight <= 0
            ):
                raise RunError(
                    f"{dataset}: {name} row {row + 1} has weight {weight!r}; a weight scales the example's loss and "
                    "must be a number above 0"
                )
        for row, truncated in enumerate(split["truncated"] if "truncated" in columns else ()):
            if not isinstance(truncated, bool):
                raise RunError(f"{dataset}: {name} row {row + 1} has truncated {truncated!r}; it must be true or false")
        data[name] = split
    return data


def _as_completions(split, dataset):
    """A ``messages`` split as TRL's conversational prompt-completion format: the last message (an assistant reply)
    is the completion, everything before it the prompt, so the loss falls on the reply only."""

    def convert(row, index):
        messages = row["messages"]
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise RunError(
                f"{dataset}: decision_weight needs each conversation to end with an assistant reply after at least "
                f"one message; row {index + 1} ends with {messages[-1]['role'] if messages else 'nothing'!r}"
            )
        return {"prompt": messages[:-1], "completion": messages[-1:]}

    return split.map(convert, with_indices=True, remove_columns=["messages"])


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
