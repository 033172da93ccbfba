"""The second way to compile a classifier: fine-tune the first layers of the base model with a classification head.

Where the probe trains only a logistic head on frozen, averaged activations, this keeps the first ``layers``
transformer layers of the base model (SmolLM2-135M by default), puts transformers' sequence-classification head on
the last token, and trains the layers and the head (the token embeddings stay frozen) on the same data, split and
calibration. The folder it writes is a plain transformers checkpoint (``config.json`` with the labels,
``model.safetensors``, the tokenizer) plus ``classifier.json`` and a model card, so
``pipeline("text-classification", model=FOLDER)`` loads it; cai-engine's loader adds the text normalisation and
the calibrated threshold. Which of the two to deploy is decided by measurement (``cai classifiers build`` trains
both and keeps the better on the held-out split).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cai_engine.classifiers.probe import CONFIG, ProbeConfig, base_model_sha256, render
from cai_engine.classifiers.train import calibrate, read_split, write_card
from cai_engine.errors import ModelError
from cai_engine.models.runtime import DEFAULT_MODEL

LABELS = {0: "compliant", 1: "violation"}


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(DEFAULT_MODEL, description="The model whose first layers are fine-tuned.")
    layers: int = Field(8, ge=1, description="How many transformer layers are kept (and run at inference).")
    epochs: int = Field(2, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(16, ge=1)
    max_tokens: int = Field(128, ge=8, description="Longer texts keep their first and last tokens.")
    false_alarm_rate: float = Field(0.05, gt=0, lt=1)
    seed: int = 0


def _truncate(ids: list[int], max_tokens: int) -> list[int]:
    if len(ids) > max_tokens:
        half = max_tokens // 2
        ids = ids[:half] + ids[-(max_tokens - half) :]
    return ids


class FinetunedClassifier:
    """A fine-tuned classifier loaded from its folder; the same interface as ``Probe`` (``config``, ``predict``,
    ``threshold``)."""

    def __init__(self, config: ProbeConfig, model: Any, tokenizer: Any, folder: Path | None = None) -> None:
        self.config = config
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.folder = folder
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: str | Path, config: ProbeConfig) -> FinetunedClassifier:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), dtype=torch.float32, local_files_only=True, use_safetensors=True
            )
        except Exception as exc:
            raise ModelError(f"{folder}: cannot load the fine-tuned classifier ({type(exc).__name__}: {exc})") from None
        return cls(config, model, tokenizer, folder)

    def batch(self, texts: Sequence[str]) -> tuple[Any, Any]:
        import torch

        encoded = [
            _truncate(self.tokenizer(t, add_special_tokens=False)["input_ids"], self.config.max_tokens) or [0]
            for t in texts
        ]
        width = max(len(e) for e in encoded)
        pad = self.model.config.pad_token_id
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = torch.tensor(e)
            mask[row, : len(e)] = 1
        return ids, mask

    def logits(self, texts: Sequence[str]) -> Any:
        ids, mask = self.batch(texts)
        return self.model(input_ids=ids, attention_mask=mask).logits

    def predict(self, prompts: Sequence[str], replies: Sequence[str] | None = None) -> list[dict[str, float]]:
        """Per request (or exchange, with ``replies``), the probability of a violation."""
        texts = [render(self.config.kind, p, None if replies is None else replies[i]) for i, p in enumerate(prompts)]
        return self.predict_texts(texts)

    def predict_texts(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """The same for texts already rendered (``probe.render``)."""
        import torch

        if not texts:
            return []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        probs: dict[int, float] = {}
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), 16):
                chunk = order[start : start + 16]
                p = torch.softmax(self.logits([texts[i] for i in chunk]), dim=-1)[:, 1]
                probs.update(zip(chunk, p.tolist()))
        return [{"violation": probs[i]} for i in range(len(texts))]

    def threshold(self, label: str = "violation") -> float:
        return self.config.thresholds.get(label, 0.5)


def train_finetuned(
    dataset: str | Path, kind: str, out: str | Path, config: FinetuneConfig, echo=print, progress: bool = True
) -> dict[str, Any]:
    """Fine-tune on ``dataset``'s ``kind`` split, calibrate, and save to ``out``; returns the metrics."""
    import json

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cai_engine.models.files import resolve_model_folder

    dataset, out = Path(dataset), Path(out)
    train, test, measured_on = read_split(dataset, kind)
    labels = [int(r["label"]) for r in train]

    def texts(rows):
        return [
            render(kind, r["prompt"] if kind == "output" else r["text"], r["text"] if kind == "output" else None)
            for r in rows
        ]

    folder, _ = resolve_model_folder(config.base_model)
    from transformers import AutoConfig

    try:
        depth = AutoConfig.from_pretrained(str(folder), local_files_only=True).num_hidden_layers
    except Exception as exc:
        raise ModelError(f"{folder}: cannot read the base model's config ({type(exc).__name__}: {exc})") from None
    if config.layers > depth:  # transformers would add new, untrained layers, and say so only in a muted warning
        raise ModelError(f"{config.base_model} has {depth} layers; the fine-tune asks for {config.layers}")
    torch.manual_seed(config.seed)
    from transformers.utils import logging as hf_logging

    # keeping the first layers leaves the rest of the checkpoint unused and the head new, on purpose: transformers'
    # load report says so at length, so it is silenced for this one load
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder),
            dtype=torch.float32,
            local_files_only=True,
            use_safetensors=True,
            num_labels=2,
            id2label=LABELS,
            label2id={v: k for k, v in LABELS.items()},
            num_hidden_layers=config.layers,
        )
    except Exception as exc:
        raise ModelError(f"{folder}: cannot load the base model ({type(exc).__name__}: {exc})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for parameter in model.get_input_embeddings().parameters():
        parameter.requires_grad = False
    probe_config = ProbeConfig(
        kind=kind,
        method="finetuned",
        base_model=config.base_model,
        base_model_sha256=base_model_sha256(config.base_model),
        layer=config.layers,
        max_tokens=config.max_tokens,
        labels=["violation"],
    )
    classifier = FinetunedClassifier(probe_config, model, tokenizer)
    train_texts = texts(train)
    positives = sum(labels)
    class_weight = torch.tensor([len(labels) / (2 * (len(labels) - positives)), len(labels) / (2 * positives)])
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    steps = config.epochs * ((len(train) + config.batch_size - 1) // config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: max(0.0, 1 - step / steps))
    rng = random.Random(config.seed)
    echo(f"fine-tuning {config.layers} layers of {config.base_model} on {len(train)} {kind} examples, {steps} steps")
    model.train()
    bar = tqdm(total=steps, desc=f"fine-tune {kind}", unit="step", disable=not progress)
    for _ in range(config.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            chunk = order[start : start + config.batch_size]
            logits = classifier.logits([train_texts[i] for i in chunk])
            target = torch.tensor([labels[i] for i in chunk])
            loss = torch.nn.functional.cross_entropy(logits, target, weight=class_weight)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    probs = [s["violation"] for s in classifier.predict_texts(texts(test))]
    threshold, report_split = calibrate(probs, test, config.false_alarm_rate)
    metrics = {
        "method": "finetuned",
        "layer": config.layers,
        "threshold": threshold,
        "false_alarm_target": config.false_alarm_rate,
        "epochs": config.epochs,
        "report_split": report_split,
        "measured_on": measured_on,
    }
    report_file = dataset / "report.json"
    data_report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else {}
    final = probe_config.model_copy(
        update={
            "thresholds": {"violation": threshold},
            "constitution": {
                k: data_report.get(f"constitution{s}")
                for k, s in (("name", ""), ("version", "_version"), ("hash", "_hash"))
            },
            "data": {
                "train": len(train),
                "test": len(test),
                "train_positives": positives,
                "dataset_report": data_report,
            },
            "metrics": metrics,
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / CONFIG).write_text(final.to_json(), encoding="utf-8")
    write_card(out, final)
    return metrics
