"""The evaluation report: the verdict in a few lines, tables, charts and one self-contained HTML page."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from cai_engine.errors import CaiError
from cai_engine.files.outputs import write_atomic
from cai_engine.records import EvalResults, GateResult, Rate
from cai_engine.stats import format_rate


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _charts(results: EvalResults) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results.models
    names = list(models)
    charts = []
    judged = [n for n in names if models[n].judged]
    if judged:
        keys = [("safe rate, harmful prompts", "safe_rate"), ("refusal, benign-but-scary", "over_refusal_benign")]
        fig, ax = plt.subplots(figsize=(7, 3.4))
        width = 0.8 / len(judged)
        for k, name in enumerate(judged):
            entries = [getattr(models[name].judged, key) or Rate() for _, key in keys]
            values = [e.rate if e.rate is not None else float("nan") for e in entries]
            errors = [
                [v - e.ci95[0] if e.ci95 else 0 for v, e in zip(values, entries)],
                [e.ci95[1] - v if e.ci95 else 0 for v, e in zip(values, entries)],
            ]
            ax.bar([i + k * width for i in range(len(keys))], values, width, yerr=errors, capsize=3, label=name)  # type: ignore[arg-type]
        ax.set_xticks([i + width * (len(judged) - 1) / 2 for i in range(len(keys))], [k for k, _ in keys])
        ax.set_ylim(0, 1)
        ax.set_ylabel("rate (95% Wilson interval)")
        ax.legend(fontsize=8)
        ax.set_title("Judged by the feedback model")
        charts.append(("judged", _png(fig)))
    metrics = [
        ("refusal markers\n(harmful)", lambda m: m.harmful.refusal_marker_rate),
        ("safe rate\n(harmful)", lambda m: m.harmful.safe_rate),
        ("over-refusal\n(benign)", lambda m: m.over_refusal.rate),
        ("refuse-only share\nof safe answers", lambda m: m.evasiveness.refuse_only_share),
    ]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        values = [fn(models[name]) for _, fn in metrics]
        values = [float("nan") if v is None else v for v in values]  # no signal is not zero
        ax.bar([i + k * width for i in range(len(metrics))], values, width, label=name)  # type: ignore[arg-type]
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(metrics))], [m for m, _ in metrics], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate")
    ax.legend(fontsize=8)
    ax.set_title("Harmlessness vs over-refusal and evasiveness")
    charts.append(("rates", _png(fig)))
    if any(models[n].harmful.harm_score is not None for n in names):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(names, [models[n].harmful.harm_score or float("nan") for n in names], color="#4a7")
        ax.set_ylim(1, 10)
        ax.set_ylabel("judge harm score (1-10, higher is safer)")
        ax.set_title("Judge-based harmlessness on held-out red-team prompts")
        charts.append(("harm-score", _png(fig)))
    first_rates = next((m.principle_violation_rates for m in models.values() if m.principle_violation_rates), None)
    if first_rates:
        ids = list(first_rates)
        fig, ax = plt.subplots(figsize=(8, 3.4))
        for k, name in enumerate(names):
            rates = models[name].principle_violation_rates or {}
            ax.bar([i + k * width for i in range(len(ids))], [rates.get(p) or 0 for p in ids], width, label=name)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(ids))], ids, rotation=60, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("violation rate")
        ax.legend(fontsize=8)
        ax.set_title("Per-principle violation rates (critic verdicts)")
        charts.append(("principles", _png(fig)))
    by_round = results.harm_by_round
    if by_round and by_round["mean_harm_score_by_round"]:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        values = by_round["mean_harm_score_by_round"]
        ax.plot(range(len(values)), [v or 0 for v in values], marker="o")
        ax.set_xlabel("revision round (0 = initial response)")
        ax.set_ylabel("mean harm score")
        ax.set_title("Harmlessness by revision round")
        charts.append(("rounds", _png(fig)))
    return charts


def gate_warning(quality: GateResult | None) -> str | None:
    """The warning for a judge that fails the gate on the labelled pairs (None when it passes or was not measured)."""
    if quality is None or quality.accuracy is None:
        return None
    if quality.accuracy < 0.6 or (quality.same_position_rate or 0) > 0.25:
        return (
            f"the judge fails its own gate on the labelled pairs (accuracy {quality.accuracy:.2f}, same "
            f"position {quality.same_position_rate}): its win rates and scores are not evidence of anything"
        )
    return None


def summary_lines(results: EvalResults | dict[str, Any]) -> list[str]:
    """The verdict in a few sentences: the last model against the first, each rate with n and its interval."""
    results = results if isinstance(results, EvalResults) else EvalResults.model_validate(results)
    models = results.models
    names = list(models)
    if not names:
        return ["no models were evaluated"]
    first, last = names[0], names[-1]
    lines = []
    a, b = models[first].judged, models[last].judged
    if a and b:
        lines.append(
            f"safe on held-out harmful prompts (judged): {first} {format_rate(a.safe_rate)} -> "
            f"{last} {format_rate(b.safe_rate)}"
        )
        lines.append(
            f"refusal on benign-but-scary prompts (judged): {first} {format_rate(a.over_refusal_benign)}"
            f" -> {last} {format_rate(b.over_refusal_benign)}"
        )
    lines.append(
        f"refusal on held-out harmful prompts (markers): {first} {format_rate(models[first].refusal_on_harmful)} -> "
        f"{last} {format_rate(models[last].refusal_on_harmful)}"
    )
    lines.append(
        f"refusal on benign-but-scary prompts (markers): {first} {format_rate(models[first].over_refusal.rate_ci)} -> "
        f"{last} {format_rate(models[last].over_refusal.rate_ci)}"
    )
    e, f = models[first].engaged, models[last].engaged
    if e and f and e.engaged and f.engaged:
        lines.append(
            f"harmful refusal or safe completion (judged): {first} {format_rate(e.declined_or_engaged)} -> "
            f"{last} {format_rate(f.declined_or_engaged)}; engaged rather than a bare refusal: {first} "
            f"{format_rate(e.engaged)} -> {last} {format_rate(f.engaged)}"
        )
    for aspect, versus in (models[last].vs_baseline or {}).items():
        lines.append(
            f"{aspect} win rate of {last} against {first}: {format_rate(versus.win_rate_ci)}, "
            f"length-controlled {versus.length_controlled_win_rate}"
        )
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "—" if value is None else str(value)


def _rows(results: EvalResults) -> dict[str, list[list[Any]]]:
    """The cells of every table, computed here so that the template only lays them out."""
    models = results.models
    names = list(models)
    judged = [n for n in names if models[n].judged]
    rows: dict[str, list[list[Any]]] = {
        "model": [[n, str(models[n].model)] for n in names],
        "marker": [
            [n, format_rate(models[n].refusal_on_harmful), format_rate(models[n].over_refusal.rate_ci)] for n in names
        ],
        "judged": [
            [
                n,
                *[
                    format_rate(getattr(models[n].judged, key))
                    for key in (
                        "safe_rate",
                        "evasive_share_of_safe",
                        "refusal_rate_harmful",
                        "over_refusal_benign",
                        "refusal_rate_helpful",
                    )
                ],
            ]
            for n in judged
        ],
        "harm": [
            [n, models[n].harmful.refusal_marker_rate, models[n].harmful.harm_score, models[n].harmful.safe_rate]
            for n in names
        ],
        "evasive": [
            [
                n,
                models[n].evasiveness.safe_answers,
                models[n].evasiveness.refuse_only_share,
                models[n].evasiveness.engaged_share,
            ]
            for n in names
        ],
        "over_refusal": [
            [n, models[n].over_refusal.rate, models[n].over_refusal.full_refusal_rate_xstest] for n in names
        ],
        "versus": [
            [
                n,
                aspect,
                v.soft_win_rate,
                format_rate(v.win_rate_ci),
                v.length_controlled_win_rate,
                v.position_consistency,
                v.abstained,
            ]
            for n in names
            for aspect, v in (models[n].vs_baseline or {}).items()
        ],
        "engaged": [
            [
                n,
                *[
                    format_rate(getattr(models[n].engaged, key))
                    for key in ("engaged", "bare_refusal", "declined_or_engaged", "engaged_structural")
                ],
            ]
            for n in names
            if models[n].engaged
        ],
        "sources": [
            [
                n,
                entry.set,
                entry.source,
                format_rate(entry.refusal),
                format_rate(entry.judged_safe if entry.set == "harmful" else entry.judged_refusal),
                *[
                    format_rate(getattr(entry.engaged, key)) if entry.engaged else "—"
                    for key in ("engaged", "bare_refusal", "declined_or_engaged", "engaged_structural")
                ],
            ]
            for n in names
            for entry in models[n].by_source
        ],
        "principles": [],
        "rounds": [],
        "actions": [],
        "violations": [],
    }
    first_rates = next(
        (models[n].principle_violation_rates for n in names if models[n].principle_violation_rates), None
    )
    if first_rates:
        rows["principles"] = [
            [p, *[(models[n].principle_violation_rates or {}).get(p) for n in names]] for p in first_rates
        ]
    if results.harm_by_round:
        rows["rounds"] = [[i, v] for i, v in enumerate(results.harm_by_round["mean_harm_score_by_round"])]
    comparison = results.policy_comparison
    if comparison:
        policies = comparison["policies"]
        actions = sorted({a for p in policies.values() for a in p["actions"]})
        rows["actions"] = [[p["name"], *[p["actions"].get(a, 0) for a in actions]] for p in policies.values()]
        principles = sorted({v for p in policies.values() for v in p["violations_by_principle"]})
        rows["violations"] = [
            [v, *[p["violations_by_principle"].get(v, 0) for p in policies.values()]] for v in principles
        ]
    return rows


def render_report(results: EvalResults) -> str:
    """The report as one self-contained HTML page, from ``templates/report.html.j2`` (autoescaped)."""
    try:
        import jinja2
    except ImportError:
        raise CaiError("the evaluation report needs jinja2; install it with pip install 'cai-engine[eval]'") from None
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("cai_engine", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.filters["cell"] = _cell
    warnings = list(results.warnings)
    gate = gate_warning(results.judge_quality)
    if gate and gate not in warnings:
        warnings.append(gate)
    comparison = results.policy_comparison or {}
    policies = comparison.get("policies", {})
    return environment.get_template("report.html.j2").render(
        results=results,
        names=list(results.models),
        summary=summary_lines(results),
        warnings=warnings,
        charts=_charts(results),
        rows=_rows(results),
        actions=sorted({a for p in policies.values() for a in p["actions"]}),
        policy_names=[p["name"] for p in policies.values()],
    )


def write_report(results: EvalResults | dict[str, Any], path: Path) -> None:
    """A self-contained HTML report: charts embedded as PNG data, one table per metric, examples side by side."""
    results = results if isinstance(results, EvalResults) else EvalResults.model_validate(results)
    write_atomic(path, render_report(results))
