"""Built-in trainers: thin wrappers over TRL, imported only when training starts."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from cai_engine.components import Options, Trainer
from cai_engine.errors import ConfigError, RunError
from cai_engine.hookspecs import hookimpl

# Hyper-parameter defaults for small runs; anything in `trl:` (or `--set`) overrides them and goes straight to TRL's
# own config class. Device, precision, tracking (report_to) and checkpointing follow TRL's own defaults, so the same
# command uses a GPU, `accelerate launch` and DeepSpeed/FSDP configs unchanged. Only without an accelerator is one
# default changed: TRL turns bf16 on, and CPUs without bf16 units emulate it (measured here, one SFT step of
# SmolLM2-135M took 64 s at batch 2 in bf16 and 26 s at batch 8 in fp32), so a CPU run keeps fp32.
CPU_ONLY_DEFAULTS: dict[str, Any] = {"bf16": False}


def has_accelerator() -> bool:
    """Whether torch sees a CUDA (or ROCm) or Apple MPS device."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(torch.cuda.is_available() or (mps is not None and mps.is_available()))


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` folder TRL saved under ``output_dir/trainer``, to resume a run that was killed
    (rerun the same command). A finished run (its ``cai_training.json`` written) is never resumed: training into it
    again starts afresh, and its old checkpoints are removed first, so a retrain cannot silently become the old
    model."""
    trainer_dir = output_dir / "trainer"
    if (output_dir / "cai_training.json").exists():
        shutil.rmtree(trainer_dir, ignore_errors=True)
        return None
    folders = [p for p in trainer_dir.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    return str(max(folders, key=lambda p: int(p.name[11:]))) if folders else None


def remove_if_empty(folder: Path) -> None:
    """TRL creates its output folder even when it saves no checkpoint; an empty folder is not left behind."""
    try:
        folder.rmdir()
    except OSError:
        pass


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


def load_dataset_folder(dataset: str | Path):
    """``train.jsonl`` (and ``test.jsonl``) from ``cai export``, or a ``datasets`` folder saved to disk."""
    import datasets

    path = Path(dataset)
    if not path.exists():
        raise RunError(f"{path}: no such dataset; export one with `cai export sft RUN --out DIR`")
    if (path / "train.jsonl").exists():
        files = {"train": str(path / "train.jsonl")}
        if (path / "test.jsonl").exists() and (path / "test.jsonl").stat().st_size:
            files["test"] = str(path / "test.jsonl")
        loaded = datasets.load_dataset("json", data_files=files)
    elif path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise RunError(f"{path}: neither train.jsonl nor a datasets folder ({exc})") from None
    else:
        loaded = datasets.load_dataset("json", data_files={"train": str(path)})
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    if "train" not in loaded or len(loaded["train"]) == 0:
        raise RunError(f"{path}: the train split is empty")
    return loaded


def load_base(model_ref: str, *, reward_head: bool = False):
    """(tokenizer, model, model id) for a local model reference; a sequence classifier with one output for reward
    models. GGUF files and the default model come from the safetensors cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from cai_engine.backends.hf_local import resolve_model_folder

    folder, model_id = resolve_model_folder(model_ref)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if reward_head:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), num_labels=1, dtype=torch.float32, local_files_only=True, use_safetensors=True
        )
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True, use_safetensors=True
        )
    return tokenizer, model, model_id


CHECK_TEXT = "A checkpoint is checked by reading this sentence back."


def _probe_outputs(model, tokenizer):
    import torch

    ids = tokenizer(CHECK_TEXT, return_tensors="pt").to(model.device)
    with torch.no_grad():
        logits = model(**ids).logits.float().cpu()
    return logits.log_softmax(-1) if logits.shape[-1] > 1 else logits


def save_checkpoint(model, tokenizer, output_dir: Path, summary: dict[str, Any]) -> None:
    """safetensors weights + tokenizer + a summary: the folder loads back as a model in every backend.

    The saved folder is read back and must reproduce the trained model's outputs (log-probs, or rewards for a reward
    model) on a fixed sentence; the largest difference is recorded as ``checkpoint_check`` and a mismatch is an
    error rather than a silently different model."""
    output_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    expected = _probe_outputs(model, tokenizer)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    reloaded = (
        type(model)
        .from_pretrained(str(output_dir), dtype=model.dtype, use_safetensors=True, local_files_only=True)
        .to(model.device)
    )
    reloaded.eval()
    difference = float((_probe_outputs(reloaded, tokenizer) - expected).abs().max())
    del reloaded
    if was_training:
        model.train()
    summary["checkpoint_check"] = {"text": CHECK_TEXT, "max_abs_difference": difference}
    (output_dir / "cai_training.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    if not difference <= 1e-3:
        raise RunError(
            f"{output_dir}: the saved checkpoint does not reproduce the trained model (outputs differ by "
            f"{difference:.3g} on a fixed sentence); it was kept for inspection, but do not use it"
        )


def _cpu_loss(trainer_cls):
    """``trainer_cls`` computing the plain language-model loss on CPU.

    TRL's SFTTrainer computes its loss through a chunked, fused LM-head kernel written for GPUs; on a CPU its
    fallback is ~20x slower than the model's own cross-entropy (measured here: 46 s for one step of 187 tokens of
    SmolLM2-135M, against ~2 s). On CPU we use the model's loss on the collator's labels (the same token-level
    cross-entropy) and keep TRL's path everywhere else.
    """

    class CPUFriendly(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.args.device.type != "cpu":
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
            from transformers import Trainer as HFTrainer

            return HFTrainer.compute_loss(
                self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    CPUFriendly.__name__ = CPUFriendly.__qualname__ = f"CPU{trainer_cls.__name__}"
    return CPUFriendly


class SFT(Trainer):
    """Supervised fine-tuning on a conversational (``messages``) dataset with ``trl.SFTTrainer``."""

    name = "sft"

    class Options(Options):
        model: str = Field("smollm2", description="Base model: 'smollm2', a model folder or a .gguf file.")
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

        return _trl_config(SFTConfig, self.name, SFT_DEFAULTS, self.options.trl, output_dir)

    def train(self, dataset, output_dir):
        from trl import SFTTrainer

        output_dir = Path(output_dir)
        config = self._config(output_dir)  # bad TRL settings fail before anything loads
        data = load_dataset_folder(dataset)
        if "messages" not in data["train"].column_names:
            raise RunError(
                f"{dataset}: expected a 'messages' column (TRL conversational format); found "
                f"{', '.join(data['train'].column_names)}"
            )
        tokenizer, model, model_id = load_base(self.options.model)
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
        trainer = _cpu_loss(SFTTrainer)(
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
        summary = {
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
        save_checkpoint(trained, tokenizer, output_dir, summary)
        summary["checkpoint"] = str(output_dir)
        return summary


# -- phase 2 ------------------------------------------------------------------------------------------------------

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def check_judge_gate(
    dataset: str | Path, min_accuracy: float, force: bool, max_same_position: float = 1.0, min_scored_share: float = 0.8
) -> dict[str, Any] | None:
    """Refuse AI labels from a judge below ``min_accuracy`` on labelled pairs, or whose two orders prefer the same
    position more often than ``max_same_position`` (CAI-SPEC gate G1), unless forced."""
    export_file = Path(dataset) / "export.json"
    export = json.loads(export_file.read_text(encoding="utf-8")) if export_file.exists() else {}
    ai = export.get("sources", {}).get("ai", 0)
    gate = export.get("judge_gate")
    if not ai or force:
        return gate
    if gate is None:
        raise ConfigError(
            f"{dataset}: {ai} pairs are labelled by an AI judge whose accuracy was never measured; run "
            "`cai rl gate RUN` before `cai export preferences`, or pass --force"
        )
    if export.get("judge_gate_matches") is False:
        raise ConfigError(
            f"{dataset}: the gate in the run measured a different judge (component, options or model) "
            "from the one that labelled these pairs; run `cai rl gate RUN` with the labelling judge, "
            "or pass --force"
        )
    share = gate.get("scored_share")
    if share is not None and share < min_scored_share:
        raise ConfigError(
            f"{dataset}: the judge scored only {share:.0%} of the labelled pairs (it abstained on the "
            f"rest), below the required {min_scored_share:.0%}; its accuracy rests on too few pairs. "
            "Use a judge that can score these pairs, or pass --force"
        )
    accuracy = gate.get("accuracy")
    if accuracy is None or accuracy < min_accuracy:
        shown = "no usable judgements" if accuracy is None else f"{accuracy:.0%} accuracy"
        raise ConfigError(
            f"{dataset}: the judge that labelled these pairs scored {shown} on {gate.get('pairs')} labelled pairs "
            f"(same-position rate {gate.get('same_position_rate')}), below the required {min_accuracy:.0%}; its "
            "labels would teach noise. Use a stronger judge (judge_model), the cot judge, the 'revision' recipe, "
            "lower min_judge_accuracy, or pass --force"
        )
    same = gate.get("same_position_rate")
    if same is not None and same > max_same_position:
        raise ConfigError(
            f"{dataset}: the judge that labelled these pairs prefers the same position in both orders on {same:.0%} "
            f"of labelled pairs (accuracy {accuracy:.0%}), above the allowed {max_same_position:.0%}; its labels are "
            "mostly position bias. Use a stronger judge (judge_model), the cot judge, the 'revision' recipe, raise "
            "max_same_position_rate, or pass --force"
        )
    return gate


def preference_data(dataset: str | Path):
    data = load_dataset_folder(dataset)
    missing = [c for c in PREFERENCE_COLUMNS if c not in data["train"].column_names]
    if missing:
        raise RunError(
            f"{dataset}: missing column(s) {', '.join(missing)}; export preference data with "
            "`cai export preferences RUN --out DIR`"
        )
    return data


def _coerce_numbers(cls, name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``2e-5`` as a string and ``no`` as False; turn such values back into numbers where the TRL
    field is numeric, and False into "no" where the field is a word (``save_strategy: no``)."""
    import dataclasses
    import enum

    fields = dataclasses.fields(cls)
    numeric = {
        f.name: type(f.default)
        for f in fields
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool)
    }
    words = {f.name for f in fields if isinstance(f.default, (str, enum.Enum)) and not isinstance(f.default, bool)}
    out = dict(settings)
    for key, value in settings.items():
        if key in words and value is False:
            out[key] = "no"
        if key in numeric and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(
                    f"invalid TRL setting for trainer {name!r}: {key} must be a number, got {value!r}"
                ) from None
            out[key] = int(number) if numeric[key] is int and number.is_integer() else number
    return out


def _trl_config(cls, name: str, defaults: dict[str, Any], overrides: dict[str, Any], output_dir: Path):
    if not has_accelerator():
        defaults = {**CPU_ONLY_DEFAULTS, **defaults}
    settings = _coerce_numbers(cls, name, {**defaults, **overrides, "output_dir": str(output_dir / "trainer")})
    try:
        return cls(**settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid TRL setting for trainer {name!r}: {exc}") from None


def _soft_reward_trainer():
    """TRL's RewardTrainer with the soft-target Bradley-Terry loss of CAI-SPEC §4.

    ``-(p log sigma(r_c - r_r) + (1 - p) log sigma(r_r - r_c))`` with ``p`` the probability that ``chosen`` is
    better; with ``p = 1`` it is exactly TRL's own loss.
    """
    import torch
    from torch import nn
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class SoftCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            if "chosen_probability" in examples[0]:
                batch["chosen_probability"] = torch.tensor([float(e["chosen_probability"]) for e in examples])
            return batch

    class SoftRewardTrainer(RewardTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            soft = inputs.pop("chosen_probability", None)
            if soft is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            inputs["use_cache"] = False
            outputs = model(**inputs)
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            delta = chosen - rejected
            soft = soft.to(delta.dtype)
            loss = -(soft * nn.functional.logsigmoid(delta) + (1 - soft) * nn.functional.logsigmoid(-delta)).mean()
            with torch.no_grad():
                self._metrics[mode]["accuracy"].append((delta > 0).float().mean().item())
                self._metrics[mode]["margin"].append(delta.mean().item())
            return (loss, outputs) if return_outputs else loss

    return SoftRewardTrainer, SoftCollator


REWARD_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-5,
    "logging_steps": 5,
    "max_length": 512,
    "seed": 0,
    "remove_unused_columns": False,
}


class RewardModel(Trainer):
    """A preference model (sequence classifier with one output) trained on soft or hard preference labels."""

    name = "reward"

    class Options(Options):
        model: str = Field("smollm2", description="Base model: 'smollm2', a model folder or a .gguf file.")
        soft_labels: bool = Field(True, description="Use `chosen_probability` as a soft target (else hard labels).")
        min_judge_accuracy: float = Field(0.6, ge=0, le=1, description="Refuse AI labels from a weaker judge.")
        max_same_position_rate: float = Field(
            0.25, ge=0, le=1, description="Refuse AI labels from a judge whose orders agree on a position this often."
        )
        force: bool = Field(False, description="Train even if the judge gate fails (not recommended).")
        trl: dict[str, Any] = Field(default_factory=dict, description="Settings passed to trl.RewardConfig.")

    def train(self, dataset, output_dir):
        from trl import RewardConfig

        output_dir = Path(output_dir)
        config = _trl_config(RewardConfig, self.name, REWARD_DEFAULTS, self.options.trl, output_dir)
        data = preference_data(dataset)
        gate = check_judge_gate(
            dataset, self.options.min_judge_accuracy, self.options.force, self.options.max_same_position_rate
        )
        tokenizer, model, model_id = load_base(self.options.model, reward_head=True)
        columns = list(PREFERENCE_COLUMNS) + (
            ["chosen_probability"]
            if self.options.soft_labels and "chosen_probability" in data["train"].column_names
            else []
        )
        train = data["train"].select_columns(columns)
        test = data["test"].select_columns(columns) if "test" in data and len(data["test"]) else None
        trainer_cls, collator_cls = _soft_reward_trainer()
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
        summary = {
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
        save_checkpoint(trainer.model, tokenizer, output_dir, summary)
        summary["checkpoint"] = str(output_dir)
        return summary


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

    class Options(Options):
        model: str = Field("smollm2", description="The policy to train (e.g. the SFT checkpoint).")
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

    def train(self, dataset, output_dir):
        from trl import DPOConfig, DPOTrainer

        output_dir = Path(output_dir)
        config = _trl_config(DPOConfig, self.name, DPO_DEFAULTS, self.options.trl, output_dir)
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
        tokenizer, model, model_id = load_base(self.options.model)
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
        summary = {
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
        save_checkpoint(trainer.model, tokenizer, output_dir, summary)
        summary["checkpoint"] = str(output_dir)
        return summary


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


class JudgeReward:
    """A TRL reward function from a cai-engine judge's pointwise 1-10 score (d-RLAIF), rescaled to [-1, 1].

    TRL calls it with the batch's prompts and completions; each completion is scored against ``principles`` (the
    constitution's rl principles by default, averaged). Where the judge abstains the reward is None, which TRL leaves
    out of the group's baseline and gives no advantage (an abstention is no signal, not a reward of 0); ``scored``
    and ``abstained`` count both.
    """

    def __init__(self, judge, principles) -> None:
        from cai_engine.records import ScoringTask

        self.judge, self.principles, self._task = judge, list(principles), ScoringTask
        self.__name__ = f"judge_{judge.name}"
        self.scored = 0
        self.abstained = 0

    def __call__(self, prompts, completions, **kwargs):
        from cai_engine.models import Message

        tasks = []
        for prompt, completion in zip(prompts, completions):
            conversation = (
                [Message.model_validate(m) for m in prompt]
                if isinstance(prompt, list)
                else [Message(role="user", content=str(prompt))]
            )
            text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
            tasks.append(self._task(conversation=conversation, response=text or " ", principles=self.principles))
        rewards = [score.reward for score in self.judge.score(tasks)]
        self.abstained += sum(r is None for r in rewards)
        self.scored += sum(r is not None for r in rewards)
        return rewards


class GRPO(Trainer):
    """Online RL with trl.GRPOTrainer: the policy samples, a reward model or the judge scores, with a KL penalty
    (``beta``) to the starting policy."""

    name = "grpo"

    class Options(Options):
        model: str = Field("smollm2", description="The policy to train (e.g. the SFT checkpoint).")
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

    def train(self, dataset, output_dir):
        import datasets as hf_datasets
        from trl import GRPOConfig, GRPOTrainer

        from cai_engine.config import ComponentRef
        from cai_engine.prompts import load_prompts

        output_dir = Path(output_dir)
        config = _trl_config(GRPOConfig, self.name, GRPO_DEFAULTS, self.options.trl, output_dir)
        from cai_engine.prompts import is_heldout

        if not self.options.allow_heldout and is_heldout(str(dataset), self.runtime.registry):
            raise ConfigError(
                f"{dataset} is an evaluation-only (held-out) prompt set; training on it would "
                "contaminate evaluation. Choose another set, or set allow_heldout: true"
            )
        items = load_prompts(str(dataset), self.runtime.registry, limit=self.options.limit)
        if not self.options.allow_heldout:
            from cai_engine.prompts import refuse_heldout_content

            refuse_heldout_content(items, self.runtime.registry, str(dataset))
        train = hf_datasets.Dataset.from_list(
            [{"prompt": [m.model_dump() for m in item.conversation]} for item in items]
        )
        if self.options.reward == "judge":
            constitution = self.runtime.registry.constitution(self.options.constitution)
            judge = ComponentRef.model_validate(self.options.judge).build("judge", self.runtime)
            reward_funcs: Any = JudgeReward(judge, constitution.for_phase("rl"))
        else:
            folder = Path(self.options.reward)
            if not (folder / "config.json").exists():
                raise RunError(f"{folder}: not a reward model folder; train one with `cai train reward`")
            reward_funcs = str(folder)
        tokenizer, model, model_id = load_base(self.options.model)
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward_funcs, args=config, train_dataset=train, processing_class=tokenizer
        )
        began = time.perf_counter()
        metrics = dict(trainer.train(resume_from_checkpoint=last_checkpoint(output_dir)).metrics)
        remove_if_empty(output_dir / "trainer")
        summary = {
            "trainer": self.name,
            "base_model": model_id,
            "prompts": str(dataset),
            "train_prompts": len(train),
            "reward": self.options.reward,
            "steps": trainer.state.global_step,
            "seconds": round(time.perf_counter() - began, 1),
            "metrics": metrics,
            "kl_beta": config.beta,
            "log_history": trainer.state.log_history,
        }
        if isinstance(reward_funcs, JudgeReward):
            summary["judge_rewards"] = {"scored": reward_funcs.scored, "abstained": reward_funcs.abstained}
        save_checkpoint(trainer.model, tokenizer, output_dir, summary)
        summary["checkpoint"] = str(output_dir)
        return summary


@hookimpl
def cai_register_trainers(register):
    register(SFT)
    register(RewardModel)
    register(DPO)
    register(GRPO)
