"""Load on `cai serve`: N requests at concurrency C through a rules-only guard to a stub upstream that answers at
once, and the same requests straight to the stub; prints errors and latency percentiles of both, and the guard's
added latency (through the guard minus direct, per percentile) and its own time inside the guard.

    python bench/serve_load.py                       # 500 requests, concurrency 32, examples/clinic-policy.yaml rules
    python bench/serve_load.py --requests 2000 --concurrency 64 --policy my-policy.yaml
"""

from __future__ import annotations

import argparse
import asyncio
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


async def load(url: str, requests: int, concurrency: int) -> tuple[list[float], int]:
    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors = 0
    body = {"model": "stub", "messages": [{"role": "user", "content": "My child has a fever. What can I give?"}]}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one() -> None:
            nonlocal errors
            async with limit:
                began = time.perf_counter()
                reply = await client.post(f"{url}/chat/completions", json=body)
                latencies.append((time.perf_counter() - began) * 1000)
                errors += reply.status_code != 200

        await asyncio.gather(*(one() for _ in range(requests)))
    return latencies, errors


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def stub_app():
    async def completions(request):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="examples/clinic-policy.yaml")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--stub", type=int, help=argparse.SUPPRESS)  # internal: serve the stub on this port
    args = parser.parse_args()
    if args.stub:
        uvicorn.run(stub_app(), host="127.0.0.1", port=args.stub, log_level="error")
        return
    # The stub, the guard server and this client are three processes, as in a deployment (one process for all
    # three would measure their contention for one interpreter lock, not the guard).
    data = yaml.safe_load(Path(args.policy).read_text(encoding="utf-8"))
    data.setdefault("guard", {})["model_critics"] = False  # rules and plugin checks only: no model in the path
    data.pop("audit", None)
    with tempfile.TemporaryDirectory() as folder:
        policy = Path(folder) / "policy.yaml"
        policy.write_text(yaml.safe_dump(data), encoding="utf-8")
        if "constitutions" in data:
            base = Path(args.policy).resolve().parent
            data["constitutions"] = [
                str(base / c) if ("/" in c or c.endswith((".yaml", ".yml", ".json"))) else c
                for c in data["constitutions"]
            ]
            policy.write_text(yaml.safe_dump(data), encoding="utf-8")
        stub_port, guard_port = free_port(), free_port()
        stub = subprocess.Popen([sys.executable, __file__, "--stub", str(stub_port)])
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
                str(args.concurrency),
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(f"http://127.0.0.1:{stub_port}/", stub)
            wait_for(f"http://127.0.0.1:{guard_port}/health", guard)
            asyncio.run(load(f"http://127.0.0.1:{guard_port}/v1", 50, args.concurrency))  # warm-up
            direct, direct_errors = asyncio.run(
                load(f"http://127.0.0.1:{stub_port}/v1", args.requests, args.concurrency)
            )
            guarded, guarded_errors = asyncio.run(
                load(f"http://127.0.0.1:{guard_port}/v1", args.requests, args.concurrency)
            )
            metrics = httpx.get(f"http://127.0.0.1:{guard_port}/metrics").text
        finally:
            for proc in (guard, stub):
                proc.terminate()
                proc.wait(10)
    inside = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith(("cai_guard_latency_ms_sum", "cai_guard_latency_ms_count"))
    }
    print(f"{args.requests} requests at concurrency {args.concurrency}, policy {args.policy} (rules and checks only)")
    print(f"errors: direct {direct_errors}, through the guard {guarded_errors}")
    for name, values in (("direct to the stub", direct), ("through the guard", guarded)):
        print(f"{name:>20}: p50 {percentile(values, 50):7.2f} ms  p99 {percentile(values, 99):7.2f} ms")
    print(
        f"{'added by the guard':>20}: p50 {percentile(guarded, 50) - percentile(direct, 50):7.2f} ms  "
        f"p99 {percentile(guarded, 99) - percentile(direct, 99):7.2f} ms"
    )
    count = inside.get("cai_guard_latency_ms_count", 0)
    print(
        f"{'inside the guard':>20}: mean {inside.get('cai_guard_latency_ms_sum', 0) / max(count, 1):7.3f} ms "
        f"over {count:.0f} responses"
    )


if __name__ == "__main__":
    main()
