"""The embedding API: ``Engine.from_policy(...)`` and the runtime guard.

    engine = Engine.from_policy("policy.yaml")
    result = engine.guard(conversation, response)        # or await engine.aguard(...), engine.guard_batch(...)
    result.response, result.compliant, result.violations

Components and models load lazily, once. Every guard decision is emitted as an audit record through the
``cai_on_record`` hook (kind ``guard``), and appended to the policy's JSONL audit file when it names one.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai_engine.checks.rules import RULES
from cai_engine.constitution.model import Constitution, Message, Phase, Principle
from cai_engine.guard.components import GuardComponents
from cai_engine.guard.loop import Guard
from cai_engine.guard.policy import Policy, load_policy
from cai_engine.models.runtime import Runtime
from cai_engine.records import (
    ComparisonTask,
    Critique,
    CritiqueTask,
    GuardResult,
    Judgement,
    Revision,
    RevisionTask,
    Violation,
    as_conversation,
)


class Engine:
    """A policy bound to a runtime: critique, revise, compare and guard, single or batched, sync or async.

    Its components (and the audit sink) are one :class:`~cai_engine.guard.components.GuardComponents`, built here
    and handed to each guard pass.
    """

    def __init__(self, policy: Policy, *, runtime: Runtime | None = None, base_dir: Path | None = None) -> None:
        self.components = GuardComponents(policy, runtime or Runtime.default(), base_dir)
        self.policy = policy
        self.runtime = self.components.runtime
        self.constitution: Constitution = self.components.constitution
        self.runtime_principles = self.components.principles
        self.policy_info = self.components.policy_info

    def model_problems(self) -> list[tuple[str, str]]:
        """``(role, problem)`` for each model the guard would load that cannot be found (checked without loading:
        a missing folder or file, a catalogue model not installed). Endpoints are not contacted."""
        return self.components.model_problems()

    @classmethod
    def from_policy(cls, source: str | Path | dict[str, Any], *, runtime: Runtime | None = None) -> Engine:
        """Load a policy file (YAML/JSON) or mapping and build an engine for it."""
        policy, base_dir = load_policy(source)
        return cls(policy, runtime=runtime, base_dir=base_dir)

    def close(self) -> None:
        """Flush and unregister the policy's audit sink."""
        self.components.close()

    # -- building blocks -------------------------------------------------------------------------------------

    def _principles(self, ids: Sequence[str] | None) -> list[Principle]:
        if ids is None:
            return self.runtime_principles
        return [self.constitution.principle(pid) for pid in ids]

    def critique(self, conversation, response: str, principles: Sequence[str] | None = None) -> list[Critique]:
        """Rule and model critiques of one response against the policy's principles (all runtime ones by default)."""
        return self.critique_batch([(conversation, response)], principles)[0]

    def critique_batch(self, items, principles: Sequence[str] | None = None) -> list[list[Critique]]:
        chosen = self._principles(principles)
        out: list[list[Critique]] = []
        tasks = []
        for conversation, response in items:
            conv = as_conversation(conversation)
            out.append(
                list(
                    self.components.rule_critic.critique(
                        [CritiqueTask(conversation=conv, response=response, principle=p) for p in chosen if p.rules]
                    )
                )
            )
            tasks += [
                (
                    len(out) - 1,
                    CritiqueTask(
                        conversation=conv, response=response, principle=p, examples=self.constitution.examples
                    ),
                )
                for p in chosen
                if p.critique_request
            ]
        if tasks and self.policy.guard.model_critics:
            for (index, _), critique in zip(tasks, self.components.critic.critique([t for _, t in tasks])):
                out[index].append(critique)
        return out

    def revise(self, conversation, response: str, principle: str, critique: str | None = None) -> Revision:
        """One revision of ``response`` for ``principle`` (rule repair when the rules can fix it, else the model)."""
        conv = as_conversation(conversation)
        p = self.constitution.principle(principle)
        task = RevisionTask(
            conversation=conv, response=response, principle=p, critique=critique, examples=self.constitution.examples
        )
        return self.revise_batch([task])[0]

    def revise_batch(self, tasks: Sequence[RevisionTask]) -> list[Revision]:
        return self.components.reviser.revise(list(tasks))

    def compare(
        self, conversation, response_a: str, response_b: str, principles: Sequence[str] | None = None
    ) -> Judgement:
        """Which response follows the principles better (both orders, averaged); defaults to every rl principle."""
        chosen = (
            [self.constitution.principle(p) for p in principles]
            if principles
            else self.constitution.for_phase(Phase.rl)
        )
        task = ComparisonTask(
            conversation=as_conversation(conversation),
            response_a=response_a,
            response_b=response_b,
            principles=chosen,
            examples=self.constitution.comparison_examples,
        )
        return self.components.judge.compare([task])[0]

    # -- the guard -------------------------------------------------------------------------------------------

    def check_input(self, conversation) -> tuple[list[Violation], str | None]:
        """The input rail on a conversation: the runtime principles' ``forbid`` rules and plugin checks applied to
        every message (each earlier turn reaches the model too, not only the last user message). Returns the
        violations and the last user message, redacted where needed; None instead of the message when some
        violation, in any message, cannot be repaired deterministically, or when there is no user message.
        :meth:`check_messages` does the same over OpenAI chat messages and returns every redacted message."""
        conversation = as_conversation(conversation)
        check = self.check_messages([{"role": m.role, "content": m.content} for m in conversation])
        last = max((i for i, m in enumerate(conversation) if m.role == "user"), default=None)
        if last is None or not check.repairable:
            return check.violations, None
        return check.violations, check.messages[last]["content"]

    def check_messages(
        self,
        messages: Any,
        tools: Any = None,
        *,
        fields: dict[str, Any] | None = None,
        rules: bool = True,
        max_context_chars: int = 8_000,
    ) -> InputCheck:
        """The input rail over OpenAI chat messages (dicts, as a chat-completions request holds them).

        Every text the model will read is checked, in every role (system, developer, user, assistant, tool):
        string content, lists of strings, parts of type ``text``, ``input_text``, ``output_text`` and ``refusal``,
        an assistant message's ``refusal``, the ``arguments`` of its ``tool_calls`` (and of a legacy
        ``function_call``), and each tool's ``description`` in ``tools``. The text parts of one message are also
        checked joined, so a word split across two parts is found. Parts the rail cannot read (images, audio,
        files, unknown part types) are listed in ``non_text``, never dropped; every string of a part of an unknown
        type is checked as well. A redaction edits only the string that held the match; every other part and field
        stays as sent. ``fields`` are the request's other fields
        whose strings may reach the model (a legacy ``functions`` list, a ``response_format`` schema, parameters
        the guard does not know): every string in them is checked too, and redacted in ``InputCheck.fields``.
        ``rules=False`` only reads and validates.

        :raises InputShapeError: a message or part that is not in the chat format (``param`` names it).
        """
        slots, non_text = read_chat_messages(messages, tools)
        fields = dict(fields or {})
        for key, value in fields.items():
            slots += [_Slot(path, at, text, -1) for path, at, text in strings_in(value, ("fields", key), key)]
        check = InputCheck(messages=list(messages), tools=tools, fields=fields, non_text=non_text)
        check.conversation = _conversation_of(messages)
        if not rules:
            return check
        changed: dict[tuple[Any, ...], str] = {}
        for slot in slots:
            context = _context(check.conversation, slot.message, max_context_chars)
            text = slot.checked_text()
            violations, redacted = self.check_text(context, text)
            if not violations:
                continue
            check.violations += violations
            check.findings.append(InputFinding(where=slot.where, violations=violations, redacted=redacted))
            value = slot.written(redacted) if redacted is not None else None
            if value is None:
                check.repairable = False
            else:
                changed[slot.path] = value
        by_message: dict[int, list[_Slot]] = {}
        for slot in slots:
            if slot.joinable:
                by_message.setdefault(slot.message, []).append(slot)
        for index, parts in by_message.items():
            if len(parts) < 2:
                continue
            texts = [changed.get(s.path, s.text) for s in parts]
            context = _context(check.conversation, index, max_context_chars)
            # what each part still shows on its own, as it will be sent (after its redaction): anything else the
            # joined text shows spans parts
            seen = {
                (v.principle_id, v.rule_id, v.critic, v.evidence)
                for t in texts
                for v in self._rail_violations(context, t)
            }
            for joined in dict.fromkeys(["".join(texts), "\n".join(texts)]):
                violations = [
                    v
                    for v in self._rail_violations(context, joined)
                    if (v.principle_id, v.rule_id, v.critic, v.evidence) not in seen
                ]
                if violations:  # a match that spans parts: no single part can be redacted to remove it
                    check.violations += violations
                    check.findings.append(InputFinding(f"messages[{index}].content", violations, None))
                    check.repairable = False
                    break
        if changed:
            root = {
                "messages": copy.deepcopy(list(messages)),
                "tools": copy.deepcopy(tools),
                "fields": copy.deepcopy(fields),
            }
            for path, value in changed.items():
                target: Any = root
                for key in path[:-1]:
                    target = target[key]
                target[path[-1]] = value
            check.messages, check.tools, check.fields = root["messages"], root["tools"], root["fields"]
            check.conversation = _conversation_of(check.messages)
        return check

    def check_text(self, context: list[Message], text: str) -> tuple[list[Violation], str | None]:
        """The input rail on one text: what the runtime principles' ``forbid`` rules and plugin checks find in it
        (``require`` rules say what a reply must contain, so they do not apply to what a model is sent; a plugin check
        runs on its rules alone, without a classifier, and one that judges what an answer lacks not at all), and the
        text repaired by their deterministic fixes, re-checked; None when a violation cannot be repaired so."""
        violations = self._rail_violations(context, text)
        if not violations:
            return [], text
        redacted = text
        by_id = {p.id: p for p in self.runtime_principles}
        for pid in sorted({v.principle_id for v in violations}, key=lambda p: -by_id[p].authority):
            for critic in sorted({v.critic for v in violations if v.principle_id == pid}):
                repairer = self.components.repairer(critic, rail=True)
                if repairer is None:
                    return violations, None
                principle = by_id[pid]
                if critic == RULES:  # the rule reviser applies every violated rule's fix: no require fixes here
                    forbid = [r for r in principle.rules if r.kind != "require"]
                    principle = principle.model_copy(update={"rules": forbid})
                revision = repairer.revise(
                    [
                        RevisionTask(
                            conversation=context or [Message(role="user", content="")],
                            response=redacted,
                            principle=principle,
                        )
                    ]
                )[0]
                if not revision.accepted:
                    return violations, None
                redacted = revision.text
        if self._rail_violations(context, redacted):  # a fix that leaves (or brings) a match
            return violations, None
        return violations, redacted

    def _rail_violations(self, context: list[Message], text: str) -> list[Violation]:
        return [
            v
            for v in self.components.deterministic_violations(context, text, rail=True)
            if not (v.critic == RULES and v.rule_id in self._require_rule_ids)
        ]

    @functools.cached_property
    def _require_rule_ids(self) -> frozenset[str]:
        return frozenset(r.id for p in self.runtime_principles for r in p.rules if r.kind == "require")

    def guard(self, conversation, response: str) -> GuardResult:
        """Check ``response`` against the policy and act on violations (revise, refuse or flag)."""
        return self.guard_batch([(conversation, response)])[0]

    async def aguard(self, conversation, response: str) -> GuardResult:
        """The guard for async web services: runs in a worker thread so the event loop stays free."""
        return await asyncio.to_thread(self.guard, conversation, response)

    async def aguard_batch(self, items, answers=None) -> list[GuardResult]:
        """``guard_batch`` in a worker thread, so the event loop stays free."""
        return await asyncio.to_thread(self.guard_batch, items, answers)

    def guard_batch(self, items, answers=None) -> list[GuardResult]:
        """Guard many (conversation, response) pairs; model work is batched across them. ``answers`` (one flag an
        item, default all true) marks the texts that are not an answer but another string of its message (a tool
        call's arguments, reasoning): a plugin check backed by a classifier reads those on its rules alone."""
        return Guard(self.components).run(items, answers)

    def refusal_text(self, violations: list[Violation]) -> str:
        """The policy's refusal message naming the violated principles."""
        return self.components.refusal(violations)


# -- reading chat messages for the input rail ----------------------------------------------------------------------

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# Part types whose text the rail reads (chat completions and the Responses API), and the key holding the text.
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
# Part types the rail knows carry media, not words (their base64 data, URLs and ids are not text the model reads):
# listed in ``non_text`` and left unchecked. A part of any other type is listed too, and every string in it checked
# (#32: a new part type may well carry text).
BINARY_PARTS = frozenset(
    {"image_url", "input_image", "image", "input_audio", "audio", "file", "input_file", "video_url", "input_video"}
)
# A conversation for rules and critics has three roles; what else the model reads is the closest of them.
_GUARD_ROLE = {"developer": "system", "tool": "user", "function": "user"}


class InputShapeError(ValueError):
    """A chat message or part that is not in the OpenAI chat format; ``param`` names it (``messages[2].content``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class InputFinding:
    """Violations in one checked string, where it is, and its redacted text (None: it cannot be repaired)."""

    where: str
    violations: list[Violation]
    redacted: str | None


@dataclass
class InputCheck:
    """What :meth:`Engine.check_messages` found: ``messages``, ``tools`` and ``fields`` are the redacted copies (what
    it was given when nothing was redacted), ``repairable`` is False when some violation cannot be redacted away,
    ``non_text`` names the parts the rail cannot read, and ``conversation`` is the messages' text for the guard."""

    messages: list[Any]
    tools: Any = None
    fields: dict[str, Any] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    findings: list[InputFinding] = field(default_factory=list)
    repairable: bool = True
    non_text: list[str] = field(default_factory=list)
    conversation: list[Message] = field(default_factory=list)


@dataclass(frozen=True)
class _Slot:
    """One string the model will read: its path in the request body, and whether it is JSON (tool arguments)."""

    path: tuple[Any, ...]
    where: str
    text: str
    message: int  # index of its message; -1 for a tool description
    joinable: bool = False  # a text part of a message's content (checked joined with the other parts too)
    is_json: bool = False

    def checked_text(self) -> str:
        """The text the rules see. Tool arguments are JSON: checked with escapes undone (``\\u0068unter2`` is
        ``hunter2`` to the model), as compact JSON."""
        return json_text(self.text) if self.is_json else self.text

    def written(self, redacted: str) -> str | None:
        """The value to send for this slot once its checked text is redacted (None: redacted JSON is no JSON)."""
        if self.is_json and redacted != self.checked_text():
            try:
                json.loads(redacted)
            except (ValueError, RecursionError):
                return None
        return redacted if redacted != self.checked_text() else self.text


def read_chat_messages(messages: Any, tools: Any = None) -> tuple[list[_Slot], list[str]]:
    """Every string the model will read in ``messages`` (and ``tools``), and the parts it cannot read.

    :raises InputShapeError: naming the first message, part or field that is not in the chat format.
    """
    if not isinstance(messages, list) or not messages:
        raise InputShapeError("'messages' must be a non-empty list of messages", "messages")
    slots: list[_Slot] = []
    non_text: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InputShapeError(f"{where} must be an object with a role and content", where)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InputShapeError(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, not {role!r}", f"{where}.role")
        content = message.get("content")
        base = ("messages", i)
        if isinstance(content, str):
            slots.append(_Slot((*base, "content"), f"{where}.content", content, i, joinable=True))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                if isinstance(part, str):
                    slots.append(_Slot((*base, "content", j), at, part, i, joinable=True))
                    continue
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise InputShapeError(f"{at} must be a string or an object with a type", at)
                key = TEXT_PARTS.get(part["type"])
                if key is None:
                    non_text.append(f"{at} ({part['type']})")
                    slots += [
                        _Slot(path, w, text, i)
                        for path, w, text in unknown_part_strings(part, (*base, "content", j), at)
                    ]
                    continue
                if not isinstance(part.get(key), str):
                    raise InputShapeError(f"{at} of type {part['type']!r} needs a string {key!r}", f"{at}.{key}")
                slots.append(_Slot((*base, "content", j, key), f"{at}.{key}", part[key], i, joinable=True))
        elif content is not None:
            raise InputShapeError(f"{where}.content must be a string, a list of parts or null", f"{where}.content")
        if "refusal" in message and message["refusal"] is not None:
            if not isinstance(message["refusal"], str):
                raise InputShapeError(f"{where}.refusal must be a string", f"{where}.refusal")
            slots.append(_Slot((*base, "refusal"), f"{where}.refusal", message["refusal"], i))
        calls = message.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise InputShapeError(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
            for k, call in enumerate(calls):
                at = f"{where}.tool_calls[{k}]"
                if not isinstance(call, dict):
                    raise InputShapeError(f"{at} must be an object", at)
                if isinstance(call.get("custom"), dict) and call.get("type") == "custom":  # free-text tool input
                    slots.append(
                        _Slot(
                            (*base, "tool_calls", k, "custom", "input"),
                            f"{at}.custom.input",
                            _string(call["custom"].get("input"), f"{at}.custom.input"),
                            i,
                        )
                    )
                    if "function" not in call:
                        continue
                function = call.get("function")
                if not isinstance(function, dict):
                    raise InputShapeError(
                        f"{at}.function must be an object with a name and arguments", f"{at}.function"
                    )
                arguments = _string(function.get("arguments"), f"{at}.function.arguments")
                path: tuple[Any, ...] = (*base, "tool_calls", k, "function", "arguments")
                slots.append(_Slot(path, f"{at}.function.arguments", arguments, i, is_json=True))
        legacy = message.get("function_call")
        if legacy is not None:
            if not isinstance(legacy, dict):
                raise InputShapeError(f"{where}.function_call must be an object", f"{where}.function_call")
            arguments = _string(legacy.get("arguments"), f"{where}.function_call.arguments")
            path = (*base, "function_call", "arguments")
            slots.append(_Slot(path, f"{where}.function_call.arguments", arguments, i, is_json=True))
        # every other string a chat template may render (a name, reasoning_content, a field this code does not know)
        for key, value in message.items():
            if key not in _READ_FIELDS:
                for path, at, text in strings_in(value, (*base, key), f"{where}.{key}"):
                    slots.append(_Slot(path, at, text, i))
    if tools is not None:
        if not isinstance(tools, list):
            raise InputShapeError("'tools' must be a list", "tools")
        for t, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise InputShapeError(f"tools[{t}] must be an object", f"tools[{t}]")
            # names, descriptions, parameter schemas (their descriptions and enum values): all rendered to the model
            for key, value in tool.items():
                if key != "type":
                    for path, at, text in strings_in(value, ("tools", t, key), f"tools[{t}].{key}"):
                        slots.append(_Slot(path, at, text, -1))
    return slots, non_text


# Message fields read above, or not text the model reads as content (the role, a tool call's id).
_READ_FIELDS = frozenset({"role", "content", "refusal", "tool_calls", "function_call", "tool_call_id"})


def strings_in(value: Any, path: tuple[Any, ...], where: str) -> Iterator[tuple[tuple[Any, ...], str, str]]:
    """Every string inside ``value`` (nested objects and lists), with its path and a readable location."""
    if isinstance(value, str):
        yield path, where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings_in(item, (*path, key), f"{where}.{key}")
    elif isinstance(value, list):
        for k, item in enumerate(value):
            yield from strings_in(item, (*path, k), f"{where}[{k}]")


def unknown_part_strings(
    part: dict[str, Any], path: tuple[Any, ...], where: str
) -> Iterator[tuple[tuple[Any, ...], str, str]]:
    """Every string of a content part the model may read as words: of a part of a type this code does not know, all
    but its ``type``; of a media part (an image, audio, a file), all but its ``type`` and its payload (the field named
    like the type, or ``url``/``data``/``file_data``), so a caption or a stray ``text`` field is read too."""
    media = part.get("type") in BINARY_PARTS
    for key, value in part.items():
        if key == "type" or (media and key in (part.get("type"), "url", "data", "file_data", "file_id")):
            continue
        yield from strings_in(value, (*path, key), f"{where}.{key}")


def _string(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputShapeError(f"{where} must be a string", where)
    return value


def json_text(text: str) -> str:
    """JSON text as a model reads it: escapes undone, compact (the text itself when it is not JSON)."""
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except (ValueError, RecursionError):
        return text


def _conversation_of(messages: list[Any]) -> list[Message]:
    """The messages as the guard's three-role conversation: each one's readable text, joined."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts = []
            for part in content:
                if isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, dict) and part.get("type") in TEXT_PARTS:
                    value = part.get(TEXT_PARTS[part["type"]])
                    texts.append(value if isinstance(value, str) else "")
            text = "\n".join(texts)
        else:
            text = ""
        role = message["role"]
        out.append(Message(role=_GUARD_ROLE.get(role, role), content=text))
    return out


def _context(conversation: list[Message], index: int, max_chars: int) -> list[Message]:
    """The turns before message ``index`` that rules and checks see as its context: the latest ones, at most
    ``max_chars`` characters in all (a long conversation is checked in linear, not quadratic, time)."""
    if index <= 0:
        return []
    out: list[Message] = []
    budget = max_chars
    for message in reversed(conversation[:index]):
        if budget <= 0:
            break
        text = message.content[-budget:]
        out.append(message if text == message.content else Message(role=message.role, content=text))
        budget -= len(text)
    return out[::-1]
