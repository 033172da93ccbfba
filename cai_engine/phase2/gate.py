"""The judge gate: measure a judge on labelled pairs (accuracy, position consistency, calibration) before its labels are trusted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cai_engine.constitution.model import Constitution, Message
from cai_engine.errors import ConfigError
from cai_engine.files.jsonl import iter_jsonl, write_json
from cai_engine.models.runtime import Runtime
from cai_engine.phase2.labels import draw_principles
from cai_engine.plugins.refs import ComponentRef
from cai_engine.prompts.sets import PromptItem
from cai_engine.records import ComparisonTask, GateResult
from cai_engine.seeds import item_rng
from cai_engine.stats import wilson_interval
from cai_engine.store.runs import now


class LabelledPair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    prompt: str
    better: str
    worse: str
    principle: str | None = Field(None, description="Principle id the pair tests (default: drawn from rl ones).")
    aspect: str | None = None


def load_labelled_pairs(source: str | Path) -> list[LabelledPair]:
    from cai_engine.files.resources import data_dir

    path = data_dir("prompts") / "judge-pairs.jsonl" if str(source) == "builtin:judge-pairs" else Path(source)
    pairs = []
    for where, row in iter_jsonl(path):
        try:
            pairs.append(LabelledPair.model_validate(row))
        except ValueError as exc:
            raise ConfigError(
                f"{where}: not a labelled pair (id, prompt, better, worse): {str(exc).splitlines()[1].strip()}"
            ) from None
    if not pairs:
        raise ConfigError(f"{path}: contains no labelled pairs")
    return pairs


def measure_judge(
    judge, pairs: list[LabelledPair], constitution: Constitution, *, runtime: Runtime, seed: int = 0
) -> GateResult:
    """Accuracy, position consistency and calibration of ``judge`` on pairs with known answers (CAI-SPEC §8.1).

    Which reply is shown first is randomised (seeded), so a judge that always picks one position scores 50%.
    """
    tasks, truth = [], []
    for pair in pairs:
        rng = item_rng(seed, pair.id)
        prompt = PromptItem(id=pair.id, conversation=[Message(role="user", content=pair.prompt)])
        principle = (
            constitution.principle(pair.principle)
            if pair.principle
            else draw_principles(runtime, constitution, prompt, 1, rng)[0]
        )
        better_first = rng.random() < 0.5
        a, b = (pair.better, pair.worse) if better_first else (pair.worse, pair.better)
        tasks.append(
            ComparisonTask(
                conversation=prompt.conversation,
                response_a=a,
                response_b=b,
                principles=[principle],
            )
        )
        truth.append(better_first)
    judgements = judge.compare(tasks)
    scored = [(j, t) for j, t in zip(judgements, truth) if j.p_a is not None]
    # a tie (p = 0.5) is half right, whichever reply was better: no tie-break may favour a position
    correct = sum(0.5 if j.p_a == 0.5 else float((j.p_a > 0.5) == t) for j, t in scored)
    ordered = [j for j, _ in scored if j.position_consistent is not None]  # pointwise judges see no order
    consistent = sum(bool(j.position_consistent) for j in ordered)
    # calibration: expected calibration error over 5 bins of the confidence in the chosen answer
    bins: dict[int, list[tuple[float, float]]] = {}
    for j, t in scored:
        confidence = max(j.p_a, 1 - j.p_a)
        right = 0.5 if j.p_a == 0.5 else float((j.p_a > 0.5) == t)  # a tie is half right, as in accuracy
        bins.setdefault(min(int((confidence - 0.5) * 10), 4), []).append((confidence, right))
    ece = (
        sum(
            len(v) / len(scored) * abs(sum(c for c, _ in v) / len(v) - sum(ok for _, ok in v) / len(v))
            for v in bins.values()
        )
        if scored
        else None
    )
    interval = wilson_interval(correct, len(scored))
    return GateResult(
        pairs=len(pairs),
        scored=len(scored),
        abstained=len(pairs) - len(scored),
        scored_share=round(len(scored) / len(pairs), 4) if pairs else None,
        accuracy=round(correct / len(scored), 4) if scored else None,
        accuracy_ci95=[round(interval[0], 4), round(interval[1], 4)] if interval else None,
        position_consistency=round(consistent / len(ordered), 4) if ordered else None,
        same_position_rate=round(1 - consistent / len(ordered), 4) if ordered else None,
        expected_calibration_error=round(ece, 4) if ece is not None else None,
        judge=judge.describe(),
    )


def judge_identity(described: dict[str, Any] | None) -> dict[str, Any] | None:
    """What makes two judges the same judge: component name, options (layout, few-shot, model) and model id."""
    if not described:
        return None
    return {"name": described.get("name"), "options": described.get("options"), "model_id": described.get("model_id")}


def run_gate(
    run: str | Path | None,
    judge_ref: ComponentRef | dict[str, Any],
    *,
    constitution: str = "harmless",
    pairs: str = "builtin:judge-pairs",
    runtime: Runtime | None = None,
    seed: int = 0,
) -> GateResult:
    """Measure a judge; with ``run``, store the result as the run's ``gate.json`` (the trainers read it)."""
    runtime = runtime or Runtime.default()
    ref = judge_ref if isinstance(judge_ref, ComponentRef) else ComponentRef.model_validate(judge_ref)
    judge = ref.build("judge", runtime)
    result = measure_judge(
        judge, load_labelled_pairs(pairs), runtime.registry.constitution(constitution), runtime=runtime, seed=seed
    )
    result = result.model_copy(update={"pairs_source": str(pairs), "measured": now()})
    if run is not None:
        path = Path(run) / "gate.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
    return result
