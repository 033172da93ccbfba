"""The OpenAI-compatible backend against a real llama.cpp server (the llamacpp-server extra) on localhost."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time

import httpx
import pytest
from stub_upstream import StubUpstream, free_port

from cai_engine import ComparisonTask, GenerationSettings, Message, ModelError
from cai_engine.plugins.components import ChatPrompt

pytestmark = pytest.mark.server

PROMPTS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant:",
    "\n\nHuman: Name a colour.\n\nAssistant:",
    "\n\nHuman: Say hello.\n\nAssistant:",
    "\n\nHuman: What is 2 + 2?\n\nAssistant:",
    "\n\nHuman: Name an animal.\n\nAssistant:",
    "\n\nHuman: Name a fruit.\n\nAssistant:",
]


LAUNCH_SERVER = """
import runpy, sys
from cai_engine.default_plugins.backends.llama_cpp import model_params, repack_enabled
sys.argv[0] = "llama_cpp.server"
with model_params(repack=repack_enabled("auto")):
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


class LlamaServer:
    def __init__(self, port: int | None = None, api_key: str | None = None) -> None:
        pytest.importorskip("llama_cpp", reason="needs the llamacpp-server extra: pip install -e '.[llamacpp-server]'")
        from cai_engine.models.files import default_model_file

        self.gguf = str(default_model_file())
        self.port = port or free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> LlamaServer:
        # llama-cpp-python's server, with llama.cpp's weight repacking chosen as the in-process backend chooses it
        # (off on CPUs with AMX, whose matrix product crashes llama.cpp on some machines)
        cmd = [
            sys.executable,
            "-c",
            LAUNCH_SERVER,
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


def test_concurrent_requests_keep_order(cai_runtime):
    """Answers come back in prompt order although the server finishes them in another order: a deterministic stub
    server (its answer names the prompt) holds the requests until all of them are in flight, then answers them last
    prompt first.

    (A real llama.cpp server's greedy text is not bit-stable between a concurrent and a sequential request on every
    CPU, so it cannot show which answer belongs to which prompt.)"""
    turn = threading.Condition()
    arrived: list[int] = []
    answered: list[int] = []

    def hold(body):
        index = PROMPTS.index(body["prompt"])
        with turn:
            arrived.append(index)
            turn.notify_all()
            if len(arrived) <= len(PROMPTS):  # the concurrent call: wait for everyone, then go in reverse order
                turn.wait_for(lambda: len(arrived) >= len(PROMPTS) and len(answered) == len(PROMPTS) - 1 - index, 30)
        return 0.0

    def completion(body):
        index = PROMPTS.index(body["prompt"])
        with turn:
            answered.append(index)
            turn.notify_all()
        return f" answer to {index}"

    with StubUpstream(completion=completion, delay=hold) as stub:
        backend = cai_runtime.backend(
            {"model": f"{stub.url}#stub", "max_concurrency": len(PROMPTS), "api_key_env": None}
        )
        settings = GenerationSettings(max_new_tokens=10)
        concurrent = backend.generate(PROMPTS, settings)
        assert answered == list(range(len(PROMPTS)))[::-1]  # all were in flight at once and finished last first
        sequential = [backend.generate([p], settings)[0] for p in PROMPTS]
    assert concurrent == sequential == [f" answer to {i}" for i in range(len(PROMPTS))]


def test_concurrent_requests_on_the_real_server(backend):
    """The llama.cpp server answers every one of several concurrent requests (no text compared across paths)."""
    before = backend.generated_tokens
    out = backend.generate(PROMPTS, GenerationSettings(max_new_tokens=10))
    assert len(out) == len(PROMPTS) and all(isinstance(t, str) and t.strip() for t in out)
    assert backend.generated_tokens - before >= len(PROMPTS)


@pytest.mark.model
def test_logprob_scoring_agrees_with_the_same_model_in_process(backend, cai_runtime):
    """The server's log-probs are those of the model it runs: the same GGUF run in-process by llama.cpp with the
    server's settings (the file's own weights, unfused attention, the prompt in one pass) scores the same, up to
    the rounding that llama.cpp's own batch-shape noise on this machine bounds (see test_llama_cpp_backend).

    (Not transformers: its float32 weights differ from llama.cpp's 8-bit-quantised activations by an amount that
    depends on the CPU's kernels.)"""
    from test_llama_cpp_backend import bound, largest_difference, reference_scores

    prompts = [
        "\n\nHuman: Which is a fruit?\n(A) [[[apple]]]\n(B) [[[car]]]\n\nAssistant: The answer is: (",
        "The capital of France is",
    ]
    options = [["A", "B"], [" Paris", " London"]]
    served = backend.continuation_logprobs(prompts, options)
    assert all(v is not None and v <= 0 for row in served for v in row)
    assert math.exp(served[0][0]) + math.exp(served[0][1]) <= 1 + 1e-6  # log-probs of one next-token distribution
    local = cai_runtime.backend(
        {"backend": "llamacpp", "model": "smollm2", "parallel": 1, "weights": "original", "flash_attention": False}
    )
    expected, noise = reference_scores(local, prompts, options)
    assert largest_difference(served, expected) <= bound(noise), (served, expected, noise)
    assert served[1][0] > served[1][1]  # Paris, by far


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
