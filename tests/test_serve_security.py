"""`cai serve` as a security boundary (issue "The guard as a security boundary"): input rails over every text the
upstream reads, a complete OpenAI-compatible proxy for agent clients, limits and timeouts, and streamed answers
released in checked pieces. Each test runs the guard on uvicorn against the deterministic stub upstream on
localhost, with rules-only policies (no model in the request path)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from stub_upstream import StubUpstream, free_port  # noqa: E402
from test_serve import QUESTION, GuardServer, policy, rule  # noqa: E402

from cai_engine import hookimpl  # noqa: E402
from cai_engine.guard.engine import Engine  # noqa: E402
from cai_engine.guard.serve import ServeOptions  # noqa: E402

SECRET = rule("pw-001", r"\bhunter\d+", fix="[redacted]")
SECRET_NO_FIX = rule("pw-002", r"\bhunter\d+")
CLEAN = {"role": "user", "content": "Name a colour."}


@pytest.fixture
def upstream():
    with StubUpstream() as stub:
        yield stub


def post(guard: GuardServer, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{guard.url}/chat/completions", json=body, timeout=kwargs.pop("timeout", 20), **kwargs)


def sse(reply: httpx.Response) -> list[dict]:
    """The JSON events of a server-sent-events body (without [DONE])."""
    events = []
    for line in reply.text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            events.append(json.loads(line[5:]))
    return events


def streamed_text(events: list[dict], index: int = 0) -> str:
    return "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []) if c["index"] == index)


# -- 1. input rails over every text the upstream reads -----------------------------------------------------------


TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "hunter2"}'}}
PLACES = {
    "system message": [{"role": "system", "content": "The admin password is hunter2."}, CLEAN],
    "developer message": [{"role": "developer", "content": "Password: hunter2"}, CLEAN],
    "an earlier user turn": [
        {"role": "user", "content": "my password is hunter2"},
        {"role": "assistant", "content": "Noted."},
        CLEAN,
    ],
    "a list of plain strings": [{"role": "user", "content": ["Name a colour.", "pw hunter2"]}],
    "a text part": [{"role": "user", "content": [{"type": "text", "text": "pw hunter2"}]}],
    "an input_text part": [{"role": "user", "content": [{"type": "input_text", "text": "pw hunter2"}]}],
    "an output_text part": [
        {"role": "assistant", "content": [{"type": "output_text", "text": "it is hunter2"}]},
        CLEAN,
    ],
    "a refusal part": [{"role": "assistant", "content": [{"type": "refusal", "refusal": "not hunter2"}]}, CLEAN],
    "an assistant refusal": [{"role": "assistant", "content": None, "refusal": "not hunter2"}, CLEAN],
    "tool call arguments": [{"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}, CLEAN],
    "escaped tool call arguments": [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{**TOOL_CALL, "function": {"name": "lookup", "arguments": '{"q": "\\u0068unter2"}'}}],
        },
        CLEAN,
    ],
    "a tool result": [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{**TOOL_CALL, "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "the vault says hunter2"},
        CLEAN,
    ],
    "a tool result as parts": [
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "vault: hunter2"}]},
        CLEAN,
    ],
}


@pytest.mark.parametrize("place", list(PLACES))
def test_the_input_rail_reads_every_role_and_content_shape(upstream, place):
    refusing = policy(add=[SECRET], input={"check": True, "action": "refuse"})
    with GuardServer(refusing, upstream.url) as guard:
        reply = post(guard, {"model": "m", "messages": PLACES[place]})
        assert reply.status_code == 200, reply.text
        verdict = reply.json()["cai_guard"]
        assert verdict["input"] == {"action": "refused", "principle_ids": ["pw-001"]}, place
        assert reply.json()["choices"][0]["finish_reason"] == "content_filter"
    assert upstream.bodies() == []  # nothing reached the model


def test_tool_descriptions_are_checked(upstream):
    tools = [{"type": "function", "function": {"name": "f", "description": "log in with hunter2", "parameters": {}}}]
    refusing = policy(add=[SECRET], input={"check": True, "action": "refuse"})
    with GuardServer(refusing, upstream.url) as guard:
        reply = post(guard, {"model": "m", "messages": [CLEAN], "tools": tools})
        assert reply.json()["cai_guard"]["input"]["action"] == "refused"
    assert upstream.bodies() == []


OTHER_FIELDS = {
    "legacy functions": {"functions": [{"name": "f", "description": "log in with hunter2", "parameters": {}}]},
    "a response_format schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "a", "schema": {"properties": {"pw": {"description": "hunter2"}}}},
        }
    },
    "a parameter the guard does not know": {"chat_template_kwargs": {"preamble": "the password is hunter2"}},
}


@pytest.mark.parametrize("place", list(OTHER_FIELDS))
def test_strings_in_the_requests_other_fields_are_checked(upstream, place):
    """An upstream may render any field into the prompt; only sampling and output controls go unread."""
    refusing = policy(add=[SECRET], input={"check": True, "action": "refuse"})
    with GuardServer(refusing, upstream.url) as guard:
        reply = post(guard, {"model": "m", "messages": [CLEAN], "temperature": 0, **OTHER_FIELDS[place]})
        assert reply.json()["cai_guard"]["input"]["action"] == "refused", place
    assert upstream.bodies() == []
    redacting = policy(add=[SECRET], input={"check": True, "action": "redact"})
    with GuardServer(redacting, upstream.url) as guard:
        reply = post(guard, {"model": "m", "messages": [CLEAN], "stop": ["hunter2"], **OTHER_FIELDS[place]})
        assert reply.status_code == 200, reply.text
    sent = upstream.bodies()[-1]
    field = next(iter(OTHER_FIELDS[place]))
    assert "hunter2" not in json.dumps(sent[field]) and "[redacted]" in json.dumps(sent[field])
    assert sent["stop"] == ["hunter2"]  # an output control, not text the model reads: sent as it came


def test_redaction_edits_only_the_part_that_matched(upstream):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
    marked = {"type": "text", "text": "Name a colour.", "cache_control": {"type": "ephemeral"}}
    messages = [
        {"role": "system", "content": "Keep hunter2 secret.", "name": "ops"},
        {"role": "user", "content": [{"type": "text", "text": "My password is hunter3."}, image, marked]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"pw": "hunter4", "n": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "hunter5 is valid"},
        {"role": "user", "content": "Thanks, name a colour."},
    ]
    redacting = policy(add=[SECRET], input={"check": True, "action": "redact"})
    with GuardServer(redacting, upstream.url) as guard:
        reply = post(guard, {"model": "m", "messages": messages})
        assert reply.status_code == 200 and reply.json()["cai_guard"]["input"]["action"] == "redacted"
    [sent] = [body["messages"] for body in upstream.bodies()]
    assert sent[0] == {"role": "system", "content": "Keep [redacted] secret.", "name": "ops"}
    assert sent[1]["content"] == [{"type": "text", "text": "My password is [redacted]."}, image, marked]
    call = sent[2]["tool_calls"][0]
    assert call["id"] == "c1" and call["function"]["name"] == "lookup"
    assert json.loads(call["function"]["arguments"]) == {"pw": "[redacted]", "n": 1}  # still JSON
    assert sent[3] == {"role": "tool", "tool_call_id": "c1", "content": "[redacted] is valid"}
    assert sent[4] == messages[4]


def test_a_match_split_across_parts_is_found_and_refused(upstream):
    split = [
        {"role": "user", "content": [{"type": "text", "text": "my password is hun"}, {"type": "text", "text": "ter2"}]}
    ]
    redacting = policy(add=[SECRET], input={"check": True, "action": "redact"})
    with GuardServer(redacting, upstream.url) as guard:
        reply = post(guard, {"model": "m", "messages": split})
        assert reply.json()["cai_guard"]["input"]["action"] == "refused"  # no single part can be redacted
    assert upstream.bodies() == []
    # the same word split across parts after a redactable match with the same evidence in one of them
    both = [{"role": "user", "content": [{"type": "text", "text": "hunter2 hun"}, {"type": "text", "text": "ter2"}]}]
    with GuardServer(redacting, upstream.url) as guard:
        reply = post(guard, {"model": "m", "messages": both})
        assert reply.json()["cai_guard"]["input"]["action"] == "refused"
    assert upstream.bodies() == []


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-1"}},
        {"type": "something_new", "x": 1},
    ],
    ids=lambda p: p["type"],
)
def test_parts_the_guard_cannot_read_pass_or_are_refused_never_dropped(upstream, part):
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    with GuardServer(policy(add=[SECRET], input={"check": True, "action": "redact"}), upstream.url) as guard:
        assert post(guard, {"model": "m", "messages": messages}).status_code == 200
    assert upstream.bodies()[0]["messages"] == messages  # passed through whole, the part included
    refusing = policy(add=[SECRET], input={"non_text": "refuse"})
    with GuardServer(refusing, upstream.url) as guard:
        reply = post(guard, {"model": "m", "messages": messages})
        error = reply.json()["error"]
        assert reply.status_code == 400 and error["code"] == "unsupported_content"
        assert error["param"] == "messages[0].content[1]" and part["type"] in error["message"]
    assert len(upstream.bodies()) == 1


@pytest.mark.parametrize(
    "message, param",
    [
        ({"role": "user", "content": 42}, "messages[0].content"),
        ({"role": "user", "content": [{"text": "no type"}]}, "messages[0].content[0]"),
        ({"role": "user", "content": [{"type": "text", "text": 3}]}, "messages[0].content[0].text"),
        ({"role": "assistant", "tool_calls": {"not": "a list"}}, "messages[0].tool_calls"),
        (
            {"role": "assistant", "tool_calls": [{"function": {"arguments": 1}}]},
            "messages[0].tool_calls[0].function.arguments",
        ),
        ("just text", "messages[0]"),
    ],
)
def test_a_message_outside_the_chat_format_is_a_400_naming_it(upstream, message, param):
    with GuardServer(policy(), upstream.url) as guard:
        reply = post(guard, {"model": "m", "messages": [message]})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param
    assert upstream.bodies() == []


def test_check_input_checks_every_turn_and_keeps_its_shape(cai_runtime):
    engine = Engine.from_policy(policy(add=[SECRET], input={"check": True, "action": "redact"}), runtime=cai_runtime)
    try:
        conversation = [
            {"role": "system", "content": "The password is hunter2."},
            {"role": "user", "content": "My card is hunter3, name a colour."},
        ]
        violations, redacted = engine.check_input(conversation)
        assert sorted(v.evidence for v in violations) == ["hunter2", "hunter3"]  # the system turn too
        assert redacted == "My card is [redacted], name a colour."  # the last user message, as before
        assert engine.check_input([{"role": "user", "content": "Name a colour."}]) == ([], "Name a colour.")
        check = engine.check_messages(conversation)
        assert [m["content"] for m in check.messages] == ["The password is [redacted].", redacted]
    finally:
        engine.close()
    engine = Engine.from_policy(policy(add=[SECRET_NO_FIX], input={"check": True}), runtime=cai_runtime)
    try:
        violations, redacted = engine.check_input([{"role": "system", "content": "hunter2"}, CLEAN])
        assert violations and redacted is None  # cannot be repaired
    finally:
        engine.close()


def test_require_rules_do_not_apply_to_the_input(cai_runtime):
    needs_thanks = rule("ty-001", "thanks", fix="Thanks!")
    needs_thanks["rules"][0]["kind"] = "require"
    engine = Engine.from_policy(policy(add=[needs_thanks], input={"check": True}), runtime=cai_runtime)
    try:  # a require rule says what a reply must contain; a system prompt without "thanks" breaks nothing
        assert engine.check_input([{"role": "system", "content": "Be brief."}, CLEAN]) == ([], "Name a colour.")
    finally:
        engine.close()


# -- 2. a complete OpenAI-compatible proxy for agent clients -----------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a word up.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]


def test_tools_and_tool_calls_pass_through(upstream):
    with GuardServer(policy(add=[rule("never-001", "zzqqxx")]), upstream.url) as guard:
        client = openai.OpenAI(base_url=guard.url, api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, tool_choice="auto")
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert call.id == "call_stub0" and call.function.name == "lookup"
        assert json.loads(call.function.arguments) == {"query": "Name a colour."}
        assert answer.system_fingerprint == "fp_stub"  # other upstream fields pass through
        # the agent's next turn: its tool call and the tool's result, in the tool and developer roles
        follow = [
            {"role": "developer", "content": "Answer in one word."},
            *QUESTION,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "blue"},
        ]
        again = client.chat.completions.create(model="m", messages=follow, tools=TOOLS, tool_choice="none")
        assert again.choices[0].message.content == "Stub answer to: Name a colour."
    first, second = upstream.bodies()
    assert first["tools"] == TOOLS and first["tool_choice"] == "auto"
    assert second["messages"][0]["role"] == "developer" and second["messages"][3]["role"] == "tool"
    assert second["messages"][2]["tool_calls"][0]["function"]["arguments"] == call.function.arguments


def test_tool_call_arguments_are_guarded_like_text(upstream):
    asked = [{"role": "user", "content": "find hunter2"}]
    with GuardServer(policy(add=[SECRET]), upstream.url) as guard:  # the input rail is off: the answer carries it
        client = openai.OpenAI(base_url=guard.url, api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="m", messages=asked, tools=TOOLS)
        [call] = answer.choices[0].message.tool_calls
        assert json.loads(call.function.arguments) == {"query": "find [redacted]"}  # revised, still JSON
        assert answer.model_extra["cai_guard"]["action"] == "revised"
    refusing = policy(add=[SECRET_NO_FIX], guard={"model_critics": False, "action": "refuse"})
    with GuardServer(refusing, upstream.url) as guard:
        client = openai.OpenAI(base_url=guard.url, api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="m", messages=asked, tools=TOOLS)
        choice = answer.choices[0]
        assert choice.message.tool_calls is None and choice.finish_reason == "content_filter"
        assert choice.message.content.startswith("I can't help with that as asked")


def test_every_choice_is_returned_and_guarded(upstream):
    third = rule("three-001", "#3", fix="(third)")
    with GuardServer(policy(add=[third]), upstream.url) as guard:
        client = openai.OpenAI(base_url=guard.url, api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="m", messages=QUESTION, n=3)
        texts = [c.message.content for c in answer.choices]
        assert texts == [
            "Stub answer to: Name a colour.",
            "Stub answer to: Name a colour. #2",
            "Stub answer to: Name a colour. (third)",
        ]
        assert [c.model_extra["cai_guard"]["action"] for c in answer.choices] == ["none", "none", "revised"]
        verdict = answer.model_extra["cai_guard"]
        assert verdict["action"] == "revised" and verdict["compliant"] and len(verdict["audit_ids"]) == 3
    assert upstream.bodies()[0]["n"] == 3


def test_logprobs_pass_when_the_guard_changed_nothing(upstream):
    second = rule("two-001", "#2", fix="(second)")
    with GuardServer(policy(add=[second]), upstream.url) as guard:
        body = post(guard, {"model": "m", "messages": QUESTION, "n": 2, "logprobs": True}).json()
        kept, dropped = body["choices"]
        assert [t["token"] for t in kept["logprobs"]["content"]] == ["Stub", "answer", "to:", "Name", "a", "colour."]
        assert dropped["message"]["content"].endswith("(second)") and dropped["logprobs"] is None


def test_top_logprobs_alternatives_are_guarded_like_text(upstream):
    # the stub's alternatives are each token reversed: "Stub answer" -> "butS", "rewsna"; the reply never has them
    hidden = rule("alt-001", r"\brewsna\b")
    with GuardServer(policy(add=[hidden]), upstream.url) as guard:
        asked = {"model": "m", "messages": QUESTION, "logprobs": True, "top_logprobs": 2}
        entries = post(guard, asked).json()["choices"][0]["logprobs"]["content"]
        assert [e["token"] for e in entries][:2] == ["Stub", "answer"] and all(e["top_logprobs"] == [] for e in entries)
        events = sse(post(guard, {**asked, "stream": True}))
        assert streamed_text(events) == "Stub answer to: Name a colour."
        streamed = [e for ev in events for c in ev["choices"] if c.get("logprobs") for e in c["logprobs"]["content"]]
        assert {e["token"] for e in streamed} >= {"Stub", " answer"}
        assert [e["top_logprobs"] for e in streamed if e["token"] == " answer"] == [[]]
    with GuardServer(policy(add=[rule("never-001", "zzqqxx")]), upstream.url) as guard:  # nothing found: kept
        entries = post(guard, asked).json()["choices"][0]["logprobs"]["content"]
        assert [a["token"] for a in entries[1]["top_logprobs"]] == ["answer", "rewsna"]


def test_streams_give_the_usage_chunk_when_asked(upstream):
    with GuardServer(policy(add=[rule("never-001", "zzqqxx")]), upstream.url) as guard:
        client = openai.OpenAI(base_url=guard.url, api_key="unused", max_retries=0)
        chunks = list(
            client.chat.completions.create(
                model="m", messages=QUESTION, stream=True, stream_options={"include_usage": True}
            )
        )
        usage = upstream.chat_completion({"messages": QUESTION})["usage"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == usage["completion_tokens"]
        assert chunks[-2].choices[0].finish_reason == "stop"
        plain = list(client.chat.completions.create(model="m", messages=QUESTION, stream=True))
        assert all(c.usage is None for c in plain)
    refusing = policy(add=[SECRET], input={"check": True})
    with GuardServer(refusing, upstream.url) as guard:  # a stream the input rail answers has one too
        client = openai.OpenAI(base_url=guard.url, api_key="unused", max_retries=0)
        asked = [{"role": "user", "content": "hunter2"}]
        chunks = list(
            client.chat.completions.create(
                model="m", messages=asked, stream=True, stream_options={"include_usage": True}
            )
        )
        assert chunks[-1].usage.total_tokens == 0 and chunks[-2].choices[0].finish_reason == "content_filter"


def test_upstream_rate_limits_reach_the_client_with_retry_after():
    def respond(method, path, body):
        error = {"error": {"message": "Rate limit reached", "type": "rate_limit_error", "code": "rate_limit"}}
        return 429, {"Retry-After": "7"}, json.dumps(error).encode()

    with StubUpstream(respond=respond) as stub, GuardServer(policy(), stub.url) as guard:
        reply = post(guard, {"model": "m", "messages": QUESTION})
        assert reply.status_code == 429 and reply.headers["retry-after"] == "7"
        assert reply.json()["error"] == {
            "message": "Rate limit reached",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit",
        }
        client = openai.OpenAI(base_url=guard.url, api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="m", messages=QUESTION)


def test_an_upstream_error_message_is_guarded_before_the_client_sees_it():
    def respond(method, path, body):
        quoted = body["messages"][-1]["content"]
        error = {"error": {"message": f"Invalid message: {quoted!r}", "type": "invalid_request_error"}}
        return 400, {}, json.dumps(error).encode()

    with StubUpstream(respond=respond) as stub:
        with GuardServer(policy(add=[SECRET]), stub.url) as guard:
            client = openai.OpenAI(base_url=guard.url, api_key="unused", max_retries=0)
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "pw hunter2"}])
            assert "hunter2" not in str(info.value) and "Invalid message: 'pw [redacted]'" in str(info.value)
        with GuardServer(policy(add=[SECRET_NO_FIX]), stub.url) as guard:
            reply = post(guard, {"model": "m", "messages": [{"role": "user", "content": "pw hunter2"}]})
            assert reply.status_code == 400 and "hunter2" not in reply.text
            assert reply.json()["cai_guard"] == {"action": "refused", "principle_ids": ["pw-002"]}


def test_an_upstream_errors_type_code_and_param_are_guarded_too():
    """The short fields of an upstream error can echo the request as well; one that breaks a rule is left out."""

    def respond(method, path, body):
        quoted = body["messages"][-1]["content"]
        error = {"error": {"message": "bad", "type": "invalid_request_error", "code": "bad_value", "param": quoted}}
        return 400, {}, json.dumps(error).encode()

    with StubUpstream(respond=respond) as stub, GuardServer(policy(add=[SECRET]), stub.url) as guard:
        reply = post(guard, {"model": "m", "messages": [{"role": "user", "content": "pw hunter2"}]})
        assert reply.status_code == 400 and "hunter2" not in reply.text
        error = reply.json()["error"]
        assert error["param"] is None and error["type"] == "invalid_request_error" and error["code"] == "bad_value"
        clean = post(guard, {"model": "m", "messages": [{"role": "user", "content": "hello there"}]})
        assert clean.json()["error"]["param"] == "hello there"


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/nope", 404),
        ("POST", "/v1/chat/completions/", 404),
        ("OPTIONS", "/v1/chat/completions", 405),
        ("POST", "/v1/completions", 404),
        ("POST", "/v1/responses", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/health", 405),
        ("PUT", "/v1/models", 405),
    ],
)
def test_every_unknown_path_and_method_answers_json(upstream, method, path, status):
    with GuardServer(policy(), upstream.url) as guard:
        reply = httpx.request(method, f"http://127.0.0.1:{guard.port}{path}")
        assert reply.status_code == status and reply.headers["content-type"] == "application/json"
        assert reply.json()["error"]["type"] == "invalid_request_error" and path in reply.json()["error"]["message"]


# -- 3. limits and timeouts --------------------------------------------------------------------------------------


def test_one_deadline_for_the_whole_upstream_exchange():
    with StubUpstream(drip=0.02) as stub, GuardServer(policy(), stub.url, timeout=1) as guard:  # ~8 s to send
        began = time.monotonic()
        reply = post(guard, {"model": "m", "messages": QUESTION})
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "upstream_timeout"
        assert time.monotonic() - began < 4  # a byte every 20 ms never trips a per-read timeout


def test_a_slow_stream_is_cut_at_the_deadline():
    with StubUpstream(chunk_delay=0.3) as stub, GuardServer(policy(), stub.url, timeout=1) as guard:
        began = time.monotonic()
        reply = post(guard, {"model": "m", "messages": QUESTION, "stream": True})
        assert time.monotonic() - began < 4
        events = sse(reply)
        assert events[-1]["error"]["code"] == "upstream_timeout"


def test_a_client_that_disconnects_frees_the_upstream_slot():
    gate = threading.Event()

    def delay(body):
        if body["messages"][-1]["content"] == "hold":
            gate.wait(20)
        return 0

    with StubUpstream(delay=delay) as stub, GuardServer(policy(), stub.url, max_concurrency=1) as guard:
        try:
            with pytest.raises(httpx.ReadTimeout):
                post(guard, {"model": "m", "messages": [{"role": "user", "content": "hold"}]}, timeout=0.5)
            began = time.monotonic()
            reply = post(guard, {"model": "m", "messages": QUESTION}, timeout=10)
            assert reply.status_code == 200 and time.monotonic() - began < 3  # the only slot was freed
            metrics = httpx.get(f"http://127.0.0.1:{guard.port}/metrics").text
            assert 'cai_requests_total{status="client_disconnected"} 1' in metrics
        finally:
            gate.set()


def test_a_client_that_drops_a_stream_frees_the_upstream_slot():
    slow = StubUpstream(chat=lambda body: LONG, chunk_delay=0.2)  # ~10 s to stream whole
    with slow, GuardServer(policy(), slow.url, max_concurrency=1) as guard:
        body = {"model": "m", "messages": QUESTION, "stream": True}
        with httpx.stream("POST", f"{guard.url}/chat/completions", json=body, timeout=10) as reply:
            for line in reply.iter_lines():
                if line.startswith("data:"):
                    break  # the first event arrived: hang up
        began = time.monotonic()
        assert post(guard, {"model": "m", "messages": QUESTION}, timeout=10).status_code == 200
        assert time.monotonic() - began < 3  # the stream's slot and upstream connection were freed at once


def test_the_body_is_limited_while_it_is_read(upstream):
    options = ServeOptions(max_body_bytes=2048)
    with GuardServer(policy(), upstream.url, options=options) as guard:
        big = {"model": "m", "messages": [{"role": "user", "content": "x" * 4000}]}
        reply = post(guard, big)
        assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"model": "m", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}]}'

        url = f"{guard.url}/chat/completions"
        reply = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
        assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
        assert post(guard, {"model": "m", "messages": QUESTION}).status_code == 200
    assert len(upstream.bodies()) == 1


@pytest.mark.parametrize(
    "raw, says",
    [
        (b'{"model": "m", "temperature": NaN, "messages": [{"role": "user", "content": "hi"}]}', "NaN"),
        (b'{"model": "m", "temperature": Infinity, "messages": [{"role": "user", "content": "hi"}]}', "Infinity"),
        (b'{"model": "m", "temperature": -Infinity, "messages": [{"role": "user", "content": "hi"}]}', "Infinity"),
        (b'{"model": "m", "temperature": 1e999, "messages": [{"role": "user", "content": "hi"}]}', "too large"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 100 + b"]" * 100 + b"}", "nested"),
        (b"[" * 200_000, "nested"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
        (b'{"messages": [{"role": "user", "content": "\xff"}]}', "UTF-8"),
        (b'{"messages": []}', "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 0}', "'n'"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 500}', "'n'"),
    ],
)
def test_bad_json_is_a_400_never_a_traceback(upstream, raw, says):
    with GuardServer(policy(), upstream.url) as guard:
        reply = httpx.post(f"{guard.url}/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert reply.status_code == 400, reply.text
        assert says in reply.json()["error"]["message"]
    assert upstream.bodies() == []


def test_a_model_list_that_is_not_json_is_a_502():
    def respond(method, path, body):
        return (200, {"Content-Type": "text/html"}, b"<html>proxy login</html>") if path == "/v1/models" else None

    with StubUpstream(respond=respond) as stub, GuardServer(policy(), stub.url) as guard:
        reply = httpx.get(f"{guard.url}/models")
        assert reply.status_code == 502 and reply.json()["error"]["code"] == "upstream_bad_response"


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_only_json_bodies_are_accepted_so_cross_site_forms_are_not(upstream, content_type):
    headers = {"content-type": content_type} if content_type else {}
    body = json.dumps({"model": "m", "messages": QUESTION}).encode()
    with GuardServer(policy(), upstream.url) as guard:
        url = f"{guard.url}/chat/completions"
        reply = httpx.post(url, content=body, headers=headers)
        assert reply.status_code == 415 and reply.json()["error"]["code"] == "unsupported_media_type"
        ok = httpx.post(url, content=body, headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200
    assert len(upstream.bodies()) == 1


def test_the_bearer_token_is_compared_in_constant_time(upstream, monkeypatch):
    import cai_engine.guard.serve as serve

    compared = []
    real = serve.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(serve.hmac, "compare_digest", spy)
    monkeypatch.setenv("CAI_SERVE_API_KEY", "s3cret")
    with GuardServer(policy(), upstream.url) as guard:
        for token, status in (("s3cret", 200), ("s3cre", 401), ("s3cretX", 401), ("", 401)):
            headers = {"authorization": f"Bearer {token}"} if token else {}
            assert post(guard, {"model": "m", "messages": QUESTION}, headers=headers).status_code == status
    assert (b"Bearer s3cre", b"Bearer s3cret") in compared


def test_health_says_nothing_about_the_upstream_to_a_stranger(upstream, monkeypatch):
    monkeypatch.setenv("CAI_SERVE_API_KEY", "s3cret")
    with GuardServer(policy(), upstream.url) as guard:
        health = f"http://127.0.0.1:{guard.port}/health"
        assert httpx.get(health).json() == {"status": "ok"}
        known = httpx.get(health, headers={"authorization": "Bearer s3cret"}).json()
        assert known["upstream"] == upstream.url and known["policy"]["name"] == "served"


def test_metrics_can_require_the_key(upstream, monkeypatch):
    monkeypatch.setenv("CAI_SERVE_API_KEY", "s3cret")
    with GuardServer(policy(), upstream.url) as guard:
        assert httpx.get(f"http://127.0.0.1:{guard.port}/metrics").status_code == 200  # the default: open
    with GuardServer(policy(), upstream.url, options=ServeOptions(metrics_need_key=True)) as guard:
        url = f"http://127.0.0.1:{guard.port}/metrics"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_serving_beyond_localhost_without_a_key_warns(cli_runner, upstream, tmp_path, monkeypatch):
    import uvicorn
    import yaml

    from cai_engine.cli import cli

    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: started.append(self.config))
    monkeypatch.delenv("CAI_SERVE_API_KEY", raising=False)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy()))
    args = ["serve", "--policy", str(path), "--upstream", upstream.url, "--port", str(free_port())]
    wide = cli_runner.invoke(cli, [*args, "--host", "0.0.0.0"])
    assert wide.exit_code == 0 and "warning: listening on 0.0.0.0" in wide.output
    local = cli_runner.invoke(cli, [*args, "--host", "127.0.0.1", "--read-timeout", "3"])
    assert local.exit_code == 0 and "warning" not in local.output
    monkeypatch.setenv("CAI_SERVE_API_KEY", "s3cret")
    keyed = cli_runner.invoke(cli, [*args, "--host", "0.0.0.0"])
    assert keyed.exit_code == 0 and "warning" not in keyed.output
    assert len(started) == 3 and started[1].timeout_keep_alive == 5


def test_a_client_that_drips_its_headers_is_cut_off(upstream):
    options = ServeOptions(read_timeout=0.5)  # `cai serve --read-timeout`: for the headers and for the body
    with GuardServer(policy(), upstream.url, read_timeout=0.5, options=options) as guard:
        with socket.create_connection(("127.0.0.1", guard.port), timeout=5) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            began, closed = time.monotonic(), False
            while time.monotonic() - began < 4 and not closed:
                try:
                    conn.sendall(b"X")  # one header byte at a time, never finishing the headers
                    conn.settimeout(0.1)
                    closed = conn.recv(1) == b""
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
            assert closed and time.monotonic() - began < 2
        # and one that drips its body gets a 408
        with socket.create_connection(("127.0.0.1", guard.port), timeout=5) as conn:
            conn.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            conn.settimeout(3)
            assert b" 408 " in conn.recv(4096).split(b"\r\n")[0] + b" "


# -- 4. streaming output rails -----------------------------------------------------------------------------------

LONG = (
    "Here is a long and careful answer about colours, which goes on for a while so that the guard can release "
    "the first part of it before the rest arrives; blue is calm, red is loud, green is restful, and then the "
    "admin password is hunter2 which must never be shown, and more text follows after it."
)


def test_a_stream_is_released_as_it_arrives(upstream):
    slow = StubUpstream(chat=lambda body: LONG.split(" and then")[0], chunk_delay=0.04)
    with slow, GuardServer(policy(add=[SECRET]), slow.url) as guard:
        began = time.monotonic()
        first = None
        with httpx.stream(
            "POST", f"{guard.url}/chat/completions", json={"model": "m", "messages": QUESTION, "stream": True}
        ) as reply:
            for line in reply.iter_lines():
                if first is None and '"content":"' in line and '"content":""' not in line:
                    first = time.monotonic() - began
        total = time.monotonic() - began
        assert first is not None and first < total / 2  # not buffered until the end


def test_a_stream_stops_before_a_forbidden_word_split_across_chunks(upstream):
    split = StubUpstream(chat=lambda body: LONG, chunk_chars=3)  # "hunter2" arrives as "...hu", "nte", "r2 ..."
    refusing = policy(add=[SECRET_NO_FIX], guard={"model_critics": False, "action": "refuse"})
    with split, GuardServer(refusing, split.url) as guard:
        events = sse(post(guard, {"model": "m", "messages": QUESTION, "stream": True}))
        last = events[-1]["choices"][0]
        assert last["finish_reason"] == "content_filter"
        verdict = events[-1]["cai_guard"]
        assert verdict["action"] == "stopped" and verdict["principle_ids"] == ["pw-002"]
        released = streamed_text(events[:-1])
        assert released and LONG.startswith(released)  # some of the answer went out, unchanged
        assert len(released) <= LONG.index("hunter2")  # and none of the forbidden word
        assert last["delta"]["content"].strip().startswith("I can't help with that as asked")
        assert verdict["released_chars"] == len(released)


def test_a_rule_whose_when_matched_before_the_window_still_stops_the_stream(upstream):
    far = (
        "The password is coming soon. "
        + "filler words go on and on here. " * 30
        + "It is hunter2 and more after. "
        + "tail words. " * 20
    )
    split = StubUpstream(chat=lambda body: far, chunk_chars=6)
    conditional = rule("pw-003", r"\bhunter\d+", when="password")
    with (
        split,
        GuardServer(policy(add=[conditional], guard={"model_critics": False, "action": "refuse"}), split.url) as guard,
    ):
        events = sse(post(guard, {"model": "m", "messages": QUESTION, "stream": True}))
        assert events[-1]["cai_guard"]["action"] == "stopped"
        assert "hunter" not in streamed_text(events[:-1])  # stopped by the window check, not at the end


def test_a_stream_with_a_repairable_violation_is_released_repaired(upstream):
    split = StubUpstream(chat=lambda body: LONG, chunk_chars=5)
    with split, GuardServer(policy(add=[SECRET]), split.url) as guard:
        plain = post(guard, {"model": "m", "messages": QUESTION}).json()
        events = sse(post(guard, {"model": "m", "messages": QUESTION, "stream": True}))
        expected = plain["choices"][0]["message"]["content"]
        assert "[redacted]" in expected and streamed_text(events) == expected
        assert events[-1]["cai_guard"]["action"] == "revised"


def test_a_require_rule_is_met_at_the_end_of_a_stream(upstream):
    thanks = rule("ty-001", "thank you", fix="Thank you!")
    thanks["rules"][0]["kind"] = "require"
    with GuardServer(policy(add=[thanks]), upstream.url) as guard:
        events = sse(post(guard, {"model": "m", "messages": QUESTION, "stream": True}))
        assert streamed_text(events) == "Stub answer to: Name a colour. Thank you!"
        assert events[-1]["cai_guard"]["action"] == "revised"


def test_streamed_tool_calls_and_choices_are_guarded(upstream):
    with GuardServer(policy(add=[SECRET]), upstream.url) as guard:
        asked = [{"role": "user", "content": "find hunter2"}]
        events = sse(post(guard, {"model": "m", "messages": asked, "stream": True, "tools": TOOLS}))
        calls = [d for e in events for c in e["choices"] for d in c["delta"].get("tool_calls") or []]
        assert len(calls) == 1 and calls[0]["function"]["name"] == "lookup" and calls[0]["id"] == "call_stub0"
        assert json.loads(calls[0]["function"]["arguments"]) == {"query": "find [redacted]"}
        assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
        body = {"model": "m", "messages": QUESTION, "stream": True, "n": 2, "logprobs": True}
        events = sse(post(guard, body))
        assert streamed_text(events, 0) == "Stub answer to: Name a colour."
        assert streamed_text(events, 1) == "Stub answer to: Name a colour. #2"
        finals = [e for e in events if e.get("choices") and e["choices"][0]["finish_reason"]]
        assert sorted(e["choices"][0]["index"] for e in finals) == [0, 1]
        assert all(e["cai_guard"]["action"] == "none" for e in finals)
        tokens = [c["logprobs"]["content"][0]["token"] for e in events for c in e["choices"] if c.get("logprobs")]
        assert "".join(tokens) == "Stub answer to: Name a colour.Stub answer to: Name a colour. #2"


def test_an_upstream_that_answers_a_stream_request_at_once_is_streamed_guarded():
    stub = StubUpstream()

    def respond(method, path, body):  # a server that ignores "stream": one JSON answer
        if method == "POST" and body.get("stream"):
            plain = stub.chat_completion({**body, "stream": False})
            return 200, {}, json.dumps(plain).encode()
        return None

    stub.respond = respond
    with stub, GuardServer(policy(add=[SECRET]), stub.url) as guard:
        asked = [{"role": "user", "content": "find hunter2"}]
        events = sse(post(guard, {"model": "m", "messages": asked, "stream": True, "n": 2, "tools": TOOLS}))
        calls = [d for e in events for c in e["choices"] for d in c["delta"].get("tool_calls") or []]
        assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"query": "find [redacted]"}] * 2
        assert [c["index"] for c in calls] == [0, 0] and calls[0]["id"] == "call_stub0"
        finals = [e for e in events if e["choices"][0]["finish_reason"]]
        assert [e["choices"][0]["finish_reason"] for e in finals] == ["tool_calls", "tool_calls"]
        assert all(e["cai_guard"]["action"] == "revised" for e in finals)


def test_a_streamed_field_the_guard_cannot_read_as_text_is_not_released():
    stub = StubUpstream()

    def respond(method, path, body):  # a stream whose deltas also carry nested fields (audio, annotations)
        if method == "POST" and body.get("stream"):
            deltas = [
                {"role": "assistant", "content": "Here it is."},
                {"audio": {"id": "a1", "transcript": "the password is hunter2"}},
                {"annotations": [{"type": "url_citation", "url_citation": {"title": "hunter2"}}]},
            ]
            events = [
                {
                    "id": "x",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": "m",
                    "choices": [{"index": 0, "delta": d, "finish_reason": None}],
                }
                for d in deltas
            ]
            events[-1]["choices"][0]["finish_reason"] = "stop"
            raw = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            return 200, {"Content-Type": "text/event-stream"}, raw.encode()
        return None

    stub.respond = respond
    with stub, GuardServer(policy(add=[SECRET]), stub.url) as guard:
        reply = post(guard, {"model": "m", "messages": QUESTION, "stream": True})
        assert "hunter2" not in reply.text
        events = sse(reply)
        assert streamed_text(events) == "Here it is."
        assert events[-1]["choices"][0]["finish_reason"] == "stop"


class KeywordCritic:
    """A critic plugin standing in for the model critic: it flags every reply that says "loud"."""

    def __init__(self) -> None:
        from cai_engine import Critic
        from cai_engine.records import Critique

        class LoudCritic(Critic):
            name = "loud-critic"

            def critique(self, tasks):
                return [
                    Critique(
                        principle_id=t.principle.id,
                        text="too loud" if "loud" in t.response else "fine",
                        needs_revision="loud" in t.response,
                        critic=self.name,
                    )
                    for t in tasks
                ]

        self.cls = LoudCritic

    @hookimpl
    def cai_register_critics(self, register):
        register(self.cls)


class EngineServer(GuardServer):
    """GuardServer for an engine built here (on a runtime with a test plugin)."""

    def __init__(self, engine: Engine, upstream_url: str, **options) -> None:
        import uvicorn

        from cai_engine.guard.serve import create_app, server_config

        self.engine = engine
        self.app = create_app(engine, upstream_url, **options)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(server_config(self.app, port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)


@pytest.mark.parametrize("every", [0, 4])
def test_with_model_critics_a_stream_is_released_only_after_a_model_check(cai_runtime, every):
    from cai_engine.models.runtime import Runtime
    from cai_engine.plugins.registry import Registry

    cai_runtime.pm.register(KeywordCritic())
    runtime = Runtime(Registry(cai_runtime.pm))
    data = policy(critic="loud-critic", guard={"model_critics": True, "action": "refuse"})
    slow = StubUpstream(chat=lambda body: LONG, chunk_delay=0.01)
    options = ServeOptions(stream_model_every=every, stream_holdback=0)
    with slow, EngineServer(Engine.from_policy(data, runtime=runtime), slow.url, options=options) as guard:
        events = sse(post(guard, {"model": "m", "messages": QUESTION, "stream": True}))
    released = streamed_text(events[:-1])
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert LONG.startswith(released) and "loud" not in released  # never past what a model check passed
    if every:
        assert len(released) > LONG.index("blue")  # released in checked steps, up to just before "loud"
    else:
        assert released == ""  # a model check only at the end: nothing before it


def test_a_short_window_is_raised_so_a_number_in_small_chunks_is_seen(cai_runtime, tmp_path):
    from cai_engine.guard.engine import Engine
    from cai_engine.guard.serve import StreamGuard

    engine = Engine.from_policy(policy(add=[SECRET]), runtime=cai_runtime)
    try:
        stream = StreamGuard(engine, [], request_id="r", model="m", holdback=0, window=0)
        assert stream.window >= 64
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("messages", "tools"),
    [
        ([{"role": "user", "name": "hunter2", "content": "hi"}], None),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "reasoning_content": "hunter2"}],
            None,
        ),
        (
            [{"role": "user", "content": "hi"}],
            [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"properties": {"a": {"description": "hunter2"}}}},
                }
            ],
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c", "type": "custom", "custom": {"input": "x"}, "function": {"arguments": "hunter2"}}
                    ],
                },
            ],
            None,
        ),
    ],
    ids=["name", "reasoning_content", "tool parameter description", "custom call with function"],
)
def test_every_string_the_model_reads_is_checked(cai_runtime, messages, tools):
    from cai_engine.guard.engine import Engine

    engine = Engine.from_policy(policy(add=[SECRET], input={"check": True, "action": "redact"}), runtime=cai_runtime)
    try:
        check = engine.check_messages(messages, tools)
        assert check.violations
        # redacted where it was, or (tool arguments that would no longer be JSON) not repairable: refused
        assert not check.repairable or "hunter2" not in json.dumps([check.messages, check.tools])
    finally:
        engine.close()


def test_nested_strings_of_an_answer_are_guarded_too():
    from cai_engine.guard.serve import output_texts

    message = {
        "role": "assistant",
        "content": "hi",
        "audio": {"id": "a1", "transcript": "the code is hunter2"},
        "reasoning_details": [{"type": "text", "text": "think hunter2"}],
    }
    paths = {out.path: out.text for out in output_texts(message)}
    assert paths[("audio", "transcript")] == "the code is hunter2"
    assert paths[("reasoning_details", 0, "text")] == "think hunter2"
    assert ("role",) not in paths


@pytest.mark.parametrize("pool", ["aiohttp", "httpx"])
def test_either_connection_pool_tells_a_dead_upstream_from_a_slow_one(pool, monkeypatch):
    # with the `serve` extra the upstream client uses aiohttp's pool (httpx-aiohttp); without it, httpx's own
    import cai_engine.guard.serve as serve

    if pool == "aiohttp":
        pytest.importorskip("httpx_aiohttp")
    else:
        monkeypatch.setattr(serve, "_fast_transport", lambda limits: None)
    with StubUpstream(drip=0.02) as slow, GuardServer(policy(add=[SECRET]), slow.url, timeout=1) as guard:
        assert post(guard, {"model": "m", "messages": QUESTION}).json()["error"]["code"] == "upstream_timeout"
    upstream = StubUpstream().start()
    with GuardServer(policy(add=[SECRET]), upstream.url, timeout=5) as guard:
        asked = [{"role": "user", "content": "say hunter2"}]
        assert post(guard, {"model": "m", "messages": asked}).json()["choices"][0]["message"]["content"] == (
            "Stub answer to: say [redacted]"
        )
        assert streamed_text(sse(post(guard, {"model": "m", "messages": QUESTION, "stream": True}))) == (
            "Stub answer to: Name a colour."
        )
        upstream.stop()
        reply = post(guard, {"model": "m", "messages": QUESTION})
        assert reply.status_code == 502 and reply.json()["error"]["code"] == "upstream_unreachable"


# -- review of #32: health, unknown parts, upstream size, audit of a plain answer to a stream ------------------------


def audited(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if json.loads(line)["kind"] == "serve"]


def test_health_never_names_the_upstream_without_a_configured_key(upstream, monkeypatch):
    monkeypatch.delenv("CAI_SERVE_API_KEY", raising=False)  # no key: everyone may use the proxy, nobody sees where to
    with GuardServer(policy(), upstream.url) as guard:
        health = f"http://127.0.0.1:{guard.port}/health"
        for headers in ({}, {"authorization": "Bearer anything"}):
            shown = httpx.get(health, headers=headers).json()
            assert shown["status"] == "ok" and "upstream" not in shown and upstream.url not in json.dumps(shown)
    monkeypatch.setenv("CAI_SERVE_API_KEY", "s3cret")
    with GuardServer(policy(), upstream.url) as guard:
        health = f"http://127.0.0.1:{guard.port}/health"
        assert httpx.get(health, headers={"authorization": "Bearer wrong"}).json() == {"status": "ok"}
        assert httpx.get(health, headers={"authorization": "Bearer s3cret"}).json()["upstream"] == upstream.url


def test_every_string_of_an_unknown_part_type_is_checked_but_media_parts_are_not(upstream):
    new = {"type": "something_new", "text": "pw hunter2", "meta": {"note": "again hunter3"}}
    image = {"type": "image_url", "image_url": {"url": "https://example.com/hunter2.png"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}, new, image]}]
    with GuardServer(policy(add=[SECRET], input={"check": True, "action": "refuse"}), upstream.url) as guard:
        verdict = post(guard, {"model": "m", "messages": messages}).json()["cai_guard"]
        assert verdict["action"] == "refused" and verdict["input"]["principle_ids"] == ["pw-001"]
        assert upstream.bodies() == []
        with_image_only = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}, image]}]
        assert post(guard, {"model": "m", "messages": with_image_only}).json()["cai_guard"]["action"] == "none"
    with GuardServer(policy(add=[SECRET], input={"check": True, "action": "redact"}), upstream.url) as guard:
        assert post(guard, {"model": "m", "messages": messages}).status_code == 200
    sent = upstream.bodies()[-1]["messages"][0]["content"]
    assert sent[1] == {"type": "something_new", "text": "pw [redacted]", "meta": {"note": "again [redacted]"}}
    assert sent[2] == image  # a media part is passed as sent, unread


def test_every_string_of_an_unknown_part_type_in_an_answer_is_guarded():
    image = {"type": "image_url", "image_url": {"url": "https://example.com/hunter2.png"}}

    def respond(method, path, body):
        content = [{"type": "text", "text": "Here:"}, {"type": "something_new", "text": "it is hunter2"}, image]
        message = {"role": "assistant", "content": content}
        answer = {
            "id": "x",
            "object": "chat.completion",
            "model": "stub",
            "choices": [{"index": 0, "message": message}],
        }
        return 200, {}, json.dumps(answer).encode()

    with StubUpstream(respond=respond) as stub, GuardServer(policy(add=[SECRET]), stub.url) as guard:
        reply = post(guard, {"model": "m", "messages": QUESTION}).json()
    content = reply["choices"][0]["message"]["content"]
    assert content[1] == {"type": "something_new", "text": "it is [redacted]"} and content[2] == image
    assert reply["cai_guard"]["action"] == "revised"


def test_an_upstream_answer_over_the_limit_is_a_502_and_audited(tmp_path):
    big = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": "a" * 10_000}}]}

    def respond(method, path, body):
        return 200, {}, json.dumps(big).encode()

    log = tmp_path / "audit.jsonl"
    limited = ServeOptions(max_upstream_bytes=4096)
    with StubUpstream(respond=respond) as stub:
        with GuardServer(policy(audit={"path": str(log)}), stub.url, options=limited) as guard:
            reply = post(guard, {"model": "m", "messages": QUESTION})
            assert reply.status_code == 502 and reply.json()["error"]["code"] == "upstream_too_large"
            assert "4096 bytes" in reply.json()["error"]["message"]
            # a plain answer to a stream request is bounded the same way
            streamed = post(guard, {"model": "m", "messages": QUESTION, "stream": True})
            assert streamed.status_code == 502 and streamed.json()["error"]["code"] == "upstream_too_large"
            metrics = httpx.get(f"http://127.0.0.1:{guard.port}/metrics").text
            assert 'status="upstream_too_large"} 2' in metrics
        with GuardServer(policy(), stub.url, options=ServeOptions(max_upstream_bytes=20_000)) as guard:
            assert post(guard, {"model": "m", "messages": QUESTION}).status_code == 200  # under the limit: as before
    assert [r["status"] for r in audited(log)] == ["upstream_too_large", "upstream_too_large"]


def test_an_upstream_answer_without_a_length_is_counted_as_it_arrives():
    import asyncio

    from cai_engine.guard.serve import UpstreamTooLarge, _read_limited

    sent = []

    async def body():
        for _ in range(100):
            sent.append(1)
            yield b"x" * 1000

    async def read(limit):
        return await _read_limited(httpx.Response(200, content=body()), limit)

    with pytest.raises(UpstreamTooLarge):
        asyncio.run(read(4096))
    assert len(sent) == 5  # stopped at the chunk that passed the limit, not at the end
    sent.clear()
    assert len(asyncio.run(read(200_000))) == 100_000


def test_a_stream_line_over_the_limit_ends_the_stream_and_is_audited(tmp_path):
    def respond(method, path, body):
        chunk = {"id": "x", "object": "chat.completion.chunk", "model": "stub"}
        small = {**chunk, "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
        huge = {**chunk, "choices": [{"index": 0, "delta": {"content": "a" * 10_000}, "finish_reason": None}]}
        events = f"data: {json.dumps(small)}\n\ndata: {json.dumps(huge)}\n\ndata: [DONE]\n\n"
        return 200, {"Content-Type": "text/event-stream"}, events.encode()

    log = tmp_path / "audit.jsonl"
    with StubUpstream(respond=respond) as stub:
        options = ServeOptions(max_upstream_bytes=4096)
        with GuardServer(policy(audit={"path": str(log)}), stub.url, options=options) as guard:
            reply = post(guard, {"model": "m", "messages": QUESTION, "stream": True})
        events = sse(reply)
        assert events[-1]["error"]["code"] == "upstream_too_large" and "stream line" in events[-1]["error"]["message"]
        assert "a" * 100 not in reply.text
        with GuardServer(policy(), stub.url) as guard:  # the default limit (16 MiB) lets it through
            events = sse(post(guard, {"model": "m", "messages": QUESTION, "stream": True}))
            assert streamed_text(events) == "Hi" + "a" * 10_000
    assert [r["status"] for r in audited(log)] == ["upstream_too_large"]


def test_a_plain_answer_to_a_stream_request_is_audited_like_one_to_a_plain_request(tmp_path):
    def respond(method, path, body):
        return 200, {}, b'{"not": "a completion"}'

    log = tmp_path / "audit.jsonl"
    with StubUpstream(respond=respond) as stub, GuardServer(policy(audit={"path": str(log)}), stub.url) as guard:
        for stream in (False, True):
            reply = post(guard, {"model": "m", "messages": QUESTION, "stream": stream})
            assert reply.status_code == 502 and reply.json()["error"]["code"] == "upstream_bad_response"
    records = audited(log)
    assert [(r["status"], r["stream"]) for r in records] == [
        ("upstream_bad_response", False),
        ("upstream_bad_response", True),
    ]


def test_a_plain_completion_answering_a_stream_request_is_audited_as_ok(tmp_path, upstream):
    def respond(method, path, body):
        answer = upstream.chat_completion({**body, "stream": False})
        return 200, {}, json.dumps(answer).encode()

    log = tmp_path / "audit.jsonl"
    with StubUpstream(respond=respond) as stub, GuardServer(policy(audit={"path": str(log)}), stub.url) as guard:
        events = sse(post(guard, {"model": "m", "messages": QUESTION, "stream": True}))
        assert streamed_text(events) == "Stub answer to: Name a colour."
    served = audited(log)
    assert [r["status"] for r in served] == ["ok"] and served[0]["stream"] and served[0]["action"] == "none"
    assert served[0]["audit_id"] and served[0]["upstream_ms"] > 0


def test_cai_serve_sets_the_upstream_size_limit(cli_runner, upstream, tmp_path, monkeypatch):
    import uvicorn
    import yaml

    from cai_engine.cli import cli

    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: started.append(self.config))
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy()))
    args = ["serve", "--policy", str(path), "--upstream", upstream.url, "--port", str(free_port())]
    assert cli_runner.invoke(cli, args).exit_code == 0
    assert cli_runner.invoke(cli, [*args, "--max-upstream-bytes", "2048"]).exit_code == 0
    assert [config.app.state.options.max_upstream_bytes for config in started] == [16 << 20, 2048]
    too_small = cli_runner.invoke(cli, [*args, "--max-upstream-bytes", "100"])
    assert too_small.exit_code == 2 and "--max-upstream-bytes" in too_small.output


# -- found on review: every string a client receives, every read bounded, every failure classified -----------------


def test_every_string_an_answer_carries_is_checked(upstream):
    secret = rule("pw-009", r"\bhunter\d+")  # no fix: a field that breaks it is left out, a message part refused

    def respond(method, path, body):
        if method != "POST":
            return None
        answer = upstream.chat_completion(body)
        answer["prompt_logprobs"] = [{"decoded_token": "hunter42"}]  # a top-level field an upstream adds
        answer["choices"][0]["stop_reason"] = "hunter43"  # a choice-level one
        answer["choices"][0]["logprobs"] = {
            "content": [{"token": "Stub", "logprob": -0.1, "top_logprobs": []}],
            "other": [{"token": "x", "logprob": -0.1, "top_logprobs": [{"token": "hunter44", "logprob": -1.0}]}],
        }
        return 200, {}, json.dumps(answer).encode()

    upstream.respond = respond
    with GuardServer(policy(add=[secret]), upstream.url) as guard:
        reply = post(guard, {"model": "m", "messages": QUESTION})
        assert reply.status_code == 200 and "hunter4" not in reply.text
        choice = reply.json()["choices"][0]
        assert "stop_reason" not in choice and "prompt_logprobs" not in reply.json()
        assert choice["logprobs"]["other"][0]["top_logprobs"] == []


@pytest.mark.parametrize(
    "part",
    [
        {"type": "text", "text": {"value": "hunter42"}},  # a text part whose text is not a string
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}, "text": "hunter42"},  # a caption
    ],
)
def test_answer_parts_of_any_shape_are_read(upstream, part):
    def respond(method, path, body):
        if method != "POST":
            return None
        answer = upstream.chat_completion(body)
        answer["choices"][0]["message"]["content"] = [{"type": "text", "text": "Here."}, part]
        return 200, {}, json.dumps(answer).encode()

    upstream.respond = respond
    refusing = policy(add=[SECRET_NO_FIX], guard={"model_critics": False, "action": "refuse"})
    with GuardServer(refusing, upstream.url) as guard:
        reply = post(guard, {"model": "m", "messages": QUESTION})
        assert "hunter42" not in reply.text and reply.json()["cai_guard"]["action"] == "refused"


def test_a_caption_on_a_media_part_of_a_request_is_checked(upstream):
    with GuardServer(policy(add=[SECRET], input={"check": True, "action": "refuse"}), upstream.url) as guard:
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}, "text": "hunter42"}
        asked = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
        reply = post(guard, {"model": "m", "messages": asked})
        assert reply.json()["cai_guard"]["action"] == "refused" and not upstream.bodies()


def test_the_model_list_is_read_within_the_upstream_limit(upstream):
    big = {"object": "list", "data": [{"id": f"model-{i:06d}", "object": "model"} for i in range(40_000)]}
    upstream.respond = lambda method, path, body: (200, {}, json.dumps(big).encode()) if method == "GET" else None
    with GuardServer(policy(), upstream.url, options=ServeOptions(max_upstream_bytes=1024 * 1024)) as guard:
        reply = httpx.get(f"{guard.url}/models", timeout=20)
        assert reply.status_code == 502 and reply.json()["error"]["code"] == "upstream_too_large"


def test_a_stream_request_answered_plainly_and_too_slowly_is_a_timeout():
    stub = StubUpstream(drip=0.02)  # one byte every 20 ms: the plain answer takes seconds

    def respond(method, path, body):
        if method == "POST" and body.get("stream"):
            return 200, {}, json.dumps(stub.chat_completion({**body, "stream": False})).encode()
        return None

    stub.respond = respond
    with stub, GuardServer(policy(), stub.url, timeout=1) as guard:
        reply = post(guard, {"model": "m", "messages": QUESTION, "stream": True})
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "upstream_timeout"


def test_proxy_settings_keep_httpx_own_pool_and_its_timeouts_count_as_timeouts(monkeypatch):
    import httpcore

    import cai_engine.guard.serve as serve

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert serve._fast_transport(httpx.Limits()) is None  # httpx's own client reads the proxy settings
    try:
        raise httpx.ConnectTimeout("slow") from httpcore.ConnectTimeout("slow")
    except httpx.ConnectTimeout as exc:
        assert serve._timed_out(exc)


def test_only_an_answers_content_is_read_as_the_answer():
    """Plugin checks read the other strings of an answer's message (tool-call arguments, reasoning, annotations) as
    the rails do: a classifier trained on answers, or a check of what an answer lacks, has nothing to judge there."""
    from cai_engine.guard.serve import output_texts

    message = {
        "role": "assistant",
        "content": [{"type": "text", "text": "Part one.", "annotations": [{"title": "a source"}]}, "Part two."],
        "reasoning_content": "thinking",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"dose": "400 mg"}'}}],
    }
    answers = {out.text: out.answer for out in output_texts(message)}
    assert answers == {
        "Part one.": True,
        "Part two.": True,
        "a source": False,
        "thinking": False,
        '{"dose": "400 mg"}': False,
    }
    spoken = output_texts({"role": "assistant", "content": None, "audio": {"id": "a1", "transcript": "Said aloud."}})
    assert {out.text: out.answer for out in spoken}["Said aloud."] is True
    plain = output_texts({"role": "assistant", "content": "Hello."})
    assert [(out.text, out.answer) for out in plain] == [("Hello.", True)]
