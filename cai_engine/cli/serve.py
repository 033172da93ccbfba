"""`cai serve`: the policy as an OpenAI-compatible guard in front of a model server."""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import click

from cai_engine.cli.base import cli, current_runtime


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
    "--max-upstream-bytes",
    type=click.IntRange(min=1024),
    default=16 << 20,
    show_default=True,
    help="Largest answer read from the upstream, and largest line of a streamed one; past it a plain request "
    "gets a 502 (upstream_too_large) and a stream ends with an error event. Counted as it arrives.",
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
    "to this long + 1 is stopped before any of it is sent. Invisible characters and combining marks count as none, "
    "a run of spaces as one.",
)
@click.option(
    "--stream-window",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="Characters before each new chunk that the stream's rule check looks back over (at least 64 and the "
    "holdback), counted as for the holdback.",
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
    max_upstream_bytes: int,
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

        for needed in ("starlette", "prometheus_client"):  # imported by the app when it is built, not above
            if importlib.util.find_spec(needed) is None:
                raise ImportError(f"No module named {needed!r}")
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
        max_upstream_bytes=max_upstream_bytes,
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
        # everything loaded so far (the policy, compiled patterns, imported modules) lives as long as the server: a
        # full garbage collection need not walk it again, which keeps its pauses, and the tail latency, short
        gc.collect()
        gc.freeze()
        uvicorn.Server(config).run()
    finally:
        gc.unfreeze()
        engine.close()
