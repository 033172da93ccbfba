"""What the built-in trainers share: loading datasets and base models, TRL configs, checkpoints, the judge gate."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from cai_engine import (
    DEFAULT_MODEL,
    ConfigError,
    GateResult,
    Options,
    PreferenceExportManifest,
    RunError,
    Trainer,
    TrainingResult,
    describe_validation,
    model_card,
    parse_scalar,
    write_atomic,
    write_json,
)

# Hyper-parameter defaults for small runs; anything in `trl:` (or `--set`) overrides them and goes straight to TRL's
# own config class. Device, precision, tracking (report_to) and checkpointing follow TRL's own defaults, so the same
# command uses a GPU, `accelerate launch` and DeepSpeed/FSDP configs unchanged. Only without an accelerator are two
# defaults changed: TRL turns bf16 on, and CPUs without bf16 units emulate it, slowly (docs/measurements.md), so a
# CPU run keeps fp32; and use_cpu is
# said outright, which is what lets several CPU processes (torchrun, `accelerate launch --multi_gpu`) train together
# over gloo instead of each training alone.
CPU_ONLY_DEFAULTS: dict[str, Any] = {"bf16": False, "use_cpu": True}


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


class TrainerOptions(Options):
    """What every built-in trainer takes: the base model and the dtype its weights are loaded, trained and saved in."""

    model: str = Field(
        DEFAULT_MODEL,
        description=f"Base model: {DEFAULT_MODEL!r} (the embedded default), an installed catalogue model's name, a "
        "model folder, a .gguf file, or a Hugging Face Hub id (from the HF cache; downloaded there first unless "
        "HF_HUB_OFFLINE=1).",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32",
        description="Weights are loaded, trained and saved in this dtype ('auto': the checkpoint's own). On a GPU, "
        "bfloat16 halves memory; on a CPU keep float32 (emulated bf16 is slower).",
    )


def load_base(model_ref: str, *, reward_head: bool = False, dtype: str = "float32"):
    """(tokenizer, model, model id) for a local model reference; a sequence classifier with one output for reward
    models. GGUF files and the default model come from the safetensors cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)

    from cai_engine import resolve_model_folder

    folder, model_id = resolve_model_folder(model_ref)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if reward_head:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), num_labels=1, dtype=torch_dtype, local_files_only=True, use_safetensors=True
        )
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch_dtype, local_files_only=True, use_safetensors=True
        )
    return tokenizer, model, model_id


CHECK_TEXT = "A checkpoint is checked by reading this sentence back."


def _probe_outputs(model, tokenizer):
    import torch

    ids = tokenizer(CHECK_TEXT, return_tensors="pt").to(model.device)
    with torch.no_grad():
        logits = model(**ids).logits.float().cpu()
    return logits.log_softmax(-1) if logits.shape[-1] > 1 else logits


def weights_digest(model) -> str:
    """A SHA-256 of every parameter (as float32), to compare the replicas of a distributed run."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()


def _replicas(trainer, model) -> tuple[bool, dict[str, Any]]:
    """Under ``accelerate launch``: check that every process ended with the same weights. Returns whether this
    process writes the checkpoint (the main one; the others wait for it) and what the result records about the
    processes (their number and weight digests; nothing for a single process)."""
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is None or accelerator.num_processes == 1:
        return True, {}
    from accelerate.utils import gather_object

    digests = gather_object([weights_digest(model)])
    if len(set(digests)) != 1:
        raise RunError(f"the {len(digests)} training processes ended with different weights; nothing was saved")
    return bool(accelerator.is_main_process), {"world_size": accelerator.num_processes, "replica_digests": digests}


def save_checkpoint(
    model, tokenizer, output_dir: Path, report: dict[str, Any], trainer: Any = None, *, made_by: Trainer | None = None
) -> TrainingResult:
    """safetensors weights (in the model's dtype) + tokenizer + the training result (``cai_training.json``) + a model
    card (``README.md``): the folder loads back as a model in every backend and reads as a model repository on the
    Hub. ``report`` is what the trainer has to say (the :class:`~cai_engine.records.TrainingResult` fields but the
    checkpoint's, and its own keys); the result is built from it once, here, and returned.

    The saved folder is read back and must reproduce the trained model's outputs (log-probs, or rewards for a reward
    model) on a fixed sentence; the largest difference is recorded as ``checkpoint_check`` and a mismatch is an
    error rather than a silently different model. Under ``accelerate launch`` (pass the ``trainer``) the processes'
    weights must agree and only the main process writes; the others wait until it has. The card's task and loading
    class are those ``made_by`` (the cai-engine trainer) declares."""
    writer, replicas = _replicas(trainer, model)
    if not writer:
        trainer.accelerator.wait_for_everyone()
        return TrainingResult(**report, **replicas, checkpoint=str(output_dir))
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
    result = TrainingResult(
        **report,
        **replicas,
        checkpoint=str(output_dir),
        checkpoint_check={"text": CHECK_TEXT, "max_abs_difference": difference},
        dtype=str(model.dtype).removeprefix("torch."),
    )
    write_json(output_dir / "cai_training.json", result)
    card = made_by or Trainer
    write_atomic(output_dir / "README.md", model_card(result.to_json(), task=card.task, auto_class=card.auto_class))
    if trainer is not None and getattr(trainer, "accelerator", None) is not None:
        trainer.accelerator.wait_for_everyone()
    if not difference <= 1e-3:
        raise RunError(
            f"{output_dir}: the saved checkpoint does not reproduce the trained model (outputs differ by "
            f"{difference:.3g} on a fixed sentence); it was kept for inspection, but do not use it"
        )
    # The run is finished and is never resumed (``last_checkpoint``): TRL's resume checkpoints (weights plus optimizer
    # state, several times the model's own size) are no longer needed once the final weights are saved and checked.
    shutil.rmtree(output_dir / "trainer", ignore_errors=True)
    return result


def cpu_loss(trainer_cls):
    """``trainer_cls`` computing the plain language-model loss on CPU.

    TRL's SFTTrainer computes its loss through a chunked, fused LM-head kernel written for GPUs; on a CPU its
    fallback is much slower than the model's own cross-entropy (docs/measurements.md). On CPU we use the model's loss on the collator's labels (the same token-level
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


def opening_weights(counted, weight: float, tokens: int):
    """Per-token loss weights: ``weight`` for the first ``tokens`` counted tokens of each run of counted tokens (a
    reply's opening, where the model answers or declines; each reply of a packed row starts its own run), 1 for the
    other counted tokens, 0 for the rest. ``counted`` is a boolean (batch, length) tensor."""
    import torch

    run = counted.clone()
    run[:, 1:] &= ~counted[:, :-1]  # the first token of each run
    opening = torch.zeros_like(counted)
    for _ in range(tokens):
        opening |= run
        following = torch.zeros_like(run)
        following[:, 1:] = run[:, :-1] & counted[:, 1:]
        run = following
    weights = counted.float()
    weights[opening] = weight
    return weights


#: Dataset columns the weighted SFT loss reads per example: ``weight`` scales its loss; ``truncated`` (a reply cut at a
#: length limit) leaves the end of turn the chat template closes the reply with out of the loss, so the policy does
#: not learn to stop where the cut fell.
EXAMPLE_COLUMNS = ("weight", "truncated")


class _ExampleWeights:
    """A collator that turns the :data:`EXAMPLE_COLUMNS` of each example into a per-token ``token_weights`` tensor
    beside the batch the wrapped collator builds (padded rows, or the one row of padding-free training; packing drops
    the columns, and the SFT trainer refuses it with them)."""

    def __init__(self, collator, end_tokens: int, max_length: int | None = None) -> None:
        self.collator = collator
        self.end_tokens = end_tokens
        self.max_length = max_length

    def _weights(self, example) -> list[float]:
        weight = float(example.pop("weight", 1.0))
        truncated = bool(example.pop("truncated", False))
        labels = example.get("labels", example["input_ids"])
        weights = [weight] * len(example["input_ids"])
        # a row max_length cut short has lost its end of turn already: nothing of the reply is left out
        cut_again = self.max_length is not None and len(example["input_ids"]) >= self.max_length
        if truncated and self.end_tokens and not cut_again:
            counted = [i for i, label in enumerate(labels) if label != -100]
            for i in counted[-self.end_tokens :]:
                weights[i] = 0.0
        return weights

    def __call__(self, examples):
        import torch

        per_example = [self._weights(example) for example in examples]
        batch = self.collator(examples)
        labels = batch["labels"]
        token_weights = torch.zeros(labels.shape, dtype=torch.float32)
        if labels.shape[0] == len(examples):
            for row, weights in enumerate(per_example):
                token_weights[row, : len(weights)] = torch.tensor(weights)
        else:  # padding-free: the examples side by side in one row
            flat = [w for weights in per_example for w in weights]
            token_weights[0, : len(flat)] = torch.tensor(flat)
        batch["token_weights"] = token_weights
        return batch


def end_of_turn_tokens(tokenizer) -> int:
    """How many tokens the tokenizer's chat template closes an assistant reply with (``<|im_end|>`` and a newline for
    SmolLM2: 2); 0 without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return 0
    marker = "Zq7xReplyEnd"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    tail = text[text.rindex(marker) + len(marker) :]
    return len(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else 0


def opening_weighted(
    trainer_cls, weight: float, tokens: int, *, example_columns: tuple[str, ...] = (), max_length: int | None = None
):
    """``trainer_cls`` whose loss weighs the first ``tokens`` tokens of each reply ``weight`` times and reads the
    dataset's :data:`EXAMPLE_COLUMNS` named in ``example_columns``.

    Plain SFT spreads a reply's loss over all its tokens, so the few tokens where a policy decides to answer or to
    decline count for little beside the rest of the reply (bench/decision_sft.py measures the difference). The loss is
    the weighted mean cross-entropy over the labelled tokens of each micro-batch, on any device; the Trainer divides
    it by the gradient-accumulation steps. It replaces TRL's own loss, so TRL's token-accuracy and entropy metrics are
    not logged, and the full logits are computed (TRL's fused loss head saves GPU memory on large vocabularies).
    """

    class OpeningWeighted(trainer_cls):
        loss_is_scaled_for_ga = False

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if example_columns:
                ends = end_of_turn_tokens(self.processing_class)
                self.data_collator = _ExampleWeights(self.data_collator, ends, max_length)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            missing = [c for c in example_columns if c not in self._signature_columns]
            if missing:
                self._signature_columns = [*self._signature_columns, *missing]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            inputs = dict(inputs)
            labels = inputs.pop("labels")
            token_weights = inputs.pop("token_weights", None)
            outputs = model(**inputs, use_cache=False)
            logits = outputs.logits[:, :-1].float()
            targets = labels[:, 1:].to(logits.device)
            per_token = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
            ).view(targets.shape)
            weights = opening_weights(targets != -100, weight, tokens)
            if token_weights is not None:
                weights = weights * token_weights[:, 1:].to(weights.device)
            loss = (per_token * weights).sum() / weights.sum().clamp_min(1e-8)
            return (loss, outputs) if return_outputs else loss

    OpeningWeighted.__name__ = OpeningWeighted.__qualname__ = f"OpeningWeighted{trainer_cls.__name__}"
    return OpeningWeighted


PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def check_judge_gate(
    dataset: str | Path, min_accuracy: float, force: bool, max_same_position: float = 1.0, min_scored_share: float = 0.8
) -> GateResult | None:
    """Refuse AI labels from a judge below ``min_accuracy`` on labelled pairs, or whose two orders prefer the same
    position more often than ``max_same_position`` (CAI-SPEC gate G1), unless forced. Returns the export's gate
    result (None when the judge was not measured)."""
    export_file = Path(dataset) / "export.json"
    export = read_preference_export(export_file) if export_file.exists() else None
    ai = export.sources.get("ai", 0) if export else 0
    gate = export.judge_gate if export else None
    if not ai or force:
        return gate
    if gate is None:
        raise ConfigError(
            f"{dataset}: {ai} pairs are labelled by an AI judge whose accuracy was never measured; run "
            "`cai rl gate RUN` before `cai export preferences`, or pass --force"
        )
    assert export is not None
    if export.judge_gate_matches is False:
        raise ConfigError(
            f"{dataset}: the gate in the run measured a different judge (component, options or model) "
            "from the one that labelled these pairs; run `cai rl gate RUN` with the labelling judge, "
            "or pass --force"
        )
    share = gate.scored_share
    if share is not None and share < min_scored_share:
        raise ConfigError(
            f"{dataset}: the judge scored only {share:.0%} of the labelled pairs (it abstained on the "
            f"rest), below the required {min_scored_share:.0%}; its accuracy rests on too few pairs. "
            "Use a judge that can score these pairs, or pass --force"
        )
    accuracy = gate.accuracy
    if accuracy is None or accuracy < min_accuracy:
        shown = "no usable judgements" if accuracy is None else f"{accuracy:.0%} accuracy"
        raise ConfigError(
            f"{dataset}: the judge that labelled these pairs scored {shown} on {gate.pairs} labelled pairs "
            f"(same-position rate {gate.same_position_rate}), below the required {min_accuracy:.0%}; its "
            "labels would teach noise. Use a stronger judge (judge_model), the cot judge, the 'revision' recipe, "
            "lower min_judge_accuracy, or pass --force"
        )
    same = gate.same_position_rate
    if same is not None and same > max_same_position:
        raise ConfigError(
            f"{dataset}: the judge that labelled these pairs prefers the same position in both orders on {same:.0%} "
            f"of labelled pairs (accuracy {accuracy:.0%}), above the allowed {max_same_position:.0%}; its labels are "
            "mostly position bias. Use a stronger judge (judge_model), the cot judge, the 'revision' recipe, raise "
            "max_same_position_rate, or pass --force"
        )
    return gate


def read_preference_export(path: Path) -> PreferenceExportManifest:
    try:
        return PreferenceExportManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise ConfigError(
            f"{path}: not a preference export's manifest ({describe_validation(exc)}); export again with "
            "`cai export preferences`"
        ) from None


def preference_data(dataset: str | Path):
    data = load_dataset_folder(dataset)
    missing = [c for c in PREFERENCE_COLUMNS if c not in data["train"].column_names]
    if missing:
        raise RunError(
            f"{dataset}: missing column(s) {', '.join(missing)}; export preference data with "
            "`cai export preferences RUN --out DIR`"
        )
    return data


def coerce_numbers(cls, name: str, settings: dict[str, Any]) -> dict[str, Any]:
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
            number = parse_scalar(value)  # the rule --set values follow
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise ConfigError(f"invalid TRL setting for trainer {name!r}: {key} must be a number, got {value!r}")
            out[key] = int(number) if numeric[key] is int and float(number).is_integer() else number
    return out


def trl_config(cls, name: str, defaults: dict[str, Any], overrides: dict[str, Any], output_dir: Path):
    if not has_accelerator():
        defaults = {**CPU_ONLY_DEFAULTS, **defaults}
    settings = coerce_numbers(cls, name, {**defaults, **overrides, "output_dir": str(output_dir / "trainer")})
    try:
        return cls(**settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid TRL setting for trainer {name!r}: {exc}") from None


def soft_reward_trainer():
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


class JudgeReward:
    """A TRL reward function from a cai-engine judge's pointwise 1-10 score (d-RLAIF), rescaled to [-1, 1].

    TRL calls it with the batch's prompts and completions; each completion is scored against ``principles`` (the
    constitution's rl principles by default, averaged). Where the judge abstains the reward is None, which TRL leaves
    out of the group's baseline and gives no advantage (an abstention is no signal, not a reward of 0); ``scored``
    and ``abstained`` count both.
    """

    def __init__(self, judge, principles) -> None:
        from cai_engine import ScoringTask

        self.judge, self.principles, self._task = judge, list(principles), ScoringTask
        self.__name__ = f"judge_{judge.name}"
        self.scored = 0
        self.abstained = 0

    def __call__(self, prompts, completions, **kwargs):
        from cai_engine import Message

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
