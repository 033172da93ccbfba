"""The OpenAI-compatible backend's retries (tenacity): which failures are tried again, how often, and how long it
waits between tries. The server is an in-process httpx.MockTransport that answers from a script, and the waits are
recorded instead of slept."""

from __future__ import annotations

import time

import httpx
import pytest

from cai_engine import GenerationSettings, ModelError

OK = {"choices": [{"text": "fine"}], "usage": {"completion_tokens": 2, "prompt_tokens": 5}}


@pytest.fixture
def slept(monkeypatch):
    """The seconds each retry waited (tenacity sleeps through time.sleep)."""
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    return waits


def scripted(cai_runtime, answers, urls=("http://a.test/v1",), **options):
    """An openai backend whose replicas answer from ``answers`` in turn (a status, (status, headers), an exception
    or a JSON body); returns the backend and the list of URLs it asked."""
    asked: list[str] = []
    script = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        answer = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, dict):
            return httpx.Response(200, json=answer)
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        return httpx.Response(status, headers=headers, json={"error": {"message": f"status {status}"}})

    backend = cai_runtime.backend(
        {"backend": "openai", "model": "m", "base_url": list(urls), "api_key_env": None, **options}
    )
    backend._clients = [
        httpx.Client(base_url=u + "/", transport=httpx.MockTransport(handle)) for u in backend.base_urls
    ]
    return backend, asked


def generate(backend):
    return backend.generate(["hi"], GenerationSettings(max_new_tokens=2))


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried_with_doubling_backoff(cai_runtime, slept, status):
    backend, asked = scripted(cai_runtime, [status, status, status, OK], max_retries=3, backoff_seconds=0.5)
    assert generate(backend) == ["fine"]
    assert len(asked) == 4 and slept == [0.5, 1.0, 2.0]
    assert backend.generated_tokens == 2 and backend.prompt_tokens == 5  # only the answer that came is counted


def test_connection_errors_are_retried(cai_runtime, slept):
    backend, asked = scripted(cai_runtime, [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), OK])
    assert generate(backend) == ["fine"] and len(asked) == 3


@pytest.mark.parametrize(("status", "message"), [(400, "rejected the request"), (404, "rejected the request")])
def test_other_client_errors_fail_at_once(cai_runtime, slept, status, message):
    backend, asked = scripted(cai_runtime, [status, OK])
    with pytest.raises(ModelError, match=rf"{message} \(HTTP {status}\): status {status}"):
        generate(backend)
    assert len(asked) == 1 and slept == []


def test_authentication_errors_fail_at_once_and_name_the_variable(cai_runtime, slept):
    backend, asked = scripted(cai_runtime, [401, OK], api_key_env="CAI_TEST_NO_SUCH_KEY")
    with pytest.raises(ModelError, match=r"authentication failed \(HTTP 401.*\$CAI_TEST_NO_SUCH_KEY"):
        generate(backend)
    assert len(asked) == 1


def test_giving_up_after_max_retries_says_why(cai_runtime, slept):
    backend, asked = scripted(cai_runtime, [503], max_retries=2, backoff_seconds=0.1)
    with pytest.raises(ModelError) as raised:
        generate(backend)
    assert len(asked) == 3 and slept == [0.1, 0.2]
    assert "no answer after 3 attempt(s)" in str(raised.value) and "HTTP 503: status 503" in str(raised.value)
    assert "the server keeps failing; check its log" in str(raised.value)

    down, asked = scripted(cai_runtime, [httpx.ConnectError("refused")], max_retries=0)
    with pytest.raises(ModelError, match=r"no answer after 1 attempt\(s\).*ConnectError: refused.*server running"):
        generate(down)
    assert len(asked) == 1


def test_retry_after_wins_when_longer_and_is_capped_at_a_minute(cai_runtime, slept):
    answers = [(503, {"Retry-After": "3"}), (429, {"Retry-After": "600"}), (503, {"Retry-After": "soon"}), OK]
    backend, _ = scripted(cai_runtime, answers, max_retries=3, backoff_seconds=0.5)
    assert generate(backend) == ["fine"]
    assert slept == [3.0, 60.0, 2.0]  # asked 3 s; asked 10 min, capped; not a number of seconds: the back-off


def test_a_retry_goes_to_another_replica(cai_runtime, slept):
    backend, asked = scripted(cai_runtime, [503, OK], urls=("http://a.test/v1", "http://b.test/v1"))
    assert generate(backend) == ["fine"]
    assert [u.split("/")[2] for u in asked] == ["a.test", "b.test"]
    assert backend.sent == [1, 1] and backend.in_flight == [0, 0]
