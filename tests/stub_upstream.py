"""A deterministic OpenAI-compatible model server for tests, started in-process on 127.0.0.1.

Its answers are canned text computed from the request (no model), so a test can compare what a client or proxy
returns against the exact text the upstream sent, on any machine. It serves ``GET /v1/models``,
``POST /v1/chat/completions`` (plain or streamed as server-sent events, one chunk per word) and
``POST /v1/completions``, and records every request it receives (path, headers, JSON body).

Chat answers follow the request as an OpenAI server would: ``n`` choices (the second and later end in `` #2``,
`` #3``, ...), per-word ``logprobs`` when asked, a call of the first tool when ``tools`` is sent (its arguments
``{"query": <last user message>}``, finish reason ``tool_calls``), and a usage chunk at the end of a stream when
``stream_options.include_usage`` is set. ``respond`` scripts any other answer (an error with headers, a body that is
not JSON), ``drip`` sends a plain answer one byte at a time, ``chunk_delay`` and ``chunk_chars`` pace and cut a
stream.

A real model server (llama.cpp) is not bit-stable in its greedy text across request paths on every CPU, so tests of
pass-through and ordering use this stub; the real server is kept for smoke tests that assert no exact text.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "stub-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_answer(body: dict[str, Any]) -> str:
    """The stub's chat answer: names the last user message, so a test can tell which request it answers."""
    users = [m.get("content") for m in body.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
    last = users[-1] if users else ""
    if isinstance(last, list):
        last = "".join(p.get("text", "") for p in last if isinstance(p, dict))
    return f"Stub answer to: {last}"


def completion_answer(body: dict[str, Any]) -> str:
    """The stub's completion: names the end of the prompt."""
    return f" stub completion of [{str(body.get('prompt', ''))[-12:]}]"


def cut(text: str, body: dict[str, Any]) -> tuple[str, str]:
    """At most ``max_tokens`` words of ``text`` (a word stands in for a token), and the finish reason."""
    words = text.split(" ")
    limit = body.get("max_tokens")
    if isinstance(limit, int) and 0 < limit < len(words):
        return " ".join(words[:limit]), "length"
    return text, "stop"


def token_logprob(token: str, body: dict[str, Any]) -> dict[str, Any]:
    """A token's log-prob entry; with ``top_logprobs`` in the request, the token and its reversed spelling as the
    alternatives (text the reply itself never contains)."""
    entry: dict[str, Any] = {"token": token, "logprob": -0.5, "bytes": None}
    if body.get("top_logprobs"):
        entry["top_logprobs"] = [
            {"token": token, "logprob": -0.5, "bytes": None},
            {"token": token[::-1], "logprob": -2.0, "bytes": None},
        ][: body["top_logprobs"]]
    return entry


class StubUpstream:
    """The server in a daemon thread; ``start()``/``stop()`` (or ``with``), restartable on the same port.

    ``chat`` and ``completion`` map a request body to the answer text; ``delay`` maps a body to seconds to wait
    before answering, and may itself block (to hold concurrent requests and release them in a chosen order).
    ``respond(method, path, body)`` may return ``(status, headers, raw body)`` to answer in its place (None: the
    normal answer). ``drip`` is seconds between the bytes of a plain answer; ``chunk_delay`` seconds between stream
    chunks; ``chunk_chars`` cuts streamed text into pieces of that many characters instead of words.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        chat: Callable[[dict[str, Any]], str] = chat_answer,
        completion: Callable[[dict[str, Any]], str] = completion_answer,
        delay: Callable[[dict[str, Any]], float] | None = None,
        respond: Callable[[str, str, Any], tuple[int, dict[str, str], bytes] | None] | None = None,
        drip: float = 0.0,
        chunk_delay: float = 0.0,
        chunk_chars: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.chat, self.completion, self.delay = chat, completion, delay
        self.respond, self.drip, self.chunk_delay, self.chunk_chars = respond, drip, chunk_delay, chunk_chars
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    # -- what a test compares against ------------------------------------------------------------------------

    def chat_completion(self, body: dict[str, Any]) -> dict[str, Any]:
        choices = []
        n = body.get("n") if isinstance(body.get("n"), int) else 1
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)]
        for i in range(max(1, n)):
            answer = self.chat(body) + (f" #{i + 1}" if i else "")
            text, finish = cut(answer, body)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tools and body.get("tool_choice") != "none":
                users = [m.get("content") for m in body.get("messages", []) if m.get("role") == "user"]
                arguments = json.dumps({"query": users[-1] if users and isinstance(users[-1], str) else ""})
                call = {"id": f"call_stub{i}", "type": "function", "function": {"name": "", "arguments": arguments}}
                call["function"]["name"] = tools[0]["function"].get("name", "tool")
                message, finish = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
            choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": finish}
            if body.get("logprobs"):
                words = (text or "").split(" ")
                choice["logprobs"] = {"content": [token_logprob(w, body) for w in words]}
            choices.append(choice)
        words = sum(len((c["message"].get("content") or "").split()) for c in choices)
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": 0,
            "model": MODEL,
            "system_fingerprint": "fp_stub",
            "choices": choices,
            "usage": {"prompt_tokens": 7, "completion_tokens": words, "total_tokens": 7 + words},
        }

    def bodies(self, path: str = "/v1/chat/completions") -> list[Any]:
        with self.lock:
            return [body for p, _, body in self.requests if p == path]

    # -- serving ---------------------------------------------------------------------------------------------

    def start(self) -> StubUpstream:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not stub.drip:
                    self.wfile.write(data)
                    return
                for i in range(len(data)):  # a slow upstream: one byte at a time
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(stub.drip)

            def _scripted(self, body: Any) -> bool:
                answer = stub.respond(self.command, self.path, body) if stub.respond else None
                if answer is None:
                    return False
                status, headers, raw = answer
                try:
                    self._send(status, raw, headers)
                except OSError:
                    pass
                return True

            def do_GET(self) -> None:
                with stub.lock:
                    stub.requests.append((self.path, dict(self.headers), None))
                if self._scripted(None):
                    return
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "tests"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                with stub.lock:
                    stub.requests.append((self.path, dict(self.headers), body))
                if not isinstance(body, dict):
                    self._send(400, {"error": {"message": "the body is not a JSON object", "type": "invalid_request"}})
                    return
                if stub.delay:
                    time.sleep(stub.delay(body))
                if self._scripted(body):
                    return
                if self.path == "/v1/chat/completions":
                    reply = stub.chat_completion(body)
                    try:
                        if body.get("stream"):
                            self._stream(reply, body)
                        else:
                            self._send(200, reply)
                    except OSError:  # the client (the guard) went away
                        pass
                elif self.path == "/v1/completions":
                    text, finish = cut(stub.completion(body), body)
                    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                    usage = {"prompt_tokens": 7, "completion_tokens": len(text.split())}
                    self._send(
                        200, {"id": "cmpl-stub", "object": "text_completion", "choices": [choice], "usage": usage}
                    )
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

            def _stream(self, reply: dict[str, Any], body: dict[str, Any]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()  # HTTP/1.0: the stream ends when the connection closes

                def send(choices: list[dict[str, Any]], **extra: Any) -> None:
                    chunk = {"id": reply["id"], "object": "chat.completion.chunk", "created": 0, "model": MODEL}
                    self.wfile.write(f"data: {json.dumps({**chunk, 'choices': choices, **extra})}\n\n".encode())
                    self.wfile.flush()
                    if stub.chunk_delay:
                        time.sleep(stub.chunk_delay)

                for choice in reply["choices"]:
                    index, message = choice["index"], choice["message"]
                    text = message.get("content") or ""
                    if stub.chunk_chars:
                        pieces = [text[i : i + stub.chunk_chars] for i in range(0, len(text), stub.chunk_chars)]
                    else:
                        pieces = [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))] if text else []
                    send([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                    for piece in pieces:
                        delta = {"index": index, "delta": {"content": piece}, "finish_reason": None}
                        if body.get("logprobs"):
                            delta["logprobs"] = {"content": [token_logprob(piece, body)]}
                        send([delta])
                    for k, call in enumerate(message.get("tool_calls") or []):
                        arguments = call["function"]["arguments"]
                        half = len(arguments) // 2
                        head = {"index": k, "id": call["id"], "type": "function"}
                        first = {**head, "function": {"name": call["function"]["name"], "arguments": arguments[:half]}}
                        send([{"index": index, "delta": {"tool_calls": [first]}, "finish_reason": None}])
                        rest = {"index": k, "function": {"arguments": arguments[half:]}}
                        send([{"index": index, "delta": {"tool_calls": [rest]}, "finish_reason": None}])
                    send([{"index": index, "delta": {}, "finish_reason": choice["finish_reason"]}])
                if (body.get("stream_options") or {}).get("include_usage"):
                    send([], usage=reply["usage"])
                self.wfile.write(b"data: [DONE]\n\n")

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # load tests open dozens of connections at once

        self.server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def __enter__(self) -> StubUpstream:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
