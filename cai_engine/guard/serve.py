"""``cai serve``: the policy as an OpenAI-compatible guard in front of any OpenAI-compatible model server.

A request to ``/v1/chat/completions`` is read within limits (body size, JSON depth, finite numbers, a JSON content
type), checked by the input rail (every text of every message, if the policy turns it on), forwarded to the upstream
under one deadline for the whole exchange, its answer read within a size limit (``max_upstream_bytes``, which also
bounds one line of a stream), and every choice of the answer is guarded by the policy before it is returned in the
same OpenAI shape, with the verdict in the ``cai_guard`` extension field. Tools, tool calls, ``n``, ``logprobs`` and
usage pass through; a tool call's arguments are guarded like text.

A streaming request is streamed from the upstream and released in checked pieces (see :class:`StreamGuard`): the
policy's rules and plugin checks run on every chunk over an overlapping window, the last ``stream_holdback``
visible characters are held back so a forbidden word split across chunks is caught before any of it leaves, and a violation
ends the stream with a final chunk whose ``finish_reason`` is ``content_filter``, whose delta is the policy's
refusal and whose ``cai_guard`` has action ``stopped``. When the upstream finishes, the whole answer goes through the
guard once more (``require`` rules, model critics) before the held-back end is released.

Built on Starlette and uvicorn, with one pooled ``httpx.AsyncClient`` for the upstream; the optional ``[serve]`` extra
installs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import math
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from cai_engine.constitution.model import Message
from cai_engine.errors import CaiError
from cai_engine.guard.engine import (
    TEXT_PARTS,
    Engine,
    InputCheck,
    InputShapeError,
    json_text,
    strings_in,
    unknown_part_strings,
)
from cai_engine.records import GuardResult, Violation
from cai_engine.store.runs import now
from cai_engine.text import textnorm

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
MAX_BODY_BYTES = 1 << 20  # a request body, read and counted as it arrives
MAX_JSON_DEPTH = 64  # as CAI_LIMIT_DEPTH for policy files
READ_TIMEOUT_S = 10.0  # for a client to send a request's headers, and again its body
MAX_CHOICES = 128  # OpenAI's own limit on n
MIN_STREAM_WINDOW = 64  # the stream check always looks back at least this far (and at least the holdback)
INLINE_RAIL_BYTES = 32_768  # larger requests are checked in a worker thread, off the event loop
MAX_ERROR_CHARS = 2_000  # of an upstream's error message: checked by the rules, then passed on
MAX_UPSTREAM_BYTES = 16 << 20  # an upstream's answer, and one line of its stream, read and counted as it arrives
MAX_STREAM_FALLBACK_BYTES = 4 * MAX_BODY_BYTES  # a plain (non-SSE) answer to a stream request
SEVERITY = {"none": 0, "flagged": 1, "revised": 2, "refused": 3, "stopped": 4}
ROUTES_HINT = "this server answers POST /v1/chat/completions, GET /v1/models, GET /health and GET /metrics"


class RequestError(Exception):
    """A request that is answered with an OpenAI-style JSON error (never a traceback)."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        outcome: str = "bad_request",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers, self.outcome = headers, outcome

    def response(self):
        return _error(self.status, self.message, self.kind, self.code, self.param, self.headers)


class UpstreamTooLarge(Exception):
    """The upstream sent more than ``max_upstream_bytes``: its answer, or one line of its stream (#32)."""

    def __init__(self, limit: int, what: str = "answer") -> None:
        super().__init__(f"the upstream's {what} is larger than {limit} bytes (cai serve --max-upstream-bytes)")
        self.limit = limit


class ClientGone(Exception):
    """The client disconnected while its request was being served."""


def _dumps(payload: Any) -> bytes:
    try:
        return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from the upstream: escaped, still valid JSON
        return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode("ascii")


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None):
    from starlette.responses import Response

    return Response(_dumps(payload), status_code=status, media_type="application/json", headers=headers)


def _error(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
):
    error = {"message": message, "type": kind, "param": param, "code": code}
    return _json({"error": error, **(extra or {})}, status, headers)


# -- reading a request --------------------------------------------------------------------------------------------


def parse_json(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A request body as JSON, strictly: UTF-8, no NaN or Infinity (nor a number too large for a float), at most
    ``max_depth`` levels of nesting, no lone UTF-16 surrogate in a string.

    :raises RequestError: a 400 saying which of these the body breaks.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "the body is not UTF-8 text") from None
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise RequestError(400, f"the JSON body is nested deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise RequestError(400, f"the body is not valid JSON ({exc})") from None
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > max_depth:
                raise RequestError(400, f"the JSON body is nested deeper than {max_depth} levels")
            items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
            for key, item in items:
                if key is not None:
                    _valid_unicode(key)
                stack.append((item, depth + 1))
        elif isinstance(value, str):
            _valid_unicode(value)
    return data


def _no_constant(name: str) -> Any:
    raise RequestError(400, f"{name} is not a JSON number; send finite numbers only")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(400, f"the number {text[:40]} is too large")
    return value


def _valid_unicode(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(
                400, "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"
            ) from None


def _lenient_json(raw: bytes) -> Any:
    """An upstream's JSON: NaN and Infinity (which some servers write in log-probs) become null."""
    try:
        return json.loads(raw, parse_constant=lambda _: None)
    except (ValueError, RecursionError):
        return None


async def _read_body(request: Any, max_bytes: int, deadline_s: float) -> bytes:
    """The body, counted as it arrives (413 past ``max_bytes``, before the rest is read) and read within
    ``deadline_s`` (408: a client dripping its body cannot hold a worker)."""
    import anyio

    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if mime != "application/json":
        raise RequestError(
            415,
            f"send the body as JSON with Content-Type: application/json (got {mime or 'no content type'!r})",
            code="unsupported_media_type",
            outcome="unsupported_media_type",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        with anyio.fail_after(deadline_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(
            408, f"the body did not arrive within {deadline_s:g} s", code="request_timeout", outcome="read_timeout"
        ) from None
    except ClientDisconnect:
        raise RequestError(
            499, "the client went away", code="client_disconnected", outcome="client_disconnected"
        ) from None
    return b"".join(chunks)


def _too_large(max_bytes: int) -> RequestError:
    return RequestError(
        413, f"the body is larger than {max_bytes} bytes (cai serve --max-body-bytes)", code="request_too_large"
    )


def _validate(body: Any) -> None:
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise RequestError(400, "'stream' must be true or false", param="stream")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES):
        raise RequestError(400, f"'n' must be a whole number from 1 to {MAX_CHOICES}", param="n")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object", param="stream_options")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise RequestError(400, "'model' must be a string", param="model")


# -- metrics ---------------------------------------------------------------------------------------------------------


class Metrics:
    """Counters and latency histograms (prometheus_client), in a registry of this app's own so that two apps in one
    process count apart. ``render()`` is the body of ``GET /metrics``, in ``content_type``."""

    def __init__(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.content_type = CONTENT_TYPE_LATEST
        self.requests = Counter(
            "cai_requests_total", "Chat completion requests by outcome.", ["status"], registry=self.registry
        )
        self.actions = Counter(
            "cai_guard_actions_total", "Guard decisions by action.", ["action"], registry=self.registry
        )
        self.upstream_errors = Counter(
            "cai_upstream_errors_total",
            "Upstream failures: unreachable, timed out or an error status.",
            registry=self.registry,
        )
        self.latency = {
            which: Histogram(
                f"cai_{which}_latency_ms",
                f"Milliseconds spent {what}.",
                buckets=LATENCY_BUCKETS_MS,
                registry=self.registry,
            )
            for which, what in (("upstream", "waiting for the upstream"), ("guard", "checking with the guard"))
        }

    def observe(self, which: str, ms: float) -> None:
        self.latency[which].observe(ms)

    def count(self, status: str, action: str | None = None) -> None:
        self.requests.labels(status=status).inc()
        if action:
            self.actions.labels(action=action).inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# -- the app ---------------------------------------------------------------------------------------------------------


@dataclass
class ServeOptions:
    """The server's limits and stream settings (``cai serve`` flags of the same names)."""

    timeout: float = 120.0  # one deadline for the whole upstream exchange, streams included
    max_concurrency: int = 32
    max_body_bytes: int = MAX_BODY_BYTES
    max_json_depth: int = MAX_JSON_DEPTH
    max_upstream_bytes: int = MAX_UPSTREAM_BYTES  # an upstream answer, and one line of a stream (502 past it)
    read_timeout: float = READ_TIMEOUT_S
    metrics_need_key: bool = False
    stream_holdback: int = 32  # visible characters of a streamed answer held back until what follows is checked
    stream_window: int = (
        256  # characters already released that each check looks back over (at least 64 and the holdback)
    )
    stream_model_every: int = 0  # with model critics: release after a model check every N chunks (0: at the end)


def create_app(
    engine: Engine,
    upstream: str,
    *,
    client_key_env: str | None = "CAI_SERVE_API_KEY",
    upstream_key_env: str | None = "CAI_UPSTREAM_API_KEY",
    timeout: float = 120.0,
    max_concurrency: int = 32,
    transport: httpx.AsyncBaseTransport | None = None,
    options: ServeOptions | None = None,
):
    """The ASGI app. ``client_key_env`` names the environment variable holding the bearer token clients must send
    (unset or empty: no auth); ``upstream_key_env`` the key sent to the upstream (else the client's Authorization
    header is passed through when there is no client token). ``options`` sets limits and streaming; ``timeout`` and
    ``max_concurrency`` are kept as arguments of their own for callers of earlier versions (``options`` wins when
    given)."""
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    opts = options or ServeOptions(timeout=timeout, max_concurrency=max_concurrency)
    engine.components.check_classifiers_active()  # loads the checks' classifiers now, not on the event loop later
    base = upstream.rstrip("/")
    client_token = os.environ.get(client_key_env or "", "") or None
    expected = f"Bearer {client_token}".encode() if client_token else b""
    upstream_token = os.environ.get(upstream_key_env or "", "") or None
    metrics = Metrics()
    limit = asyncio.Semaphore(opts.max_concurrency)
    state: dict[str, Any] = {}

    def client() -> httpx.AsyncClient:
        if "client" not in state:
            limits = httpx.Limits(max_connections=opts.max_concurrency, max_keepalive_connections=opts.max_concurrency)
            state["client"] = httpx.AsyncClient(
                timeout=httpx.Timeout(opts.timeout, connect=min(opts.timeout, 10.0)),
                transport=transport or _fast_transport(limits),
                limits=limits,
            )
        return state["client"]

    def authorised(request: Request) -> bool:
        if client_token is None:
            return True
        given = request.headers.get("authorization", "").encode("latin-1")
        return hmac.compare_digest(given, expected)  # constant time: no token guessing by timing

    def upstream_headers(request: Request) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if upstream_token:
            headers["authorization"] = f"Bearer {upstream_token}"
        elif client_token is None and request.headers.get("authorization"):
            headers["authorization"] = request.headers["authorization"]
        return headers

    def unauthorised():
        return _error(401, "missing or wrong bearer token", "invalid_request_error", "invalid_api_key")

    def emit(record: dict[str, Any]) -> None:
        engine.runtime.emit(record, "serve")

    async def health(request: Request):
        if not authorised(request):  # says nothing about the policy or the upstream to a stranger
            return _json({"status": "ok"})
        if client_token is None:  # no key configured: everyone is "authorised", so the upstream stays unsaid (#32)
            return _json({"status": "ok", "policy": engine.policy_info})
        return _json({"status": "ok", "policy": engine.policy_info, "upstream": base})

    async def metrics_endpoint(request: Request):
        if opts.metrics_need_key and not authorised(request):
            return unauthorised()
        return Response(metrics.render(), media_type=metrics.content_type)

    async def models(request: Request):
        if not authorised(request):
            return unauthorised()
        headers = upstream_headers(request)
        headers.pop("content-type")

        async def fetch() -> tuple[httpx.Response, bytes]:
            with anyio.fail_after(opts.timeout):
                req = client().build_request("GET", f"{base}/models", headers=headers)
                reply = await client().send(req, stream=True)
                try:  # counted as it arrives, like every upstream answer
                    return reply, await _read_limited(reply, opts.max_upstream_bytes)
                finally:
                    with anyio.CancelScope(shield=True):
                        await reply.aclose()

        try:
            reply, content = await _unless_disconnected(request, fetch)
        except ClientGone:
            return Response(status_code=499)
        except UpstreamTooLarge as exc:
            return _error(502, str(exc), "upstream_error", "upstream_too_large")
        except (TimeoutError, httpx.HTTPError) as exc:
            if _timed_out(exc):
                return _error(504, f"the upstream {base} did not answer in time", "upstream_error", "upstream_timeout")
            return _unreachable(base, exc)
        data = _lenient_json(content)
        if not isinstance(data, dict) or reply.status_code >= 500:
            return _error(
                502,
                f"the upstream answered {reply.status_code} with no JSON model list",
                "upstream_error",
                "upstream_bad_response",
            )
        return _json(data, reply.status_code)

    def upstream_failure(exc: Exception, record: dict[str, Any]) -> Response:
        """The answer when the upstream exchange did not happen: the client left (499, nothing sent), the deadline
        passed (504), the upstream could not be reached (502) or sent too much (502); counted and audited."""
        if isinstance(exc, ClientGone):
            metrics.count("client_disconnected")
            emit({**record, "status": "client_disconnected"})
            return Response(status_code=499)
        metrics.upstream_errors.inc()
        if isinstance(exc, UpstreamTooLarge):
            metrics.count("upstream_too_large")
            emit({**record, "status": "upstream_too_large"})
            return _error(502, str(exc), "upstream_error", "upstream_too_large")
        if _timed_out(exc):
            metrics.count("upstream_timeout")
            emit({**record, "status": "upstream_timeout"})
            return _error(
                504,
                f"the upstream {base} did not answer within {opts.timeout:g} s",
                "upstream_error",
                "upstream_timeout",
            )
        metrics.count("upstream_unreachable")
        emit({**record, "status": "upstream_unreachable"})
        return _unreachable(base, exc)

    async def guard_answer(
        data: Any, conversation: list[Message], record: dict[str, Any], input_info: Any, upstream_ms: float
    ) -> Response | tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any], float]:
        """An upstream's JSON answer guarded and audited: a 502 when it is not a chat completion, a 500 when the guard
        fails, else the guarded choices, their verdicts, the overall verdict and the guard's milliseconds."""
        if not _is_completion(data):
            metrics.upstream_errors.inc()
            metrics.count("upstream_error")
            emit({**record, "status": "upstream_bad_response"})
            return _error(
                502, "the upstream's answer is not an OpenAI chat completion", "upstream_error", "upstream_bad_response"
            )
        guard_began = time.perf_counter()
        try:
            choices, verdicts = await _guard_choices(engine, conversation, data["choices"])
        except CaiError as exc:
            metrics.count("guard_error")
            emit({**record, "status": "guard_error", "error": str(exc)})
            return _error(500, f"the guard failed: {exc}", "guard_error")
        guard_ms = (time.perf_counter() - guard_began) * 1000
        metrics.observe("guard", guard_ms)
        verdict = _overall(verdicts)
        metrics.count("ok", verdict["action"])
        if input_info:
            verdict["input"] = input_info
        emit(
            {
                **record,
                "status": "ok",
                "audit_id": verdict["audit_id"],
                "action": verdict["action"],
                "input": input_info,
                "upstream_ms": round(upstream_ms, 3),
                "guard_ms": round(guard_ms, 3),
            }
        )
        return choices, verdicts, verdict, guard_ms

    async def chat(request: Request):
        began = time.perf_counter()
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if not authorised(request):
            metrics.count("unauthorised")
            return unauthorised()
        try:
            raw = await _read_body(request, opts.max_body_bytes, opts.read_timeout)
            body = parse_json(raw, max_depth=opts.max_json_depth)
            _validate(body)
            check = await _input_rail(engine, body, len(raw))
        except RequestError as exc:
            metrics.count(exc.outcome)
            return exc.response()
        stream = bool(body.get("stream"))
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        model_name = body.get("model") or "upstream"
        record: dict[str, Any] = {
            "id": request_id,
            "time": now(),
            "policy": engine.policy_info,
            "model": model_name,
            "stream": stream,
        }
        if check.non_text and engine.policy.input.non_text == "refuse":
            metrics.count("non_text_refused")
            emit({**record, "status": "non_text_refused", "parts": check.non_text})
            return _error(
                400,
                f"the guard cannot read {', '.join(check.non_text)}, and this policy refuses what it cannot check "
                "(input.non_text: refuse); send text only",
                "invalid_request_error",
                "unsupported_content",
                param=check.non_text[0].split(" ")[0],
            )
        input_info = None
        if check.violations:
            action = engine.policy.input.action
            ids = sorted({v.principle_id for v in check.violations})
            where = [f.where for f in check.findings]
            if action == "redact" and check.repairable:
                body = {**body, **check.fields, "messages": check.messages}
                if check.tools is not None:
                    body["tools"] = check.tools
                input_info = {"action": "redacted", "principle_ids": ids}
            elif action == "flag":
                input_info = {"action": "flag", "principle_ids": ids}
            else:
                input_info = {"action": "refused", "principle_ids": ids}
                verdict: dict[str, Any] = {
                    "action": "refused",
                    "input": input_info,
                    "principle_ids": ids,
                    "audit_id": request_id,
                    "compliant": False,
                }
                metrics.count("ok", "input_refused")
                guard_ms = round((time.perf_counter() - began) * 1000, 3)
                emit({**record, "status": "input_refused", "input": input_info, "where": where, "guard_ms": guard_ms})
                refusal = {"role": "assistant", "content": engine.refusal_text(check.violations)}
                choices = [{"index": 0, "message": refusal, "finish_reason": "content_filter"}]
                return _respond(request_id, model_name, choices, verdict, None, stream, include_usage)
            record["input_where"] = where
        conversation = check.conversation
        if stream:
            return await stream_chat(request, body, conversation, record, input_info, include_usage)
        forward = {**body, "stream": False}
        forward.pop("stream_options", None)
        upstream_began = time.perf_counter()

        async def post() -> tuple[httpx.Response, bytes]:
            async with limit:
                with anyio.fail_after(opts.timeout):
                    req = client().build_request(
                        "POST", f"{base}/chat/completions", content=_dumps(forward), headers=upstream_headers(request)
                    )
                    reply = await client().send(req, stream=True)
                    try:  # read and counted as it arrives: an answer past the limit is never held whole
                        return reply, await _read_limited(reply, opts.max_upstream_bytes)
                    finally:
                        with anyio.CancelScope(shield=True):  # closed even when the client has gone
                            await reply.aclose()

        try:
            reply, content = await _unless_disconnected(request, post)
        except (ClientGone, TimeoutError, httpx.HTTPError, UpstreamTooLarge) as exc:
            return upstream_failure(exc, record)
        upstream_ms = (time.perf_counter() - upstream_began) * 1000
        metrics.observe("upstream", upstream_ms)
        if reply.status_code >= 400:
            return upstream_error(reply.status_code, reply.headers, content, conversation, record)
        data = _lenient_json(content)
        guarded = await guard_answer(data, conversation, record, input_info, upstream_ms)
        if isinstance(guarded, Response):
            return guarded
        choices, verdicts, verdict, guard_ms = guarded
        if len(choices) > 1:
            for choice, one in zip(choices, verdicts):
                choice["cai_guard"] = one
        rest = {k: v for k, v in data.items() if k not in ("id", "object", "created", "choices", "usage")}
        rest = without_findings(engine, conversation, rest)
        payload = {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            **rest,
            "model": data.get("model", model_name),
            "choices": choices,
            "usage": data.get("usage"),
            "cai_guard": verdict,
        }
        timing = f"upstream;dur={upstream_ms:.2f}, guard;dur={guard_ms:.2f}"
        return _json(payload, headers={"server-timing": timing})

    def upstream_error(status: int, headers: Any, content: bytes, conversation: list[Message], record: dict):
        """An upstream error for the client: 4xx keep their status with the message run through the policy's
        rules (an upstream may quote the request back); 5xx become 502; Retry-After passes through."""
        metrics.upstream_errors.inc()
        metrics.count("upstream_error")
        emit({**record, "status": f"upstream_{status}"})
        passed = {}
        retry = headers.get("retry-after")
        if retry and len(retry) <= 64 and retry.isascii() and retry.isprintable():
            passed["retry-after"] = retry
        if status >= 500:
            return _error(502, f"the upstream answered {status}", "upstream_error", "upstream_error", headers=passed)
        detail = _lenient_json(content)
        error = detail.get("error") if isinstance(detail, dict) else None
        if isinstance(error, str):
            error = {"message": error}
        if not isinstance(error, dict):
            error = {"message": detail.get("message") if isinstance(detail, dict) else None}
        said = error.get("message")
        message: str = said[:MAX_ERROR_CHARS] if isinstance(said, str) else f"the upstream answered {status}"
        violations, redacted = engine.check_text(conversation[-4:], message)
        extra = None
        if violations:
            ids = sorted({v.principle_id for v in violations})
            action = "redacted" if redacted is not None else "refused"
            message = (
                redacted
                if redacted is not None
                else f"the upstream answered {status}; {engine.refusal_text(violations)}"
            )
            extra = {"cai_guard": {"action": action, "principle_ids": ids}}
        fields = {}
        for name in ("type", "code", "param"):  # short, but they can echo the request too: one that breaks a rule
            value = _short(error.get(name))  # is left out rather than repaired (a client matches these exactly)
            if value is not None and engine.check_text(conversation[-4:], value)[0]:
                value = None
                extra = extra or {"cai_guard": {"action": "redacted", "principle_ids": []}}
            fields[name] = value
        kind = fields["type"] or "upstream_error"
        return _error(status, message, kind, fields["code"], fields["param"], passed, extra)

    async def stream_chat(
        request: Request,
        body: dict[str, Any],
        conversation: list[Message],
        record: dict[str, Any],
        input_info: dict[str, Any] | None,
        include_usage: bool,
    ):
        forward = {**body, "stream": True}
        deadline = time.monotonic() + opts.timeout
        upstream_began = time.perf_counter()
        held = {"slot": False}

        async def release_slot() -> None:
            if held["slot"]:
                held["slot"] = False
                limit.release()

        async def open_stream() -> httpx.Response:
            await limit.acquire()
            held["slot"] = True
            try:
                with anyio.fail_after(opts.timeout):
                    req = client().build_request(
                        "POST", f"{base}/chat/completions", content=_dumps(forward), headers=upstream_headers(request)
                    )
                    return await client().send(req, stream=True)
            except BaseException:
                await release_slot()
                raise

        try:
            reply = await _unless_disconnected(request, open_stream)
        except (ClientGone, TimeoutError, httpx.HTTPError) as exc:
            return upstream_failure(exc, record)
        if reply.status_code >= 400 or "text/event-stream" not in reply.headers.get("content-type", ""):
            too_large: UpstreamTooLarge | None = None
            try:
                with anyio.fail_after(max(0.01, deadline - time.monotonic())):
                    content = await _read_limited(reply, min(opts.max_upstream_bytes, MAX_STREAM_FALLBACK_BYTES))
            except (TimeoutError, httpx.HTTPError) as exc:  # as on the plain path: 504 or 502, audited (the
                return upstream_failure(exc, record)  # finally below closes the reply and frees the slot)
            except UpstreamTooLarge as exc:
                content, too_large = b"", exc
            finally:
                await reply.aclose()
                await release_slot()
            upstream_ms = (time.perf_counter() - upstream_began) * 1000
            metrics.observe("upstream", upstream_ms)
            if reply.status_code >= 400:
                return upstream_error(reply.status_code, reply.headers, content, conversation, record)
            if too_large is not None:
                return upstream_failure(too_large, record)
            data = _lenient_json(content)  # an upstream that answers a stream request with one JSON answer
            guarded = await guard_answer(data, conversation, record, input_info, upstream_ms)
            if isinstance(guarded, Response):
                return guarded
            choices, verdicts, verdict, _ = guarded
            for choice, one in zip(choices, verdicts):
                choice["cai_guard"] = {**one, "input": input_info} if input_info else one
            model = data.get("model", record["model"])
            return _respond(record["id"], model, choices, verdict, data.get("usage"), True, include_usage)
        guard = StreamGuard(
            engine,
            conversation,
            request_id=record["id"],
            model=record["model"],
            holdback=opts.stream_holdback,
            window=opts.stream_window,
            model_every=opts.stream_model_every,
            include_usage=include_usage,
            input_info=input_info,
        )
        done = {"recorded": False}

        async def finish_record(status: str) -> None:
            if done["recorded"]:
                return
            done["recorded"] = True
            verdict = _overall(guard.verdicts) if guard.verdicts else {"action": "none", "audit_id": None}
            metrics.observe("upstream", (time.perf_counter() - upstream_began) * 1000)
            if status == "ok":
                metrics.count("ok", verdict["action"])
            else:
                metrics.count(status)
            emit(
                {
                    **record,
                    "status": status,
                    "audit_id": verdict.get("audit_id"),
                    "action": verdict.get("action"),
                    "input": input_info,
                    "stopped": guard.stop_log,
                    "upstream_ms": round((time.perf_counter() - upstream_began) * 1000, 3),
                    "guard_ms": round(guard.guard_ms, 3),
                }
            )

        async def cleanup() -> None:
            await reply.aclose()
            await release_slot()
            await finish_record("client_disconnected")

        async def events():
            lines = _sse_lines(reply, opts.max_upstream_bytes)
            try:
                while True:
                    try:
                        with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                            line = await lines.__anext__()
                    except StopAsyncIteration:
                        break
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    chunk = _lenient_json(payload.encode("utf-8", "surrogatepass"))
                    if not isinstance(chunk, dict):
                        yield guard.error_event(
                            502, "the upstream sent a chunk that is not JSON", "upstream_bad_response"
                        )
                        await finish_record("upstream_error")
                        return
                    if isinstance(chunk.get("error"), dict | str):
                        error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
                        said = error.get("message")
                        text = said[:MAX_ERROR_CHARS] if isinstance(said, str) else "the upstream failed mid-answer"
                        violations, redacted = engine.check_text(conversation[-4:], text)
                        if violations:
                            text = redacted if redacted is not None else "the upstream failed mid-answer"
                        yield guard.error_event(502, text, "upstream_error")
                        await finish_record("upstream_error")
                        return
                    for out in await guard.feed(chunk):
                        yield out
                    if guard.all_stopped:
                        break
                await reply.aclose()  # the upstream is done (or cut off): free its connection before the last guard
                await release_slot()
                for out in await guard.finish():
                    yield out
                yield "data: [DONE]\n\n"
                await finish_record("ok")
            except UpstreamTooLarge as exc:
                metrics.upstream_errors.inc()
                yield guard.error_event(502, str(exc), "upstream_too_large")
                await finish_record("upstream_too_large")
            except TimeoutError:
                metrics.upstream_errors.inc()
                yield guard.error_event(
                    504, f"the upstream did not finish within {opts.timeout:g} s", "upstream_timeout"
                )
                await finish_record("upstream_timeout")
            except httpx.HTTPError as exc:
                metrics.upstream_errors.inc()
                yield guard.error_event(502, f"the upstream's stream broke ({type(exc).__name__})", "upstream_error")
                await finish_record("upstream_error")
            except CaiError as exc:
                yield guard.error_event(500, f"the guard failed: {exc}", "guard_error")
                await finish_record("guard_error")

        return _guarded_stream(events(), cleanup, deadline)

    async def not_found_or_not_allowed(request: Request, exc: Exception):
        status = getattr(exc, "status_code", 500)
        if status == 404:
            message = f"no route {request.method} {request.url.path}; {ROUTES_HINT}"
            return _error(404, message, "invalid_request_error", "not_found")
        if status == 405:
            allow = (getattr(exc, "headers", None) or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {allow or 'none'})"
            return _error(405, message, "invalid_request_error", "method_not_allowed", headers={"allow": allow})
        return _error(status, str(getattr(exc, "detail", "")) or "error", "invalid_request_error")

    async def internal_error(request: Request, exc: Exception):
        return _error(500, "the guard server failed on this request (details are in its log)", "server_error")

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
    handlers: dict[Any, Callable[..., Awaitable[Any]]] = {
        HTTPException: not_found_or_not_allowed,
        Exception: internal_error,
    }
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.router.redirect_slashes = False  # "/v1/chat/completions/" is an unknown path (a JSON 404), not a redirect
    app.state.metrics = metrics
    app.state.options = opts
    return app


def _short(value: Any) -> str | None:
    """A field of an upstream error worth passing on: a short printable string (or number), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and len(value) <= 64 and value.isprintable():
        return value
    return None


def _unreachable(base: str, exc: Exception):
    return _error(
        502, f"the upstream {base} is unreachable ({type(exc).__name__})", "upstream_error", "upstream_unreachable"
    )


def _is_completion(data: Any) -> bool:
    choices = data.get("choices") if isinstance(data, dict) else None
    return (
        isinstance(choices, list)
        and bool(choices)
        and all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices)
    )


async def _read_limited(reply: httpx.Response, limit: int) -> bytes:
    """The body of a streamed reply, counted as it arrives (decoded): :class:`UpstreamTooLarge` past ``limit``, as
    soon as a Content-Length says so or the bytes read pass it."""
    declared = reply.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UpstreamTooLarge(limit)
    chunks, size = [], 0
    async for chunk in reply.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise UpstreamTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _sse_lines(reply: httpx.Response, limit: int) -> AsyncIterator[str]:
    """The lines of a server-sent-events body (LF, CRLF or CR ends one), each at most ``limit`` bytes: a longer
    one raises :class:`UpstreamTooLarge` before more of it is held."""
    pending: list[bytes] = []  # the start of a line whose end has not come yet (joined once, when it comes)
    size = 0
    async for chunk in reply.aiter_bytes():
        if b"\n" not in chunk and b"\r" not in chunk:
            pending.append(chunk)
            size += len(chunk)
            if size > limit:
                raise UpstreamTooLarge(limit, "stream line")
            continue
        pending.append(chunk)  # a \r\n cut between chunks reads as an empty line more: SSE ignores it
        *complete, rest = b"".join(pending).replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for line in complete:
            if len(line) > limit:
                raise UpstreamTooLarge(limit, "stream line")
            yield line.decode("utf-8", "replace")
        if len(rest) > limit:
            raise UpstreamTooLarge(limit, "stream line")
        pending, size = [rest], len(rest)
    if size:
        yield b"".join(pending).decode("utf-8", "replace")


async def _unless_disconnected(request: Any, work: Callable[[], Awaitable[Any]]) -> Any:
    """``await work()``, cancelled as soon as the client disconnects (:class:`ClientGone`): a request whose client
    has gone frees its upstream connection and its concurrency slot at once."""
    import anyio

    outcome: dict[str, Any] = {}
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    outcome["gone"] = True
                    group.cancel_scope.cancel()
                    return

        async def run() -> None:
            try:
                outcome["value"] = await work()
            except Exception as exc:  # handed to the caller below, outside the task group
                outcome["error"] = exc
            group.cancel_scope.cancel()

        group.start_soon(watch)
        group.start_soon(run)
    if "value" in outcome:
        return outcome["value"]
    if "error" in outcome:
        raise outcome["error"]
    raise ClientGone


# Request fields whose strings the model does not read as text: sampling and output controls, ids, tool choice.
# Every other field but `messages` and `tools` (a legacy `functions` list, a `response_format` schema, parameters
# the guard does not know, which an upstream may render into the prompt) has its strings checked by the input rail.
CONTROL_FIELDS = frozenset(
    {
        "model", "stream", "stream_options", "temperature", "top_p", "n", "max_tokens", "max_completion_tokens",
        "stop", "seed", "user", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias",
        "parallel_tool_calls", "tool_choice", "function_call", "metadata", "store", "service_tier", "modalities",
        "reasoning_effort", "top_k", "min_p", "repetition_penalty",
    }
)  # fmt: skip


def read_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The request's fields besides ``messages`` and ``tools`` that may carry text to the model."""
    return {k: v for k, v in body.items() if k not in CONTROL_FIELDS and k not in ("messages", "tools")}


async def _input_rail(engine: Engine, body: dict[str, Any], size: int) -> InputCheck:
    """Read every message (400 on a bad shape) and, when the policy checks input, check every text."""
    check_rules = engine.policy.input.check
    messages, tools, fields = body.get("messages"), body.get("tools"), read_fields(body)
    try:
        if check_rules and size > INLINE_RAIL_BYTES:
            return await asyncio.to_thread(engine.check_messages, messages, tools, fields=fields)
        return engine.check_messages(messages, tools, fields=fields, rules=check_rules)
    except InputShapeError as exc:
        raise RequestError(400, str(exc), param=exc.param) from None
    except CaiError as exc:
        raise RequestError(500, f"the input rail failed: {exc}", "guard_error", outcome="guard_error") from None


# -- guarding an answer ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Out:
    """One string of an answer's message that the guard checks: where it is, whether it is JSON, and whether it is the
    answer's text (content) rather than another string (arguments, reasoning, annotations: plugin checks read those
    as the rails do, without a classifier trained on answers)."""

    path: tuple[Any, ...]
    text: str
    is_json: bool = False
    answer: bool = False

    def checked(self) -> str:
        return json_text(self.text) if self.is_json else self.text


def output_texts(message: dict[str, Any]) -> list[_Out]:
    """The strings of an answer's message the client will read: its content (a string, the text parts of a list,
    and every string of a part of a type this code does not know; media parts are not read), every other string
    field but ``role``/``name``/``tool_call_id`` (``refusal``, ``reasoning_content``, ...), and the arguments of
    its tool calls. Content is always checked unless the message only calls tools."""
    out: list[_Out] = []
    content = message.get("content")
    calls: list[Any] = message["tool_calls"] if isinstance(message.get("tool_calls"), list) else []
    if isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, str):
                out.append(_Out(("content", j), part, answer=True))
            elif (
                isinstance(part, dict)
                and part.get("type") in TEXT_PARTS
                and isinstance(part.get(TEXT_PARTS[part["type"]]), str)
            ):
                key = TEXT_PARTS[part["type"]]
                out.append(_Out(("content", j, key), part[key], answer=True))
                out += [  # any other string of a text part (annotations, a title)
                    _Out(path, text)
                    for path, _, text in strings_in(
                        {k: v for k, v in part.items() if k not in ("type", key)}, ("content", j), ""
                    )
                    if text
                ]
            elif isinstance(part, dict):  # media (but their payload), a type this code does not know, a text part
                # whose text is not a string: every string in it
                out += [_Out(path, text) for path, _, text in unknown_part_strings(part, ("content", j), "") if text]
    elif isinstance(content, str) and (content or not (calls or message.get("function_call"))):
        out.append(_Out(("content",), content, answer=True))
    elif content is None and not (calls or message.get("function_call")):
        out.append(_Out(("content",), "", answer=True))
    for key, value in message.items():  # every other string, nested too (audio.transcript, reasoning_details[].text)
        if key not in ("role", "content", "name", "tool_call_id", "tool_calls", "function_call"):
            out += [  # an audio answer's transcript is the answer itself
                _Out(path, text, answer=key == "audio" and path[-1] == "transcript")
                for path, _, text in strings_in(value, (key,), key)
                if text
            ]
    for k, call in enumerate(calls):
        if not isinstance(call, dict):
            continue
        function = call.get("function")
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            out.append(_Out(("tool_calls", k, "function", "arguments"), function["arguments"], is_json=True))
        custom = call.get("custom")
        if isinstance(custom, dict) and isinstance(custom.get("input"), str):
            out.append(_Out(("tool_calls", k, "custom", "input"), custom["input"]))
    legacy = message.get("function_call")
    if isinstance(legacy, dict) and isinstance(legacy.get("arguments"), str):
        out.append(_Out(("function_call", "arguments"), legacy["arguments"], is_json=True))
    return out


def _verdict(results: list[GuardResult], action: str | None = None) -> dict[str, Any]:
    worst = action or max((r.action for r in results), key=SEVERITY.__getitem__, default="none")
    verdict: dict[str, Any] = {
        "action": worst,
        "compliant": all(r.compliant for r in results) and worst != "refused",
        "abstained": any(r.abstained for r in results),
        "principle_ids": sorted({v.principle_id for r in results for v in r.violations}),
        "audit_id": results[0].id if results else None,
    }
    if len(results) > 1:
        verdict["audit_ids"] = [r.id for r in results]
    return verdict


def _overall(verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    """The request's verdict: its one choice's, or for several the strictest action, every principle and audit id."""
    if len(verdicts) == 1:
        return dict(verdicts[0])
    ids = [a for v in verdicts for a in v.get("audit_ids") or [v.get("audit_id")] if a]
    return {
        "action": max((v["action"] for v in verdicts), key=SEVERITY.__getitem__),
        "compliant": all(v.get("compliant") for v in verdicts),
        "abstained": any(v.get("abstained") for v in verdicts),
        "principle_ids": sorted({p for v in verdicts for p in v["principle_ids"]}),
        "audit_id": ids[0] if ids else None,
        "audit_ids": ids,
    }


def _set(target: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


async def _guard_choices(
    engine: Engine, conversation: list[Message], choices: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Guard every choice of a chat completion in one batch: each choice with its strings guarded (revised in
    place; the whole message replaced by the refusal when one string is refused or a revised tool call is no longer
    JSON), ``logprobs`` kept only when the guard changed nothing, and one verdict per choice."""
    import copy

    items = [(i, out) for i, choice in enumerate(choices) for out in output_texts(choice["message"])]
    pairs = [(conversation, out.checked()) for _, out in items]
    results = await _guard_pairs(engine, pairs, [out.answer for _, out in items])
    guarded, verdicts = [], []
    for i, choice in enumerate(choices):
        mine = [(out, r) for (j, out), r in zip(items, results) if j == i]
        message = copy.deepcopy(choice["message"])
        refused = next((r for _, r in mine if r.action == "refused"), None)
        refusal = refused.response if refused else None
        changed = refused is not None
        if refused is None:
            for out, r in mine:
                if r.action != "revised":
                    continue
                changed = True
                if out.is_json and not _parses(r.response):  # a revision that broke the call: no call at all
                    refusal = engine.refusal_text(_found(r))
                    break
                _set(message, out.path, r.response)
        extras = {k: v for k, v in choice.items() if k not in ("index", "message", "finish_reason", "logprobs")}
        new = {k: v for k, v in choice.items() if k not in extras} | without_findings(engine, conversation, extras)
        if refusal is not None:
            new["message"] = {"role": "assistant", "content": refusal}
            new["finish_reason"] = "content_filter"
        else:
            new["message"] = message
            new["finish_reason"] = choice.get("finish_reason") or "stop"
        if changed and "logprobs" in new:
            new["logprobs"] = None  # they describe tokens the client no longer gets
        elif new.get("logprobs"):
            new["logprobs"] = guard_logprobs(engine, conversation, new["logprobs"])
        guarded.append(new)
        verdicts.append(_verdict([r for _, r in mine], "refused" if refusal is not None else None))
    return guarded, verdicts


# characters of the reply put before each top_logprobs alternative when it is checked: a forbidden word that an
# alternative token would have completed is found, as it would be in the reply
LOGPROB_WINDOW = 48


def logprob_alternatives(logprobs: Any, prefix: str = "") -> str:
    """The text ``top_logprobs`` would show a client: for every alternative token (one the model did not pick), the
    reply's last ``LOGPROB_WINDOW`` characters before it followed by the token, and the token alone, one per line. ``prefix`` is the text
    released before these log-probs (a stream's earlier chunks)."""
    lines: list[str] = []
    if not isinstance(logprobs, dict):
        return ""
    for key, entries in logprobs.items():  # content, refusal, and any other list an upstream sends
        if not isinstance(entries, list):
            continue
        text = prefix if key == "content" else ""
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            token = entry["token"] if isinstance(entry.get("token"), str) else ""
            for alternative in entry.get("top_logprobs") or []:
                other = alternative.get("token") if isinstance(alternative, dict) else None
                if isinstance(other, str) and other != token:
                    lines += [text[-LOGPROB_WINDOW:] + other, other]
            text += token
    return "\n".join(lines)


def without_alternatives(logprobs: dict[str, Any]) -> dict[str, Any]:
    """``logprobs`` with every ``top_logprobs`` list emptied (the chosen tokens' own log-probs stay)."""
    return {
        key: [{**e, "top_logprobs": []} if isinstance(e, dict) else e for e in value]
        if isinstance(value, list)
        else value
        for key, value in logprobs.items()
    }


def guard_logprobs(engine: Engine, conversation: list[Message], logprobs: Any, prefix: str = "") -> Any:
    """``logprobs`` as the client may see them: alternatives removed when the policy's rules or checks find anything
    in them (they would show text the guard did not release)."""
    alternatives = logprob_alternatives(logprobs, prefix)
    if alternatives and engine.check_text(conversation, alternatives)[0]:
        return without_alternatives(logprobs)
    return logprobs


async def _guard_pairs(
    engine: Engine, pairs: list[tuple[list[Message], str]], answers: list[bool]
) -> list[GuardResult]:
    """``engine.guard_batch``: on the event loop when no model can run and the texts are small (rules and checks take
    well under a millisecond there, less than handing the work to a thread), else in a worker thread (a plugin check
    backed by a classifier runs a model's first layers on an answer: tens of milliseconds)."""
    if not pairs:
        return []
    inline = engine.policy.model_free and not engine.components.check_classifiers_active()
    if inline and sum(len(text) for _, text in pairs) <= INLINE_RAIL_BYTES:
        return engine.guard_batch(pairs, answers)
    return await asyncio.to_thread(engine.guard_batch, pairs, answers)


def _timed_out(exc: BaseException) -> bool:
    """Whether an upstream failure is a timeout (the request's deadline, or a timeout on the connection) rather than
    an upstream that is down. httpx-aiohttp reports every aiohttp connection error as ``httpx.ConnectTimeout``, so
    the error that caused it decides."""
    if isinstance(exc, TimeoutError):
        return True
    if not isinstance(exc, httpx.TimeoutException):
        return False
    cause = exc.__cause__
    if cause is None or isinstance(cause, TimeoutError):
        return True
    return not type(cause).__module__.startswith("aiohttp")  # httpcore's own timeouts are timeouts


def _fast_transport(limits: Any) -> Any:
    """aiohttp's connection pool under httpx's API when ``httpx-aiohttp`` is installed (the ``serve`` extra): it costs
    the proxy about half the CPU a request of httpx's own pool does at high concurrency; None: httpx's own."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None  # httpx's own client honours HTTP(S)_PROXY and NO_PROXY; aiohttp's session here would not
    try:
        from httpx_aiohttp import AiohttpTransport
    except ImportError:
        return None
    return AiohttpTransport(limits=limits)


PROXY_VARIABLES = tuple(name for base in ("http_proxy", "https_proxy", "all_proxy") for name in (base, base.upper()))


def without_findings(engine: Engine, conversation: list[Message], fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` (an answer's or a choice's fields besides the message: ``prompt_logprobs``, ``stop_reason``, an
    upstream's own extensions) less every field in which the policy's rules or checks find anything: the client
    receives them as they are, so they are checked like text and left out rather than repaired."""
    kept = {}
    for key, value in fields.items():
        texts = [text for _, _, text in strings_in(value, (key,), key) if text]
        if texts and engine.check_text(conversation, "\n".join(texts))[0]:
            continue
        kept[key] = value
    return kept


def _found(result: GuardResult) -> list[Violation]:
    """What the guard found in a response: a revised one's violations are those of its first round."""
    return result.violations or [v for r in result.rounds for v in r.violations]


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


# -- streaming -------------------------------------------------------------------------------------------------------


@dataclass
class _Piece:
    key: str  # the delta field ("content", "reasoning_content", ...)
    start: int
    end: int
    logprobs: Any = None


@dataclass
class _Choice:
    """One choice of a streamed answer: its text so far per field, what of it is released, what waits."""

    index: int
    texts: dict[str, str] = field(default_factory=dict)
    released: dict[str, int] = field(default_factory=dict)
    checked: dict[str, int] = field(default_factory=dict)
    cleared: dict[str, int] = field(default_factory=dict)  # what the last model check passed (model critics only)
    pieces: list[_Piece] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    function_call: dict[str, Any] | None = None
    finish_reason: str | None = None
    role_sent: bool = False
    held: bool = False  # a repairable violation: nothing more is released until the final guard decides
    stopped: bool = False
    chunks: int = 0
    model_checked_at: int = 0
    flags: list[Violation] = field(default_factory=list)
    seen: dict[str, _Visible] = field(default_factory=dict)  # per field: where its visible characters are


class _Visible:
    """Where the characters a pattern can see are in one streamed field, read once as the text grows (#32).

    The holdback and the check window count only these, so padding a word with characters that folding drops
    (zero-width spaces, soft hyphens, combining marks, ...: ``textnorm.is_dropped``) cannot push the word out of
    either; a run of whitespace counts once, as a hyphenated line break folds away however many spaces it holds.
    ``marks`` keeps the (raw, squeezed) positions of the last ``keep`` counted characters. ``squeezed`` is the text
    with each such gap cut to ``GAP`` dropped and ``GAP`` whitespace characters (and two newlines more at most):
    folding reads the same words in it, and a check window taken from it stays about ``window`` characters long
    however much padding the answer holds (each chunk's check costs the same; no quadratic rescans)."""

    GAP = 8

    def __init__(self, keep: int) -> None:
        self.read_to = 0
        self.squeezed = ""
        self.marks: deque[tuple[int, int]] = deque(maxlen=max(1, keep))
        self.space = False  # the gap at the end already holds a counted whitespace character
        self.dropped = self.spaces = self.newlines = 0  # what the gap at the end has kept of each
        self.when_found: list[str] = []  # what `when` patterns matched in the squeezed text before ``when_to``
        self.when_to = 0

    def read(self, text: str) -> None:
        """Take the text added since the last call."""
        out: list[str] = []
        at = len(self.squeezed)
        for i in range(self.read_to, len(text)):
            char = text[i]
            if not char.isascii() and textnorm.is_dropped(char):
                if self.dropped < self.GAP:
                    self.dropped += 1
                    out.append(char)
                continue
            if char.isspace():
                if self.spaces < self.GAP or (char == "\n" and self.newlines < 2):
                    self.spaces += 1
                    self.newlines += char == "\n"
                    if not self.space:
                        self.space = True
                        self.marks.append((i, at + len(out)))
                    out.append(char)
                continue
            self.space, self.dropped, self.spaces, self.newlines = False, 0, 0, 0
            self.marks.append((i, at + len(out)))
            out.append(char)
        self.read_to = len(text)
        self.squeezed += "".join(out)

    def release_up_to(self, holdback: int) -> int:
        """The raw end of what may be released: all but the last ``holdback`` counted characters and the dropped
        characters or spaces before them."""
        if holdback == 0:
            return self.read_to
        if len(self.marks) <= holdback:
            return 0
        return self.marks[-holdback - 1][0] + 1

    def window_start(self, window: int) -> int:
        """Where in ``squeezed`` the last ``window`` counted characters begin (0: fewer were read)."""
        return self.marks[-window][1] if len(self.marks) >= window else 0


class StreamGuard:
    """Releases a streamed answer in checked pieces.

    Each upstream chunk's text is appended to its choice; the policy's ``forbid`` rules and plugin checks run over
    the new text plus ``window`` characters already released (so a match that spans chunks is found), and the last
    ``holdback`` characters stay unreleased until more text (or the end) follows them, so a match up to
    ``holdback + 1`` characters long is stopped before any of it leaves. Both count visible characters, those
    left after folding (see ``_Visible``): invisible padding inside a word lengthens neither. On a violation: policy
    action ``flag`` reports it and goes on; a violation the rules and checks can repair holds the rest of the answer for the final
    guard (which may release it repaired); anything else stops the choice with a final chunk: ``finish_reason``
    ``content_filter``, the policy's refusal as its delta, and ``cai_guard.action`` ``stopped``. With model critics
    nothing is released before a model check: every ``model_every`` chunks (0: once, at the end). When the upstream
    ends, the whole answer and every tool call (held until then) are guarded as a non-streamed answer would be; the
    rest is released if the guard leaves the released part as it was, else the choice is stopped.
    """

    def __init__(
        self,
        engine: Engine,
        conversation: list[Message],
        *,
        request_id: str,
        model: str,
        holdback: int = 32,
        window: int = 256,
        model_every: int = 0,
        include_usage: bool = False,
        input_info: dict[str, Any] | None = None,
    ) -> None:
        self.engine, self.conversation = engine, conversation
        self.id, self.model, self.created = request_id, model, int(time.time())
        # the window never shrinks below the holdback (or 64): a short window would let a match arriving in small
        # chunks (a card number four digits at a time) go unseen
        self.holdback, self.model_every = max(0, holdback), max(0, model_every)
        self.window = max(window, self.holdback, MIN_STREAM_WINDOW)
        self.include_usage, self.input_info = include_usage, input_info
        self.model_critics = bool(engine.policy.guard.model_critics)
        self.choices: dict[int, _Choice] = {}
        self.usage: Any = None
        self.extra: dict[str, Any] = {}
        self.verdicts: list[dict[str, Any]] = []
        self.stop_log: list[dict[str, Any]] = []
        self.guard_ms = 0.0

    @property
    def all_stopped(self) -> bool:
        return bool(self.choices) and all(c.stopped for c in self.choices.values())

    # -- output ------------------------------------------------------------------------------------------------

    def _chunk(self, index: int | None, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            **self.extra,
        }
        if index is None:
            body["choices"] = []
        else:
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
            if "logprobs" in extra:
                choice["logprobs"] = extra.pop("logprobs")
            body["choices"] = [choice]
        body.update(extra)
        return f"data: {_dumps(body).decode('utf-8')}\n\n"

    def error_event(self, status: int, message: str, code: str) -> str:
        """An error in mid-stream, as OpenAI sends one (the official clients raise it)."""
        error = {"message": message, "type": "upstream_error" if status != 500 else "guard_error", "code": code}
        return f"data: {_dumps({'error': error}).decode('utf-8')}\n\n"

    def _delta(self, state: _Choice, delta: dict[str, Any]) -> dict[str, Any]:
        if not state.role_sent:
            state.role_sent = True
            return {"role": "assistant", **delta}
        return delta

    # -- input -------------------------------------------------------------------------------------------------

    async def feed(self, chunk: dict[str, Any]) -> list[str]:
        """Take one upstream chunk; returns the SSE events that may be released now."""
        for key in ("system_fingerprint", "service_tier"):
            if key in chunk:
                self.extra[key] = chunk[key]
        if isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        touched: dict[int, _Choice] = {}
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0) if isinstance(choice.get("index", 0), int) else 0
            state = self.choices.setdefault(index, _Choice(index))
            if state.stopped:
                continue
            delta: dict[str, Any] = choice["delta"] if isinstance(choice.get("delta"), dict) else {}
            logprobs = choice.get("logprobs")
            for key, value in delta.items():
                if key == "tool_calls" and isinstance(value, list):
                    self._add_tool_calls(state, value)
                elif key == "function_call" and isinstance(value, dict):
                    call = state.function_call or {"name": "", "arguments": ""}
                    for part in ("name", "arguments"):
                        if isinstance(value.get(part), str):
                            call[part] += value[part]
                    state.function_call = call
                elif key != "role" and isinstance(value, str):
                    text = state.texts.get(key, "")
                    state.texts[key] = text + value
                    state.pieces.append(_Piece(key, len(text), len(text) + len(value), logprobs))
                    logprobs = None  # one chunk's log-probs go with its first text piece
                    state.chunks += 1
            if isinstance(choice.get("finish_reason"), str):
                state.finish_reason = choice["finish_reason"]
            touched[index] = state
        out: list[str] = []
        for state in touched.values():
            out += await self._advance(state)
        return out

    def _add_tool_calls(self, state: _Choice, deltas: list[Any]) -> None:
        for delta in deltas:
            if not isinstance(delta, dict):
                continue
            index = delta["index"] if isinstance(delta.get("index"), int) else 0
            call = state.tool_calls.setdefault(index, {"index": index, "function": {"name": "", "arguments": ""}})
            for key in ("id", "type"):
                if isinstance(delta.get(key), str):
                    call[key] = delta[key]
            function: dict[str, Any] = delta["function"] if isinstance(delta.get("function"), dict) else {}
            for part in ("name", "arguments"):
                if isinstance(function.get(part), str):
                    call["function"][part] += function[part]

    def _seen(self, state: _Choice, key: str) -> _Visible:
        if key not in state.seen:
            state.seen[key] = _Visible(max(self.window, self.holdback + 1))
        return state.seen[key]

    def _window(self, state: _Choice, key: str) -> str:
        """The new text of field ``key`` and ``window`` visible characters before it (all older text was checked
        with its own window), taken from the squeezed copy so that padding cannot stretch it."""
        seen = self._seen(state, key)
        start = seen.window_start(self.window)  # counted before the new text is read: back from the last check
        seen.read(state.texts[key])
        text = seen.squeezed
        stop = max(0, start - 64)
        while start > stop and not text[start - 1].isspace():  # begin at a word: \b and words match as they will
            start -= 1
        if start == 0:
            return text
        # a rule's `when` may have matched earlier in the answer, out of the window: what it matched goes in front
        # of the window, so the rule applies to the new text as it will to the whole answer (fail closed). Only the
        # text that left the window since the last check is searched, with a window's overlap for a match across
        # that edge: the prefix is not searched again on every chunk.
        if start > seen.when_to:
            for evidence in self._when_matches(text[max(0, seen.when_to - self.window) : start]):
                if evidence not in seen.when_found:
                    seen.when_found.append(evidence)
            seen.when_to = start
        found = seen.when_found
        return ("\n".join(found) + "\n" + text[start:]) if found else text[start:]

    def _when_matches(self, text: str) -> list[str]:
        out: list[str] = []
        for principle in self.engine.runtime_principles:
            for rule in principle.rules:
                if rule.when and rule.when_in in ("response", "either"):
                    found = textnorm.search(rule.compiled()[1], rule.when, text)
                    if found and (evidence := found[1].original_of(found[0])) not in out:
                        out.append(evidence)
        return out

    async def _advance(self, state: _Choice) -> list[str]:
        if state.stopped or state.held:
            return []
        action = self.engine.policy.guard.action
        for key, text in state.texts.items():
            if state.checked.get(key, 0) == len(text):
                continue
            window = self._window(state, key)
            violations, repaired = self.engine.check_text(self.conversation, window)
            state.checked[key] = len(text)
            if not violations:
                continue
            if action == "flag":
                state.flags += violations
            elif action == "revise" and repaired is not None:
                state.held = True
                return []
            else:
                return [self._stop(state, violations, "rules")]
        if self.model_critics and self.model_every and state.chunks - state.model_checked_at >= self.model_every:
            state.model_checked_at = state.chunks
            for key, text in list(state.texts.items()):
                began = time.perf_counter()
                flagged = await asyncio.to_thread(self._model_flags, text)
                self.guard_ms += (time.perf_counter() - began) * 1000
                if flagged and action != "flag":
                    return [self._stop(state, flagged, "model")]
                state.cleared[key] = len(text)
        return self._release(state)

    def _model_flags(self, text: str) -> list[Violation]:
        """What the model critic flags in ``text`` so far (rules and checks are the window's job)."""
        name = self.engine.policy.critic.name
        critiques = self.engine.critique(self.conversation, text)
        return [
            Violation(principle_id=c.principle_id, evidence=c.text, message=c.text, critic=name)
            for c in critiques
            if c.critic == name and c.needs_revision
        ]

    def _safe(self, state: _Choice, key: str) -> int:
        """How far field ``key`` may be released: all but the held-back end (``holdback`` visible characters and
        any invisible ones before them), and with model critics no further than the last model check passed."""
        seen = self._seen(state, key)
        seen.read(state.texts.get(key, ""))
        safe = seen.release_up_to(self.holdback)
        if self.model_critics:
            safe = min(safe, state.cleared.get(key, 0))
        return safe

    def _release(self, state: _Choice, everything: bool = False) -> list[str]:
        out = []
        while state.pieces:
            piece = state.pieces[0]
            if not everything and piece.end > piece.start and piece.end > self._safe(state, piece.key):
                break
            state.pieces.pop(0)
            text = state.texts[piece.key][piece.start : piece.end]
            state.released[piece.key] = max(state.released.get(piece.key, 0), piece.end)
            extra = {}
            if piece.logprobs is not None:
                prefix = state.texts[piece.key][: piece.start]
                extra["logprobs"] = guard_logprobs(self.engine, self.conversation, piece.logprobs, prefix)
            out.append(self._chunk(state.index, self._delta(state, {piece.key: text}), **extra))
        return out

    def _stop(self, state: _Choice, violations: list[Violation], by: str, refusal: str | None = None) -> str:
        state.stopped = True
        state.pieces.clear()
        released = sum(state.released.values())
        ids = sorted({v.principle_id for v in violations})
        self.stop_log.append({"choice": state.index, "by": by, "principle_ids": ids, "released_chars": released})
        text = refusal or self.engine.refusal_text(violations)
        verdict = {
            "action": "stopped",
            "compliant": False,
            "abstained": False,
            "principle_ids": ids,
            "audit_id": None,
            "released_chars": released,
        }
        if self.input_info:
            verdict["input"] = self.input_info
        self.verdicts.append(verdict)
        lead = "\n\n" if released else ""
        return self._chunk(
            state.index, self._delta(state, {"content": lead + text}), "content_filter", cai_guard=verdict
        )

    # -- the end -----------------------------------------------------------------------------------------------

    async def finish(self) -> list[str]:
        """The upstream is done: guard each unstopped choice whole, release what may be, and close each choice."""
        live = [s for s in sorted(self.choices.values(), key=lambda s: s.index) if not s.stopped]
        items: list[tuple[_Choice, _Out]] = []
        for state in live:
            message: dict[str, Any] = {"role": "assistant", **state.texts}
            if state.tool_calls:
                message["tool_calls"] = [state.tool_calls[k] for k in sorted(state.tool_calls)]
            if state.function_call:
                message["function_call"] = state.function_call
            if "content" not in message and not (state.tool_calls or state.function_call):
                message["content"] = ""
            items += [(state, out) for out in output_texts(message)]
        began = time.perf_counter()
        pairs = [(self.conversation, out.checked()) for _, out in items]
        results = await _guard_pairs(self.engine, pairs, [out.answer for _, out in items])
        self.guard_ms += (time.perf_counter() - began) * 1000
        out_events: list[str] = []
        for state in live:
            mine = [(out, r) for (s, out), r in zip(items, results) if s is state]
            out_events += self._close(state, mine)
        if self.include_usage:
            out_events.append(self._chunk(None, {}, usage=self.usage))
        return out_events

    def _close(self, state: _Choice, mine: list[tuple[_Out, GuardResult]]) -> list[str]:
        refused = next((r for _, r in mine if r.action == "refused"), None)
        if refused is not None:
            return [self._stop(state, refused.violations, "guard", refusal=refused.response)]
        out: list[str] = []
        tails: dict[str, str] = {}
        calls = {k: dict(c, function=dict(c["function"])) for k, c in state.tool_calls.items()}
        function_call = dict(state.function_call) if state.function_call else None
        for item, r in mine:
            head = item.path[0]
            if head in ("tool_calls", "function_call"):
                value = r.response if r.action == "revised" else item.text
                if r.action == "revised" and item.is_json and not _parses(value):
                    return [self._stop(state, _found(r), "guard")]
                if head == "tool_calls":
                    call = calls[sorted(state.tool_calls)[item.path[1]]]
                    if item.path[2] == "custom":
                        call["custom"] = {**call.get("custom", {}), "input": value}
                    else:
                        call["function"]["arguments"] = value
                elif function_call is not None:
                    function_call["arguments"] = value
                continue
            if r.action != "revised":
                continue
            released = state.texts.get(head, "")[: state.released.get(head, 0)]
            if not r.response.startswith(released):  # the revision changes what the client already has
                return [self._stop(state, _found(r), "guard")]
            tails[head] = r.response[len(released) :]
        if tails:  # revised: the pieces still held are replaced by the revised rest
            state.pieces = [p for p in state.pieces if p.key not in tails]
        out += self._release(state, everything=True)
        for key, tail in tails.items():
            if tail:
                out.append(self._chunk(state.index, self._delta(state, {key: tail})))
        if calls:
            delta = {"tool_calls": [calls[k] for k in sorted(calls)]}
            out.append(self._chunk(state.index, self._delta(state, delta)))
        if function_call is not None:
            out.append(self._chunk(state.index, self._delta(state, {"function_call": function_call})))
        verdict = _verdict([r for _, r in mine])
        if state.flags and verdict["action"] == "none":
            verdict.update(action="flagged", compliant=False)
            verdict["principle_ids"] = sorted({*verdict["principle_ids"], *(v.principle_id for v in state.flags)})
        if self.input_info:
            verdict["input"] = self.input_info
        self.verdicts.append(verdict)
        finish = state.finish_reason or ("tool_calls" if calls else "stop")
        out.append(self._chunk(state.index, self._delta(state, {}), finish, cai_guard=verdict))
        return out


def _guarded_stream(events: Any, cleanup: Callable[[], Awaitable[None]], deadline: float | None = None):
    return _stream_class()(events, cleanup, deadline)


@functools.cache
def _stream_class() -> type:
    import anyio
    from starlette.responses import StreamingResponse

    class GuardedStream(StreamingResponse):
        """A server-sent-events response that always cleans up (closes the upstream, frees the concurrency slot),
        however it ends: finished, failed, or cancelled by the client going away."""

        def __init__(self, events: Any, cleanup: Callable[[], Awaitable[None]], deadline: float | None = None) -> None:
            super().__init__(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
            self._events, self._cleanup, self._deadline = events, cleanup, deadline

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                # the whole exchange's deadline also bounds sending: a client that stops reading cannot hold the
                # upstream connection and its concurrency slot past it
                # (a few seconds' grace, so the stream's own error event at the deadline still reaches a reader)
                left = None if self._deadline is None else max(0.0, self._deadline - time.monotonic()) + 5.0
                with anyio.move_on_after(left):
                    await super().__call__(scope, receive, send)
            finally:
                with anyio.CancelScope(shield=True):
                    with contextlib.suppress(Exception):
                        await self._events.aclose()
                    await self._cleanup()

    return GuardedStream


def _respond(
    request_id: str,
    model: str,
    choices: list[dict[str, Any]],
    verdict: dict[str, Any],
    usage: Any,
    stream: bool,
    include_usage: bool = False,
):
    """An answer the guard holds whole (an input refusal; an upstream that answered a stream request at once), plain
    or as a stream: each choice's message as one delta, then its finish with its verdict."""
    from starlette.responses import StreamingResponse

    created = int(time.time())
    if not stream:
        body = {"id": request_id, "object": "chat.completion", "created": created, "model": model}
        return _json({**body, "choices": choices, "usage": usage, "cai_guard": verdict})

    def chunk(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
        body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
        return f"data: {_dumps({**body, 'choices': choices, **(extra or {})}).decode('utf-8')}\n\n"

    async def events():
        for choice in choices:
            delta = {k: v for k, v in choice["message"].items() if v is not None}
            if isinstance(delta.get("tool_calls"), list):  # a streamed tool call says which call it belongs to
                delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(delta["tool_calls"])]
            index = choice.get("index", 0)
            yield chunk([{"index": index, "delta": {"role": "assistant", **delta}, "finish_reason": None}])
            done = {"cai_guard": choice.get("cai_guard", verdict)}
            yield chunk([{"index": index, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"}], done)
        if include_usage:
            yield chunk([], {"usage": usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


# -- running -----------------------------------------------------------------------------------------------------------


def server_config(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    read_timeout: float = READ_TIMEOUT_S,
    keep_alive: int = 5,
    log_level: str = "warning",
):
    """The uvicorn config ``cai serve`` runs with. uvicorn has no deadline for a request's headers (its
    ``timeout_keep_alive`` only starts after a response, and any byte resets it, so a client that drips a header
    a second holds a connection forever); this config runs uvicorn's h11 protocol with one: a connection whose
    request headers are not complete ``read_timeout`` seconds after it opened (or after the previous response) is
    closed. h11's own cap on a request's header block (16 KiB, ``h11_max_incomplete_event_size``) still applies, and
    an idle keep-alive connection closes after ``keep_alive`` seconds."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=_header_deadline_protocol(float(read_timeout)),
        timeout_keep_alive=keep_alive,
        h11_max_incomplete_event_size=16 * 1024,
    )


@functools.cache
def _header_deadline_protocol(seconds: float) -> type:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11(H11Protocol):
        """uvicorn's h11 protocol with a deadline for each request's headers (slow-header clients: "slowloris")."""

        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineH11


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def check_upstream(upstream: str, *, timeout: float = 10.0) -> str | None:
    """None if ``upstream``/models answers; otherwise why not."""
    key = os.environ.get("CAI_UPSTREAM_API_KEY") or None
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with client.stream("GET", f"{upstream.rstrip('/')}/models", headers=headers) as reply:
                await _read_limited(reply, MAX_STREAM_FALLBACK_BYTES)  # the answer is not used: bounded, then dropped
    except UpstreamTooLarge:
        return f"{upstream}/models answered more than {MAX_STREAM_FALLBACK_BYTES} bytes"
    except httpx.HTTPError as exc:
        return f"{upstream} is unreachable ({type(exc).__name__})"
    if reply.status_code != 200:
        return f"{upstream}/models answered {reply.status_code}"
    return None
