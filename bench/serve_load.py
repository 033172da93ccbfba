"""Load on `cai serve`: N requests at each concurrency C through a rules-only guard to a stub upstream that answers
at once, and the same requests straight to the stub; prints errors and latency percentiles of both, the guard's
added latency (through the guard minus direct, per percentile), the proxy's own share of each request (the client's
latency minus the upstream exchange the guard timed, from its Server-Timing header) and its time inside the guard.

    python bench/serve_load.py                       # 1,000 requests at concurrency 32 and at 100, serve-policy rules
    python bench/serve_load.py --requests 2000 --concurrency 64 --policy examples/clinic-policy.yaml
    python bench/serve_load.py --concurrency 32 --upstream-delay 250 --pin --repeat 3
                                                     # an upstream that takes 250 ms (a short model answer), the guard
                                                     # on its own core, three rounds

An upstream that answers at once (the default) is the worst case: the closed loop of C clients then saturates
whatever is slowest, and the figures measure throughput more than the time the guard adds. ``--upstream-delay``
models an upstream that takes time to answer, as a model does. ``--pin`` puts the guard server on the last CPU and
the stub and this client on the others, so the guard does not queue behind them. The guard's CPU time a request
(from /proc, Linux) is the figure least moved by the machine's other work.

The stub, the guard server and this client are three processes on one machine, so on few cores the queueing of
all three shows up in every figure; the "own" figure is the closest to what the guard alone costs a request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

ANSWER = (
    "Take 500 mg of paracetamol every six hours if you need it, no more than four doses a day, and see a doctor "
    "if the fever lasts more than three days."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, requests: int, concurrency: int) -> tuple[list[float], int, list[float]]:
    """Latencies (ms), the error count, and for each answer with a Server-Timing header the client's latency minus
    the upstream time the guard reported (its own share)."""
    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    own: list[float] = []
    errors = 0
    body = {"model": "stub", "messages": [{"role": "user", "content": "My child has a fever. What can I give?"}]}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one() -> None:
            nonlocal errors
            async with limit:
                began = time.perf_counter()
                try:
                    reply = await client.post(f"{url}/chat/completions", json=body)
                except httpx.HTTPError:
                    errors += 1
                    return
                ms = (time.perf_counter() - began) * 1000
                latencies.append(ms)
                errors += reply.status_code != 200
                timing = dict(
                    part.strip().split(";dur=") for part in reply.headers.get("server-timing", "").split(",") if part
                )
                if "upstream" in timing:
                    own.append(ms - float(timing["upstream"]))

        await asyncio.gather(*(one() for _ in range(requests)))
    return latencies, errors, own


WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model": "stub", "messages": [{"role": "user", "content": "My child has a fever. What can I give?"}]}'
"""


def wrk_load(url: str, seconds: int, concurrency: int, cpus: list[int] | None) -> tuple[dict[int, float], int, int]:
    """Latency percentiles (ms), the error count and the request count of one wrk run (a closed loop of
    ``concurrency`` connections for ``seconds``): wrk is C and costs its CPU little, so its tail is the servers'."""
    import re
    import shutil

    if shutil.which("wrk") is None:
        raise SystemExit("--client wrk needs wrk on the PATH (Debian: apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    command = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        script.name,
        f"{url}/chat/completions",
    ]
    if cpus:
        command = ["taskset", "-c", ",".join(map(str, cpus)), *command]
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    found = {
        int(q): float(v) * scale[unit] for q, v, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    }
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return found, errors + (int(non_2xx.group(1)) if non_2xx else 0), requests


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def stub_app(delay_ms: float = 0.0, jitter_ms: float = 0.0):
    import random

    draw = random.Random(0)

    async def completions(request):
        wait = max(0.0, delay_ms + draw.uniform(-jitter_ms, jitter_ms))
        if wait:
            await asyncio.sleep(wait / 1000)
        return JSONResponse(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "stub",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            }
        )

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def wait_for(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def policy_copy(path: str) -> dict:
    """The policy at ``path`` for a benchmark: rules and plugin checks only (no model in the request path), no audit
    file, constitution paths made absolute (the copy is written to a temporary folder)."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    data.setdefault("guard", {})["model_critics"] = False
    data.pop("audit", None)
    data.pop("$schema", None)
    base = Path(path).resolve().parent
    data["constitutions"] = [
        str(base / c) if ("/" in c or c.endswith((".yaml", ".yml", ".json"))) else c
        for c in data.get("constitutions", [])
    ]
    return data


def inside(metrics: str) -> tuple[float, float]:
    """The guard's own latency sum (ms) and count, from /metrics."""
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith(("cai_guard_latency_ms_sum", "cai_guard_latency_ms_count"))
    }
    return values.get("cai_guard_latency_ms_sum", 0.0), values.get("cai_guard_latency_ms_count", 0.0)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="examples/serve-policy.yaml")
    parser.add_argument("--requests", type=int, default=1000, help="requests at each concurrency")
    parser.add_argument("--concurrency", default="32,100", help="comma-separated concurrency levels")
    parser.add_argument("--upstream-delay", type=float, default=0.0, help="ms the stub waits before it answers")
    parser.add_argument(
        "--upstream-jitter",
        type=float,
        default=0.0,
        help="ms drawn uniformly around the delay (a model's answers vary in time); without it, every answer of a "
        "closed loop comes back at once, in a burst the guard must work through one by one",
    )
    parser.add_argument("--pin", action="store_true", help="the guard on the last CPU, stub and client on the rest")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of direct + guarded runs at each concurrency")
    parser.add_argument(
        "--client",
        choices=["httpx", "wrk"],
        default="httpx",
        help="the load client: this script's own (httpx; its tail includes its own CPU) or wrk (C, light; runs for "
        "--seconds instead of a number of requests)",
    )
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--stub", type=int, help=argparse.SUPPRESS)  # internal: serve the stub on this port
    args = parser.parse_args()
    if args.stub:
        uvicorn.run(
            stub_app(args.upstream_delay, args.upstream_jitter), host="127.0.0.1", port=args.stub, log_level="error"
        )
        return
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pinned = args.pin and len(cpus) >= 2
    if args.pin and not pinned:
        print("--pin needs 2 CPUs or more (and Linux); running unpinned")
    if pinned:
        os.sched_setaffinity(0, cpus[:-1])  # this client, and the stub it starts, stay off the guard's CPU
    levels = [int(c) for c in str(args.concurrency).split(",")]
    # The stub, the guard server and this client are three processes, as in a deployment (one process for all
    # three would measure their contention for one interpreter lock, not the guard).
    data = policy_copy(args.policy)
    with tempfile.TemporaryDirectory() as folder:
        policy = Path(folder) / "policy.yaml"
        policy.write_text(yaml.safe_dump(data), encoding="utf-8")
        stub_port, guard_port = free_port(), free_port()
        stub = subprocess.Popen(
            [
                *(sys.executable, __file__, "--stub", str(stub_port)),
                *("--upstream-delay", str(args.upstream_delay), "--upstream-jitter", str(args.upstream_jitter)),
            ]
        )
        guard = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cai_engine.cli",
                "serve",
                "--policy",
                str(policy),
                "--upstream",
                f"http://127.0.0.1:{stub_port}/v1",
                "--port",
                str(guard_port),
                "--max-concurrency",
                str(max(levels)),
            ],
            stderr=subprocess.DEVNULL,
        )
        if pinned:
            os.sched_setaffinity(guard.pid, cpus[-1:])
        results = []
        wrk_results: list[tuple] = []
        try:
            wait_for(f"http://127.0.0.1:{stub_port}/", stub)
            wait_for(f"http://127.0.0.1:{guard_port}/health", guard)
            for level in levels:
                asyncio.run(load(f"http://127.0.0.1:{guard_port}/v1", 2 * level, level))  # warm-up
                if args.client == "wrk":
                    client_cpus = cpus[:-1] if pinned else None
                    for _ in range(args.repeat):
                        direct_q, direct_errors, direct_n = wrk_load(
                            f"http://127.0.0.1:{stub_port}/v1", args.seconds, level, client_cpus
                        )
                        cpu_before = cpu_seconds(guard.pid)
                        guarded_q, guarded_errors, guarded_n = wrk_load(
                            f"http://127.0.0.1:{guard_port}/v1", args.seconds, level, client_cpus
                        )
                        cpu_after = cpu_seconds(guard.pid)
                        cpu = None if cpu_before is None or cpu_after is None else (cpu_after - cpu_before) / guarded_n
                        wrk_results.append(
                            (level, direct_q, direct_errors, direct_n, guarded_q, guarded_errors, guarded_n, cpu)
                        )
                    continue
                for _ in range(args.repeat):
                    direct, direct_errors, _own = asyncio.run(
                        load(f"http://127.0.0.1:{stub_port}/v1", args.requests, level)
                    )
                    before = inside(httpx.get(f"http://127.0.0.1:{guard_port}/metrics").text)
                    cpu_before = cpu_seconds(guard.pid)
                    guarded, guarded_errors, own = asyncio.run(
                        load(f"http://127.0.0.1:{guard_port}/v1", args.requests, level)
                    )
                    cpu_after = cpu_seconds(guard.pid)
                    after = inside(httpx.get(f"http://127.0.0.1:{guard_port}/metrics").text)
                    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
                    results.append((level, direct, direct_errors, guarded, guarded_errors, own, before, after, cpu))
        finally:
            for proc in (guard, stub):
                proc.terminate()
                proc.wait(10)
    print(
        f"policy {args.policy} (rules and checks only); stub upstream answering after {args.upstream_delay:g} ms "
        f"(± {args.upstream_jitter:g} ms); "
        + (f"guard on CPU {cpus[-1]}, stub and client on CPUs {cpus[:-1]}" if pinned else "all on the same CPUs")
    )
    added: dict[int, list[tuple[float, float]]] = {}
    for level, direct_q, direct_errors, direct_n, guarded_q, guarded_errors, guarded_n, cpu in wrk_results:
        added.setdefault(level, []).append((guarded_q[50] - direct_q[50], guarded_q[99] - direct_q[99]))
        print(
            f"wrk at concurrency {level} for {args.seconds} s: {direct_n} requests direct, {guarded_n} through the guard"
        )
        print(f"{'errors':>20}: direct {direct_errors}, through the guard {guarded_errors}")
        for name, q in (("direct to the stub", direct_q), ("through the guard", guarded_q)):
            print(f"{name:>20}: p50 {q[50]:7.2f} ms  p99 {q[99]:7.2f} ms")
        print(
            f"{'added by the guard':>20}: p50 {guarded_q[50] - direct_q[50]:7.2f} ms  p99 {guarded_q[99] - direct_q[99]:7.2f} ms"
        )
        if cpu is not None:
            print(f"{'guard CPU a request':>20}: {cpu * 1000:7.3f} ms (user + system, /proc)")
    for level, direct, direct_errors, guarded, guarded_errors, own, before, after, cpu in results:
        added.setdefault(level, []).append(
            (percentile(guarded, 50) - percentile(direct, 50), percentile(guarded, 99) - percentile(direct, 99))
        )
        print(f"{args.requests} requests at concurrency {level}")
        print(f"{'errors':>20}: direct {direct_errors}, through the guard {guarded_errors}")
        for name, values in (("direct to the stub", direct), ("through the guard", guarded)):
            print(f"{name:>20}: p50 {percentile(values, 50):7.2f} ms  p99 {percentile(values, 99):7.2f} ms")
        print(
            f"{'added by the guard':>20}: p50 {percentile(guarded, 50) - percentile(direct, 50):7.2f} ms  "
            f"p99 {percentile(guarded, 99) - percentile(direct, 99):7.2f} ms  (through the guard minus direct)"
        )
        if own:
            print(
                f"{'the proxy own share':>20}: p50 {percentile(own, 50):7.2f} ms  p99 {percentile(own, 99):7.2f} ms"
                "  (each request's latency minus its upstream exchange)"
            )
        count = after[1] - before[1]
        print(
            f"{'inside the guard':>20}: mean {(after[0] - before[0]) / max(count, 1):7.3f} ms over {count:.0f} answers"
        )
        if cpu is not None:
            print(f"{'guard CPU a request':>20}: {cpu * 1000 / args.requests:7.3f} ms (user + system, /proc)")
    for level, rounds in added.items():
        if len(rounds) > 1:
            p50s, p99s = sorted(r[0] for r in rounds), sorted(r[1] for r in rounds)
            print(
                f"concurrency {level}, {len(rounds)} rounds: added p50 {', '.join(f'{v:.1f}' for v in p50s)} ms "
                f"(median {statistics.median(p50s):.1f}); added p99 {', '.join(f'{v:.1f}' for v in p99s)} ms "
                f"(median {statistics.median(p99s):.1f})"
            )


if __name__ == "__main__":
    main()
