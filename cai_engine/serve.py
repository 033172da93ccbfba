"""``cai serve``: the policy as an OpenAI-compatible guard in front of any OpenAI-compatible model server.

A request to ``/v1/chat/completions`` is checked (the input rail, if the policy turns it on), forwarded to the
upstream without streaming, and the upstream's answer is guarded by the policy before it is returned in the same
OpenAI shape, with the guard's verdict in the ``cai_guard`` extension field. A streaming request is answered as a
stream too, but only after the whole answer has been guarded (buffer and release): model critics need the whole
answer, so the first token arrives when the guard is done.

Built on Starlette and uvicorn, with one pooled ``httpx.AsyncClient`` for the upstream; the optional ``[serve]`` extra
installs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from typing import Any

import httpx

from .engine import Engine
from .errors import CaiError
from .runs import now
from .schema import Message

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


def _error(status: int, message: str, kind: str, code: str | None = None, param: str | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class Metrics:
    """Counters and latency histograms in Prometheus' text format."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.actions: dict[str, int] = {}
        self.upstream_errors = 0
        self.hist: dict[str, list[int]] = {
            "upstream": [0] * (len(LATENCY_BUCKETS_MS) + 1),
            "guard": [0] * (len(LATENCY_BUCKETS_MS) + 1),
        }
        self.sums: dict[str, float] = {"upstream": 0.0, "guard": 0.0}

    def observe(self, which: str, ms: float) -> None:
        index = next((i for i, b in enumerate(LATENCY_BUCKETS_MS) if ms <= b), len(LATENCY_BUCKETS_MS))
        self.hist[which][index] += 1
        self.sums[which] += ms

    def count(self, status: str, action: str | None = None) -> None:
        self.requests[status] = self.requests.get(status, 0) + 1
        if action:
            self.actions[action] = self.actions.get(action, 0) + 1

    def render(self) -> str:
        lines = ["# HELP cai_requests_total Chat completion requests by outcome.", "# TYPE cai_requests_total counter"]
        lines += [f'cai_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())]
        lines += ["# HELP cai_guard_actions_total Guard decisions by action.", "# TYPE cai_guard_actions_total counter"]
        lines += [f'cai_guard_actions_total{{action="{k}"}} {v}' for k, v in sorted(self.actions.items())]
        lines += ["# TYPE cai_upstream_errors_total counter", f"cai_upstream_errors_total {self.upstream_errors}"]
        for which in ("upstream", "guard"):
            name = f"cai_{which}_latency_ms"
            lines.append(f"# TYPE {name} histogram")
            total = 0
            for bound, n in zip([*LATENCY_BUCKETS_MS, "+Inf"], self.hist[which]):
                total += n
                lines.append(f'{name}_bucket{{le="{bound}"}} {total}')
            lines += [f"{name}_sum {round(self.sums[which], 3)}", f"{name}_count {total}"]
        return "\n".join(lines) + "\n"


def create_app(
    engine: Engine,
    upstream: str,
    *,
    client_key_env: str | None = "CAI_SERVE_API_KEY",
    upstream_key_env: str | None = "CAI_UPSTREAM_API_KEY",
    timeout: float = 120.0,
    max_concurrency: int = 32,
    transport: httpx.AsyncBaseTransport | None = None,
):
    """The ASGI app. ``client_key_env`` names the environment variable holding the bearer token clients must send
    (unset or empty: no auth); ``upstream_key_env`` the key sent to the upstream (else the client's Authorization
    header is passed through when there is no client token)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    base = upstream.rstrip("/")
    client_token = os.environ.get(client_key_env or "", "") or None
    upstream_token = os.environ.get(upstream_key_env or "", "") or None
    metrics = Metrics()
    limit = asyncio.Semaphore(max_concurrency)
    state: dict[str, Any] = {}

    def client() -> httpx.AsyncClient:
        if "client" not in state:
            state["client"] = httpx.AsyncClient(
                timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                transport=transport,
                limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            )
        return state["client"]

    def authorised(request: Request) -> bool:
        if client_token is None:
            return True
        return request.headers.get("authorization", "") == f"Bearer {client_token}"

    def upstream_headers(request: Request) -> dict[str, str]:
        if upstream_token:
            return {"Authorization": f"Bearer {upstream_token}"}
        if client_token is None and request.headers.get("authorization"):
            return {"Authorization": request.headers["authorization"]}
        return {}

    async def health(request: Request):
        return JSONResponse({"status": "ok", "policy": engine.policy_info, "upstream": base})

    async def metrics_endpoint(request: Request):
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(request: Request):
        if not authorised(request):
            return _error(401, "missing or wrong bearer token", "invalid_request_error", "invalid_api_key")
        try:
            reply = await client().get(f"{base}/models", headers=upstream_headers(request))
        except httpx.TimeoutException:
            return _error(504, f"the upstream {base} did not answer in time", "upstream_error", "upstream_timeout")
        except httpx.HTTPError as exc:
            return _error(
                502,
                f"the upstream {base} is unreachable ({type(exc).__name__})",
                "upstream_error",
                "upstream_unreachable",
            )
        return JSONResponse(reply.json(), status_code=reply.status_code)

    async def chat(request: Request):
        began = time.perf_counter()
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if not authorised(request):
            metrics.count("unauthorised")
            return _error(401, "missing or wrong bearer token", "invalid_request_error", "invalid_api_key")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            metrics.count("bad_request")
            return _error(400, "the body is not JSON", "invalid_request_error")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            metrics.count("bad_request")
            return _error(400, "'messages' must be a non-empty list", "invalid_request_error", param="messages")
        try:
            conversation = [
                Message.model_validate({"role": m.get("role"), "content": _text(m.get("content"))})
                for m in body["messages"]
            ]
        except (AttributeError, ValueError, TypeError):
            metrics.count("bad_request")
            return _error(
                400,
                "each message needs a role (system, user, assistant) and text content",
                "invalid_request_error",
                param="messages",
            )
        stream = bool(body.get("stream"))
        model_name = body.get("model") or "upstream"
        record: dict[str, Any] = {
            "id": request_id,
            "time": now(),
            "policy": engine.policy_info,
            "model": model_name,
            "stream": stream,
        }
        input_info = None
        if engine.policy.input.check:
            violations, redacted = engine.check_input(conversation)
            if violations:
                action = engine.policy.input.action
                if action == "redact" and redacted is not None:
                    index = max(i for i, m in enumerate(body["messages"]) if m.get("role") == "user")
                    body["messages"][index] = {**body["messages"][index], "content": redacted}
                    conversation[index] = Message(role="user", content=redacted)
                elif action != "flag":
                    action = "refused"  # type: ignore[assignment]  # the outcome, reported as the guard reports it
                input_info = {
                    "action": "redacted" if action == "redact" else action,
                    "principle_ids": sorted({v.principle_id for v in violations}),
                }
                if action == "refused":
                    text = engine.refusal_text(violations)
                    verdict: dict[str, Any] = {
                        "action": "refused",
                        "input": input_info,
                        "principle_ids": input_info["principle_ids"],
                        "audit_id": request_id,
                        "compliant": False,
                    }
                    metrics.count("ok", "input_refused")
                    _emit(
                        engine,
                        {
                            **record,
                            "status": "input_refused",
                            "input": input_info,
                            "upstream_ms": 0.0,
                            "guard_ms": round((time.perf_counter() - began) * 1000, 3),
                        },
                    )
                    return _respond(request_id, model_name, text, "stop", verdict, None, stream)
        forward = {**body, "stream": False}
        forward.pop("stream_options", None)
        upstream_began = time.perf_counter()
        async with limit:
            try:
                reply = await client().post(f"{base}/chat/completions", json=forward, headers=upstream_headers(request))
            except httpx.TimeoutException:
                metrics.upstream_errors += 1
                metrics.count("upstream_timeout")
                _emit(engine, {**record, "status": "upstream_timeout"})
                return _error(
                    504,
                    f"the upstream {base} did not answer within {timeout:g} s",
                    "upstream_error",
                    "upstream_timeout",
                )
            except httpx.HTTPError as exc:
                metrics.upstream_errors += 1
                metrics.count("upstream_unreachable")
                _emit(engine, {**record, "status": "upstream_unreachable"})
                return _error(
                    502,
                    f"the upstream {base} is unreachable ({type(exc).__name__})",
                    "upstream_error",
                    "upstream_unreachable",
                )
        upstream_ms = (time.perf_counter() - upstream_began) * 1000
        metrics.observe("upstream", upstream_ms)
        if reply.status_code >= 400:
            metrics.upstream_errors += 1
            metrics.count("upstream_error")
            _emit(engine, {**record, "status": f"upstream_{reply.status_code}"})
            status = 502 if reply.status_code >= 500 else reply.status_code
            try:
                detail = reply.json()
            except ValueError:
                detail = None
            if isinstance(detail, dict) and "error" in detail and status < 500:
                return JSONResponse(detail, status_code=status)
            return _error(status, f"the upstream answered {reply.status_code}", "upstream_error", "upstream_error")
        try:
            data = reply.json()
            choice = data["choices"][0]
            answer = _text(choice["message"].get("content"))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            metrics.upstream_errors += 1
            metrics.count("upstream_error")
            return _error(
                502, "the upstream's answer is not an OpenAI chat completion", "upstream_error", "upstream_bad_response"
            )
        guard_began = time.perf_counter()
        try:
            result = await asyncio.to_thread(engine.guard, conversation, answer)
        except CaiError as exc:
            metrics.count("guard_error")
            _emit(engine, {**record, "status": "guard_error", "error": str(exc)})
            return _error(500, f"the guard failed: {exc}", "guard_error")
        guard_ms = (time.perf_counter() - guard_began) * 1000
        metrics.observe("guard", guard_ms)
        metrics.count("ok", result.action)
        verdict = {
            "action": result.action,
            "compliant": result.compliant,
            "abstained": result.abstained,
            "principle_ids": sorted({v.principle_id for v in result.violations}),
            "audit_id": result.id,
        }
        if input_info:
            verdict["input"] = input_info
        _emit(
            engine,
            {
                **record,
                "status": "ok",
                "audit_id": result.id,
                "action": result.action,
                "input": input_info,
                "upstream_ms": round(upstream_ms, 3),
                "guard_ms": round(guard_ms, 3),
            },
        )
        return _respond(
            request_id,
            data.get("model", model_name),
            result.response,
            choice.get("finish_reason") or "stop",
            verdict,
            data.get("usage"),
            stream,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if "client" in state:
            await state.pop("client").aclose()

    routes = [
        Route("/health", health),
        Route("/metrics", metrics_endpoint),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.metrics = metrics
    return app


def _text(content: Any) -> str:
    """OpenAI content: a string, or a list of parts of which the text parts count."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise TypeError("content must be text")


def _emit(engine: Engine, record: dict[str, Any]) -> None:
    engine.runtime.emit(record, "serve")


def _respond(request_id: str, model: str, text: str, finish: str, verdict: dict[str, Any], usage: Any, stream: bool):
    from starlette.responses import JSONResponse, StreamingResponse

    created = int(time.time())
    if not stream:
        return JSONResponse(
            {
                "id": request_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": usage,
                "cai_guard": verdict,
            }
        )

    def chunk(delta: dict[str, Any], reason: str | None, extra: dict[str, Any] | None = None) -> str:
        body = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
            **(extra or {}),
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def events():
        yield chunk({"role": "assistant", "content": text}, None)
        yield chunk({}, finish, {"cai_guard": verdict})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def check_upstream(upstream: str, *, timeout: float = 10.0) -> str | None:
    """None if ``upstream``/models answers; otherwise why not."""
    key = os.environ.get("CAI_UPSTREAM_API_KEY") or None
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            reply = await client.get(
                f"{upstream.rstrip('/')}/models", headers={"Authorization": f"Bearer {key}"} if key else {}
            )
    except httpx.HTTPError as exc:
        return f"{upstream} is unreachable ({type(exc).__name__})"
    if reply.status_code != 200:
        return f"{upstream}/models answered {reply.status_code}"
    return None
