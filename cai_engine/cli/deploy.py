"""Deployment commands: `cai policy`, `cai checks`, `cai guard` and `cai serve`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from cai_engine.cli.base import CaiGroup, cli, current_runtime, echo_json, state, write_schema
from cai_engine.errors import CaiError


@cli.group("policy", cls=CaiGroup)
def policy_group() -> None:
    """Validate and show deployment policies (constitutions + overrides + guard settings)."""


@policy_group.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def policy_validate(paths: tuple[Path, ...]) -> None:
    """Validate policy files: schema, constitutions, overrides, component options (no model is loaded).

    A policy with `model: none` must keep every model out of the guard's request path: it fails when a reply
    could need a model to rewrite it (a rule without a fix, a plugin check whose repair can decline) and the policy
    does not write out guard.on_failure to say what happens instead. A policy that has a model but no model critic
    gets a note naming where the guard would still call it.
    """
    from cai_engine.guard.engine import Engine
    from cai_engine.guard.policy import model_fallbacks, model_free_problem, unchecked_without_model

    failed = 0
    for path in paths:
        try:
            engine = Engine.from_policy(path, runtime=current_runtime())
            engine.close()
            problems = engine.model_problems()
        except CaiError as exc:
            failed += 1
            click.echo(f"FAIL {exc}", err=True)
            continue
        policy, registry = engine.policy, engine.runtime.registry
        guard_roles = [(role, p) for role, p in problems if role != "judge"]
        for role, problem in problems:
            if role == "judge":
                click.echo(f"warning: {path}: judge: {problem} (only compare() uses it)", err=True)
        if guard_roles:
            failed += 1
            click.echo(f"FAIL {path}: {guard_roles[0][0]}: {guard_roles[0][1]}", err=True)
            continue
        model_free = model_free_problem(policy, engine.constitution, registry)
        if model_free:
            failed += 1
            click.echo(f"FAIL {path}: {model_free}", err=True)
            continue
        fallbacks = model_fallbacks(policy, engine.constitution, registry)
        if policy.model_free:
            mode = "rules only (model: none)"
            if fallbacks:
                mode += f"; what rules and checks may not repair ({len(fallbacks)}) ends as on_failure: {policy.guard.on_failure}"
        else:
            mode = "model critic on" if policy.guard.model_critics else "no model critic"
        click.echo(
            f"ok   {path}: {policy.name}@{policy.version}, "
            f"{len(engine.constitution.principles)} principles ({len(engine.runtime_principles)} at runtime); {mode}"
        )
        if not policy.model_free and not policy.guard.model_critics and fallbacks:
            shown = "; ".join(fallbacks[:3]) + (f"; and {len(fallbacks) - 3} more" if len(fallbacks) > 3 else "")
            click.echo(
                f"note: {path}: the guard has no model critic but can still load a model to rewrite a reply: {shown} "
                "(write model: none to keep models out of the request path)",
                err=True,
            )
        unchecked = unchecked_without_model(policy, engine.constitution)
        if unchecked:
            shown = ", ".join(unchecked[:8]) + (f" and {len(unchecked) - 8} more" if len(unchecked) > 8 else "")
            click.echo(
                f"note: {path}: {len(unchecked)} runtime principle(s) have no rules or checks, so without a model "
                f"critic nothing checks them at runtime: {shown}",
                err=True,
            )
    if failed:
        raise click.ClickException(f"{failed} of {len(paths)} policy file(s) failed validation")


@policy_group.command("show")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
def policy_show(path: Path, fmt: str) -> None:
    """The fully resolved policy: settings plus the effective constitution after extends and overrides."""
    import yaml

    from cai_engine.guard.engine import Engine

    engine = Engine.from_policy(path, runtime=current_runtime())
    engine.close()
    data = engine.policy.model_dump(
        mode="json", by_alias=True, exclude={"schema_", "add", "override", "disable", "disable_tags"}
    )
    data["effective_constitution"] = {
        "content_hash": engine.constitution.content_hash(),
        "stance": engine.constitution.stance.value,
        "principles": [p.model_dump(mode="json", exclude_defaults=True) for p in engine.constitution.principles],
    }
    if fmt == "json":
        echo_json(data)
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110), nl=False)


@policy_group.command("schema")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write to this file instead of stdout.")
def policy_schema(output: Path | None) -> None:
    """Print the policy JSON Schema (generated from the pydantic model)."""
    from cai_engine.guard.policy import policy_json_schema

    write_schema(policy_json_schema(), output)


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
@click.option("--no-repair", is_flag=True, help="Score detection only.")
@click.option("--errors", "show_errors", is_flag=True, help="List each case the check gets wrong, with its why.")
@click.option("--json", "as_json", is_flag=True, help="Print the full results as JSON.")
def checks_eval(check_names, case_files, model, no_repair, show_errors, as_json) -> None:
    """Score deterministic checks on labelled answers: precision, recall and F1 with n and 95% intervals, and how
    often the check's repair succeeds (the repaired answer passes the check, the labelled evidence is gone and the
    labelled content kept).

    \b
      cai checks eval --check medical.phi --cases plugins/cai-medical/tests/data/medical.phi.jsonl
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
    cases = [load_cases(path) for path in case_files]  # every file is validated before any scoring
    runtime = current_runtime() if model else None
    results = [
        evaluate_check(registry, name, rows, runtime=runtime, model=model, repair=not no_repair)
        for name, rows in zip(check_names, cases)
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


@cli.command("guard")
@click.option("--policy", "policy_path", required=True, type=click.Path(path_type=Path), help="Policy file.")
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(path_type=Path, allow_dash=True),
    help="JSONL, one conversation per line (messages ending with the assistant's response): a file, a pipe "
    "(<(cmd), /dev/stdin), or - for standard input. Read once.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Results as JSONL (default: stdout). Written whole when the run succeeds; never the input file.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Conversations guarded together."
)
@click.option(
    "--fail-on",
    type=click.Choice(["never", "revise", "flag", "refuse"]),
    default="never",
    show_default=True,
    help="Exit with status 3 when any response got this action or a stronger one (revise < flag < "
    "refuse), so the command can gate a CI job; the output is written either way.",
)
def guard_command(policy_path: Path, input_path: Path, out: Path | None, batch_size: int, fail_on: str) -> None:
    """Guard responses with a policy: critique (rules, then the model), revise until compliant, audit each.

    The input is read once (a pipe works as well as a file), and every row is checked before the first one is
    guarded; a bad row, or an input with no rows, stops the run with its file and line. The --out file is written
    to a .partial beside it and replaces --out only when the whole run succeeds, so a failed or stopped run (an
    error, Ctrl-C, SIGTERM, SIGHUP) leaves --out as it was and removes its .partial; a .partial left by a killed run
    is removed by the next run. The audit log (the policy's audit.path) gets one record per decision and a final
    guard_run record: completed or failed.

    Exit status: 0 when done, 1 on an error (nothing written), 3 when --fail-on is met, 128 + the signal's number
    when stopped by a signal (143 for SIGTERM).
    """
    from cai_engine.guard.engine import Engine
    from cai_engine.guard.files import Terminated, guard_file, stop_on_signals

    try:
        with stop_on_signals():
            engine = Engine.from_policy(policy_path, runtime=current_runtime())
            try:
                counts = guard_file(engine, input_path, out, batch_size=batch_size, emit=click.echo)
            finally:
                engine.close()
    except Terminated as stop:
        click.echo(f"cai guard: {stop}" + (f"; {out} is as it was" if out else ""), err=True)
        sys.exit(128 + stop.signum)
    click.echo("guarded " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), err=True)
    severity = {"revised": 1, "flagged": 2, "refused": 3}
    bar = {"never": 99, "revise": 1, "flag": 2, "refuse": 3}[fail_on]
    worst = max((severity.get(action, 0) for action, n in counts.items() if n), default=0)
    if worst >= bar:
        click.echo(
            f"--fail-on {fail_on}: at least one response was {next(k for k, v in severity.items() if v == worst)}",
            err=True,
        )
        sys.exit(3)


@cli.command("serve")
@click.option("--policy", "policy_path", required=True, type=click.Path(path_type=Path), help="Policy file.")
@click.option("--upstream", required=True, help="The model server's OpenAI base URL, e.g. http://127.0.0.1:8080/v1.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=120.0,
    show_default=True,
    help="Seconds the whole upstream exchange may take (a stream included, however slowly it arrives); "
    "past that a plain request gets a 504 and a stream ends with an error event.",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Upstream requests in flight at once (more wait their turn).",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1024),
    default=1 << 20,
    show_default=True,
    help="Largest request body; a larger one gets a 413 before the rest of it is read.",
)
@click.option(
    "--max-json-depth",
    type=click.IntRange(min=4, max=1000),
    default=64,
    show_default=True,
    help="Deepest nesting of a request's JSON (400 past it).",
)
@click.option(
    "--read-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds a client has to send a request's headers (the connection is closed), and again its body (408).",
)
@click.option(
    "--keep-alive",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Seconds an idle keep-alive connection stays open (uvicorn's timeout_keep_alive).",
)
@click.option(
    "--metrics-need-key",
    is_flag=True,
    help="Require the client bearer token ($CAI_SERVE_API_KEY) for /metrics too.",
)
@click.option(
    "--stream-holdback",
    type=click.IntRange(min=0),
    default=32,
    show_default=True,
    help="Characters of a streamed answer held back until the text after them is checked: a forbidden match up "
    "to this long + 1 is stopped before any of it is sent.",
)
@click.option(
    "--stream-window",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="Characters before each new chunk that the stream's rule check looks back over (at least 64 and the "
    "holdback).",
)
@click.option(
    "--stream-model-every",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="With model critics in the policy: run the model check every N streamed chunks and release what it "
    "passed (0: release only after the whole answer is guarded).",
)
@click.option("--check", is_flag=True, help="Validate the policy and reach the upstream, then exit.")
def serve_command(
    policy_path: Path,
    upstream: str,
    host: str,
    port: int,
    timeout: float,
    max_concurrency: int,
    max_body_bytes: int,
    max_json_depth: int,
    read_timeout: float,
    keep_alive: int,
    metrics_need_key: bool,
    stream_holdback: int,
    stream_window: int,
    stream_model_every: int,
    check: bool,
) -> None:
    """An OpenAI-compatible guard in front of any OpenAI-compatible model server.

    Serves /v1/chat/completions, /v1/models, /health and /metrics. Every choice of each upstream answer (its text,
    its tool calls' arguments) is guarded by the policy and returned in the OpenAI shape with the verdict in the
    `cai_guard` field; with `input.check` in the policy every message's text is checked first. A streaming request
    is released in checked pieces and cut with finish_reason `content_filter` on a violation. Clients must send
    `Authorization: Bearer $CAI_SERVE_API_KEY` when that variable is set; the upstream gets $CAI_UPSTREAM_API_KEY
    (or the client's header when no client key is configured). Needs the [serve] extra.
    """
    import asyncio
    import os

    from cai_engine.guard.engine import Engine

    engine = Engine.from_policy(policy_path, runtime=current_runtime())
    problems = [f"{role}: {problem}" for role, problem in engine.model_problems() if role != "judge"]
    if problems:
        raise click.ClickException(f"{policy_path}: {problems[0]}")
    from cai_engine.guard.policy import model_free_problem

    problem = model_free_problem(engine.policy, engine.constitution, engine.runtime.registry)
    if problem:
        raise click.ClickException(f"{policy_path}: {problem}")
    try:
        import uvicorn

        from cai_engine.guard.serve import ServeOptions, check_upstream, create_app, is_loopback, server_config
    except ImportError as exc:
        raise click.ClickException(
            f"cai serve needs the serve extra: pip install 'cai-engine[serve]' ({exc})"
        ) from None
    if check:
        problem = asyncio.run(check_upstream(upstream, timeout=min(timeout, 10.0)))
        if problem:
            raise click.ClickException(problem)
        click.echo(f"ok   {policy_path}: {engine.policy.name}@{engine.policy.version}; upstream {upstream} answers")
        return
    if not is_loopback(host) and not os.environ.get("CAI_SERVE_API_KEY"):
        click.echo(
            f"warning: listening on {host}, beyond this machine, with no client key: anyone who can reach it can use "
            "the upstream through it. Set CAI_SERVE_API_KEY.",
            err=True,
        )
    click.echo(
        f"guarding {upstream} with {engine.policy.name}@{engine.policy.version} on http://{host}:{port}/v1", err=True
    )
    options = ServeOptions(
        timeout=timeout,
        max_concurrency=max_concurrency,
        max_body_bytes=max_body_bytes,
        max_json_depth=max_json_depth,
        read_timeout=read_timeout,
        metrics_need_key=metrics_need_key,
        stream_holdback=stream_holdback,
        stream_window=stream_window,
        stream_model_every=stream_model_every,
    )
    app = create_app(engine, upstream, options=options)
    try:
        config = server_config(app, host=host, port=port, read_timeout=read_timeout, keep_alive=keep_alive)
        uvicorn.Server(config).run()
    finally:
        engine.close()
