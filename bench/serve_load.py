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
import threading
import time

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from cai_engine.engine import Engine
from cai_engine.serve import create_app

ANSWER = ("Take 500 mg of paracetamol every six hours if you need it, no more than four doses a day, and see a doctor "
          "if the fever lasts more than three days.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(app) -> tuple[uvicorn.Server, int]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, port


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="examples/clinic-policy.yaml")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    async def completions(request):
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": "stub",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER},
                                          "finish_reason": "stop"}]})

    stub, stub_port = serve(Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])]))
    engine = Engine.from_policy(args.policy)
    engine.policy.guard.model_critics = False  # rules and plugin checks only: no model in the request path
    app = create_app(engine, f"http://127.0.0.1:{stub_port}/v1", max_concurrency=args.concurrency)
    guard, guard_port = serve(app)
    asyncio.run(load(f"http://127.0.0.1:{guard_port}/v1", 50, args.concurrency))  # warm-up
    direct, direct_errors = asyncio.run(load(f"http://127.0.0.1:{stub_port}/v1", args.requests, args.concurrency))
    guarded, guarded_errors = asyncio.run(load(f"http://127.0.0.1:{guard_port}/v1", args.requests, args.concurrency))
    metrics = app.state.metrics
    print(f"{args.requests} requests at concurrency {args.concurrency}, policy {args.policy} (rules and checks only)")
    print(f"errors: direct {direct_errors}, through the guard {guarded_errors}")
    for name, values in (("direct to the stub", direct), ("through the guard", guarded)):
        print(f"{name:>20}: p50 {percentile(values, 50):7.2f} ms  p99 {percentile(values, 99):7.2f} ms")
    print(f"{'added by the guard':>20}: p50 {percentile(guarded, 50) - percentile(direct, 50):7.2f} ms  "
          f"p99 {percentile(guarded, 99) - percentile(direct, 99):7.2f} ms")
    print(f"{'inside the guard':>20}: mean {metrics.sums['guard'] / max(sum(metrics.hist['guard']), 1):7.3f} ms "
          f"over {sum(metrics.hist['guard'])} responses")
    guard.should_exit = stub.should_exit = True


if __name__ == "__main__":
    main()
