"""The OpenAI-compatible backend spread over several replicas: least outstanding requests, failover, Retry-After.

The replicas are small HTTP servers this test starts on localhost; each answers /v1/completions with its own name.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cai_engine import GenerationSettings


class Replica:
    def __init__(self, name: str, delay: float = 0.02, fail_first: int = 0, retry_after: str | None = None) -> None:
        self.name, self.delay, self.fail_first, self.retry_after = name, delay, fail_first, retry_after
        self.requests = 0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with replica.lock:
                    replica.requests += 1
                    failing = replica.requests <= replica.fail_first
                    replica.in_flight += 1
                    replica.max_in_flight = max(replica.max_in_flight, replica.in_flight)
                time.sleep(replica.delay)
                with replica.lock:
                    replica.in_flight -= 1
                if failing:
                    self.send_response(503)
                    if replica.retry_after:
                        self.send_header("Retry-After", replica.retry_after)
                    payload = json.dumps({"error": {"message": "busy"}}).encode()
                else:
                    self.send_response(200)
                    text = f"{replica.name}:{body['prompt'][-3:]}"
                    payload = json.dumps({"choices": [{"text": text}], "usage": {"completion_tokens": 1}}).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def replicas():
    started = [Replica("a", delay=0.05), Replica("b", delay=0.05)]
    yield started
    for replica in started:
        replica.close()


def backend(cai_runtime, urls, **options):
    return cai_runtime.backend(
        {"backend": "openai", "model": "m", "base_url": urls, "backoff_seconds": 0.01, **options}
    )


def test_requests_spread_over_replicas_and_keep_their_order(cai_runtime, replicas):
    server = backend(cai_runtime, [r.url for r in replicas], max_concurrency=8)
    prompts = [f"prompt {i:03d}" for i in range(32)]
    out = server.generate(prompts, GenerationSettings(max_new_tokens=1))
    assert [o.split(":")[1] for o in out] == [p[-3:] for p in prompts]  # answers in prompt order
    a, b = (r.requests for r in replicas)
    assert a + b == 32 and min(a, b) >= 12, (a, b)  # least-outstanding keeps both busy
    assert server.sent == [a, b] and server.in_flight == [0, 0]
    assert max(r.max_in_flight for r in replicas) <= 5  # 8 in flight over 2 replicas, never piled on one


def test_a_dead_replica_fails_over_to_a_live_one(cai_runtime, replicas):
    dead = replicas[1].url
    replicas[1].close()
    server = backend(cai_runtime, [dead, replicas[0].url], max_concurrency=4, max_retries=2)
    out = server.generate([f"p{i}" for i in range(8)], GenerationSettings(max_new_tokens=1))
    assert all(o.startswith("a:") for o in out)


def test_retry_after_is_honoured(cai_runtime):
    busy = Replica("c", delay=0.0, fail_first=1, retry_after="0.5")
    try:
        server = backend(cai_runtime, [busy.url], max_retries=2)
        began = time.perf_counter()
        assert server.generate(["hello"], GenerationSettings(max_new_tokens=1)) == ["c:llo"]
        assert time.perf_counter() - began >= 0.5  # waited as asked, not the 0.01 s back-off
    finally:
        busy.close()
