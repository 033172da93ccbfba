"""The OpenAI-compatible backend against a real llama.cpp server (llama-cpp-python[server]) on localhost."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from cai_engine import ComparisonTask, GenerationSettings, Message, ModelError
from cai_engine.components import ChatPrompt

pytestmark = pytest.mark.server

PROMPTS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant:",
    "\n\nHuman: Name a colour.\n\nAssistant:",
    "\n\nHuman: Say hello.\n\nAssistant:",
    "\n\nHuman: What is 2 + 2?\n\nAssistant:",
    "\n\nHuman: Name an animal.\n\nAssistant:",
    "\n\nHuman: Name a fruit.\n\nAssistant:",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, port: int | None = None, api_key: str | None = None) -> None:
        pytest.importorskip("llama_cpp", reason="needs the server extra: pip install -e '.[server]'")
        from cai_engine.backends.model_files import default_model_file

        self.gguf = str(default_model_file())
        self.port = port or free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> LlamaServer:
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            self.gguf,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            "2048",
            "--n_threads",
            "2",
        ]
        if self.api_key:
            cmd += ["--api_key", self.api_key]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/models", headers=headers, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("llama.cpp server did not come up")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server():
    srv = LlamaServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def backend(cai_runtime, server):
    return cai_runtime.backend({"model": f"{server.url}#smollm2", "max_concurrency": 3, "api_key_env": None})


def test_generation_and_stop_sequences(backend):
    out = backend.generate(PROMPTS[:2], GenerationSettings(max_new_tokens=24, stop=("\n",)))
    assert len(out) == 2 and all(isinstance(t, str) and t.strip() for t in out)
    assert all("\n" not in t for t in out)
    assert backend.generated_tokens > 0


def test_concurrent_requests_keep_order(backend):
    settings = GenerationSettings(max_new_tokens=10)
    concurrent = backend.generate(PROMPTS, settings)
    sequential = [backend.generate([p], settings)[0] for p in PROMPTS]
    assert concurrent == sequential


@pytest.mark.model
def test_logprob_scoring_agrees_with_the_local_model(backend, cai_runtime):
    prompt = "\n\nHuman: Which is a fruit?\n(A) [[[apple]]]\n(B) [[[car]]]\n\nAssistant: The answer is: ("
    ((a, b),) = backend.continuation_logprobs([prompt], [["A", "B"]])
    local = cai_runtime.backend("smollm2").continuation_logprobs([prompt], [["A", "B"]])[0]
    assert a is not None and b is not None
    assert abs(a - local[0]) < 0.3 and abs(b - local[1]) < 0.3  # Q4_1 on llama.cpp vs dequantised fp32


def test_option_outside_top_logprobs_is_none(backend):
    (scores,) = backend.continuation_logprobs(["The capital of France is"], [[" Paris", "zzqxj-not-a-token"]])
    assert scores[0] is not None and scores[1] is None


def test_judge_runs_on_the_server(cai_runtime, server):
    judge = cai_runtime.component("judge", "logprob", {"model": {"model": f"{server.url}#x", "api_key_env": None}})
    harmless = cai_runtime.registry.constitution("harmless")
    task = ComparisonTask(
        conversation=[Message(role="user", content="How do I open a locked door at home?")],
        response_a="Call a locksmith or your landlord.",
        response_b="Kick it in, who cares.",
        principles=[harmless.principle("harm-001")],
    )
    (judgement,) = judge.compare([task])
    assert [o.order for o in judgement.orders] == ["ab", "ba"]
    assert judgement.abstained or 0 < judgement.p_a < 1


def test_chat_prompts_become_a_transcript(backend):
    text = backend._text(ChatPrompt([Message(role="user", content="Hi")], "Sure"))
    assert text == "\n\nHuman: Hi\n\nAssistant:Sure"


def test_wrong_path_is_a_client_error(cai_runtime, server):
    bad = cai_runtime.backend({"model": f"{server.url.removesuffix('/v1')}/v9#x", "api_key_env": None})
    with pytest.raises(ModelError, match=r"rejected the request \(HTTP 404\)"):
        bad.generate(["hi"], GenerationSettings(max_new_tokens=2))


def test_authentication_errors_are_clear(cai_runtime, monkeypatch):
    srv = LlamaServer(api_key="s3cret").start()
    try:
        monkeypatch.setenv("CAI_TEST_KEY", "wrong")
        wrong = cai_runtime.backend({"model": f"{srv.url}#x", "api_key_env": "CAI_TEST_KEY"})
        with pytest.raises(ModelError, match=r"authentication failed \(HTTP 401.*CAI_TEST_KEY"):
            wrong.generate(["hi"], GenerationSettings(max_new_tokens=2))
        monkeypatch.setenv("CAI_TEST_KEY2", "s3cret")
        right = cai_runtime.backend({"model": f"{srv.url}#x", "api_key_env": "CAI_TEST_KEY2"})
        assert right.generate(["\n\nHuman: Hi\n\nAssistant:"], GenerationSettings(max_new_tokens=3))[0]
    finally:
        srv.stop()


def test_server_down_is_a_clear_error(cai_runtime):
    backend = cai_runtime.backend(
        {"model": f"http://127.0.0.1:{free_port()}/v1#x", "max_retries": 1, "backoff_seconds": 0, "api_key_env": None}
    )
    with pytest.raises(ModelError, match=r"no answer after 2 attempt\(s\).*is the server running\?"):
        backend.generate(["hi"], GenerationSettings(max_new_tokens=2))


def test_server_going_away_mid_run_then_coming_back(cai_runtime):
    srv = LlamaServer().start()
    try:
        backend = cai_runtime.backend(
            {"model": f"{srv.url}#x", "max_retries": 1, "backoff_seconds": 0, "api_key_env": None}
        )
        settings = GenerationSettings(max_new_tokens=4)
        assert backend.generate(PROMPTS[:1], settings)[0]
        srv.stop()  # the server goes away mid-run
        with pytest.raises(ModelError, match="no answer after 2 attempt"):
            backend.generate(PROMPTS[:2], settings)
        # a patient client rides out a restart: retries with back-off until the server is back
        patient = cai_runtime.backend(
            {"model": f"{srv.url}#x", "max_retries": 8, "backoff_seconds": 0.5, "api_key_env": None}
        )
        restarter = threading.Thread(target=lambda: (time.sleep(1.0), srv.start()))
        restarter.start()
        assert all(patient.generate(PROMPTS[:2], settings))
        restarter.join()
    finally:
        srv.stop()


def test_chat_mode_cannot_score(cai_runtime, server):
    from cai_engine import BackendUnavailableError

    chat = cai_runtime.backend({"model": f"{server.url}#x", "mode": "chat", "api_key_env": None})
    with pytest.raises(BackendUnavailableError, match="mode: completions"):
        chat.continuation_logprobs(["x"], [["A", "B"]])
    assert chat.generate([[Message(role="user", content="Say hi")]], GenerationSettings(max_new_tokens=5))[0]
