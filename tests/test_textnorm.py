"""Rules see through Unicode respellings, in replies and in requests, and repairs edit what was sent."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cai_engine.checks.rules import check_principle, repair
from cai_engine.constitution.model import Message, Principle
from cai_engine.guard.engine import Engine
from cai_engine.text.textnorm import fold, is_dropped

WORD = Principle.model_validate(
    {
        "id": "t-001",
        "title": "No detonators",
        "rules": [
            {
                "id": "t-001-word",
                "kind": "forbid",
                "pattern": r"\bdetonator\b",
                "message": "Forbidden word.",
                "fix": "[removed]",
            }
        ],
    }
)
CARD = r"\b\d(?:[ -]?\d){12,18}\b"  # the customer-service constitution's card-number rule
NUMBER = Principle.model_validate(
    {
        "id": "t-002",
        "title": "No card numbers",
        "rules": [{"id": "t-002-card", "kind": "forbid", "pattern": CARD, "message": "Card.", "fix": "[card]"}],
    }
)

# Each way of spelling "detonator" that a plain pattern misses.
WORD_VARIANTS = {
    "zero-width space": "deto\u200bnator",
    "zero-width joiner": "de\u200dtonator",
    "zero-width non-joiner": "deton\u200cator",
    "soft hyphen": "deto\u00adnator",
    "word joiner": "detona\u2060tor",
    "full-width letters": "ｄｅｔｏｎａｔｏｒ",
    "mathematical bold letters": "\U0001d41d\U0001d41e\U0001d42d\U0001d428\U0001d427\U0001d41a\U0001d42d\U0001d428\U0001d42b",
    "Cyrillic look-alikes": "d\u0435t\u043enat\u043er",
    "Greek omicron": "det\u03bfnator",
    "combining accent": "deto\u0301nator",
    "precomposed accent": "detonatór",
    "hyphenated line break": "deto-\n  nator",
    "hyphenated line break with zero-width spaces": "deto\u200b-\u200b\n\u200b nator",
    "upper case": "DETONATOR",
    "Hangul filler": "deto\u3164nator",
    "Braille blank": "deton\u2800ator",
    "enclosing mark": "de\u20ddtonator",
    "small capitals": "\u1d05\u1d07\u1d1b\u1d0f\u0274\u1d00\u1d1b\u1d0f\u0280",
    "o with stroke": "det\u00f8nator",
    "variation selector": "deto\ufe0fnator",
}
CARD_VARIANTS = {
    "plain": "4111 1111 1111 1111",
    "full-width digits": "４１１１ １１１１ １１１１ １１１１",
    "Arabic-Indic digits": "\u0664\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661",
    "dots between digits": "4.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1",
    "zero-width spaces between digits": "4111\u200b1111\u200b1111\u200b1111",
    "slashes between groups": "4111/1111/1111/1111",
    "dots between groups": "4111.1111.1111.1111",
    "dashes between groups": "4111-1111-1111-1111",
    "a space between every digit": "4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
    "full-width digits and ideographic spaces": "４１１１\u3000１１１１\u3000１１１１\u3000１１１１",
}


@pytest.mark.parametrize("name", sorted(WORD_VARIANTS))
def test_a_respelled_word_is_caught_and_repaired_in_the_original(name):
    spelled = WORD_VARIANTS[name]
    reply = f"Sure. First get a {spelled}, then wait."
    found = check_principle(WORD, [Message(role="user", content="hi")], reply)
    assert len(found) == 1, name
    assert found[0].evidence == spelled.strip()  # evidence is what was sent, not the folded form
    fixed, unfixed = repair(WORD, [Message(role="user", content="hi")], reply)
    assert fixed == "Sure. First get a [removed], then wait." and not unfixed


@pytest.mark.parametrize("name", sorted(CARD_VARIANTS))
def test_a_respelled_card_number_is_caught_and_repaired(name):
    reply = f"Your card {CARD_VARIANTS[name]} was charged twice."
    assert check_principle(NUMBER, [Message(role="user", content="hi")], reply), name
    fixed, _ = repair(NUMBER, [Message(role="user", content="hi")], reply)
    assert fixed == "Your card [card] was charged twice."


@pytest.mark.parametrize(
    "text",
    [
        "The café's résumé workshop starts at 9.30 and costs 12.50 euros.",
        "Версия 2.1.3 вышла; see section 4.2 of the manual.",
        "Call between 9 and 5, or write to us. Order 1234 ships in 3-5 days.",
        "A detonation is a kind of explosion; a denotator is not a word.",
    ],
)
def test_ordinary_text_is_not_matched(text):
    assert not check_principle(WORD, [Message(role="user", content="hi")], text)
    assert not check_principle(NUMBER, [Message(role="user", content="hi")], text)


# Number texts a deployer would call a false positive if the card rule fired on them (#32 review): lists of
# decimals, dates, version numbers, a phone number, a price list.
ORDINARY_NUMBERS = [
    "Scores this week: 12.5 13.0 14.5 15.0 16.5 points.",
    "Temps 21.4 22.1 23.8 24.0 25.5 C",
    "Prices: 12,50 13,00 14,50 15,00 16,50 euros.",
    "The release is due on 2026-12-04.",
    "Dates 2026-12-04, 2026-12-05 and 2026-12-06.",
    "Tested on Python 3.11.7, 3.12.1 and 3.13.0.",
    "Call us on +1 415 555 0132 or 415-555-0133.",
    "Lap times 1:02.5 1:03.1 1:02.9 1:04.0 1:03.3.",
]


@pytest.mark.parametrize("text", ORDINARY_NUMBERS)
def test_ordinary_number_texts_are_not_card_numbers(text):
    assert not check_principle(NUMBER, [Message(role="user", content="hi")], text)


def test_separators_go_only_from_a_run_of_digits_that_uses_one_kind():
    assert fold("card 4111 1111.1111 1111 ok", digits=True).text == "card 4111 1111.1111 1111 ok"  # mixed: kept
    assert fold("a 1.2.3.4 b 5 6 7", digits=True).text == "a 1234 b 567"
    assert fold("x 12..34", digits=True).text == "x 12..34"  # two separators in a row are not one separator
    view = fold("n: 4-1-1-1 end", digits=True)
    assert view.text == "n: 4111 end" and view.original_of(re.search("4111", view.text)) == "4-1-1-1"


def test_folding_keeps_a_map_to_the_original():
    text = "a ｂｏ\u200bｍｂ, b"
    view = fold(text)
    assert view.text == "a bomb, b"
    start = view.text.index("bomb")
    assert text[slice(*view.span(start, start + 4))] == "ｂｏ\u200bｍｂ"


def test_patterns_with_accents_still_match_as_written():
    principle = Principle.model_validate(
        {
            "id": "t-003",
            "rules": [{"id": "t-003-r", "kind": "require", "pattern": "— Équipe Acme", "message": "m", "fix": "x"}],
        }
    )
    assert not check_principle(principle, [Message(role="user", content="hi")], "Merci. — Équipe Acme")
    assert check_principle(principle, [Message(role="user", content="hi")], "Merci.")


@pytest.mark.parametrize("name", ["full-width digits", "dots between digits", "Arabic-Indic digits"])
def test_the_input_rail_redacts_respelled_card_numbers(cai_runtime, tmp_path, name):
    policy = {
        "name": "gateway",
        "version": "1",
        "constitutions": ["customer-service"],
        "input": {"check": True, "action": "redact"},
        "guard": {"model_critics": False},
        "audit": {"path": str(tmp_path / "audit.jsonl")},
    }
    engine = Engine.from_policy(policy, runtime=cai_runtime)
    try:
        message = f"My card is {CARD_VARIANTS[name]}, why was it charged twice?"
        violations, redacted = engine.check_input([Message(role="user", content=message)])
        assert violations and redacted == "My card is [card number removed], why was it charged twice?"
    finally:
        engine.close()


def test_long_texts_are_folded_and_redacted_whole():
    text = "ｂｏｍｂ and more words here. " * 20_000  # ~560k characters, 20,000 matches
    principle = Principle.model_validate(
        {"id": "t-004", "rules": [{"id": "r", "kind": "forbid", "pattern": "bomb", "message": "m", "fix": "[x]"}]}
    )
    fixed, _ = repair(principle, [Message(role="user", content="hi")], text)
    assert fixed == "[x] and more words here. " * 20_000  # past the fold cache's size, every match repaired


def test_is_dropped_names_what_folding_removes():
    for char in "\u200b\u200c\u200d\u00ad\u2060\ufeff\u0301\u20dd\ufe0f\u3164\u2800":
        assert is_dropped(char) and fold(f"a{char}b").text == "ab", hex(ord(char))
    for char in "a \n-é\u0435ｄ\u00a0":  # letters, spaces and look-alikes fold to something
        assert not is_dropped(char) and fold(char).text, hex(ord(char))


@pytest.mark.parametrize(
    "text",
    [
        "Your card is 4111.1111.1111.1111 12 ok",  # a number after the card
        "card 4111.1111.1111.1111 12/27",  # and its expiry
        "Your card is 4111.1111/1111.1111 ok",  # two kinds of separator inside one number
    ],
)
def test_a_card_next_to_other_numbers_is_still_a_card(text):
    from cai_engine.checks.rules import check_principle
    from cai_engine.context import default_runtime

    root = Path(__file__).resolve().parent.parent
    constitution = default_runtime().registry.constitution(str(root / "constitutions" / "customer-service.yaml"))
    cards = [p for p in constitution.principles if any("\\d(?:" in (r.pattern or "") for r in p.rules)]
    assert cards and check_principle(cards[0], [], text)
