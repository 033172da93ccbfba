"""`cai serve` against real servers on localhost: the guard server on uvicorn, the official `openai` client, and as
the upstream a deterministic OpenAI-compatible stub (known answers, so pass-through is checked exactly) or, in one
end-to-end test, the llama.cpp OpenAI server."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import yaml

from cai_engine.cli import cli
from cai_engine.guard.audit import sha256_text
from cai_engine.guard.engine import Engine

pytestmark = pytest.mark.server

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from stub_upstream import StubUpstream, free_port  # noqa: E402
from test_openai_backend import LlamaServer  # noqa: E402

QUESTION = [{"role": "user", "content": "Name a colour."}]


class GuardServer:
    """The guard app on uvicorn in a thread, on a free port."""

    def __init__(self, policy: dict, upstream: str, read_timeout: float = 10.0, **options) -> None:
        import uvicorn

        from cai_engine.guard.serve import create_app, server_config

        self.engine = Engine.from_policy(policy)
        self.app = create_app(self.engine, upstream, **options)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        config = server_config(self.app, port=self.port, read_timeout=read_timeout, log_level="error")
        self.server = uvicorn.Server(config)  # as `cai serve` runs it: uvicorn with a deadline for headers
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> GuardServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("the guard server did not come up")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.close()


def policy(**extra) -> dict:
    data = {"name": "served", "constitutions": ["harmless"], "guard": {"model_critics": False, "action": "revise"}}
    data.update(extra)
    return data


def rule(pid: str, pattern: str, **more) -> dict:
    return {
        "id": pid,
        "title": f"rule {pid}",
        "phases": ["runtime"],
        "rules": [{"id": f"{pid}-r", "kind": "forbid", "pattern": pattern, "message": f"matched {pid}", **more}],
    }


@pytest.fixture
def upstream():
    """The deterministic stub upstream: its answers are known text, so pass-through is checked exactly."""
    with StubUpstream() as stub:
        yield stub


def test_compliant_answers_pass_unchanged_and_streaming_matches(upstream, monkeypatch):
    monkeypatch.setenv("CAI_SERVE_API_KEY", "s3cret")
    expected = upstream.chat_completion({"messages": QUESTION, "max_tokens": 16})
    text = expected["choices"][0]["message"]["content"]
    assert text == "Stub answer to: Name a colour."
    with GuardServer(policy(add=[rule("never-001", "zzqqxx")]), upstream.url) as guard:
        client = openai.OpenAI(base_url=guard.url, api_key="s3cret")
        answer = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=16)
        assert answer.choices[0].message.content == text  # the upstream's text, unchanged
        assert answer.choices[0].finish_reason == "stop" and answer.model == expected["model"]
        assert answer.usage.completion_tokens == expected["usage"]["completion_tokens"]
        verdict = answer.model_extra["cai_guard"]
        assert verdict["action"] == "none" and verdict["compliant"] and len(verdict["audit_id"]) == 36
        chunks = list(
            client.chat.completions.create(
                model="smollm2", messages=QUESTION, temperature=0, max_tokens=16, stream=True
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert chunks[-1].model_extra["cai_guard"]["action"] == "none"
        # a finish reason other than "stop" passes through too (the stub cuts at max_tokens words)
        cut = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=2)
        assert cut.choices[0].message.content == "Stub answer" and cut.choices[0].finish_reason == "length"
        assert [m.id for m in client.models.list().data] == ["stub-model"]  # /v1/models is passed through
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=guard.url, api_key="wrong").chat.completions.create(
                model="smollm2", messages=QUESTION, max_tokens=4
            )
        metrics = httpx.get(f"http://127.0.0.1:{guard.port}/metrics").text
        assert 'cai_guard_actions_total{action="none"} 3' in metrics and 'status="unauthorised"} 1' in metrics
    sent = upstream.bodies()
    assert len(sent) == 3  # the unauthorised request never reached the upstream
    assert all(body["messages"] == QUESTION for body in sent)
    assert [body["stream"] for body in sent] == [False, True, False]  # a stream is streamed from the upstream too
    assert [body["max_tokens"] for body in sent] == [16, 16, 2] and sent[0]["temperature"] == 0
    assert not any("s3cret" in str(headers) for _, headers, _ in upstream.requests)  # the client's key stays here


def test_violating_answers_are_revised_or_refused(upstream, tmp_path):
    every = rule("all-001", r"(?s)\w.*", fix="--")
    with GuardServer(policy(add=[every]), upstream.url) as guard:
        client = openai.OpenAI(base_url=guard.url, api_key="unused")
        revised = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8)
        content = revised.choices[0].message.content
        assert content.endswith("--") and not any(c.isalnum() for c in content)
        assert revised.model_extra["cai_guard"]["action"] == "revised"
    no_fix = rule("all-002", "(?s).+")
    audit = tmp_path / "audit.jsonl"
    refusing = policy(add=[no_fix], guard={"model_critics": False, "action": "refuse"}, audit={"path": str(audit)})
    with GuardServer(refusing, upstream.url) as guard:
        client = openai.OpenAI(base_url=guard.url, api_key="unused")
        refused = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8)
        assert refused.choices[0].message.content.startswith("I can't help with that as asked")
        assert refused.model_extra["cai_guard"]["principle_ids"] == ["all-002"]
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    served = [r for r in records if r["kind"] == "serve"]
    assert [r["kind"] for r in records] == ["guard", "serve"] and served[0]["status"] == "ok"
    assert served[0]["audit_id"] == records[0]["id"] and served[0]["upstream_ms"] > 0 and served[0]["guard_ms"] >= 0
    original = upstream.chat_completion({"messages": QUESTION, "max_tokens": 8})["choices"][0]["message"]["content"]
    assert records[0]["original"] in (original, sha256_text(original))  # the upstream's answer that was refused


def test_input_rails_refuse_or_redact_before_the_upstream(upstream):
    secret = rule("pw-001", r"\bhunter\d+", fix="[redacted]")
    asked = [{"role": "user", "content": "My password is hunter2. Name a colour."}]
    refusing = policy(add=[secret], input={"check": True, "action": "refuse"})
    with GuardServer(refusing, upstream.url) as guard:
        client = openai.OpenAI(base_url=guard.url, api_key="unused")
        refused = client.chat.completions.create(model="smollm2", messages=asked, max_tokens=8)
        verdict = refused.model_extra["cai_guard"]
        assert verdict["action"] == "refused" and verdict["input"] == {"action": "refused", "principle_ids": ["pw-001"]}
        assert "cai_upstream_latency_ms_count 0" in httpx.get(f"http://127.0.0.1:{guard.port}/metrics").text
    assert upstream.bodies() == []  # nothing was sent upstream
    redacting = policy(add=[secret], input={"check": True, "action": "redact"})
    with GuardServer(redacting, upstream.url) as guard:
        client = openai.OpenAI(base_url=guard.url, api_key="unused")
        answer = client.chat.completions.create(model="smollm2", messages=asked, temperature=0, max_tokens=16)
        assert answer.model_extra["cai_guard"]["input"]["action"] == "redacted"
        redacted = [{"role": "user", "content": "My password is [redacted]. Name a colour."}]  # sent upstream
        assert [body["messages"] for body in upstream.bodies()] == [redacted]
        assert answer.choices[0].message.content == "Stub answer to: My password is [redacted]. Name a colour."


def test_a_dead_upstream_gives_502_and_the_server_recovers():
    upstream = StubUpstream().start()
    try:
        with GuardServer(policy(), upstream.url, timeout=30) as guard:
            client = openai.OpenAI(base_url=guard.url, api_key="unused", max_retries=0)
            assert client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4).choices
            upstream.stop()
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4)
            assert info.value.status_code == 502 and "unreachable" in str(info.value)
            assert httpx.get(f"http://127.0.0.1:{guard.port}/health").status_code == 200  # still up
            upstream.start()  # back on the same port
            back = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4)
            assert back.choices[0].message.content == "Stub answer to: Name"
    finally:
        upstream.stop()


def test_bad_requests_get_openai_errors(upstream):
    with GuardServer(policy(), upstream.url) as guard:
        base = f"http://127.0.0.1:{guard.port}/v1/chat/completions"
        bad = httpx.post(base, content=b"not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
        assert httpx.post(base, content=b"not json").status_code == 415  # no JSON content type: see test_serve_security
        reply = httpx.post(base, json={"messages": [{"role": "robot", "content": "hi"}]})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages[0].role"
    assert upstream.bodies() == []


def test_serve_check_validates_policy_and_upstream(cli_runner, upstream, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy()))
    ok = cli_runner.invoke(cli, ["serve", "--policy", str(path), "--upstream", upstream.url, "--check"])
    assert ok.exit_code == 0 and "upstream" in ok.output, ok.output
    dead = cli_runner.invoke(
        cli, ["serve", "--policy", str(path), "--upstream", f"http://127.0.0.1:{free_port()}/v1", "--check"]
    )
    assert dead.exit_code == 1 and "unreachable" in dead.output


def test_a_real_llama_cpp_server_behind_the_guard(monkeypatch):
    """The one end-to-end run against a real model server (llama.cpp): plain and streamed answers come back guarded.

    No text is compared across the two requests: greedy text through two request paths of a llama.cpp server is
    not bit-stable on every CPU (exact pass-through is tested above against the deterministic stub)."""
    llama = LlamaServer().start()
    try:
        with GuardServer(policy(add=[rule("never-003", "zzqqxx")]), llama.url) as guard:
            client = openai.OpenAI(base_url=guard.url, api_key="unused")
            answer = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=16)
            assert answer.choices[0].message.content.strip() and answer.choices[0].finish_reason in ("stop", "length")
            verdict = answer.model_extra["cai_guard"]
            assert verdict["action"] == "none" and verdict["compliant"]
            chunks = list(
                client.chat.completions.create(
                    model="smollm2", messages=QUESTION, temperature=0, max_tokens=16, stream=True
                )
            )
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
            assert chunks[-1].choices[0].finish_reason is not None
            assert chunks[-1].model_extra["cai_guard"]["action"] == "none"
            assert client.models.list().data  # the real server's /v1/models, passed through
    finally:
        llama.stop()


def test_load_with_an_instant_stub_upstream():
    """500 requests at concurrency 32 against a rules-only policy and an upstream that answers at once: no errors.
    The latency figures for the README come from bench/serve_load.py (speed is measured by benchmarks, not tests)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def completions(request):
        return JSONResponse(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "stub",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "Blue."}, "finish_reason": "stop"}
                ],
            }
        )

    stub = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(stub, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        with GuardServer(policy(add=[rule("never-002", "zzqqxx")]), f"http://127.0.0.1:{port}/v1") as guard:

            async def run() -> list[int]:
                limit = asyncio.Semaphore(32)
                async with httpx.AsyncClient(timeout=30) as client:

                    async def one(i: int) -> int:
                        async with limit:
                            reply = await client.post(
                                f"{guard.url}/chat/completions", json={"model": "stub", "messages": QUESTION}
                            )
                            return reply.status_code

                    return await asyncio.gather(*(one(i) for i in range(500)))

            codes = asyncio.run(run())
            assert codes.count(200) == 500
    finally:
        server.should_exit = True
        thread.join(10)


def test_serve_check_refuses_a_model_free_policy_that_could_need_a_model(cli_runner, upstream, tmp_path):
    path = tmp_path / "policy.yaml"
    no_fix = policy(model="none", add=[rule("never-003", "zzqqxx")])  # guard.action revise, and no fix to apply
    path.write_text(yaml.safe_dump(no_fix))
    failed = cli_runner.invoke(cli, ["serve", "--policy", str(path), "--upstream", upstream.url, "--check"])
    assert failed.exit_code == 1
    assert "model: none, but a reply could need a model to rewrite it: rule never-003-r (never-003) has no fix" in (
        failed.output
    )
    assert "write guard.on_failure" in failed.output and "answers" not in failed.output
    assert upstream.requests == []  # refused before the upstream is tried
    no_fix["guard"]["on_failure"] = "refuse"  # said outright: such a reply is refused
    path.write_text(yaml.safe_dump(no_fix))
    ok = cli_runner.invoke(cli, ["serve", "--policy", str(path), "--upstream", upstream.url, "--check"])
    assert ok.exit_code == 0 and "upstream" in ok.output, ok.output
