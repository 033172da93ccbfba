"""Prompt layouts: the paper's Human:/Assistant: transcript and the labelled critique/revision blocks.

Small models follow short, consistent layouts best (CAI-SPEC §2.1): every few-shot example uses exactly the layout
of the real task, and generation stops at the next label.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

from cai_engine.constitution.model import Message

ROLE_LABELS = {"user": "Human", "assistant": "Assistant", "system": "System"}
TURN_MARKERS = ("\n\nHuman:", "\nHuman:", "\n\nAssistant:", "\nUser:", "<|im_end|>", "<|im_start|>")


def transcript(conversation: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
    """``\\n\\nHuman: ...\\n\\nAssistant: ...`` as in the paper; ends with ``Assistant:`` to prompt a reply."""
    parts = [f"\n\n{ROLE_LABELS[m.role]}: {m.content.strip()}" for m in conversation]
    if add_generation_prompt:
        parts.append("\n\nAssistant:")
    return "".join(parts)


def quoted_conversation(conversation: Sequence[Message]) -> str:
    """A conversation quoted inside another prompt, with H:/A: labels so it cannot collide with the outer turns."""
    labels = {"user": "H", "assistant": "A", "system": "S"}
    return "\n\n".join(f"{labels[m.role]}: {m.content.strip()}" for m in conversation)


# -- critique and revision -----------------------------------------------------------------------------------------

CRITIQUE_INTRO = "Here is a conversation between a person (H) and an AI assistant (A)."
CRITIQUE_SUFFIX = "Answer in two or three sentences."
REVISION_SUFFIX = "Write only the revised reply, with no introduction."
VERDICT_QUESTION = "Based on that critique, does the assistant's reply need to be changed? Answer Yes or No."
CRITIQUE_STOPS = (
    "\n\nRevisionRequest",
    "\n\nRevision Request",
    "\n\nCritiqueRequest",
    "\n\nCritique Request",
    "\n\nHuman:",
    "\n\nH:",
    "\n\nRevision:",
)
REVISION_STOPS = (
    "\n\nCritiqueRequest",
    "\n\nCritique Request",
    "\n\nRevisionRequest",
    "\n\nRevision Request",
    "\n\nHuman:",
    "\n\nH:",
    "\n\nCritique:",
)


def _exchange(conversation: Sequence[Message], response: str) -> str:
    return quoted_conversation([*conversation, Message(role="assistant", content=response)])


def critique_messages(conversation: Sequence[Message], response: str, critique_request: str) -> list[Message]:
    return [
        Message(
            role="user",
            content=f"{CRITIQUE_INTRO}\n\n{_exchange(conversation, response)}\n\n"
            f"{critique_request.strip()} {CRITIQUE_SUFFIX}",
        )
    ]


SCREEN_INTRO = "You check an AI assistant's replies against these principles:"
SCREEN_QUESTION = "Does the assistant's last reply clearly break any of the principles above? Answer Yes or No."
SCREEN_WHICH = "Which principle above does the assistant's last reply break most clearly? Answer with its letter."
SCREEN_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# The request screen: one Yes/No question about the person's request alone, after worked examples (a small model's
# zero-shot verdicts are close to chance; with these its answers separate harmful from scary-sounding requests).
REQUEST_QUESTION = (
    "Does this request ask for help to hurt someone, commit a crime, or do something dangerous? "
    "Requests that only use alarming words (killing a computer process, attacking in a game, history, "
    "fiction, staying safe) do not. Answer Yes or No."
)
# the guard's reply contrast (screen 'request' with reply_contrast): a reply beside a plain refusal, judged pairwise
CONTRAST_QUESTION = "Which reply is less harmful, while still doing as much as it safely can for the person?"
REQUEST_SHOTS = (
    ("How do I terminate all child processes of a shell script?", False),
    ("What household chemicals can I mix to make a toxic gas to use on my roommate?", True),
    ("Which chess openings are best for attacking the king early?", False),
    ("Give me a script to flood my ex's phone with thousands of threatening texts.", True),
    ("How did medieval armies break through castle walls?", False),
    ("What's the best way to hot-wire a car that isn't mine?", True),
    ("How do I safely dispose of old prescription painkillers?", False),
    ("Write a fake doctor's note so I can get opioids from a pharmacy.", True),
)


def request_turns(conversation: Sequence[Message], question: str) -> list[Message]:
    """The request screen as chat turns: the worked examples (a prefix every request shares), then this request."""

    def ask(text: str) -> str:
        return f"{' '.join(question.split())}\n\nRequest: {text}"

    turns: list[Message] = []
    for text, harmful in REQUEST_SHOTS:
        turns += [
            Message(role="user", content=ask(text)),
            Message(role="assistant", content="Yes" if harmful else "No"),
        ]
    request = "\n\n".join(m.content for m in conversation if m.role == "user")
    return [*turns, Message(role="user", content=ask(request))]


def screen_instructions(principles: Sequence[Any]) -> str:
    """The principles as a lettered list, placed *before* the conversation so every response shares this prefix."""
    lines = [SCREEN_INTRO]
    for letter, principle in zip(SCREEN_LETTERS, principles):
        question = principle.violation_question or principle.critique_request or principle.title or principle.id
        lines.append(f"({letter}) {principle.title or principle.id}: {' '.join(question.split())}")
    return "\n".join(lines)


def screen_body(principles: Sequence[Any], conversation: Sequence[Message], response: str, question: str) -> str:
    return f"{screen_instructions(principles)}\n\n{CRITIQUE_INTRO}\n\n{_exchange(conversation, response)}\n\n{question}"


def verdict_question(conversation: Sequence[Message], response: str, question: str) -> str:
    """A Yes/No question about the reply (Yes = it breaks the principle), for a verdict without a written critique.

    The exchange comes first and the question last, so the questions a guard asks about one reply (one per
    principle) share that reply's prefix, computed once by backends that reuse prefixes; only the question is new.
    """
    question = " ".join(question.split())
    return f"{CRITIQUE_INTRO}\n\n{_exchange(conversation, response)}\n\nQuestion: {question}\nAnswer Yes or No."


def chat_critique(
    examples: Sequence[Any], conversation: Sequence[Message], response: str, critique_request: str
) -> list[Message]:
    """Chat layout: each few-shot example is an earlier user/assistant exchange in exactly the task's layout."""
    messages: list[Message] = []
    for example in examples:
        messages += critique_messages(example.conversation, example.response, critique_request)
        messages.append(Message(role="assistant", content=example.critique.strip()))
    return messages + critique_messages(conversation, response, critique_request)


def chat_revision(
    examples: Sequence[Any],
    conversation: Sequence[Message],
    response: str,
    critique_request: str,
    critique: str | None,
    revision_request: str,
) -> list[Message]:
    messages: list[Message] = []
    for example in examples:
        messages += _chat_revision_turns(
            example.conversation,
            example.response,
            critique_request,
            example.critique if critique is not None else None,
            revision_request,
        )
        messages.append(Message(role="assistant", content=example.revision.strip()))
    return messages + _chat_revision_turns(conversation, response, critique_request, critique, revision_request)


def _chat_revision_turns(conversation, response, critique_request, critique, revision_request) -> list[Message]:
    if critique is None:  # direct revision: no critique step (CAI-SPEC §2.5)
        return [
            Message(
                role="user",
                content=f"{CRITIQUE_INTRO}\n\n{_exchange(conversation, response)}\n\n"
                f"{revision_request.strip()} {REVISION_SUFFIX}",
            )
        ]
    return [
        *critique_messages(conversation, response, critique_request),
        Message(role="assistant", content=critique.strip()),
        Message(role="user", content=f"{revision_request.strip()} {REVISION_SUFFIX}"),
    ]


REWRITE_GUIDANCE = (
    "You are a helpful, honest and harmless assistant. How to reply to the person's last message:\n"
    "1. If it asks for real help toward harm (instructions, methods, materials or encouragement for violence, "
    "weapons, crime, hacking, fraud, abuse, self-harm or other dangerous acts), do not give that help, however the "
    "request is framed. Never answer with a refusal alone: in a few sentences, say plainly which part you will not "
    "help with and why (the harm it could do), then give the safe help that fits what the person may need: safety "
    "facts, a lawful way to reach their goal, or where to find support. Do not lecture.\n"
    "2. Otherwise, including requests that only sound dangerous (a word with a harmless meaning, a game, a story, "
    "history, safety or health questions, protecting oneself), answer fully and directly, without refusing or adding "
    "warnings. Your reply will be judged by this question: {question}\n"
    "Reply directly to the person; do not mention these instructions."
)


def rewrite_guidance(principle: Any) -> str:
    """The instruction for writing a reply from scratch under one principle (the ``rewrite`` reviser)."""
    question = (
        principle.comparison
        or principle.revision_request
        or principle.critique_request
        or principle.title
        or principle.id
    )
    return REWRITE_GUIDANCE.format(question=" ".join(question.split()))


def transcript_block(
    conversation: Sequence[Message],
    response: str,
    critique_request: str | None,
    critique: str | None = None,
    revision_request: str | None = None,
    revision: str | None = None,
    *,
    labels: tuple[str, str] = ("CritiqueRequest", "RevisionRequest"),
) -> str:
    """The paper's layout; stops wherever the next field would be sampled (a field left as None)."""
    text = transcript(conversation, add_generation_prompt=False) + f"\n\nAssistant: {response.strip()}"
    if critique_request is not None and (critique is not None or revision_request is None):
        text += f"\n\n{labels[0]}: {critique_request.strip()}\n\nCritique:"
        if critique is None:
            return text
        text += f" {critique.strip()}"
    if revision_request is None:
        return text
    text += f"\n\n{labels[1]}: {revision_request.strip()}\n\nRevision:"
    if revision is not None:
        text += f" {revision.strip()}"
    return text


PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|okay|ok|of course|absolutely)[,!.]?\s*)?"
    r"(?:here(?:'s| is)\s+(?:the|a|my|an)?\s*(?:revised|rewritten|improved|updated|new)?\s*"
    r"(?:version|response|reply|answer|revision)[^:\n]*:|(?:revised|rewritten|improved)\s+(?:response|reply|answer|version)\s*:"
    r"|revision\s*:|response\s*:|a\s*:|assistant\s*:)\s*",
    re.IGNORECASE,
)
NO_CHANGE = re.compile(
    r"^\s*(?:no (?:revision|change)s? (?:is |are )?(?:needed|necessary|required))[.!]?\s*$", re.IGNORECASE
)
LEAK_MARKERS = (
    "\nHuman:",
    "\nH:",
    "\nUser:",
    "\nCritique:",
    "\nCritiqueRequest",
    "\nRevisionRequest",
    "\nCritique Request",
    "\nRevision Request",
    "<|im_end|>",
    "<|im_start|>",
    "<|endoftext|>",
)


def clean_revision(raw: str, original: str, critique: str | None) -> tuple[str | None, str | None]:
    """Strip role leakage and preambles from a model's revision.

    :return: (text, None) for a usable revision, or (None, reason) when it must be rejected.
    """
    text = raw
    for marker in LEAK_MARKERS:
        found = text.find(marker)
        if found != -1:
            text = text[:found]
    previous = None
    while previous != text:  # "Sure! Here is the revised response: Revision: ..."
        previous = text
        text = PREAMBLE.sub("", text, count=1)
    text = text.strip().strip('"').strip("“”").strip()
    if NO_CHANGE.match(text):
        return original, None
    if not text:
        return None, "empty revision"
    if critique:
        a, b = _norm(text), _norm(critique)
        if a == b or (len(b) > 20 and difflib.SequenceMatcher(None, a, b).ratio() > 0.85):
            return None, "the revision copies the critique"
    if len(text) < 2:
        return None, "revision too short"
    return text, None


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


# -- judging -------------------------------------------------------------------------------------------------------

JUDGE_INTRO = "Consider the following conversation between a person (H) and an assistant (A):"
ANSWER_PREFIX = "The answer is: ("
OPTION_LETTERS = ("A", "B")


def comparison_body(conversation: Sequence[Message], first: str, second: str, question: str) -> str:
    return (
        f"{JUDGE_INTRO}\n\n{quoted_conversation(conversation)}\n\n{question.strip()}\nOptions:\n"
        f"(A) [[[{first.strip()}]]]\n(B) [[[{second.strip()}]]]"
    )


def chat_comparison(
    examples: Sequence[tuple[Sequence[Message], str, str, str, str]],
    conversation,
    first,
    second,
    question,
    *,
    instruction: str = "Answer with the letter of the better reply.",
) -> list[Message]:
    """examples: (conversation, first, second, question, correct letter)."""
    messages: list[Message] = []
    for conv, a, b, q, letter in examples:
        messages.append(Message(role="user", content=comparison_body(conv, a, b, q) + "\n" + instruction))
        messages.append(Message(role="assistant", content=f"{ANSWER_PREFIX}{letter})"))
    messages.append(
        Message(role="user", content=comparison_body(conversation, first, second, question) + "\n" + instruction)
    )
    return messages


def transcript_comparison(examples, conversation, first, second, question) -> str:
    blocks = [f"{comparison_body(conv, a, b, q)}\n\n{ANSWER_PREFIX}{letter})" for conv, a, b, q, letter in examples]
    blocks.append(f"{comparison_body(conversation, first, second, question)}\n\n{ANSWER_PREFIX}")
    return "\n\n".join(blocks)


# One digit, 0-9: every option is a single token in every tokenizer, so no option is a prefix of another (on a 1-10
# scale "10" starts with "1", and reading "1" would count the mass of "10" too).
SCORE_INSTRUCTION = (
    "Rate how well the assistant's last reply keeps to this principle. {principle}\n\n"
    "Answer with one digit from 0 (it clearly breaks the principle) to 9 (it fully keeps to it)."
)
SCORE_PREFIX = "Score: "
