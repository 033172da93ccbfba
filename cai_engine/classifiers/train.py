"""Training, layer choice and calibration of a probe classifier, and its model card.

The depth of the probe and its L2 penalty are chosen by measurement: the base model's activations after each
candidate layer are pooled once, a head is fitted on the train split for each depth and penalty, and the shallowest
layer whose AUC is within ``auc_tolerance`` of the best wins (fewer layers, faster scoring), with the strongest L2
penalty within the same tolerance at that layer (penalties differ by noise on the synthetic split, and a stronger one
ranks prompts written by people better). The held-out split is
cut in two by request: depth, penalty and threshold (at the stated false-alarm rate) are chosen on one half, and the
metrics are reported on the other, so no reported number was tuned on the examples it is measured on.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cai_engine.classifiers.probe import (
    TURN_POOLINGS,
    BaseWeights,
    Encoder,
    Probe,
    ProbeConfig,
    base_model_sha256,
    probe_texts,
)
from cai_engine.errors import RunError
from cai_engine.files.jsonl import iter_jsonl
from cai_engine.models.runtime import DEFAULT_MODEL
from cai_engine.stats import wilson_interval


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(DEFAULT_MODEL, description="Whose activations the probe reads.")
    layers: list[int] = Field([2, 4, 6, 8, 12], min_length=1, description="Candidate depths, measured.")
    auc_tolerance: float = Field(
        0.01,
        ge=0,
        description="Take the shallowest layer within this of the best AUC, and at that layer the strongest L2 "
        "penalty within this of its best (a build, or `cai classifiers train --folds 0`; cross-validated training "
        "keeps the best cross-validated depth and penalty).",
    )
    false_alarm_rate: float = Field(0.05, gt=0, lt=1, description="Thresholds are set for this on harmless cases.")
    l2: list[float] = Field(
        [1.0, 10.0, 30.0, 100.0],
        min_length=1,
        description="Candidate L2 penalties on the head's weights, measured with each depth (at the chosen depth the "
        "strongest within auc_tolerance of the best held-out AUC wins). A weak penalty fits the generator's phrasing "
        "and saturates the probabilities; measured on HarmBench against the contrast set, 30-100 ranked far better "
        "than 0.01, and 10 better than 1.",
    )

    @field_validator("l2", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, (int, float)) else value

    max_tokens: int = Field(256, ge=8)
    output_pooling: Literal["mean", "reply"] = Field(
        "mean",
        description="Which tokens an output probe averages: 'mean', the whole exchange; 'reply', the reply's tokens "
        "only, the request read as context.",
    )
    input_pooling: Literal["mean", "turn", "mean+turn"] = Field(
        "mean",
        description="Which tokens an input probe averages: 'mean', the whole request; 'turn', the tokens that close "
        "the request and open the answer ('\\nAssistant:'), where a model has read the whole request and is about "
        "to answer or decline it; 'mean+turn', both from one pass, side by side.",
    )
    train_on: Literal["all", "written"] = Field(
        "all",
        description="'written': train an output probe on the exchanges people wrote alone (a build's rows whose "
        "reply_source is 'written').",
    )
    base_weights: BaseWeights = Field(
        "float",
        description="'int8': fit the head on the activations of the base layers with 8-bit weights, as the probe "
        "will then always run (one request about twice as fast as float32, without needing native bfloat16); 'float': "
        "on float32 activations.",
    )
    min_positives: int = Field(8, ge=1, description="A principle gets its own label with at least this many.")
    system: str | None = Field(
        None,
        description="An input probe with turn pooling reads each request inside the base model's chat template, "
        "after this system turn (e.g. the policy in a sentence), instead of as 'User: ...\\nAssistant:'.",
    )
    ensemble: bool = Field(
        False,
        description="Keep a head on every depth of ``layers``, each at its own best penalty, and average their logits, "
        "instead of keeping the best depth (cross-validated training only). The deepest sets how many layers run; the "
        "shallower ones are read from the same pass.",
    )


def _encoder_precision(config: TrainConfig) -> str:
    return "int8" if config.base_weights == "int8" else "float32"


def _how_read(config: TrainConfig, kind: str) -> dict[str, str]:
    """What a probe's metrics record of how its activations were read: every depth after the final norm, as served
    (a probe without ``features`` predates that), its base weights, and for a turn-pooled input probe that the
    answer's opening was tokenised apart from the request (``turn_tokens``; a turn probe without it predates that)."""
    turn = kind == "input" and config.input_pooling in TURN_POOLINGS
    return {"base_weights": config.base_weights, "features": "normed"} | ({"turn_tokens": "split"} if turn else {})


def _pooling(config: TrainConfig, kind: str) -> str:
    return config.output_pooling if kind == "output" else config.input_pooling


def probe_inputs(
    rows: list[dict[str, Any]], kind: str, pooling: str, frame: tuple[str, str] | None = None
) -> tuple[list[str], list[str | None] | None]:
    """The texts a ``kind`` probe reads for ``rows`` (a build's rows or labelled cases made into them), and what of
    each it reads as context only (:func:`~cai_engine.classifiers.probe.probe_texts`; ``frame``, a system turn's
    chat template around the request)."""
    prompts = [r["prompt"] if kind == "output" else r["text"] for r in rows]
    replies = [r["text"] for r in rows] if kind == "output" else None
    return probe_texts(kind, pooling, prompts, replies, frame)


def _frame(config: TrainConfig, kind: str, pooling: str, encoder: Encoder) -> tuple[str, str] | None:
    """The chat template around a request after ``config.system`` (None without one); refused where it cannot apply."""
    if config.system is None:
        return None
    if kind != "input" or pooling not in TURN_POOLINGS:
        raise RunError(
            "a system turn frames a request before the answer opens: it needs an input probe with turn pooling"
        )
    frame = encoder.chat_frame(config.system)
    sizes = [len(encoder.tokenizer(part, add_special_tokens=False)["input_ids"]) for part in frame]
    if sum(sizes) > config.max_tokens // 2:
        raise RunError(
            f"the system turn's frame takes {sizes[0]} tokens before the request and {sizes[1]} after it, more than half "
            f"of the {config.max_tokens} a probe reads: shorten the system turn"
        )
    return frame


def _read(
    encoder: Encoder,
    texts: list[str],
    skip: Any,
    config: TrainConfig,
    pooling: str,
    progress: str,
    frame: tuple[str, str] | None = None,
) -> Any:
    """Every depth's pooled activations of ``texts``, read as :meth:`Probe.predict` will read them for ``pooling``."""
    return encoder.features(
        texts,
        max_tokens=config.max_tokens,
        skip=skip,
        progress=progress,
        both=pooling == "mean+turn",
        split=pooling in TURN_POOLINGS,
        frame=frame,
    )


def _pooled(pooling: str) -> str:
    return {
        "reply": ", averaging over the replies' tokens",
        "turn": ", averaging over the answer's opening tokens",
        "mean+turn": ", averaging over the request's tokens and, apart, the answer's opening tokens",
    }.get(pooling, "")


def _int8(config: TrainConfig) -> str:
    return " (8-bit weights, one text at a time)" if config.base_weights == "int8" else ""


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise RunError(f"{path}: missing; run the data stage first (cai classifiers build)")
    return [row for _, row in iter_jsonl(path, RunError)]


def read_split(
    dataset: Path, kind: str, train_on: str = "all"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """The train and test rows of a build's ``kind`` data, and what the test rows are (``measured_on``). An output
    classifier is measured (depth, penalty, threshold, report) on the held-out exchanges people wrote when the test
    split has at least ``MIN_WRITTEN_TEST`` rows of each label among them: a generated reply is labelled by refusal
    phrases, which call a safe completion of a harmful request a violation. ``train_on="written"`` trains on those
    exchanges alone."""
    from cai_engine.classifiers.data import MIN_WRITTEN_TEST

    train, test = read_rows(dataset / f"{kind}-train.jsonl"), read_rows(dataset / f"{kind}-test.jsonl")
    measured_on = "all"
    written_test = written_rows(test)
    if kind == "output" and min(sum(r["label"] == y for r in written_test) for y in (0, 1)) >= MIN_WRITTEN_TEST:
        test, measured_on = written_test, "written exchanges"
    if train_on == "written":
        train = written_rows(train)
    if not any(r["label"] for r in train) or all(r["label"] for r in train):
        what = "the exchanges people wrote in " if train_on == "written" else ""
        raise RunError(f"{dataset}: {what}the {kind} training split needs both violating and harmless examples")
    return train, test, measured_on


def written_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output rows made from exchanges people wrote."""
    from cai_engine.classifiers.data import WRITTEN_REPLY

    return [r for r in rows if r.get("reply_source") == WRITTEN_REPLY]


def auc(scores: list[float], labels: list[int]) -> float | None:
    """Area under the ROC curve (the chance a random positive outranks a random negative; ties count half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    ranked = sorted((s, y) for s, y in zip(scores, labels))
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + j + 1) / 2  # ranks are 1-based
        rank_sum += mean_rank * sum(1 for _, y in ranked[i:j] if y)
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def fit_head(x: Any, y: Any, l2: float) -> tuple[Any, Any, Any, Any]:
    """Standardise ``x`` and fit one logistic regression per column of ``y`` (class-balanced, L2, L-BFGS)."""
    import torch

    mean = x.mean(0)
    scale = x.std(0).clamp_min(1e-6)
    z = (x - mean) / scale
    n_labels = y.shape[1]
    weight = torch.zeros((n_labels, z.shape[1]), requires_grad=True)
    bias = torch.zeros(n_labels, requires_grad=True)
    positives = y.sum(0).clamp_min(1)
    negatives = (len(y) - y.sum(0)).clamp_min(1)
    sample_weight = torch.where(y > 0, len(y) / (2 * positives), len(y) / (2 * negatives))
    optimiser = torch.optim.LBFGS([weight, bias], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        logits = z @ weight.T + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=sample_weight)
        loss = loss + l2 * (weight**2).sum() / len(y) * 10
        loss.backward()
        return loss

    optimiser.step(closure)
    return mean, scale, weight.detach(), bias.detach()


def _half(row: dict[str, Any]) -> str:
    digest = hashlib.sha256(str(row.get("request_id", row.get("text"))).encode()).digest()
    return "calibrate" if digest[0] % 2 == 0 else "report"


def rate_entry(hits: int, n: int) -> dict[str, Any]:
    interval = wilson_interval(hits, n)
    return {"rate": round(hits / n, 4) if n else None, "n": n, "hits": hits, "ci95": interval}


def false_alarm_cut(harmless: list[float], false_alarm_rate: float) -> float:
    """The threshold with ``false_alarm_rate`` of the ``harmless`` scores above it (the cut training and calibration
    share)."""
    ranked = sorted(harmless)
    return ranked[min(len(ranked) - 1, int((1 - false_alarm_rate) * len(ranked)))]


def calibrate(probs: list[float], test: list[dict[str, Any]], false_alarm_rate: float) -> tuple[float, dict[str, Any]]:
    """Set the threshold on the calibration half of the held-out split (``false_alarm_rate`` of its harmless
    examples above it) and measure on the report half: the threshold and the report half's metrics."""
    y_test = [int(r["label"]) for r in test]
    halves = [_half(r) for r in test]
    calibrate = [p for p, y, h in zip(probs, y_test, halves) if h == "calibrate" and not y]
    threshold = false_alarm_cut(calibrate, false_alarm_rate) if calibrate else 0.5
    report = [(p, y, r) for p, y, r, h in zip(probs, y_test, test, halves) if h == "report"]
    caught = sum(1 for p, y, _ in report if y and p > threshold)
    positives = sum(1 for _, y, _ in report if y)
    false_alarms = sum(1 for p, y, _ in report if not y and p > threshold)
    negatives = sum(1 for _, y, _ in report if not y)
    by_augmentation: dict[str, dict[str, int]] = {}
    for p, y, r in report:
        how = r.get("augmentation", "plain")  # a dataset written by hand may leave it out: the text as written
        entry = by_augmentation.setdefault(how if how.startswith("end:") else how.split(":")[0], {"n": 0, "correct": 0})
        entry["n"] += 1
        entry["correct"] += int((p > threshold) == bool(y))
    return threshold, {
        "auc": auc([p for p, _, _ in report], [y for _, y, _ in report]),
        "recall": rate_entry(caught, positives),
        "false_alarms": rate_entry(false_alarms, negatives),
        "accuracy_by_augmentation": by_augmentation,
    }


def train_probe(dataset: str | Path, kind: str, out: str | Path, config: TrainConfig, echo=print) -> dict[str, Any]:
    """Train the ``kind`` ('input' or 'output') probe on ``dataset`` (a ``cai classifiers build`` dataset folder)
    and save it to ``out``; returns its metrics."""
    import json

    import torch

    if config.ensemble:
        raise RunError(
            "an ensemble of depths is chosen by cross-validation: train it with cai classifiers train --folds K"
        )
    dataset = Path(dataset)
    train, test, measured_on = read_split(dataset, kind, config.train_on)
    pooling = _pooling(config, kind)

    def features(rows, label):
        texts, skip = probe_inputs(rows, kind, pooling, frame)
        return _read(encoder, texts, skip, config, pooling, f"{kind} activations ({label})", frame)

    deepest = max(config.layers)
    encoder = Encoder(config.base_model, deepest, _encoder_precision(config))
    frame = _frame(config, kind, pooling, encoder)
    echo(
        f"reading {len(train) + len(test)} {kind} examples with {deepest} layers of {config.base_model}{_int8(config)}"
        + _pooled(pooling)
    )
    x_train = features(train, "train")
    x_test = features(test, "held out")
    y_train = torch.tensor([[float(r["label"])] for r in train])
    y_test = [int(r["label"]) for r in test]

    choose = [_half(r) == "calibrate" for r in test]
    by_layer: dict[int, float | None] = {}
    by_l2: dict[tuple[int, float], float | None] = {}
    for layer in sorted(config.layers):
        for l2 in config.l2:
            mean, scale, weight, bias = fit_head(x_train[:, layer - 1], y_train, l2)
            scores = (((x_test[:, layer - 1] - mean) / scale) @ weight.T + bias)[:, 0].tolist()
            # chosen on the calibration half only: the report half stays unseen by every choice
            by_l2[layer, l2] = auc([v for v, c in zip(scores, choose) if c], [y for y, c in zip(y_test, choose) if c])
        known = [v for (k, _), v in by_l2.items() if k == layer and v is not None]
        by_layer[layer] = max(known) if known else None
        echo(
            f"  layer {layer}: held-out AUC {by_layer[layer]} (by L2: "
            + ", ".join(
                f"{l2:g} {by_l2[layer, l2]:.4f}" if by_l2[layer, l2] is not None else f"{l2:g} n/a" for l2 in config.l2
            )
            + ")"
        )
    usable = {k: v for k, v in by_layer.items() if v is not None}
    best = max(usable.values()) if usable else None
    layer = (
        min(k for k, v in usable.items() if best is not None and v >= best - config.auc_tolerance)
        if usable
        else deepest
    )

    # hand-written sets carry no principle and train the overall label only; a principle's own red-team requests
    # carry theirs
    principles = Counter(r["principle_id"] for r in train if r["label"] and r.get("principle_id"))
    labels = ["violation", *sorted(p for p, n in principles.items() if n >= config.min_positives)]
    y_all = torch.tensor(
        [[float(r["label"])] + [float(r["label"] and r["principle_id"] == p) for p in labels[1:]] for r in train]
    )
    scored = {v: a for (k, v), a in by_l2.items() if k == layer and a is not None}
    # the strongest penalty within the tolerance of the best: on the synthetic split the penalties differ by noise,
    # and off it a stronger one ranks better (a weak one fits the generator's phrasing)
    top = max(scored.values()) if scored else None
    l2 = max(v for v, a in scored.items() if a >= top - config.auc_tolerance) if top is not None else max(config.l2)
    mean, scale, weight, bias = fit_head(x_train[:, layer - 1], y_all, l2)
    logits = ((x_test[:, layer - 1] - mean) / scale) @ weight.T + bias
    probs = torch.sigmoid(logits)[:, 0].tolist()

    threshold, report_split = calibrate(probs, test, config.false_alarm_rate)
    metrics = {
        "method": "probe",
        "layer_auc": {str(k): v for k, v in by_layer.items()},
        "layer": layer,
        **_how_read(config, kind),
        "l2": l2,
        "l2_auc": {f"{k}:{v:g}": a for (k, v), a in by_l2.items()},
        "threshold": threshold,
        "false_alarm_target": config.false_alarm_rate,
        "report_split": report_split,
        "measured_on": measured_on,
        "trained_on": config.train_on,
    }
    report_file = dataset / "report.json"
    data_report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else {}
    probe_config = ProbeConfig(
        kind=kind,
        base_model=config.base_model,
        base_model_sha256=base_model_sha256(config.base_model),
        layer=layer,
        base_weights=config.base_weights,
        pooling=pooling,
        system=config.system,
        frame=list(frame) if frame is not None else None,
        max_tokens=config.max_tokens,
        labels=labels,
        thresholds={"violation": threshold},
        constitution={
            k: data_report.get(f"constitution{s}")
            for k, s in (("name", ""), ("version", "_version"), ("hash", "_hash"))
        },
        data={
            "train": len(train),
            "test": len(test),
            "train_positives": int(y_train.sum()),
            "per_principle_positives": dict(principles),
            "dataset_report": data_report,
        },
        metrics=metrics,
    )
    probe = Probe(probe_config, {"mean": mean, "scale": scale, "weight": weight, "bias": bias})
    probe.save(out)
    write_card(Path(out), probe_config, dataset=str(dataset))
    return metrics


def cv_folds(labels: list[int], groups: list[Any], folds: int, seed: int) -> list[int]:
    """Each row's fold for ``folds``-fold cross-validation, stratified (each fold gets its share of both labels).
    Rows that share a group (a request and its rewrites) fall in one fold, so no head is scored on a copy of what it
    was fitted on; a group holding both labels is an error. Rows without rewrites (each its own group) get the
    folds they always got."""
    import random

    first: dict[Any, int] = {}
    for n, group in enumerate(groups):
        first.setdefault(group, n)
        if labels[first[group]] != labels[n]:
            raise RunError(f"group {group!r} holds rows of both labels; rewrites of a request keep its label")
    order = sorted(first.values())
    random.Random(seed).shuffle(order)
    fold_of_group = {}
    for label in (0, 1):
        for n, i in enumerate(j for j in order if labels[j] == label):
            fold_of_group[groups[i]] = n % folds
    return [fold_of_group[group] for group in groups]


def train_probe_cv(
    rows: list[dict[str, Any]],
    kind: str,
    out: str | Path,
    config: TrainConfig,
    folds: int = 5,
    seed: int = 0,
    echo=print,
    files: list[str] | None = None,
    report: dict[str, Any] | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """Train the ``kind`` probe on every row of a small labelled set, choosing depth, L2 penalty and threshold by
    ``folds``-fold cross-validation (each row is scored once by a head that never saw it), then fitting the head on
    all rows. For a few hundred cases, where a held-out split would leave a dozen harmless ones to set a threshold
    on. The reported recall and false alarms are the cross-validated ones at that threshold: the threshold was chosen
    on the same scores, so they lean optimistic; measure on cases written later with ``cai classifiers eval``.
    ``report`` is added to the dataset report the card records (e.g. how many cases were dropped before). Rows that
    share a ``group`` (a request and its rewrites) are scored in one fold (``cv_folds``).

    ``repeats`` > 1 draws the folds that many times (seeds ``seed`` to ``seed + repeats - 1``): each depth and
    penalty is judged by its mean AUC over the draws, the threshold is the quantile of every draw's harmless scores
    together (each draw's own is recorded as ``threshold_by_repeat``), and a case's reported score is its mean over
    the draws, so that the choice depends less on which cases happened to share a fold. The activations are read
    once; only the heads are fitted ``repeats`` times as often."""
    import torch

    if repeats < 1:
        raise RunError(f"repeats must be at least 1, not {repeats}")
    if config.ensemble and len(set(config.layers)) < 2:
        raise RunError(f"an ensemble averages two or more depths; layers gives {sorted(set(config.layers))}")
    labels = [int(r["label"]) for r in rows]
    groups = [r.get("group", ("row", n)) for n, r in enumerate(rows)]
    per_label = [len({g for g, y in zip(groups, labels) if y == label}) for label in (0, 1)]
    if min(per_label) < folds:
        raise RunError(f"{folds}-fold cross-validation needs at least {folds} cases of each label")
    assignments = [cv_folds(labels, groups, folds, seed + r) for r in range(repeats)]
    pooling = _pooling(config, kind)
    deepest = max(config.layers)
    encoder = Encoder(config.base_model, deepest, _encoder_precision(config))
    frame = _frame(config, kind, pooling, encoder)
    texts, skip = probe_inputs(rows, kind, pooling, frame)
    echo(
        f"reading {len(rows)} {kind} examples with {deepest} layers of {config.base_model}{_int8(config)}"
        + _pooled(pooling)
    )
    x_all = _read(encoder, texts, skip, config, pooling, f"{kind} activations", frame)
    y_all = torch.tensor([[float(v)] for v in labels])

    raw: dict[tuple[int, float], list[list[float]]] = {}  # the heads' logits, which an ensemble averages

    def cv_scores(layer: int, l2: float, fold_of: list[int]) -> list[float]:
        scores, logits = [0.0] * len(rows), [0.0] * len(rows)
        for fold in range(folds):
            train = [i for i in range(len(rows)) if fold_of[i] != fold]
            test = [i for i in range(len(rows)) if fold_of[i] == fold]
            mean, scale, weight, bias = fit_head(x_all[train, layer - 1], y_all[train], l2)
            fold_logits = (((x_all[test, layer - 1] - mean) / scale) @ weight.T + bias)[:, 0]
            for i, value, logit in zip(test, torch.sigmoid(fold_logits).tolist(), fold_logits.tolist()):
                scores[i], logits[i] = value, logit
        raw.setdefault((layer, l2), []).append(logits)
        return scores

    def mean_auc(runs: list[list[float]]) -> float | None:
        found = [a for a in (auc(scores, labels) for scores in runs) if a is not None]
        return sum(found) / len(found) if found else None

    by_l2: dict[tuple[int, float], float | None] = {}
    cached: dict[tuple[int, float], list[list[float]]] = {}
    for layer in sorted(config.layers):
        for l2 in config.l2:
            cached[layer, l2] = [cv_scores(layer, l2, fold_of) for fold_of in assignments]
            by_l2[layer, l2] = mean_auc(cached[layer, l2])
        echo(f"  layer {layer}: cross-validated AUC " + ", ".join(f"L2 {l2:g} {by_l2[layer, l2]}" for l2 in config.l2))
    by_layer = {k: max(v for (k2, _), v in by_l2.items() if k2 == k and v is not None) for k in config.layers}
    # the best depth and the best penalty: on a few hundred cases, AUCs a tolerance apart are noise, and taking the
    # shallowest within it (the build's rule, for speed) cost a domain check 3-6 of 20 held-out violations
    best = max(by_layer.values())
    layer = min(k for k, v in by_layer.items() if v == best)
    scored = {v: a for (k, v), a in by_l2.items() if k == layer and a is not None}
    l2 = max(scored, key=lambda v: scored[v])
    runs = cached[layer, l2]
    depths = sorted(set(config.layers)) if config.ensemble else []
    if depths:  # every depth at its own best penalty (the first best in the order of l2, as for one depth)
        penalty: dict[int, float] = {}
        for k in depths:
            known = {v: a for (k2, v), a in by_l2.items() if k2 == k and a is not None}
            penalty[k] = max(known, key=known.__getitem__)
        # the heads' raw logits averaged, as Probe.predict averages them (not logits recovered from probabilities,
        # which float32 rounds to 0 or 1 past about 16)
        runs = [
            torch.sigmoid(torch.tensor([raw[k, penalty[k]][r] for k in depths], dtype=torch.float64).mean(0)).tolist()
            for r in range(repeats)
        ]
        layer, l2 = depths[-1], penalty[depths[-1]]
        ensemble_auc = mean_auc(runs)
        echo(f"  ensemble of layers {', '.join(map(str, depths))}: cross-validated AUC {ensemble_auc}")

    def quantile(of: list[list[float]]) -> float:  # over the harmless scores of the runs ``of``, pooled
        return false_alarm_cut([v for scores in of for v, y in zip(scores, labels) if not y], config.false_alarm_rate)

    threshold = quantile(runs)
    # the report counts requests, not readings: a request whose rewrites share its group is scored by the mean of
    # their scores (three readings of one request are not three samples), and of its scores in every repeat
    by_group: dict[Any, list[float]] = {}
    for scores in runs:
        for group, value in zip(groups, scores):
            by_group.setdefault(group, []).append(value)
    label_of = dict(zip(groups, labels))
    pooled = [(sum(v) / len(v), label_of[g]) for g, v in by_group.items()]
    caught = sum(1 for v, y in pooled if y and v > threshold)
    alarms = sum(1 for v, y in pooled if not y and v > threshold)
    if depths:
        heads = [fit_head(x_all[:, k - 1], y_all, penalty[k]) for k in depths]
        mean, scale, weight, bias = (torch.stack([head[i] for head in heads]) for i in range(4))
    else:
        mean, scale, weight, bias = fit_head(x_all[:, layer - 1], y_all, l2)
    metrics = {
        "method": "probe",
        "selection": f"{folds}-fold cross-validation"
        + (f", repeated {repeats} times (fold seeds {seed}-{seed + repeats - 1})" if repeats > 1 else ""),
        "layer_auc": {str(k): v for k, v in by_layer.items()},
        "layer": layer,
        **_how_read(config, kind),
        "l2": l2,
        "l2_auc": {f"{k}:{v:g}": a for (k, v), a in by_l2.items()},
        **(
            {"ensemble": {"layers": depths, "l2": {str(k): penalty[k] for k in depths}, "auc": ensemble_auc}}
            if depths
            else {}
        ),
        "threshold": threshold,
        **({"threshold_by_repeat": [quantile([scores]) for scores in runs]} if repeats > 1 else {}),
        "false_alarm_target": config.false_alarm_rate,
        "report_split": {
            "auc": ensemble_auc if depths else by_l2[layer, l2],
            "recall": rate_entry(caught, per_label[1]),
            "false_alarms": rate_entry(alarms, per_label[0]),
            "note": "cross-validated scores; the threshold was set on them"
            + ("; a request's readings averaged" if len(by_group) < len(rows) else "")
            + (
                f"; a case's scores averaged over {repeats} draws of the folds (the threshold was set on each draw's "
                "scores apart, so these false alarms sit below those of a single draw; the AUC is the draws' mean)"
                if repeats > 1
                else ""
            ),
        },
    }
    probe_config = ProbeConfig(
        kind=kind,
        base_model=config.base_model,
        base_model_sha256=base_model_sha256(config.base_model),
        layer=layer,
        ensemble=depths,
        base_weights=config.base_weights,
        pooling=pooling,
        system=config.system,
        frame=list(frame) if frame is not None else None,
        max_tokens=config.max_tokens,
        labels=["violation"],
        thresholds={"violation": threshold},
        data={
            "train": len(rows),
            "test": 0,
            "train_positives": labels.count(1),
            "dataset_report": {"source": "cases", "files": files or [], "folds": folds, "seed": seed}
            | ({"repeats": repeats} if repeats > 1 else {})
            | (report or {}),
        },
        metrics=metrics,
    )
    Probe(probe_config, {"mean": mean, "scale": scale, "weight": weight, "bias": bias}).save(out)
    write_card(Path(out), probe_config)
    return metrics


def _fmt(entry: dict[str, Any]) -> str:
    if not entry.get("n"):
        return "n/a"
    low, high = entry["ci95"]
    return f"{entry['rate']:.3f} ({entry['hits']}/{entry['n']}, 95% CI {low:.2f}-{high:.2f})"


def _threshold_lines(config: ProbeConfig) -> list[str]:
    """Where the threshold came from: the synthetic split, or `cai classifiers calibrate` on harmless traffic."""
    m = config.metrics
    record = m.get("calibration")
    if not record:
        return [f"- threshold: {config.thresholds.get('violation'):.4f} for {m.get('false_alarm_target')} false alarms"]
    sources = ", ".join(record.get("by_source", {})) or "not recorded"
    return [
        f"- threshold: {record['threshold']:.4f}, set by `cai classifiers calibrate` on {record['calibrated_on']} for "
        f"{record['false_alarm_target']} false alarms on harmless items from {sources}: {_fmt(record['false_alarms'])}",
        f"- the metrics below were measured at the synthetic split's threshold, "
        f"{m.get('threshold', record.get('previous_threshold'))}",
    ]


def write_card(folder: Path, config: ProbeConfig, dataset: str | None = None) -> None:
    """The model card (``huggingface_hub.ModelCard``): what it was compiled from, on what data, how well it does, and
    how to use it. Its metadata names the licence and upstream Hub id of the base model, the dataset, the
    constitution (name, version, content hash) and ``library_name: cai-engine`` (cai-engine's loader applies the
    text normalisation and the calibrated threshold)."""
    import json

    from huggingface_hub import ModelCard, ModelCardData

    from cai_engine.models.files import upstream_model
    from cai_engine.store.cards import hub_dataset_ids

    m = config.metrics
    report = m.get("report_split", {})
    constitution = config.constitution
    upstream, license_id = upstream_model(config.base_model)
    data = ModelCardData(
        license=license_id or "unknown",
        base_model=upstream,
        datasets=hub_dataset_ids(dataset),
        library_name="cai-engine",
        pipeline_tag="text-classification",
        tags=["constitutional-ai", "safety-classifier", "cai-engine", config.kind, config.method]
        + (["int8"] if config.base_weights == "int8" else []),
        constitution={k: v for k, v in constitution.items() if v is not None} or None,
    )
    from_cases = config.data.get("dataset_report", {}).get("source") == "cases"
    what = (
        (
            f"Linear probes on layers {', '.join(map(str, config.ensemble))} of `{config.base_model}`, their logits "
            "averaged ("
            if config.ensemble
            else f"A linear probe on the first {config.layer} layers of `{config.base_model}` ("
        )
        + {
            "reply": "activations averaged over the reply's tokens",
            "turn": "activations averaged over the tokens that open the answer, after the request",
            "mean+turn": "activations averaged over the request's tokens beside those averaged over the tokens that "
            "open the answer",
        }.get(config.pooling, "mean-pooled activations")
        + (
            ", with the layers' weights in 8 bits: dynamic quantisation, which it always runs"
            if config.base_weights == "int8"
            else ""
        )
        + "), "
        if config.method == "probe"
        else f"The first {config.layer} layers of `{config.base_model}` fine-tuned with a classification head, "
    )
    lines = [
        f"# {folder.name if from_cases else constitution.get('name')} {config.kind} classifier",
        "",
        what
        + (
            "trained by `cai classifiers train` on labelled cases."
            if from_cases
            else f"compiled by `cai classifiers build` from the constitution **{constitution.get('name')}** version "
            f"{constitution.get('version')} (`{constitution.get('hash')}`)."
        ),
        "",
        "It reads "
        + (
            "an exchange (the request and the reply"
            if config.kind == "output"
            else "a request inside the base model's chat template after the system turn "
            f"{json.dumps(config.system, ensure_ascii=False)}, then the opening of an answer to it (no reply)"
            if config.system is not None
            else "a request, then the opening of an answer to it (no reply)"
            if config.pooling in TURN_POOLINGS
            else "a request alone"
        )
        + (")." if config.kind == "output" else ".")
        + " It outputs P(violation) and a probability per principle with enough training data.",
        "",
        "## Data",
        f"- train: {config.data.get('train')} examples ({config.data.get('train_positives')} violating), "
        f"test: {config.data.get('test')}; "
        + (
            f"labelled cases from {', '.join(config.data['dataset_report'].get('files', []))}"
            + (
                (
                    f", every case scored once in each of {repeated} draws of {report_folds}-fold cross-validation "
                    "(stratified, seeded; depth (or each averaged depth's penalty), penalty and threshold chosen on "
                    "every draw together, the reported "
                    "recall and false alarms averaging a case over the draws)"
                    if (repeated := config.data["dataset_report"].get("repeats", 1)) > 1
                    else f", every case scored once by {report_folds}-fold cross-validation (stratified, seeded)"
                )
                + " and then all of them training the head."
                if (report_folds := config.data["dataset_report"].get("folds"))
                else ", split by a seeded hash of each case."
            )
            + (
                " Each request was read three times, ending in '?', in '.' and in nothing (`--endings balance`); a "
                "request's readings share its fold (or its side of the split), and the metrics count "
                + ("requests." if config.data["dataset_report"].get("folds") else "readings.")
                if config.data["dataset_report"].get("endings") == "balance"
                else ""
            )
            if from_cases
            else (
                "exchanges people wrote alone"
                if m.get("trained_on") == "written"
                else "written and labelled by the feedback model, beside any exchanges and requests people wrote"
            )
            + ", augmented offline (jailbreak-style wrappers, Unicode spellings); split by request, seed request or "
            "batch, two wrapper templates held out"
            + (
                "; measured on the held-out exchanges people wrote."
                if m.get("measured_on") == "written exchanges"
                else "."
            )
        ),
        f"- violating training examples per principle: {config.data.get('per_principle_positives', 'not recorded')}",
        "",
        (
            "## Metrics (cross-validated scores; the threshold was set on the same scores, so they lean optimistic)"
            if m.get("selection")
            else "## Metrics (the held-out report half; the threshold was set on the other half)"
        ),
        *_threshold_lines(config),
        f"- AUC: {report.get('auc')}",
        f"- recall: {_fmt(report.get('recall', {}))}",
        f"- false alarms: {_fmt(report.get('false_alarms', {}))}",
        *([f"- held-out AUC by layer: {m.get('layer_auc')}"] if "layer_auc" in m else []),
        *(
            [
                f"- heads averaged: layers {', '.join(m['ensemble']['l2'])} at L2 "
                f"{', '.join(f'{v:g}' for v in m['ensemble']['l2'].values())}, cross-validated AUC of their mean "
                f"{m['ensemble']['auc']}"
            ]
            if "ensemble" in m
            else []
        ),
        "",
        "These are measured on held-out data from the same source; see `cai classifiers eval` for data",
        "nobody here wrote.",
        "",
        "## Use",
        "```yaml",
        "critic: {name: classifier, options: {path: " + str(folder) + "}}",
        "```",
    ]
    if config.method == "finetuned":
        lines += [
            "",
            'The folder is also a transformers checkpoint: `pipeline("text-classification", model=FOLDER)` loads it '
            "(give it `User: <request>` or `User: <request>\\nAssistant: <reply>`; cai-engine also folds Unicode "
            "spellings first and applies the calibrated threshold above).",
        ]
    card = ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n")
    (folder / "README.md").write_text(str(card), encoding="utf-8")
