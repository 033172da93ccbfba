"""Streaming output rails of `cai serve`: what a violating streamed answer leaks before the guard stops it, and the
time to first token the rails add.

A stub upstream (its own process) streams a ~150-word answer one word per chunk (or --chunk-chars characters per
chunk, so words arrive split), a chunk every --chunk-ms; in the violating answer "the admin password is hunter2"
starts at word 81. The guard (`cai serve`, its own process, rules
only: the policy plus a forbid rule for `hunter<digits>` with no fix, action refuse) runs once per --holdbacks
value. For each, N streams of each answer, one at a time, go straight to the stub and through the guard; printed:
time to the first content token (p50, direct and guarded), for the violating answer the chunks released before the
stop, how many characters of the forbidden word were released, and how long after the stub sent it the stop came.

    python bench/serve_stream.py                          # examples/serve-policy.yaml, holdbacks 0,8,32,64
    python bench/serve_stream.py --chunk-chars 3 --chunk-ms 5 --requests 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import uvicorn
import yaml
from serve_load import free_port, percentile, policy_copy, wait_for
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

TEXT = (
    "Colours can be described in many ways and the words people use for them change from one place to another "
    "so a careful answer starts with the light itself and then moves on to the names that painters and printers "
    "and children use for what they see when the sun is low or high and the sky is clear or full of cloud "
)
WORDS = TEXT.split()
CLEAN = " ".join((WORDS * 4)[:150])
LEAK_AT = 80  # the word the violation starts at
VIOLATING = " ".join(
    [*CLEAN.split()[:LEAK_AT], "the", "admin", "password", "is", "hunter2", *CLEAN.split()[LEAK_AT:145]]
)
FORBIDDEN = "hunter2"


def pieces(text: str, chars: int) -> list[str]:
    """The chunks the stub sends: words (with their leading space), or ``chars`` characters each."""
    if chars:
        return [text[i : i + chars] for i in range(0, len(text), chars)]
    return [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))]


def stub_app(chunk_s: float, chunk_chars: int):
    async def completions(request):
        body = await request.json()
        text = VIOLATING if body["messages"][-1]["content"] == "leak" else CLEAN

        async def events():
            def chunk(delta, finish=None):
                data = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "stub"}
                data["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
                return f"data: {json.dumps(data)}\n\n"

            yield chunk({"role": "assistant", "content": ""})
            for piece in pieces(text, chunk_chars):
                await asyncio.sleep(chunk_s)
                yield chunk({"content": piece})
            yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


async def one_stream(client: httpx.AsyncClient, url: str, kind: str) -> dict:
    body = {"model": "stub", "messages": [{"role": "user", "content": kind}], "stream": True}
    began = time.perf_counter()
    first = None
    text, finish, stop_at, token_at, chunks = "", None, None, None, 0
    async with client.stream("POST", f"{url}/chat/completions", json=body) as reply:
        async for line in reply.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            for choice in event.get("choices", []):
                content = choice["delta"].get("content") or ""
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                    if finish == "content_filter":
                        stop_at = time.perf_counter() - began
                        continue  # the refusal delta is not part of the answer
                if content and first is None:
                    first = time.perf_counter() - began
                chunks += bool(content)
                text += content
                if FORBIDDEN in text and token_at is None:
                    token_at = time.perf_counter() - began
    return {"first": first, "text": text, "finish": finish, "stop_at": stop_at, "token_at": token_at, "chunks": chunks}


async def run_streams(url: str, kind: str, n: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as client:
        return [await one_stream(client, url, kind) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="examples/serve-policy.yaml")
    parser.add_argument("--requests", type=int, default=10, help="streams of each answer per holdback")
    parser.add_argument("--chunk-ms", type=float, default=20.0, help="ms between the stub's chunks")
    parser.add_argument("--chunk-chars", type=int, default=0, help="characters per chunk (0: one word per chunk)")
    parser.add_argument("--holdbacks", default="0,8,32,64", help="--stream-holdback values to measure")
    parser.add_argument("--stub", type=int, help=argparse.SUPPRESS)  # internal: serve the stub on this port
    args = parser.parse_args()
    if args.stub:
        app = stub_app(args.chunk_ms / 1000, args.chunk_chars)
        uvicorn.run(app, host="127.0.0.1", port=args.stub, log_level="error")
        return
    forbid = {
        "id": "bench-001",
        "title": "No passwords",
        "phases": ["runtime"],
        "rules": [{"id": "bench-001-r", "kind": "forbid", "pattern": r"\bhunter\d+", "message": "a password"}],
    }
    stub_port = free_port()
    pace = ["--chunk-ms", str(args.chunk_ms), "--chunk-chars", str(args.chunk_chars)]
    stub = subprocess.Popen([sys.executable, __file__, "--stub", str(stub_port), *pace])
    with tempfile.TemporaryDirectory() as folder:
        data = policy_copy(args.policy)
        data.setdefault("add", []).append(forbid)
        data["guard"] = {**data.get("guard", {}), "action": "refuse", "model_critics": False}
        policy = Path(folder) / "policy.yaml"
        policy.write_text(yaml.safe_dump(data), encoding="utf-8")
        try:
            wait_for(f"http://127.0.0.1:{stub_port}/", stub)
            direct = f"http://127.0.0.1:{stub_port}/v1"
            clean_direct = asyncio.run(run_streams(direct, "clean", args.requests))
            leak_direct = asyncio.run(run_streams(direct, "leak", args.requests))
            ttft_direct = percentile([r["first"] for r in clean_direct], 50) * 1000
            token_direct = percentile([r["token_at"] for r in leak_direct], 50) * 1000
            unit = f"{args.chunk_chars} characters" if args.chunk_chars else "a word"
            at = VIOLATING.index(FORBIDDEN)
            before = at // args.chunk_chars if args.chunk_chars else len(VIOLATING[:at].split())
            print(
                f"stub: {unit} every {args.chunk_ms:g} ms, {len(pieces(CLEAN, args.chunk_chars))} chunks; in the "
                f"violating answer '{FORBIDDEN}' starts in chunk {before + 1} and "
                f"has left the stub whole at p50 {token_direct:.0f} ms"
            )
            print(f"{args.requests} streams of each answer per row, one at a time; policy {args.policy} + bench-001")
            print(f"direct to the stub: time to first token p50 {ttft_direct:7.1f} ms")
            for holdback in [int(h) for h in args.holdbacks.split(",")]:
                port = free_port()
                guard = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "cai_engine.cli",
                        "serve",
                        "--policy",
                        str(policy),
                        "--upstream",
                        direct,
                        "--port",
                        str(port),
                        "--stream-holdback",
                        str(holdback),
                    ],
                    stderr=subprocess.DEVNULL,
                )
                try:
                    wait_for(f"http://127.0.0.1:{port}/health", guard)
                    url = f"http://127.0.0.1:{port}/v1"
                    asyncio.run(run_streams(url, "clean", 2))  # warm-up
                    clean = asyncio.run(run_streams(url, "clean", args.requests))
                    leak = asyncio.run(run_streams(url, "leak", args.requests))
                finally:
                    guard.terminate()
                    guard.wait(10)
                ttft = percentile([r["first"] for r in clean], 50) * 1000
                intact = sum(r["text"] == CLEAN and r["finish"] == "stop" for r in clean)
                stopped = sum(r["finish"] == "content_filter" for r in leak)
                released = [r["chunks"] for r in leak]
                leaked = max(_leaked_chars(r["text"]) for r in leak)
                lag = percentile([(r["stop_at"] or 0) * 1000 - token_direct for r in leak], 50)
                print(
                    f"holdback {holdback:3d} chars: first token p50 {ttft:7.1f} ms (+{ttft - ttft_direct:6.1f}); clean "
                    f"answers whole {intact}/{len(clean)}; violating answers stopped {stopped}/{len(leak)} after "
                    f"{min(released)}-{max(released)} chunks released, characters of '{FORBIDDEN}' released: at "
                    f"most {leaked}; the stop came p50 {lag:+.0f} ms after the stub had sent the word whole"
                )
        finally:
            stub.terminate()
            stub.wait(10)


def _leaked_chars(text: str) -> int:
    """How many leading characters of the forbidden word the released text ends with (or holds whole)."""
    if FORBIDDEN in text:
        return len(FORBIDDEN)
    start = VIOLATING.index(FORBIDDEN)
    return max(0, min(len(text), start + len(FORBIDDEN)) - start) if VIOLATING.startswith(text) else -1


if __name__ == "__main__":
    main()
