"""A deterministic OpenAI-compatible model server for tests, started in-process on 127.0.0.1.

Its answers are canned text computed from the request (no model), so a test can compare what a client or proxy
returns against the exact text the upstream sent, on any machine. It serves ``GET /v1/models``,
``POST /v1/chat/completions`` (plain or streamed as server-sent events, one chunk per word) and
``POST /v1/completions``, and records every request it receives (path, headers, JSON body).

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


class StubUpstream:
    """The server in a daemon thread; ``start()``/``stop()`` (or ``with``), restartable on the same port.

    ``chat`` and ``completion`` map a request body to the answer text; ``delay`` maps a body to seconds to wait
    before answering, and may itself block (to hold concurrent requests and release them in a chosen order).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        chat: Callable[[dict[str, Any]], str] = chat_answer,
        completion: Callable[[dict[str, Any]], str] = completion_answer,
        delay: Callable[[dict[str, Any]], float] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.chat, self.completion, self.delay = chat, completion, delay
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    # -- what a test compares against ------------------------------------------------------------------------

    def chat_completion(self, body: dict[str, Any]) -> dict[str, Any]:
        text, finish = cut(self.chat(body), body)
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": 0,
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": 7,
                "completion_tokens": len(text.split()),
                "total_tokens": 7 + len(text.split()),
            },
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

            def _send(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                with stub.lock:
                    stub.requests.append((self.path, dict(self.headers), None))
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
                if self.path == "/v1/chat/completions":
                    reply = stub.chat_completion(body)
                    if body.get("stream"):
                        self._stream(reply)
                    else:
                        self._send(200, reply)
                elif self.path == "/v1/completions":
                    text, finish = cut(stub.completion(body), body)
                    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                    usage = {"prompt_tokens": 7, "completion_tokens": len(text.split())}
                    self._send(
                        200, {"id": "cmpl-stub", "object": "text_completion", "choices": [choice], "usage": usage}
                    )
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

            def _stream(self, reply: dict[str, Any]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
                text = reply["choices"][0]["message"]["content"]
                words = text.split(" ")
                deltas = [{"role": "assistant", "content": ""}] + [
                    {"content": w if i == 0 else " " + w} for i, w in enumerate(words)
                ]
                for delta in [*deltas, {}]:
                    finish = None if delta else reply["choices"][0]["finish_reason"]
                    chunk = {
                        "id": reply["id"],
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": MODEL,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                    }
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
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
