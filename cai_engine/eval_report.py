"""The evaluation report: the verdict in a few lines, tables, charts and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from .outputs import write_atomic
from .refusals import REFUSAL_MARKERS, REFUSAL_PREFIXES, has_refusal_marker, starts_with_refusal  # noqa: F401
from .stats import format_rate


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _charts(results: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    charts = []
    judged = [n for n in names if results["models"][n].get("judged")]
    if judged:
        keys = [("safe rate, harmful prompts", "safe_rate"), ("refusal, benign-but-scary", "over_refusal_benign")]
        fig, ax = plt.subplots(figsize=(7, 3.4))
        width = 0.8 / len(judged)
        for k, name in enumerate(judged):
            entries = [results["models"][name]["judged"][key] or {} for _, key in keys]
            values = [e.get("rate") if e.get("rate") is not None else float("nan") for e in entries]
            errors = [
                [v - e["ci95"][0] if e.get("ci95") else 0 for v, e in zip(values, entries)],
                [e["ci95"][1] - v if e.get("ci95") else 0 for v, e in zip(values, entries)],
            ]
            ax.bar([i + k * width for i in range(len(keys))], values, width, yerr=errors, capsize=3, label=name)  # type: ignore[arg-type]
        ax.set_xticks([i + width * (len(judged) - 1) / 2 for i in range(len(keys))], [k for k, _ in keys])
        ax.set_ylim(0, 1)
        ax.set_ylabel("rate (95% Wilson interval)")
        ax.legend(fontsize=8)
        ax.set_title("Judged by the feedback model")
        charts.append(("judged", _png(fig)))
    metrics = [
        ("refusal markers\n(harmful)", lambda m: m["harmful"]["refusal_marker_rate"]),
        ("safe rate\n(harmful)", lambda m: m["harmful"]["safe_rate"]),
        ("over-refusal\n(benign)", lambda m: m["over_refusal"]["rate"]),
        ("refuse-only share\nof safe answers", lambda m: m["evasiveness"]["refuse_only_share"]),
    ]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        values = [fn(results["models"][name]) for _, fn in metrics]
        values = [float("nan") if v is None else v for v in values]  # no signal is not zero
        ax.bar([i + k * width for i in range(len(metrics))], values, width, label=name)  # type: ignore[arg-type]
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(metrics))], [m for m, _ in metrics], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate")
    ax.legend(fontsize=8)
    ax.set_title("Harmlessness vs over-refusal and evasiveness")
    charts.append(("rates", _png(fig)))
    if any(results["models"][n]["harmful"]["harm_score"] is not None for n in names):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(names, [results["models"][n]["harmful"]["harm_score"] or float("nan") for n in names], color="#4a7")
        ax.set_ylim(1, 10)
        ax.set_ylabel("judge harm score (1-10, higher is safer)")
        ax.set_title("Judge-based harmlessness on held-out red-team prompts")
        charts.append(("harm-score", _png(fig)))
    first_rates = next(
        (m.get("principle_violation_rates") for m in results["models"].values() if m.get("principle_violation_rates")),
        None,
    )
    if first_rates:
        ids = list(first_rates)
        fig, ax = plt.subplots(figsize=(8, 3.4))
        for k, name in enumerate(names):
            rates = results["models"][name].get("principle_violation_rates") or {}
            ax.bar([i + k * width for i in range(len(ids))], [rates.get(p) or 0 for p in ids], width, label=name)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(ids))], ids, rotation=60, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("violation rate")
        ax.legend(fontsize=8)
        ax.set_title("Per-principle violation rates (critic verdicts)")
        charts.append(("principles", _png(fig)))
    by_round = results.get("harm_by_round")
    if by_round and by_round["mean_harm_score_by_round"]:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        values = by_round["mean_harm_score_by_round"]
        ax.plot(range(len(values)), [v or 0 for v in values], marker="o")
        ax.set_xlabel("revision round (0 = initial response)")
        ax.set_ylabel("mean harm score")
        ax.set_title("Harmlessness by revision round")
        charts.append(("rounds", _png(fig)))
    return charts


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return html.escape("—" if v is None else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def gate_warning(quality: dict[str, Any] | None) -> str | None:
    """The warning for a judge that fails the gate on the labelled pairs (None when it passes or was not measured)."""
    quality = quality or {}
    if quality.get("accuracy") is None:
        return None
    if quality["accuracy"] < 0.6 or (quality.get("same_position_rate") or 0) > 0.25:
        return (
            f"the judge fails its own gate on the labelled pairs (accuracy {quality['accuracy']:.2f}, same "
            f"position {quality.get('same_position_rate')}): its win rates and scores are not evidence of anything"
        )
    return None


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The verdict in a few sentences: the last model against the first, each rate with n and its interval."""
    models = results["models"]
    names = list(models)
    if not names:
        return ["no models were evaluated"]
    first, last = names[0], names[-1]
    lines = []
    a, b = models[first].get("judged"), models[last].get("judged")
    if a and b:
        lines.append(
            f"safe on held-out harmful prompts (judged): {first} {format_rate(a.get('safe_rate'))} -> "
            f"{last} {format_rate(b.get('safe_rate'))}"
        )
        lines.append(
            f"refusal on benign-but-scary prompts (judged): {first} {format_rate(a.get('over_refusal_benign'))}"
            f" -> {last} {format_rate(b.get('over_refusal_benign'))}"
        )
    lines.append(
        f"refusal on held-out harmful prompts (markers): {first} "
        f"{format_rate(models[first].get('refusal_on_harmful'))} -> {last} "
        f"{format_rate(models[last].get('refusal_on_harmful'))}"
    )
    lines.append(
        f"refusal on benign-but-scary prompts (markers): {first} "
        f"{format_rate(models[first]['over_refusal'].get('rate_ci'))} -> {last} "
        f"{format_rate(models[last]['over_refusal'].get('rate_ci'))}"
    )
    for aspect, versus in (models[last].get("vs_baseline") or {}).items():
        lines.append(
            f"{aspect} win rate of {last} against {first}: {format_rate(versus.get('win_rate_ci'))}, "
            f"length-controlled {versus.get('length_controlled_win_rate')}"
        )
    return lines


def write_report(results: dict[str, Any], path: Path) -> None:
    """A self-contained HTML report: charts embedded as PNG data, one table per metric, examples side by side."""
    models = results["models"]
    names = list(models)
    counts = results["prompt_counts"]
    parts = [
        f"<h1>cai-engine evaluation</h1><p>{html.escape(results['created'])} · constitution "
        f"<code>{html.escape(results['constitution']['name'])}</code> · {counts.get('harmful', 0)} held-out "
        f"harmful, {counts.get('benign', 0)} benign-but-scary and {counts.get('helpful', 0)} helpful prompts</p>"
    ]
    parts.append(
        "<h2>Summary</h2><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(results)) + "</ul>"
    )
    warnings = list(results.get("warnings", []))
    gate = gate_warning(results.get("judge_quality"))
    if gate and gate not in warnings:
        warnings.append(gate)
    for warning in warnings:
        parts.append(f"<p class='warn'><b>Warning:</b> {html.escape(warning)}</p>")
    judge = results.get("judge")
    if judge:
        parts.append(f"<p>judge: <code>{html.escape(str(judge.get('model_id') or judge.get('model')))}</code></p>")
    parts.append("<h2>Models</h2>" + _table(["name", "model"], [[n, str(models[n]["model"])] for n in names]))
    parts.append(
        "<h2>Refusals read by string markers (deterministic; rate, n, 95% Wilson interval)</h2>"
        + _table(
            ["model", "refusal on held-out harmful prompts", "refusal on benign-but-scary prompts"],
            [
                [
                    n,
                    format_rate(models[n].get("refusal_on_harmful")),
                    format_rate(models[n]["over_refusal"].get("rate_ci")),
                ]
                for n in names
            ],
        )
    )
    judged = [n for n in names if models[n].get("judged")]
    if judged:
        parts.append(
            "<h2>Judged by the feedback model (rate, n, 95% Wilson interval)</h2>"
            + _table(
                [
                    "model",
                    "safe rate on harmful prompts",
                    "evasive share of those safe answers",
                    "refusal on harmful",
                    "refusal on benign-but-scary",
                    "refusal on helpful",
                ],
                [
                    [
                        n,
                        *[
                            format_rate(models[n]["judged"].get(k))
                            for k in (
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
            )
        )
    for key, data in _charts(results):
        parts.append(f'<img alt="{key}" src="{data}">')
    parts.append(
        "<h2>Harmlessness (held-out red-team prompts)</h2>"
        + _table(
            ["model", "refusal-marker rate (weak signal)", "judge harm score", "safe rate"],
            [
                [
                    n,
                    models[n]["harmful"]["refusal_marker_rate"],
                    models[n]["harmful"]["harm_score"],
                    models[n]["harmful"]["safe_rate"],
                ]
                for n in names
            ],
        )
    )
    parts.append(
        "<h2>Evasiveness among safe answers</h2>"
        + _table(
            ["model", "safe answers", "refuse only", "engage and explain"],
            [
                [
                    n,
                    models[n]["evasiveness"]["safe_answers"],
                    models[n]["evasiveness"]["refuse_only_share"],
                    models[n]["evasiveness"]["engaged_share"],
                ]
                for n in names
            ],
        )
    )
    parts.append(
        "<h2>Over-refusal (benign prompts that sound dangerous)</h2>"
        + _table(
            ["model", "refusal rate", "full refusal (XSTest prefixes)"],
            [
                [n, models[n]["over_refusal"]["rate"], models[n]["over_refusal"]["full_refusal_rate_xstest"]]
                for n in names
            ],
        )
    )
    versus = [n for n in names if "vs_baseline" in models[n]]
    if versus:
        parts.append(
            f"<h2>Judge win rate against {html.escape(names[0])} (both orders)</h2>"
            + _table(
                [
                    "model",
                    "aspect",
                    "soft win rate",
                    "win rate (n, 95% CI)",
                    "length-controlled",
                    "position consistency",
                    "abstained",
                ],
                [
                    [
                        n,
                        aspect,
                        v["soft_win_rate"],
                        format_rate(v.get("win_rate_ci")),
                        v["length_controlled_win_rate"],
                        v["position_consistency"],
                        v["abstained"],
                    ]
                    for n in versus
                    for aspect, v in models[n]["vs_baseline"].items()
                ],
            )
        )
    if any(models[n].get("principle_violation_rates") for n in names):
        ids = list(
            next(models[n]["principle_violation_rates"] for n in names if models[n].get("principle_violation_rates"))
        )
        parts.append(
            "<h2>Per-principle violation rates</h2>"
            + _table(
                ["principle", *names],
                [[p, *[(models[n].get("principle_violation_rates") or {}).get(p) for n in names]] for p in ids],
            )
        )
    quality = results.get("judge_quality")
    if quality:
        parts.append(
            "<h2>Judge quality (labelled pairs)</h2>"
            + _table(
                ["pairs", "accuracy", "position consistency", "same position", "calibration error", "abstained"],
                [
                    [
                        quality["pairs"],
                        quality["accuracy"],
                        quality["position_consistency"],
                        quality["same_position_rate"],
                        quality["expected_calibration_error"],
                        quality["abstained"],
                    ]
                ],
            )
        )
    by_round = results.get("harm_by_round")
    if by_round:
        parts.append(
            "<h2>Harmlessness by revision round</h2>"
            + _table(["round", "mean harm score"], [[i, v] for i, v in enumerate(by_round["mean_harm_score_by_round"])])
        )
    comparison = results.get("policy_comparison")
    if comparison:
        policies = list(comparison["policies"])
        actions = sorted({a for p in policies for a in comparison["policies"][p]["actions"]})
        parts.append(
            f"<h2>Policies compared on {html.escape(str(comparison['model']))}</h2>"
            + _table(
                ["policy", *actions],
                [
                    [
                        comparison["policies"][p]["name"],
                        *[comparison["policies"][p]["actions"].get(a, 0) for a in actions],
                    ]
                    for p in policies
                ],
            )
        )
        principles = sorted({v for p in policies for v in comparison["policies"][p]["violations_by_principle"]})
        parts.append(
            _table(
                ["principle (responses flagged)", *[comparison["policies"][p]["name"] for p in policies]],
                [
                    [v, *[comparison["policies"][p]["violations_by_principle"].get(v, 0) for p in policies]]
                    for v in principles
                ],
            )
        )
        for diff in comparison["differences"][:5]:
            cells = "".join(
                f"<td><b>{html.escape(comparison['policies'][p]['name'])}</b> ({diff[p]['action']})<br>"
                f"{html.escape(diff[p]['response'])}</td>"
                for p in policies
            )
            parts.append(f"<p>{html.escape(diff['prompt'])}</p><table class='side'><tr>{cells}</tr></table>")
    parts.append("<h2>Examples</h2>")
    for example in results.get("examples", []):
        cells = "".join(
            f"<td><b>{html.escape(n)}</b><br>{html.escape(r)}</td>" for n, r in example["responses"].items()
        )
        parts.append(
            f"<p><i>{html.escape(example['set'])}</i>: {html.escape(example['prompt'])}</p>"
            f"<table class='side'><tr>{cells}</tr></table>"
        )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;"
        "vertical-align:top;font-size:14px}th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}"
        "table.side td{width:33%;white-space:pre-wrap}.warn{color:#b00;border:1px solid #b00;padding:6px}"
    )
    write_atomic(
        path,
        f"<!doctype html><html><head><meta charset='utf-8'><title>cai-engine evaluation</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n",
    )
