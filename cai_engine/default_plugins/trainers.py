"""Built-in trainers: thin wrappers over TRL, imported only when training starts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from cai_engine.components import Options, Trainer
from cai_engine.errors import ConfigError, RunError
from cai_engine.hookspecs import hookimpl

# Sensible CPU defaults; anything in `trl:` overrides them and goes straight to TRL's own config class.
SFT_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
    "learning_rate": 5e-5, "lr_scheduler_type": "constant", "logging_steps": 5, "save_strategy": "no",
    "report_to": "none", "max_length": 512, "assistant_only_loss": False, "use_cpu": True, "seed": 0,
    "dataset_num_proc": None, "disable_tqdm": False,
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


def save_checkpoint(model, tokenizer, output_dir: Path, summary: dict[str, Any]) -> None:
    """safetensors weights + tokenizer + a summary: the folder loads back as a model in every backend."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "cai_training.json").write_text(json.dumps(summary, indent=2, default=str) + "\n",
                                                  encoding="utf-8")


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
        trl: dict[str, Any] = Field(default_factory=dict,
                                    description="Settings passed to trl.SFTConfig as they are (max_steps, ...).")

    def _config(self, output_dir: Path):
        from trl import SFTConfig

        settings = {**SFT_DEFAULTS, **self.options.trl, "output_dir": str(output_dir / "trainer")}
        try:
            return SFTConfig(**settings)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid TRL setting for trainer 'sft': {exc}") from None

    def train(self, dataset, output_dir):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTTrainer

        from cai_engine.backends.hf_local import resolve_model_folder

        output_dir = Path(output_dir)
        config = self._config(output_dir)  # bad TRL settings fail before anything loads
        data = load_dataset_folder(dataset)
        if "messages" not in data["train"].column_names:
            raise RunError(f"{dataset}: expected a 'messages' column (TRL conversational format); found "
                           f"{', '.join(data['train'].column_names)}")
        folder, model_id = resolve_model_folder(self.options.model)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
        peft_config = None
        if self.options.lora:
            from peft import LoraConfig

            peft_config = LoraConfig(r=self.options.lora_r, lora_alpha=self.options.lora_alpha,
                                     lora_dropout=self.options.lora_dropout, task_type="CAUSAL_LM",
                                     target_modules=self.options.lora_target_modules)
        keep = ["messages"]
        train = data["train"].select_columns(keep)
        test = data["test"].select_columns(keep) if "test" in data else None
        trainer = SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=test,
                             processing_class=tokenizer, peft_config=peft_config)
        began = time.perf_counter()
        result = trainer.train()
        metrics = dict(result.metrics)
        if test is not None and len(test):
            metrics.update(trainer.evaluate())
        trained = trainer.model
        if self.options.lora:
            trained = trained.merge_and_unload()  # a plain model folder that loads without peft
        summary = {"trainer": self.name, "base_model": model_id, "dataset": str(dataset), "lora": self.options.lora,
                   "train_examples": len(train), "test_examples": len(test) if test is not None else 0,
                   "steps": trainer.state.global_step, "seconds": round(time.perf_counter() - began, 1),
                   "metrics": metrics, "log_history": trainer.state.log_history,
                   "trl": {k: v for k, v in config.to_dict().items() if k in {**SFT_DEFAULTS, **self.options.trl}}}
        save_checkpoint(trained, tokenizer, output_dir, summary)
        summary["checkpoint"] = str(output_dir)
        return summary


@hookimpl
def cai_register_trainers(register):
    register(SFT)
