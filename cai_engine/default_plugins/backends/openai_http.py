"""An OpenAI-compatible HTTP backend: vLLM, TGI, llama.cpp server, Ollama, or a hosted API.

Requests run concurrently up to a bound; transient failures (connection errors, timeouts, 429 and 5xx) are retried
with exponential back-off (or after the server's ``Retry-After``); authentication and other client errors fail at
once with the server's message. ``base_url`` may list several replicas of the same model: each request goes to the
one with the fewest requests in flight, and a retry goes to another replica when one fails.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
import tenacity
from pydantic import Field

from cai_engine import Backend, BackendUnavailableError, ChatPrompt, GenerationSettings, ModelError, Prompt, cut_at_stop

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is cut to this


class OpenAIBackend(Backend):
    """Talks to ``{base_url}/completions`` (or ``/chat/completions`` in chat mode)."""

    name = "openai"

    class Options(Backend.Options):
        model: str = Field("default", description="The model name the server expects.")
        base_url: str | list[str] = Field(
            description="The API root, e.g. http://127.0.0.1:8000/v1, or a list of replicas serving the same model "
            "(requests go to the one with the fewest in flight)."
        )
        api_key_env: str | None = Field(
            "OPENAI_API_KEY", description="Environment variable holding the API key (unset: no key is sent)."
        )
        mode: Literal["completions", "chat"] = Field(
            "completions",
            description="'completions' renders conversations as a Human:/Assistant: transcript and "
            "supports log-prob scoring; 'chat' uses the server's chat template.",
        )
        max_concurrency: int = Field(4, ge=1, le=256, description="Requests in flight at once.")
        max_retries: int = Field(3, ge=0, description="Retries for transient errors.")
        backoff_seconds: float = Field(0.5, ge=0, description="First retry delay; doubles each retry.")
        timeout_seconds: float = Field(120.0, gt=0, description="Per-request timeout.")
        top_logprobs: int = Field(20, ge=2, le=20, description="How many top log-probs to ask for when scoring.")
        repetition_penalty_field: str | None = Field(
            "repeat_penalty",
            description="Request field for the repetition penalty ('repeat_penalty' for "
            "llama.cpp, 'repetition_penalty' for vLLM/TGI, null to omit).",
        )
        extra_body: dict[str, Any] = Field(default_factory=dict, description="Extra fields sent with every request.")

    @classmethod
    def claims(cls, ref, registry):
        return ref.startswith(("http://", "https://"))

    @classmethod
    def read_ref(cls, ref):
        """``http://host:port/v1#name``: the API root and the model name the server expects (``default``)."""
        url, _, name = ref.partition("#")
        return {"base_url": url, "model": name or "default"}

    def __init__(self, options) -> None:
        super().__init__(options)
        headers = {}
        key = os.environ.get(self.options.api_key_env) if self.options.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        urls = [self.options.base_url] if isinstance(self.options.base_url, str) else list(self.options.base_url)
        if not urls:
            raise ModelError("the openai backend needs at least one base_url")
        self.base_urls = [u.rstrip("/") for u in urls]
        self._clients = [
            httpx.Client(base_url=u + "/", headers=headers, timeout=self.options.timeout_seconds)
            for u in self.base_urls
        ]
        self.in_flight = [0] * len(self._clients)
        self.sent = [0] * len(self._clients)  # requests each replica was given (for load reports and tests)
        self._next = 0
        self._lock = threading.Lock()
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.seconds = 0.0

    @property
    def model_id(self) -> str:
        return f"{','.join(self.base_urls)}#{self.options.model}"

    @property
    def path_summary(self) -> str:
        return f"OpenAI-compatible HTTP ({self.options.mode} mode, {len(self.base_urls)} endpoint(s))"

    def close(self) -> None:
        for client in self._clients:
            client.close()

    # -- transport -------------------------------------------------------------------------------------------

    def _pick(self, avoid: int | None) -> int:
        """The replica with the fewest requests in flight (ties in turn), not ``avoid`` when there is another."""
        with self._lock:
            count = len(self._clients)
            order = [(self._next + k) % count for k in range(count)]
            candidates = [i for i in order if i != avoid] or order
            chosen = min(candidates, key=lambda i: self.in_flight[i])
            self._next = (chosen + 1) % count
            self.in_flight[chosen] += 1
            self.sent[chosen] += 1
            return chosen

    def _send(self, index: int, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return self._clients[index].post(path, json={**self.options.extra_body, **body})
        finally:
            with self._lock:
                self.in_flight[index] -= 1

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries (tenacity): transient failures are tried again after ``backoff_seconds * 2**n`` (or the
        server's ``Retry-After``, up to a minute, when that is longer), on another replica when there is one."""
        attempts = self.options.max_retries + 1
        failed: int | None = None
        reachable = False  # some server answered, if only with an error: it is running

        def attempt() -> dict[str, Any]:
            nonlocal failed, reachable
            index = self._pick(avoid=failed)
            url = f"{self.base_urls[index]}/{path}"
            try:
                response = self._send(index, path, body)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                failed = index
                raise _Transient(f"{url}: {type(exc).__name__}: {exc}") from exc
            if response.status_code in RETRY_STATUS:
                failed, reachable = index, True
                raise _Transient(
                    f"{url}: HTTP {response.status_code}: {_message(response)}",
                    wait=min(_retry_after(response), MAX_RETRY_AFTER_S),
                )
            return self._answer(url, response)

        backoff = tenacity.wait_exponential(multiplier=self.options.backoff_seconds, exp_base=2)
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(attempts),
            wait=lambda state: max(_asked_wait(state), backoff(state)),
            retry=tenacity.retry_if_exception_type(_Transient),
        )
        try:
            return retrying(attempt)
        except tenacity.RetryError as exc:
            last = exc.last_attempt.exception()
        hint = "the server keeps failing; check its log" if reachable else "is the server running?"
        where = self.base_urls[0] if len(self.base_urls) == 1 else f"{len(self.base_urls)} replicas"
        raise ModelError(f"{where}: no answer after {attempts} attempt(s) (last: {last}); {hint}")

    def _answer(self, url: str, response: httpx.Response) -> dict[str, Any]:
        """The JSON of a final answer (counting its tokens), or a ModelError for one that is not worth retrying."""
        if response.status_code in (401, 403):
            hint = f"set the key in ${self.options.api_key_env}" if self.options.api_key_env else "set api_key_env"
            raise ModelError(
                f"{url}: authentication failed (HTTP {response.status_code}: {_message(response)}); {hint}"
            )
        if response.status_code >= 400:
            raise ModelError(
                f"{url}: the server rejected the request (HTTP {response.status_code}): {_message(response)}"
            )
        try:
            data = response.json()
        except ValueError:
            raise ModelError(f"{url}: the server's answer is not JSON") from None
        usage = data.get("usage") or {}
        with self._lock:
            self.generated_tokens += int(usage.get("completion_tokens") or 0)
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        return data

    def _map(self, fn, items: Sequence[Any]) -> list[Any]:
        began = time.perf_counter()
        try:
            if len(items) <= 1 or self.options.max_concurrency == 1:
                return [fn(item) for item in items]
            with ThreadPoolExecutor(max_workers=min(self.options.max_concurrency, len(items))) as pool:
                return list(pool.map(fn, items))
        finally:
            self.seconds += time.perf_counter() - began

    def _text(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, ChatPrompt):
            return self.format_chat(list(prompt.messages)) + prompt.assistant_prefix
        return self.format_chat(list(prompt))

    # -- Backend API -----------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[str]:
        def one(item: tuple[int, Prompt]) -> str:
            index, prompt = item
            body: dict[str, Any] = {
                "model": self.options.model,
                "max_tokens": settings.max_new_tokens,
                "temperature": settings.temperature,
                "top_p": settings.top_p,
            }
            if settings.stop:
                body["stop"] = list(settings.stop)
            if settings.seed is not None:
                body["seed"] = settings.seed + index
            if self.options.repetition_penalty_field and settings.repetition_penalty != 1.0:
                body[self.options.repetition_penalty_field] = settings.repetition_penalty
            if self.options.mode == "chat" and not isinstance(prompt, str):
                messages = prompt.messages if isinstance(prompt, ChatPrompt) else prompt
                body["messages"] = [m.model_dump() for m in messages]
                data = self._post("chat/completions", body)
                text = data["choices"][0]["message"].get("content") or ""
            else:
                body["prompt"] = self._text(prompt)
                data = self._post("completions", body)
                text = data["choices"][0].get("text") or ""
            return cut_at_stop(text, settings.stop)

        return self._map(one, list(enumerate(prompts)))

    def continuation_logprobs(
        self, prompts: Sequence[Prompt], continuations: Sequence[Sequence[str]]
    ) -> list[list[float | None]]:
        """Read the next-token top log-probs once per prompt and look each continuation up in them.

        Only continuations that are a single token can be scored this way; one missing from the server's top-k
        comes back as None, and the judge abstains.
        """
        if self.options.mode == "chat":
            raise BackendUnavailableError("log-prob scoring needs mode: completions on the OpenAI backend")

        def one(item: tuple[Prompt, Sequence[str]]) -> list[float | None]:
            prompt, options = item
            data = self._post(
                "completions",
                {
                    "model": self.options.model,
                    "prompt": self._text(prompt),
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "logprobs": self.options.top_logprobs,
                },
            )
            logprobs = (data.get("choices") or [{}])[0].get("logprobs") or {}
            top = (logprobs.get("top_logprobs") or [None])[0]
            if not top:
                raise BackendUnavailableError(
                    f"{', '.join(self.base_urls)}: the server returned no log-probs, so log-prob judges cannot run on it; "
                    "use a server that returns top_logprobs on /completions (vLLM, llama.cpp) or a local model"
                )
            out: list[float | None] = []
            for option in options:
                exact = top.get(option)
                if exact is None:
                    near = [v for k, v in top.items() if k.strip() == option.strip()]
                    exact = max(near) if near else None
                out.append(float(exact) if exact is not None else None)
            return out

        return self._map(one, list(zip(prompts, continuations)))


class _Transient(Exception):
    """A failure worth another try: no answer, or a status in RETRY_STATUS (``wait``: the server's Retry-After)."""

    def __init__(self, message: str, wait: float = 0.0) -> None:
        super().__init__(message)
        self.wait = wait


def _asked_wait(state: tenacity.RetryCallState) -> float:
    """The wait the failed attempt's server asked for (0 when it did not)."""
    error = state.outcome.exception() if state.outcome is not None else None
    return error.wait if isinstance(error, _Transient) else 0.0


def _retry_after(response: httpx.Response) -> float:
    """Seconds the server asks to wait (``Retry-After`` in seconds; an HTTP date or nothing counts as 0)."""
    try:
        return max(0.0, float(response.headers.get("retry-after", 0)))
    except ValueError:
        return 0.0


def _message(response: httpx.Response) -> str:
    try:
        data = response.json()
        error = data.get("error", data) if isinstance(data, dict) else data
        message = error.get("message") if isinstance(error, dict) else str(error)
    except ValueError:
        message = response.text
    message = str(message or response.reason_phrase).strip().splitlines()
    return message[0][:300] if message else response.reason_phrase
