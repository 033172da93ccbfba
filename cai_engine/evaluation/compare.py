"""Policy comparison: what the runtime guard does to the same model's responses under each of several policies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cai_engine.evaluation.sources import load_source
from cai_engine.files.jsonl import write_json
from cai_engine.models.runtime import ModelRef, Runtime


def compare_policies(
    model: ModelRef,
    policies: list[str],
    prompts: str,
    out: str | Path,
    *,
    limit: int | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """What the guard does to the same model's responses under each policy: actions, violations, differences."""
    from cai_engine.guard.engine import Engine

    runtime = runtime or Runtime.default()
    items = load_source(prompts, runtime.registry, limit=limit)
    sampler = runtime.component("sampler", "model", {"model": model, "temperature": 0.0})
    texts = [row[0] for row in sampler.sample([i.conversation for i in items])]
    result: dict[str, Any] = {"model": model, "prompts": prompts, "count": len(items), "policies": {}}
    per_policy = {}
    for path in policies:
        engine = Engine.from_policy(path, runtime=runtime)
        guarded = engine.guard_batch([(i.conversation, t) for i, t in zip(items, texts)])
        engine.close()
        actions: dict[str, int] = {}
        violations: dict[str, int] = {}
        for g in guarded:
            actions[g.action] = actions.get(g.action, 0) + 1
            for v in {v.principle_id for r in g.rounds for v in r.violations}:
                violations[v] = violations.get(v, 0) + 1
        per_policy[path] = guarded
        result["policies"][path] = {
            "name": engine.policy.name,
            "actions": actions,
            "violations_by_principle": dict(sorted(violations.items())),
        }
    first, *rest = policies
    result["differences"] = [
        {
            "prompt": item.text,
            "response": text,
            **{p: {"action": per_policy[p][k].action, "response": per_policy[p][k].response} for p in policies},
        }
        for k, (item, text) in enumerate(zip(items, texts))
        if any(
            per_policy[p][k].action != per_policy[first][k].action
            or per_policy[p][k].response != per_policy[first][k].response
            for p in rest
        )
    ][:20]
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json(Path(out) / "policy-comparison.json", result)
    return result
