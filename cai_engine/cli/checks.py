"""`cai checks`: the deterministic checks plugins ship, and their scores on labelled answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cai_engine.cli.base import CaiGroup, cli, current_runtime, echo_json, state
from cai_engine.errors import CaiError


@cli.group("checks", cls=CaiGroup)
def checks_group() -> None:
    """Deterministic checks that plugins ship with their principles, and how well they work."""


@checks_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def checks_list(as_json: bool) -> None:
    """Each registered check (a critic that has a matching reviser and is named by a principle), with its plugin."""
    registry = state().registry
    used: dict[str, list[str]] = {}
    for name in registry.constitution_names():
        try:
            constitution = registry.constitution(name)
        except CaiError:
            continue
        for principle in constitution.principles:
            for check in principle.checks:
                used.setdefault(check, [])
                if principle.id not in used[check]:
                    used[check].append(principle.id)
    rows: list[dict[str, Any]] = [
        {
            "check": check,
            "plugin": registry.owner("critic", check) if check in registry.names("critic") else None,
            "repairs": check in registry.names("reviser"),
            "principles": used[check],
        }
        for check in sorted(used)
    ]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no check is named by any registered principle; install a domain plugin (e.g. cai-medical)")
    for row in rows:
        click.echo(
            f"{row['check']:24} {row['plugin'] or '(not registered)':16} "
            f"{'repairs' if row['repairs'] else 'no repair':10} principles: {', '.join(row['principles'])}"
        )


@checks_group.command("eval")
@click.option(
    "--check",
    "check_names",
    multiple=True,
    required=True,
    help="A check to score (e.g. medical.phi); repeat to score several, each on its own --cases file.",
)
@click.option(
    "--cases",
    "case_files",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Labelled JSONL cases (id, prompt, response, violates, why; optional kind, evidence, keep); "
    "one per --check, in the same order.",
)
@click.option(
    "--model",
    help="Also score the model tier: the principle's critic on this model (e.g. "
    "qwen2.5-coder-1.5b). Slow on a CPU: seconds per case.",
)
@click.option(
    "--classifier",
    "classifiers",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Also score this output classifier (e.g. from `cai classifiers train`) alone and together with the check "
    "(flagged when either flags); one per --check, in the same order.",
)
@click.option("--no-repair", is_flag=True, help="Score detection only.")
@click.option("--errors", "show_errors", is_flag=True, help="List each case the check gets wrong, with its why.")
@click.option("--json", "as_json", is_flag=True, help="Print the full results as JSON.")
def checks_eval(check_names, case_files, model, classifiers, no_repair, show_errors, as_json) -> None:
    """Score deterministic checks on labelled answers: precision, recall and F1 with n and 95% intervals, and how
    often the check's repair succeeds (the repaired answer passes the check, the labelled evidence is gone and the
    labelled content kept).

    \b
      cai checks eval --check medical.phi --cases plugins/cai-medical/cai_medical/cases/medical.phi.jsonl
    """
    from cai_engine.evaluation.checks import evaluate_check, load_cases, summary_table

    if len(check_names) != len(case_files):
        raise click.UsageError(
            f"give one --cases file per --check ({len(check_names)} checks, {len(case_files)} case files)"
        )
    registry = state().registry
    for name in check_names:
        if name not in registry.names("critic"):
            raise click.UsageError(f"no check named {name!r}; `cai checks list` shows the installed ones")
    if classifiers and len(classifiers) != len(check_names):
        raise click.UsageError(
            f"give one --classifier per --check ({len(check_names)} checks, {len(classifiers)} given)"
        )
    cases = [load_cases(path) for path in case_files]  # every file is validated before any scoring
    loaded: list[Any] = [None] * len(check_names)
    if classifiers:
        from cai_engine.classifiers.load import load_classifier

        loaded = [load_classifier(folder) for folder in classifiers]
        for folder, probe in zip(classifiers, loaded):
            if probe.config.kind != "output":
                raise click.UsageError(f"{folder}: an input classifier; a check reads replies (give an output one)")
    runtime = current_runtime() if model else None
    results = [
        evaluate_check(registry, name, rows, runtime=runtime, model=model, repair=not no_repair, classifier=probe)
        for name, rows, probe in zip(check_names, cases, loaded)
    ]
    if runtime is not None:
        runtime.close()
    if as_json:
        echo_json(results if len(results) > 1 else results[0])
        return
    for line in summary_table(results):
        click.echo(line)
    for result in results:
        det = result["deterministic"]
        click.echo(
            f"{result['check']}: {result['cases']} cases ({result['violating']} violating), confusion "
            f"{det['confusion']}, {det['ms_per_case']} ms per case"
            + (f"; classifier {result['backed_by_classifier']}" if "backed_by_classifier" in result else "")
            + (
                f"; repair handed to the model {result['repair']['handed_over']} time(s)"
                if result.get("repair", {}).get("available")
                else ""
            )
        )
        if show_errors:
            for error in det["errors"]:
                verdict = "missed" if error["label"] else "false alarm"
                click.echo(f"  {verdict}: {error['id']} [{error['kind']}] {error['why']}")
            for failure in result.get("repair", {}).get("failures", []):
                click.echo(
                    f"  repair failed: {failure['id']} {json.dumps({k: v for k, v in failure.items() if k != 'id'})}"
                )
