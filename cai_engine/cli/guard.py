"""`cai guard`: guard a file of conversations with a policy."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cai_engine.cli.base import cli, current_runtime


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
    guard_run record, completed or failed, however the run ends once the policy is loaded (a bad row, an empty
    input, an unusable --out and a signal included): a failed one says why, where (setup, reading or guarding)
    and how many rows were read and guarded.

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
