"""`cai merge`: join the shards of one run."""

from __future__ import annotations

from pathlib import Path

import click

from cai_engine.cli.base import (
    cli,
)


@cli.command("merge")
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.argument("shard_dirs", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
def merge_command(out: Path, shard_dirs: tuple[Path, ...]) -> None:
    """Merge the shard folders of one `cai sl`, `cai rl label` or `cai eval` run (each made with --shard I/N) into OUT.

    The shards must come from the same config (everything but --shard) and cover 0..N-1 exactly once. A merged
    `cai sl` or `cai rl label` run is an ordinary run directory, ready for `cai export`; a merged evaluation gets
    its metrics, results.json and report computed again from every shard's answers.
    """
    from cai_engine.stages import merge

    summary = merge(out, list(shard_dirs))
    click.echo(f"merged {summary.shards} {summary.kind} shards ({summary.records} records) into {out}")
